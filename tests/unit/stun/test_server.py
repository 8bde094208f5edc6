"""
The STUN server's Twisted adapters on a fake reactor: which sockets
:class:`StunServer` opens and closes, which socket each answer leaves from,
and STUN over TCP (framing, idle timeout, size and connection caps) on a
``StringTransport`` with the fake reactor's clock.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.interfaces import IListeningPort, IReactorUDP
from twisted.internet.protocol import DatagramProtocol, Protocol, ServerFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse._types import Endpoint
from nattraverse.stun.attributes import (
    ChangeRequest,
    ErrorCode,
    OtherAddress,
    ResponseOrigin,
    ResponsePort,
    UnknownAttribute,
    UnknownAttributes,
    XorMappedAddress,
)
from nattraverse.stun.constants import MAGIC_COOKIE_BYTES, MessageClass, Method
from nattraverse.stun.message import Message, decode, encode, frame_length
from nattraverse.stun.responder import PRIMARY, BindingResponder, Reply, SocketKey
from nattraverse.stun.server import MAX_TCP_MESSAGE, StunServer, StunStreamProtocol

A = "192.0.2.1"
B = "192.0.2.2"
P = 3478
Q = 3479
CLIENT = Endpoint("198.51.100.7", 40000)
TXID = bytes(range(1, 13))
AP, AQ, BP, BQ = SocketKey(0, 0), SocketKey(0, 1), SocketKey(1, 0), SocketKey(1, 1)


def request(
    *attributes: Any, txid: bytes = TXID, message_class: int = MessageClass.REQUEST
) -> bytes:
    """A Binding message, by default a request."""
    return encode(Method.BINDING, message_class, txid, attributes)


# -- a fake reactor with UDP ---------------------------------------------------------


def _address(kind: str, host: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in host:
        return IPv6Address(kind, host, port)  # type: ignore[arg-type]
    return IPv4Address(kind, host, port)  # type: ignore[arg-type]


@implementer(IListeningPort)
class FakeUdpPort:
    """A listening UDP port that records what is written through it."""

    def __init__(self, host: str, port: int, protocol: DatagramProtocol) -> None:
        self.host = host
        self.port = port
        self.protocol = protocol
        self.listening = True
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.write_error: OSError | None = None

    def startListening(self) -> None:
        """Already listening."""

    def stopListening(self) -> None:
        self.listening = False

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address("UDP", self.host, self.port)

    def write(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.written.append((datagram, addr))

    def receive(self, datagram: bytes, source: Endpoint = CLIENT) -> None:
        """Hand the protocol a datagram, as the reactor would."""
        self.protocol.datagramReceived(datagram, (source.host, source.port))


@implementer(IListeningPort)
class FakeTcpPort:
    """A listening TCP port that keeps its factory."""

    def __init__(self, host: str, port: int, factory: ServerFactory[Protocol]) -> None:
        self.host = host
        self.port = port
        self.factory = factory
        self.listening = True

    def startListening(self) -> None:
        """Already listening."""

    def stopListening(self) -> None:
        self.listening = False

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address("TCP", self.host, self.port)


@implementer(IReactorUDP)
class FakeReactor(MemoryReactorClock):
    """
    A ``MemoryReactorClock`` with ``listenUDP``; port 0 picks 50000, 50001,
    ...  Addresses in :attr:`refuse` fail with ``CannotListenError``.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.udp: list[FakeUdpPort] = []
        self.tcp: list[FakeTcpPort] = []
        self.refuse: set[tuple[str, int]] = set()
        self._next_port = 50000

    def _bind(self, interface: str, port: int) -> int:
        if (interface, port) in self.refuse:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "in use"))
        if port == 0:
            port, self._next_port = self._next_port, self._next_port + 1
        return port

    def listenUDP(
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> FakeUdpPort:
        listening = FakeUdpPort(interface, self._bind(interface, port), protocol)
        self.udp.append(listening)
        return listening

    def listenTCP(
        self, port: int, factory: ServerFactory[Protocol], backlog: int = 50, interface: str = ""
    ) -> FakeTcpPort:
        listening = FakeTcpPort(interface, self._bind(interface, port), factory)
        self.tcp.append(listening)
        return listening

    def udp_port(self, host: str, port: int) -> FakeUdpPort:
        """The UDP port listening on *host*, *port*."""
        (found,) = [p for p in self.udp if (p.host, p.port) == (host, port)]
        return found


def started(reactor: FakeReactor, **kwargs: Any) -> StunServer:
    """A StunServer on *reactor*, started (fast path off: the fake has no sockets)."""
    kwargs.setdefault("interface", A)
    kwargs.setdefault("port", P)
    server = StunServer(reactor, fast_path=False, **kwargs)
    server.startService()
    return server


def written(port: FakeUdpPort) -> list[tuple[Message, tuple[str, int]]]:
    """What was written through *port*, decoded."""
    return [(decode(data), addr) for data, addr in port.written]


# -- the service --------------------------------------------------------------------


def test_defaults() -> None:
    """The server's defaults: port 3478 on all addresses, 10 s idle timeout, 1000 connections."""
    server = StunServer(FakeReactor())
    assert (server.interface, server.port) == ("0.0.0.0", 3478)
    assert (server.alt_address, server.alt_port) == (None, 3479)
    assert server.responder.software is None
    assert server.tcp_idle_timeout == 10.0
    assert server.max_tcp_connections == 1000


def test_listens_on_udp_and_tcp() -> None:
    """One UDP socket and one TCP listener, on the same address and port."""
    reactor = FakeReactor()
    started(reactor)
    assert [(p.host, p.port) for p in reactor.udp] == [(A, P)]
    assert [(p.host, p.port) for p in reactor.tcp] == [(A, P)]


def test_tcp_follows_allocated_udp_port() -> None:
    """With port 0, TCP listens on the port UDP got, and endpoint() names it."""
    reactor = FakeReactor()
    server = started(reactor, port=0)
    assert server.endpoint() == Endpoint(A, 50000)
    assert [(p.host, p.port) for p in reactor.tcp] == [(A, 50000)]


def test_no_tcp_when_disabled() -> None:
    """tcp=False opens no TCP listener."""
    reactor = FakeReactor()
    started(reactor, tcp=False)
    assert reactor.tcp == []


def test_rfc5780_four_sockets() -> None:
    """With a second address: two addresses by two ports, and TCP on the primary only."""
    reactor = FakeReactor()
    server = started(reactor, alt_address=B, alt_port=Q)
    assert sorted((p.host, p.port) for p in reactor.udp) == [(A, P), (A, Q), (B, P), (B, Q)]
    assert [server.endpoint(k) for k in (AP, AQ, BP, BQ)] == [
        Endpoint(A, P),
        Endpoint(A, Q),
        Endpoint(B, P),
        Endpoint(B, Q),
    ]
    assert [(p.host, p.port) for p in reactor.tcp] == [(A, P)]


def test_rfc5780_port_zero_reuses_allocated_ports() -> None:
    """With ports 0, the second address listens on the ports the first one got."""
    reactor = FakeReactor()
    server = started(reactor, port=0, alt_address=B, alt_port=0)
    primary, alternate = server.endpoint(AP).port, server.endpoint(AQ).port
    assert primary != alternate
    assert server.endpoint(BP) == Endpoint(B, primary)
    assert server.endpoint(BQ) == Endpoint(B, alternate)


def test_alt_address_needs_specific_interface() -> None:
    """RFC 5780 with a wildcard primary address is refused at construction."""
    with pytest.raises(ValueError, match="interface"):
        StunServer(FakeReactor(), alt_address=B)


def test_start_failure_closes_opened_ports() -> None:
    """When a socket cannot be opened, those already open are closed and the error raised."""
    reactor = FakeReactor()
    reactor.refuse.add((B, P))
    with pytest.raises(CannotListenError):
        started(reactor, alt_address=B, alt_port=Q)
    assert [p.listening for p in reactor.udp] == [False, False]


def test_start_failure_leaves_service_stopped() -> None:
    """A service whose sockets could not be opened does not claim to be running."""
    reactor = FakeReactor()
    reactor.refuse.add((B, P))
    server = StunServer(reactor, interface=A, port=P, alt_address=B, alt_port=Q)
    with pytest.raises(CannotListenError):
        server.startService()
    assert not server.running


def test_stop_closes_every_port() -> None:
    """stopService closes all four UDP sockets and the TCP listener."""
    reactor = FakeReactor()
    server = started(reactor, alt_address=B, alt_port=Q)
    stopping = server.stopService()
    assert [p.listening for p in reactor.udp] == [False] * 4
    assert [p.listening for p in reactor.tcp] == [False]
    assert not server.running
    assert stopping.called


# -- UDP ------------------------------------------------------------------------------


def test_udp_answer_to_source() -> None:
    """A Binding request over UDP is answered from the same socket to its source."""
    reactor = FakeReactor()
    started(reactor)
    port = reactor.udp_port(A, P)
    port.receive(request())
    [(message, addr)] = written(port)
    assert addr == CLIENT
    assert message.get(XorMappedAddress) == XorMappedAddress(CLIENT)


def test_udp_change_request_from_other_socket() -> None:
    """CHANGE-REQUEST (IP and port) is answered from the socket of the other address and port."""
    reactor = FakeReactor()
    started(reactor, alt_address=B, alt_port=Q)
    reactor.udp_port(A, P).receive(request(ChangeRequest(True, True)))
    assert reactor.udp_port(A, P).written == []
    [(message, addr)] = written(reactor.udp_port(B, Q))
    assert addr == CLIENT
    assert message.get(ResponseOrigin) == ResponseOrigin(Endpoint(B, Q))


def test_udp_change_port_from_alternate_port() -> None:
    """CHANGE-REQUEST (port) received on the alternate address leaves from its other port."""
    reactor = FakeReactor()
    started(reactor, alt_address=B, alt_port=Q)
    reactor.udp_port(B, Q).receive(request(ChangeRequest(change_port=True)))
    [(message, _)] = written(reactor.udp_port(B, P))
    assert message.get(OtherAddress) == OtherAddress(Endpoint(A, P))


def test_udp_response_port() -> None:
    """RESPONSE-PORT sends the answer to that port of the client's address."""
    reactor = FakeReactor()
    started(reactor, alt_address=B, alt_port=Q)
    reactor.udp_port(A, P).receive(request(ResponsePort(41000)))
    [(message, addr)] = written(reactor.udp_port(A, P))
    assert addr == (CLIENT.host, 41000)
    assert message.get(XorMappedAddress) == XorMappedAddress(CLIENT)


def test_udp_change_request_without_second_address() -> None:
    """Without a second address CHANGE-REQUEST gets 420 from the receiving socket."""
    reactor = FakeReactor()
    started(reactor)
    port = reactor.udp_port(A, P)
    port.receive(request(ChangeRequest(True, True)))
    [(message, addr)] = written(port)
    assert addr == CLIENT
    assert message.get(ErrorCode) is not None
    assert message.get(UnknownAttributes) == UnknownAttributes((0x0003,))


def test_udp_not_stun_dropped() -> None:
    """A datagram that is not STUN is dropped and counted."""
    reactor = FakeReactor()
    server = started(reactor)
    port = reactor.udp_port(A, P)
    port.receive(b"\x80\x60" + bytes(30))
    assert port.written == []
    assert server.stats.dropped_not_stun == 1


def test_udp_send_error_counted() -> None:
    """A failed send is counted, never raised into the reactor."""
    reactor = FakeReactor()
    server = started(reactor)
    port = reactor.udp_port(A, P)
    port.write_error = OSError(errno.EPERM, "filtered")
    port.receive(request())
    assert server.send_errors == 1


class BrokenResponder(BindingResponder):
    """A responder with a bug."""

    def respond(
        self, data: bytes, source: Endpoint, local: SocketKey = PRIMARY, *, stream: bool = False
    ) -> Reply | None:
        raise RuntimeError("bug")


def test_udp_responder_failure_counted() -> None:
    """A bug in the responder is counted and logged, never raised into the reactor."""
    reactor = FakeReactor()
    server = started(reactor)
    server.responder = BrokenResponder()
    reactor.udp_port(A, P).receive(request())
    assert server.stats_internal_errors == 1


# -- TCP ------------------------------------------------------------------------------


def connect(
    reactor: FakeReactor, peer: Endpoint = CLIENT
) -> tuple[Protocol | None, StringTransport]:
    """Offer the server's TCP factory a connection from *peer*."""
    address = _address("TCP", peer.host, peer.port)
    protocol: Protocol | None = reactor.tcp[0].factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    if protocol is not None:
        protocol.makeConnection(transport)
    return protocol, transport


def connected(reactor: FakeReactor, peer: Endpoint = CLIENT) -> tuple[Protocol, StringTransport]:
    """A connection the server accepted."""
    protocol, transport = connect(reactor, peer)
    assert isinstance(protocol, StunStreamProtocol)
    return protocol, transport


def responses(transport: StringTransport) -> list[Message]:
    """The messages written to *transport*, split by their length fields."""
    data, messages = transport.value(), []
    while data:
        size = frame_length(data)
        messages.append(decode(data[:size]))
        data = data[size:]
    return messages


def closed(transport: StringTransport) -> bool:
    """Whether the server closed (aborted) the connection."""
    return bool(transport.disconnected)


def close(protocol: Protocol) -> None:
    """The connection ends, as the reactor would tell the protocol."""
    protocol.connectionLost(Failure(ConnectionDone()))


def test_tcp_request_answered() -> None:
    """A Binding request over TCP gets the peer's address back on the stream."""
    reactor = FakeReactor()
    started(reactor)
    protocol, transport = connected(reactor)
    protocol.dataReceived(request())
    [message] = responses(transport)
    assert message.get(XorMappedAddress) == XorMappedAddress(CLIENT)


def test_tcp_ipv6_peer() -> None:
    """An IPv6 peer gets its IPv6 address."""
    reactor = FakeReactor()
    started(reactor)
    peer = Endpoint("2001:db8::7", 40000)
    protocol, transport = connected(reactor, peer)
    protocol.dataReceived(request())
    [message] = responses(transport)
    assert message.get(XorMappedAddress) == XorMappedAddress(peer)


def test_tcp_request_in_single_bytes() -> None:
    """A request written one byte at a time is answered once complete."""
    reactor = FakeReactor()
    started(reactor)
    protocol, transport = connected(reactor)
    data = request(UnknownAttribute(0xC0DE, b"12345678"))
    for i in range(len(data) - 1):
        protocol.dataReceived(data[i : i + 1])
    assert transport.value() == b""
    protocol.dataReceived(data[-1:])
    [message] = responses(transport)
    assert message.message_class is MessageClass.SUCCESS


def test_tcp_two_requests_in_one_write() -> None:
    """Two requests in one write are both answered, in order."""
    reactor = FakeReactor()
    started(reactor)
    protocol, transport = connected(reactor)
    second = bytes(range(20, 32))
    protocol.dataReceived(request() + request(txid=second))
    assert [m.transaction_id for m in responses(transport)] == [TXID, second]


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", b"\x80\x00\x00\x00"])
def test_tcp_not_stun_closes(data: bytes) -> None:
    """A stream whose first byte cannot start STUN (0x40 or more) is closed and counted."""
    reactor = FakeReactor()
    server = started(reactor)
    protocol, transport = connected(reactor)
    protocol.dataReceived(data)
    assert closed(transport)
    assert transport.value() == b""
    assert server.stats.dropped_not_stun == 1


def test_tcp_oversized_message_closes() -> None:
    """A declared message larger than MAX_TCP_MESSAGE closes the connection."""
    reactor = FakeReactor()
    server = started(reactor)
    protocol, transport = connected(reactor)
    length = MAX_TCP_MESSAGE - 20 + 4
    protocol.dataReceived(b"\x00\x01" + length.to_bytes(2, "big") + MAGIC_COOKIE_BYTES)
    assert closed(transport)
    assert server.stats.dropped_malformed == 1


def test_tcp_largest_message_answered() -> None:
    """A message of exactly MAX_TCP_MESSAGE bytes is still answered."""
    reactor = FakeReactor()
    started(reactor)
    protocol, transport = connected(reactor)
    data = request(UnknownAttribute(0xC0DE, bytes(MAX_TCP_MESSAGE - 24)))
    assert len(data) == MAX_TCP_MESSAGE
    protocol.dataReceived(data)
    assert not closed(transport)
    [message] = responses(transport)
    assert message.message_class is MessageClass.SUCCESS


def test_tcp_response_ignored_connection_kept() -> None:
    """A well-framed STUN message that is not a request is dropped; the connection stays."""
    reactor = FakeReactor()
    server = started(reactor)
    protocol, transport = connected(reactor)
    protocol.dataReceived(request(message_class=MessageClass.SUCCESS) + request())
    assert not closed(transport)
    assert server.stats.dropped_not_request == 1
    assert len(responses(transport)) == 1


def test_tcp_change_request_rfc5780_gets_400() -> None:
    """Over TCP in RFC 5780 mode, CHANGE-REQUEST gets 400 on the stream."""
    reactor = FakeReactor()
    started(reactor, alt_address=B, alt_port=Q)
    protocol, transport = connected(reactor)
    protocol.dataReceived(request(ChangeRequest(True, False)))
    [message] = responses(transport)
    error = message.get(ErrorCode)
    assert error is not None
    assert error.code == 400


def test_tcp_idle_timeout_closes_silent_connection() -> None:
    """A connection that sends nothing is closed after tcp_idle_timeout, not before."""
    reactor = FakeReactor()
    server = started(reactor, tcp_idle_timeout=4.0)
    _, transport = connected(reactor)
    reactor.advance(3.9)
    assert not closed(transport)
    reactor.advance(0.2)
    assert closed(transport)
    assert server.tcp_timeouts == 1


def test_tcp_idle_timeout_closes_half_sent_message() -> None:
    """A message left half sent is closed after tcp_idle_timeout."""
    reactor = FakeReactor()
    server = started(reactor)
    protocol, transport = connected(reactor)
    protocol.dataReceived(request()[:10])
    reactor.advance(10.0)
    assert closed(transport)
    assert server.tcp_timeouts == 1


def test_tcp_trickling_does_not_keep_alive() -> None:
    """Bytes that never complete a message do not restart the idle timer."""
    reactor = FakeReactor()
    started(reactor)
    protocol, transport = connected(reactor)
    data = request(UnknownAttribute(0xC0DE, bytes(100)))
    for i in range(10):
        protocol.dataReceived(data[i : i + 1])
        reactor.advance(1.0)
    assert closed(transport)


def test_tcp_complete_message_restarts_timer() -> None:
    """A complete request restarts the idle timer."""
    reactor = FakeReactor()
    started(reactor)
    protocol, transport = connected(reactor)
    reactor.advance(9.0)
    protocol.dataReceived(request())
    reactor.advance(9.0)
    assert not closed(transport)
    reactor.advance(1.0)
    assert closed(transport)


def test_tcp_connection_cap() -> None:
    """The connection after max_tcp_connections is refused and counted."""
    reactor = FakeReactor()
    server = started(reactor, max_tcp_connections=2)
    connected(reactor)
    connected(reactor)
    protocol, _ = connect(reactor)
    assert protocol is None
    assert server.tcp_refused == 1
    assert server.tcp_connections == 2


def test_tcp_close_frees_a_slot() -> None:
    """A closed connection is uncounted, making room for a new one."""
    reactor = FakeReactor()
    server = started(reactor, max_tcp_connections=1)
    protocol, _ = connected(reactor)
    close(protocol)
    assert server.tcp_connections == 0
    assert connect(reactor)[0] is not None
    assert server.tcp_refused == 0


def test_tcp_close_cancels_idle_timer() -> None:
    """A closed connection leaves no timer behind."""
    reactor = FakeReactor()
    started(reactor)
    protocol, _ = connected(reactor)
    close(protocol)
    assert reactor.getDelayedCalls() == []


def test_tcp_drop_cancels_idle_timer() -> None:
    """A connection closed for bad input leaves no timer behind, and no timeout is counted."""
    reactor = FakeReactor()
    server = started(reactor)
    protocol, _ = connected(reactor)
    protocol.dataReceived(b"\xff\xff\xff\xff")
    reactor.advance(60)
    assert server.tcp_timeouts == 0
    assert reactor.getDelayedCalls() == []


def test_stop_closes_open_connections() -> None:
    """stopService closes the TCP connections still open, not only the listener."""
    reactor = FakeReactor()
    server = started(reactor)
    _, transport = connected(reactor)
    server.stopService()
    assert closed(transport)


def test_tcp_responder_failure_counted() -> None:
    """A bug in the responder is counted and the connection survives."""
    reactor = FakeReactor()
    server = started(reactor)
    server.responder = BrokenResponder()
    protocol, transport = connected(reactor)
    protocol.dataReceived(request())
    assert server.stats_internal_errors == 1
    assert not closed(transport)
