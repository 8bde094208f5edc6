"""
Simulated hosts, their reactors (``IReactorUDP`` and ``IReactorTime`` on
the network's clock) and their UDP ports.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, InvalidAddressError, MessageLengthError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    IReactorUDP,
    IUDPTransport,
)
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from nattraverse._types import Endpoint
from nattraverse.testing._link import Link
from nattraverse.testing._realm import Attachment, Packet, Realm

if TYPE_CHECKING:
    from nattraverse.testing._network import Network

_log = Logger()

#: Largest UDP payload over IPv4; longer writes fail as on a real socket.
MAX_UDP_PAYLOAD = 65507

#: Linux's default ephemeral port range (``net.ipv4.ip_local_port_range``).
EPHEMERAL_PORTS = (32768, 60999)

_ANY = "0.0.0.0"


def _is_loopback(host: str) -> bool:
    return host.startswith("127.")


def _ipv4(text: object) -> str | None:
    """*text* as canonical IPv4 text, or ``None`` when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        return None


@implementer(IListeningPort, IUDPTransport)
class SimulatedUDPPort:
    """
    A UDP port of a simulated host, as ``reactor.listenUDP`` returns it.

    It behaves like Twisted's ``udp.Port``: writes go through the network
    (and arrive through the clock, never inside :meth:`write`); after
    :meth:`stopListening` the port stops reading at once and closes, calling
    the protocol's ``stopProtocol``, on the next turn of the clock.

    :ivar protocol: The datagram protocol.
    :ivar interface: The address bound (``"0.0.0.0"`` for all).
    :ivar port: The port number bound.
    :ivar maxPacketSize: Longer datagrams are cut to this size on receipt.
    """

    def __init__(
        self,
        host: SimulatedHost,
        port: int,
        protocol: AbstractDatagramProtocol,
        interface: str,
        maxPacketSize: int,
    ) -> None:
        self.host = host
        self.port = port
        self.protocol = protocol
        self.interface = interface
        self.maxPacketSize = maxPacketSize
        #: Whether the port is bound (Twisted's ``connected`` means that).
        self.connected = False
        self.reading = False
        self._connected_to: Endpoint | None = None
        self._broadcast = False
        self._stopped: Deferred[None] | None = None

    def __repr__(self) -> str:
        return f"<SimulatedUDPPort {self.host.name} {self.interface}:{self.port}>"

    def logPrefix(self) -> str:
        """The protocol's class name, as Twisted logs it."""
        return f"{type(self.protocol).__name__} (UDP)"

    def startListening(self) -> None:
        """Bind the port and start the protocol (``listenUDP`` does this)."""
        self.port = self.host._bind(self)
        self.connected = True
        self.reading = True
        self.protocol.makeConnection(self)

    def getHost(self) -> IPv4Address:
        """The bound address, ``IPv4Address("UDP", interface, port)``."""
        return IPv4Address("UDP", self.interface, self.port)

    @property
    def connected_to(self) -> Endpoint | None:
        """The address given to :meth:`connect`, if any."""
        return self._connected_to

    def write(self, datagram: bytes, addr: tuple[str, int] | None = None) -> None:
        """
        Send *datagram* to *addr*, or to the connected address.

        :raises InvalidAddressError: when the host is not an IPv4 address.
        :raises MessageLengthError: for more than 65507 bytes.
        :raises OSError: ``EBADF`` once the port is closed, ``EINVAL`` for
            port 0.
        """
        if not isinstance(datagram, bytes | bytearray | memoryview):
            raise TypeError(f"a datagram is bytes, not {type(datagram).__name__}")
        if self._connected_to is not None:
            if addr is not None and tuple(addr) != tuple(self._connected_to):
                raise ValueError(
                    f"this port is connected to {self._connected_to}; write to it or to None"
                )
            destination = self._connected_to
        else:
            if addr is None:
                raise ValueError("an unconnected UDP port needs an address to write to")
            destination = self._destination(addr)
        if not self.connected:
            raise OSError(errno.EBADF, f"{self!r} is closed")
        if len(datagram) > MAX_UDP_PAYLOAD:
            raise MessageLengthError("message too long")
        self.host._send(self, bytes(datagram), destination)

    def writeSequence(self, seq: Iterable[bytes], addr: tuple[str, int] | None = None) -> None:
        """Write the concatenation of *seq* as one datagram."""
        self.write(b"".join(seq), addr)

    @staticmethod
    def _destination(addr: Sequence[Any]) -> Endpoint:
        host = _ipv4(addr[0])
        if host is None:
            raise InvalidAddressError(
                addr[0], "write() only accepts IPv4 addresses on a simulated host"
            )
        port = addr[1]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"{port!r} is not a port number")
        if port == 0:
            raise OSError(errno.EINVAL, "cannot send to port 0")
        return Endpoint(host, port)

    def connect(self, host: str, port: int) -> None:
        """
        Talk to one remote address only: datagrams from others are dropped,
        and ICMP port unreachable from it calls the protocol's
        ``connectionRefused()``.

        :raises RuntimeError: when already connected.
        :raises InvalidAddressError: when *host* is not an IPv4 address.
        """
        if self._connected_to is not None:
            raise RuntimeError("already connected, reconnecting is not currently supported")
        if _ipv4(host) is None:
            raise InvalidAddressError(host, "not an IPv4 address.")
        self._connected_to = self._destination((host, port))

    def setBroadcastAllowed(self, enabled: bool) -> None:
        """Remembered only: the simulation has no broadcast."""
        self._broadcast = bool(enabled)

    def getBroadcastAllowed(self) -> bool:
        """What :meth:`setBroadcastAllowed` was given last."""
        return self._broadcast

    def stopListening(self) -> Deferred[None] | None:
        """
        Stop reading now, and close on the next turn of the clock.

        :returns: A Deferred that fires once closed, or ``None`` when the
            port was already closed or closing.
        """
        if not self.connected or self._stopped is not None:
            return None
        self.reading = False
        self._stopped = Deferred()
        self.host.reactor.callLater(0, self.connectionLost)
        return self._stopped

    def loseConnection(self) -> None:
        """Same as :meth:`stopListening`."""
        self.stopListening()

    def connectionLost(self, reason: object = None) -> None:
        """Unbind the port and stop the protocol."""
        if not self.connected:
            return
        self.connected = False
        self.reading = False
        self.host._unbind(self)
        try:
            self.protocol.doStop()
        finally:
            stopped, self._stopped = self._stopped, None
            if stopped is not None:
                stopped.callback(None)

    def _deliver(self, packet: Packet) -> None:
        """Hand a datagram to the protocol, as Twisted's ``doRead`` does."""
        network = self.host.network
        data = packet.payload[: self.maxPacketSize]
        network.stats.delivered += 1
        network._record("deliver", self.host.name, packet)
        try:
            self.protocol.datagramReceived(data, (packet.source.host, packet.source.port))
        except Exception:
            network.stats.protocol_errors += 1
            _log.failure(
                "{protocol!r} failed on a datagram from {source}",
                protocol=self.protocol,
                source=str(packet.source),
            )


