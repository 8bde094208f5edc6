"""
The STUN server: Twisted adapters around
:class:`~nattraverse.stun.responder.BindingResponder`.

- UDP: one socket, or four (two addresses by two ports) for RFC 5780.  Each
  datagram is answered from the socket the responder chooses, to the
  request's source (or RESPONSE-PORT).  Nothing is kept per source.
  Binding requests that authenticate with a rendezvous UDP binding token
  (``bindings``) report their source to its rendezvous connection; only
  over UDP, never over TCP.
- TCP: STUN framed over a stream (RFC 8489 section 6.2.2), with an idle
  timeout, a cap on message size and a cap on concurrent connections.

Nothing a peer sends raises into the reactor: malformed input is counted
in :class:`~nattraverse.stun.responder.ServerStats` and dropped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IReactorFDSet,
    IReactorTCP,
    IReactorUDP,
)
from twisted.internet.protocol import DatagramProtocol, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.stun.constants import HEADER_LENGTH
from nattraverse.stun.fastpath import MAX_DATAGRAM, FastStunPort
from nattraverse.stun.message import frame_length
from nattraverse.stun.responder import (
    PRIMARY,
    BindingResponder,
    Bindings,
    Reply,
    ServerAddresses,
    ServerStats,
    SocketKey,
)

#: The socket on the primary address and the second port.
SECOND_PORT = SocketKey(0, 1)

_log = Logger()

#: Largest STUN message accepted over TCP.  Binding requests are small;
#: this bounds the memory a connection can hold.
MAX_TCP_MESSAGE = 8192


class StunDatagramProtocol(DatagramProtocol):
    """
    Answers the datagrams of one of the server's UDP sockets.
    """

    def __init__(self, server: StunServer, key: SocketKey) -> None:
        self.server = server
        self.key = key

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        server = self.server
        try:
            reply = server.responder.respond(datagram, Endpoint(addr[0], addr[1]), self.key)
            if reply is not None:
                server.send(reply)
        except Exception:
            server.stats_internal_errors += 1
            _log.failure("STUN server failed to answer {source}", source=addr)


class StunStreamProtocol(Protocol, TimeoutMixin):
    """
    Answers STUN requests framed over one TCP connection.

    The idle timer restarts only when a whole message has arrived, so a peer
    that trickles bytes or leaves a message half sent is disconnected after
    the timeout.
    """

    def __init__(self, server: StunServer) -> None:
        self.server = server
        self._buffer = bytearray()
        self._source = Endpoint("0.0.0.0", 0)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's clock: the server's reactor, not the global one."""
        return self.server.reactor.callLater(period, func)  # type: ignore[no-any-return]

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        assert isinstance(peer, IPv4Address | IPv6Address)
        self._source = Endpoint(peer.host, peer.port)
        self.server._streams.add(self)
        self.setTimeout(self.server.tcp_idle_timeout)  # type: ignore[no-untyped-call]
        # Stop reading while our answers wait in the send buffer: a peer
        # that sends requests and never reads the answers is then cut off by
        # the idle timeout instead of filling our memory with them.
        transport = self.transport
        transport.registerProducer(transport, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            if buffer[0] >= 0x40:
                self.server.stats.dropped_not_stun += 1
                self._drop("not STUN")
                return
            size = frame_length(buffer)
            if size > MAX_TCP_MESSAGE or size < HEADER_LENGTH:
                self.server.stats.dropped_malformed += 1
                self._drop(f"message of {size} bytes")
                return
            if len(buffer) < size:
                return
            message = bytes(buffer[:size])
            del buffer[:size]
            self.resetTimeout()  # type: ignore[no-untyped-call]
            try:
                reply = self.server.responder.respond(message, self._source, PRIMARY, stream=True)
            except Exception:
                self.server.stats_internal_errors += 1
                _log.failure("STUN server failed to answer {source}", source=self._source)
                reply = None
            if reply is not None:
                self.transport.write(reply.payload)  # type: ignore[union-attr]

    def _drop(self, why: str) -> None:
        _log.debug("closing STUN/TCP connection from {source}: {why}", source=self._source, why=why)
        self._buffer.clear()
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        self.transport.abortConnection()  # type: ignore[union-attr]

    def timeoutConnection(self) -> None:
        self.server.tcp_timeouts += 1
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        self.server.tcp_connections -= 1
        self.server._streams.discard(self)


class _StunStreamFactory(ServerFactory):
    def __init__(self, server: StunServer) -> None:
        self.server = server

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        server = self.server
        if server.tcp_connections >= server.max_tcp_connections:
            server.tcp_refused += 1
            return None
        server.tcp_connections += 1
        return StunStreamProtocol(server)


class StunServer(Service):
    """
    A STUN server on UDP and TCP.

    :param reactor: Provides UDP, TCP and time.
    :param interface: The primary address to listen on (``"0.0.0.0"`` for
        all; a specific address when *alt_address* is given).
    :param port: The primary port (0 picks one; see :meth:`endpoint`).
    :param alt_address: A second address of this host: turns on RFC 5780
        and the RFC 3489 CHANGED-ADDRESS.
    :param alt_port: The second port, used with *alt_address*, and with
        *second_port*.
    :param second_port: Listen on *alt_port* of the primary address even
        without *alt_address*: a peer that binds there too, from the socket
        it bound at the primary port, learns whether its NAT maps per
        destination (:meth:`second_port_number`).
    :param software: SOFTWARE text for every answer; ``None`` keeps answers
        small.
    :param tcp: Whether to serve STUN over TCP on the primary address and
        port too.
    :param tcp_idle_timeout: Seconds a TCP connection may stay without a
        complete request.
    :param max_tcp_connections: Concurrent TCP connections; more are closed
        at once.
    :param fast_path: Use the lean UDP receive loop for plain Binding
        requests, where the reactor supports it.
    :param bindings: The rendezvous' UDP binding tokens
        (:class:`~nattraverse.rendezvous.udpbind.UdpBindings`): Binding
        requests over UDP that authenticate with one report their source
        to its connection.  ``None``: every request is answered alike.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        interface: str = "0.0.0.0",
        port: int = 3478,
        alt_address: str | None = None,
        alt_port: int = 3479,
        software: str | None = None,
        tcp: bool = True,
        tcp_idle_timeout: float = 10.0,
        max_tcp_connections: int = 1000,
        fast_path: bool = True,
        bindings: Bindings | None = None,
        second_port: bool = False,
    ) -> None:
        if alt_address is not None and (
            not interface or ipaddress.ip_address(interface).is_unspecified
        ):
            raise ValueError(
                "RFC 5780 needs the primary address: give a specific interface "
                "address together with alt_address"
            )
        self.reactor = reactor
        self.interface = interface
        self.port = port
        self.alt_address = alt_address
        self.alt_port = alt_port
        self.second_port = second_port
        self.tcp = tcp
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.fast_path = fast_path
        self.stats = ServerStats()
        self.responder = BindingResponder(software=software, stats=self.stats, bindings=bindings)
        self.stats_internal_errors = 0
        self.send_errors = 0
        self.tcp_connections = 0
        self.tcp_refused = 0
        self.tcp_timeouts = 0
        # Open TCP connections, closed by stopService with the listeners.
        self._streams: set[StunStreamProtocol] = set()
        self._udp: dict[SocketKey, Any] = {}
        # Plain Binding requests may skip the responder only when its answer
        # to them is the minimal one.
        self._fast_enabled = alt_address is None and self.responder.fast_path_allowed
        self._tcp: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        try:
            self._listen()
        except BaseException:
            self.running = False
            self._close_all()
            raise

    def _listen(self) -> None:
        primary = self._listen_udp(PRIMARY, self.interface, self.port)
        primary_port = primary.getHost().port
        if self.alt_address is not None:
            alt = self._listen_udp(SECOND_PORT, self.interface, self.alt_port)
            alt_port = alt.getHost().port
            self._listen_udp(SocketKey(1, 0), self.alt_address, primary_port)
            self._listen_udp(SocketKey(1, 1), self.alt_address, alt_port)
            self.responder.addresses = ServerAddresses(
                Endpoint(self.interface, primary_port), Endpoint(self.alt_address, alt_port)
            )
        elif self.second_port:
            self._listen_udp(SECOND_PORT, self.interface, self.alt_port)
        if self.tcp:
            if not IReactorTCP.providedBy(self.reactor):
                raise TypeError(
                    "StunServer(tcp=True) needs a reactor providing IReactorTCP; pass tcp=False"
                )
            self._tcp = self.reactor.listenTCP(
                primary_port, _StunStreamFactory(self), interface=self.interface
            )
        _log.info(
            "STUN server on {endpoints} (RFC 5780: {rfc5780})",
            endpoints=", ".join(str(self.endpoint(k)) for k in sorted(self._udp)),
            rfc5780=self.alt_address is not None,
        )

    def _listen_udp(self, key: SocketKey, interface: str, port: int) -> Any:
        protocol = StunDatagramProtocol(self, key)
        if self.fast_path and IReactorFDSet.providedBy(self.reactor):
            listening: Any = FastStunPort(
                port,
                protocol,
                enabled=self._fast_enabled,
                interface=interface,
                reactor=self.reactor,
            )
            listening.startListening()
        else:
            if not IReactorUDP.providedBy(self.reactor):
                raise TypeError("StunServer needs a reactor providing IReactorUDP")
            listening = self.reactor.listenUDP(
                port, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM
            )
        self._udp[key] = listening
        return listening

    @property
    def fast_answers(self) -> int:
        """Plain Binding requests answered by the fast path (not in :attr:`stats`)."""
        return sum(getattr(port, "fast_answers", 0) for port in self._udp.values())

    def second_port_number(self) -> int:
        """The port of the primary address's second socket, 0 when there is none."""
        if SECOND_PORT not in self._udp:
            return 0
        return self.endpoint(SECOND_PORT).port

    def endpoint(self, key: SocketKey = PRIMARY) -> Endpoint:
        """The address of a listening UDP socket (the real port when 0 was asked)."""
        host = self._udp[key].getHost()
        return Endpoint(host.host, host.port)

    def send(self, reply: Reply) -> None:
        """Send a reply from the socket it names; a failed send is counted."""
        try:
            self._udp[reply.via].write(reply.payload, reply.destination)
        except (OSError, KeyError, MessageLengthError) as e:
            # Twisted turns EMSGSIZE into MessageLengthError, not an OSError:
            # an RFC 5780 answer echoing a near-64 KiB PADDING is too long.
            self.send_errors += 1
            _log.debug("STUN reply to {dest} not sent: {error}", dest=reply.destination, error=e)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self._close_all()

    def _close_all(self) -> defer.Deferred[None]:
        ports: list[Any] = list(self._udp.values())
        if self._tcp is not None:
            ports.append(self._tcp)
        self._udp.clear()
        self._tcp = None
        for stream in list(self._streams):
            stream.transport.abortConnection()  # type: ignore[union-attr]
        results = [defer.maybeDeferred(p.stopListening) for p in ports]
        return defer.gatherResults(results).addCallback(lambda _: None)