@implementer(IReactorUDP, IReactorTime)
class SimulatedReactor:
    """
    The reactor of one simulated host: UDP ports on the host's addresses
    and timers on the network's shared clock.

    :meth:`getDelayedCalls` lists this host's own pending calls only.
    """

    def __init__(self, host: SimulatedHost) -> None:
        self.host = host
        self.clock = host.network.clock
        self._calls: list[IDelayedCall] = []
        self._prune_at = 64

    def __repr__(self) -> str:
        return f"<SimulatedReactor of {self.host.name}>"

    def seconds(self) -> float:
        """The network's clock time."""
        return self.clock.seconds()

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        """Call *callable* after *delay* seconds of the network's clock."""
        call = self.clock.callLater(delay, callable, *args, **kw)
        calls = self._calls
        calls.append(call)
        if len(calls) >= self._prune_at:
            calls[:] = [c for c in calls if c.active()]
            self._prune_at = max(64, 2 * len(calls))
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        """This host's calls that have not run or been cancelled."""
        self._calls[:] = [c for c in self._calls if c.active()]
        return list(self._calls)

    def listenUDP(
        self,
        port: int,
        protocol: AbstractDatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> SimulatedUDPPort:
        """
        Bind a UDP port on the host and start *protocol* on it.

        :param port: The port number; 0 picks a free one from the Linux
            ephemeral range, at random from the host's seeded generator.
        :param interface: One of the host's addresses, ``"127.0.0.1"``, or
            ``""``/``"0.0.0.0"`` for all of them.
        :raises CannotListenError: when the port is taken or the host has no
            such address.
        """
        listening = SimulatedUDPPort(
            self.host, port, protocol, interface or _ANY, maxPacketSize=maxPacketSize
        )
        listening.startListening()
        return listening


class SimulatedHost(Attachment):
    """
    A host with one or more addresses in a realm.  Made by
    :meth:`Network.host <nattraverse.testing.Network.host>`.

    :ivar name: The host's name.
    :ivar realm: Where its addresses are.
    :ivar address: Its primary address: ports bound to all addresses send
        from it.
    :ivar addresses: All its addresses, the primary first.
    :ivar reactor: Provides ``IReactorUDP`` and ``IReactorTime``: hand it to
        code under test in place of the global reactor.
    """

    def __init__(
        self, network: Network, name: str, realm: Realm, addresses: Sequence[str], link: Link
    ) -> None:
        super().__init__(name, link, network.random("link", name))
        self.network = network
        self.realm = realm
        self.addresses = tuple(addresses)
        self.address = self.addresses[0]
        self.reactor = SimulatedReactor(self)
        self._bound: dict[Endpoint, SimulatedUDPPort] = {}
        self._port_rng = network.random("ports", name)

    def __repr__(self) -> str:
        return f"<SimulatedHost {self.name} {', '.join(self.addresses)}>"

    @property
    def ports(self) -> tuple[SimulatedUDPPort, ...]:
        """The bound UDP ports."""
        return tuple(self._bound.values())

    def _in_use(self, interface: str, number: int) -> bool:
        if interface == _ANY:
            return any(key.port == number for key in self._bound)
        return Endpoint(interface, number) in self._bound or Endpoint(_ANY, number) in self._bound

    def _bind(self, port: SimulatedUDPPort) -> int:
        """
        Give *port* its address; returns the port number (picked when 0).

        :raises CannotListenError: as a socket's ``bind()`` would fail.
        """
        requested, interface = port.port, port.interface
        canonical = _ipv4(interface)
        if canonical is None:
            raise CannotListenError(
                interface,
                requested,
                OSError(errno.EAFNOSUPPORT, "simulated hosts have IPv4 addresses only"),
            )
        if canonical != _ANY and not _is_loopback(canonical) and canonical not in self.addresses:
            raise CannotListenError(
                interface,
                requested,
                OSError(errno.EADDRNOTAVAIL, f"{self.name} has no address {canonical}"),
            )
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise TypeError(f"a port number is an int, not {requested!r}")
        if not 0 <= requested <= 65535:
            raise OverflowError("bind(): port must be 0-65535.")
        number = requested or self._ephemeral(canonical)
        if number == 0 or self._in_use(canonical, number):
            raise CannotListenError(
                interface, requested, OSError(errno.EADDRINUSE, "Address already in use")
            )
        port.interface = canonical
        self._bound[Endpoint(canonical, number)] = port
        return number

    def _ephemeral(self, interface: str) -> int:
        low, high = EPHEMERAL_PORTS
        for _ in range(64):
            number = self._port_rng.randint(low, high)
            if not self._in_use(interface, number):
                return number
        start = self._port_rng.randint(low, high)
        for offset in range(high - low + 1):
            number = low + (start - low + offset) % (high - low + 1)
            if not self._in_use(interface, number):
                return number
        return 0

    def _unbind(self, port: SimulatedUDPPort) -> None:
        """Free *port*'s address."""
        key = Endpoint(port.interface, port.port)
        if self._bound.get(key) is port:
            del self._bound[key]

    def _send(self, port: SimulatedUDPPort, payload: bytes, destination: Endpoint) -> None:
        """Send a datagram from *port* (checked by the port)."""
        network = self.network
        loopback = _is_loopback(destination.host)
        if port.interface == _ANY:
            source_host = "127.0.0.1" if loopback else self.address
        else:
            source_host = port.interface
            if _is_loopback(source_host) and not loopback:
                raise OSError(errno.EINVAL, "a port bound to loopback cannot send out")
        packet = network._new_packet(Endpoint(source_host, port.port), destination, payload)
        network.stats.sent += 1
        network._record("send", self.name, packet)
        self._emit(packet)

    def _emit(self, packet: Packet) -> None:
        destination = packet.destination.host
        if _is_loopback(destination) or destination in self.addresses:
            self.network._later(0.0, self._arrive, packet)
        else:
            self.network._transmit(packet, self.realm, self)

    def _port_for(self, destination: Endpoint) -> SimulatedUDPPort | None:
        return self._bound.get(destination) or self._bound.get(Endpoint(_ANY, destination.port))

    def _arrive(self, packet: Packet) -> None:
        """A packet for one of the host's addresses."""
        network = self.network
        port = self._port_for(packet.destination)
        if packet.about is not None:
            self._icmp(port, packet)
            return
        if port is None:
            network.stats.unreachable += 1
            network._record("unreachable", self.name, packet)
            # Like Linux: answer with ICMP port unreachable.
            self._emit(
                network._new_packet(
                    packet.destination, packet.source, b"", (packet.source, packet.destination)
                )
            )
            return
        if not port.reading:
            network._record("closed", self.name, packet)
            return
        connected = port.connected_to
        if connected is not None and packet.source != connected:
            network._record("not-connected", self.name, packet)
            return
        port._deliver(packet)

    def _icmp(self, port: SimulatedUDPPort | None, packet: Packet) -> None:
        """ICMP port unreachable: reported to a connected port only, as on
        Linux; unconnected UDP sockets never see it."""
        network = self.network
        assert packet.about is not None
        refused = packet.about[1]
        if port is None or not port.reading or port.connected_to != refused:
            network._record("icmp-ignored", self.name, packet)
            return
        network.stats.refusals_reported += 1
        network._record("icmp", self.name, packet)
        try:
            port.protocol.connectionRefused()  # type: ignore[attr-defined]
        except Exception:
            network.stats.protocol_errors += 1
            _log.failure("{protocol!r} failed on connectionRefused", protocol=port.protocol)
