"""
The reactor of a simulated host: IReactorUDP and IReactorTime on the
network's clock, and UDP ports that behave like Twisted's.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError, InvalidAddressError, MessageLengthError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
    IReactorUDP,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol
from zope.interface.verify import verifyObject

from nattraverse._types import Endpoint
from nattraverse.testing import Link, Network, SimulatedHost
from tests.unit.testing.sim_support import Echo, Recorder, listen


def two_hosts() -> tuple[Network, SimulatedHost, SimulatedHost]:
    network = Network()
    return network, network.host("a"), network.host("b")


def test_reactor_provides_udp_and_time() -> None:
    """A host's reactor provides IReactorUDP and IReactorTime."""
    _, a, _ = two_hosts()
    assert verifyObject(IReactorUDP, a.reactor)
    assert verifyObject(IReactorTime, a.reactor)


def test_port_provides_listening_port_and_udp_transport() -> None:
    """listenUDP returns an IListeningPort that is an IUDPTransport."""
    _, a, _ = two_hosts()
    port, _ = listen(a)
    assert verifyObject(IListeningPort, port)
    assert verifyObject(IUDPTransport, port)


def test_time_is_the_networks_clock() -> None:
    """seconds() and callLater() run on the shared clock."""
    network, a, b = two_hosts()
    fired: list[float] = []
    a.reactor.callLater(2.5, lambda: fired.append(b.reactor.seconds()))
    network.run(3)
    assert fired == [2.5]
    assert a.reactor.seconds() == network.clock.seconds() == 3.0


def test_delayed_calls_are_per_host() -> None:
    """getDelayedCalls() lists this host's pending calls only."""
    network, a, b = two_hosts()
    call = a.reactor.callLater(1, lambda: None)
    b.reactor.callLater(2, lambda: None)
    assert a.reactor.getDelayedCalls() == [call]
    call.cancel()
    assert a.reactor.getDelayedCalls() == []
    network.run(2)
    assert b.reactor.getDelayedCalls() == []


def test_many_delayed_calls_are_pruned() -> None:
    """Calls that have run are forgotten."""
    network, a, _ = two_hosts()
    for i in range(500):
        a.reactor.callLater(i, lambda: None)
    network.run(1000)
    a.reactor.callLater(1, lambda: None)
    assert len(a.reactor.getDelayedCalls()) == 1


def test_ephemeral_port() -> None:
    """Port 0 picks a port from the Linux ephemeral range."""
    _, a, _ = two_hosts()
    port, _ = listen(a)
    assert 32768 <= port.getHost().port <= 60999


def test_get_host() -> None:
    """getHost() is IPv4Address('UDP', interface, port), 0.0.0.0 for all addresses."""
    _, a, _ = two_hosts()
    assert listen(a, 5000)[0].getHost() == IPv4Address("UDP", "0.0.0.0", 5000)
    assert listen(a, 5001, interface=a.address)[0].getHost() == IPv4Address("UDP", a.address, 5001)


@pytest.mark.parametrize(
    ("first", "second"),
    [("", ""), ("", "192.0.2.1"), ("192.0.2.1", ""), ("192.0.2.1", "192.0.2.1")],
)
def test_port_in_use(first: str, second: str) -> None:
    """Binding a port already bound on the same or the wildcard address fails."""
    _, a, _ = two_hosts()
    listen(a, 5000, interface=first)
    with pytest.raises(CannotListenError) as raised:
        listen(a, 5000, interface=second)
    assert raised.value.socketError.errno == errno.EADDRINUSE


def test_same_port_on_two_addresses() -> None:
    """One port number may be bound on each of a host's addresses."""
    network = Network()
    host = network.host("h", address="192.0.2.1", aliases=["192.0.2.2"])
    listen(host, 5000, interface="192.0.2.1")
    listen(host, 5000, interface="192.0.2.2")
    assert len(host.ports) == 2


def test_foreign_interface() -> None:
    """Binding an address the host does not have fails."""
    _, a, _ = two_hosts()
    with pytest.raises(CannotListenError) as raised:
        listen(a, 5000, interface="192.0.2.99")
    assert raised.value.socketError.errno == errno.EADDRNOTAVAIL


def test_ipv6_interface() -> None:
    """Simulated hosts are IPv4 only."""
    _, a, _ = two_hosts()
    with pytest.raises(CannotListenError):
        listen(a, 5000, interface="::")


def test_protocol_started_in_listen_and_stopped_on_next_turn() -> None:
    """startProtocol runs in listenUDP; stopListening stops it on the next clock turn."""
    network, a, _ = two_hosts()
    port, recorder = listen(a, 5000)
    assert recorder.started == 1
    stopped = port.stopListening()
    assert isinstance(stopped, Deferred)
    assert recorder.stopped == 0
    assert port.stopListening() is None
    network.clock.advance(0)
    assert recorder.stopped == 1
    assert recorder.transport is None
    assert network.run_until(stopped) is None
    assert a.ports == ()
    listen(a, 5000)


def test_stopped_port_reads_nothing() -> None:
    """A port that stopped listening gets no more datagrams."""
    network, a, b = two_hosts()
    port, recorder = listen(a, 5000)
    sender, _ = listen(b)
    port.stopListening()
    sender.write(b"late", (a.address, 5000))
    network.pump()
    assert recorder.received == []


def test_write_after_close() -> None:
    """Writing to a closed port fails like a closed socket."""
    network, a, _ = two_hosts()
    port, _ = listen(a)
    port.stopListening()
    network.pump()
    with pytest.raises(OSError, match="closed") as raised:
        port.write(b"x", ("192.0.2.9", 9))
    assert raised.value.errno == errno.EBADF


@pytest.mark.parametrize(
    ("addr", "error"),
    [
        (("example.com", 9), InvalidAddressError),
        (("2001:db8::1", 9), InvalidAddressError),
        (("192.0.2.9", 70000), ValueError),
        (("192.0.2.9", 0), OSError),
    ],
)
def test_write_checks_address(addr: tuple[str, int], error: type[Exception]) -> None:
    """write() wants an IPv4 address and a port."""
    _, a, _ = two_hosts()
    port, _ = listen(a)
    with pytest.raises(error):
        port.write(b"x", addr)


def test_write_too_long() -> None:
    """More than 65507 bytes is too long for a UDP datagram over IPv4."""
    _, a, _ = two_hosts()
    port, _ = listen(a)
    with pytest.raises(MessageLengthError):
        port.write(b"x" * 65508, ("192.0.2.9", 9))


def test_write_sequence() -> None:
    """writeSequence sends the parts as one datagram."""
    network, a, b = two_hosts()
    port, _ = listen(a)
    _, received = listen(b, 7)
    port.writeSequence([b"he", b"llo"], (b.address, 7))
    network.pump()
    assert received.payloads == [b"hello"]


def test_max_packet_size_truncates() -> None:
    """A datagram longer than maxPacketSize is cut, as recvfrom does."""
    network, a, b = two_hosts()
    port, _ = listen(a)
    recorder = Recorder()
    b.reactor.listenUDP(7, recorder, maxPacketSize=4)
    port.write(b"truncated", (b.address, 7))
    network.pump()
    assert recorder.payloads == [b"trun"]


def test_source_tuple() -> None:
    """datagramReceived gets a plain (host, port) tuple."""
    network, a, b = two_hosts()
    port, _ = listen(a, 1234)
    _, received = listen(b, 7)
    port.write(b"x", (b.address, 7))
    network.pump()
    ((_, addr),) = received.received
    assert type(addr) is tuple
    assert addr == (a.address, 1234)


def test_connected_port() -> None:
    """A connected port writes without an address and hears only its peer."""
    network = Network()
    a = network.host("a")
    b = network.host("b", address="192.0.2.10", aliases=["192.0.2.11"])
    port, received = listen(a, 1000)
    port.connect("192.0.2.10", 7)
    peer, _ = listen(b, 7, interface="192.0.2.10")
    stranger, _ = listen(b, 7, interface="192.0.2.11")
    port.write(b"hi")
    peer.write(b"from peer", (a.address, 1000))
    stranger.write(b"from stranger", (a.address, 1000))
    network.pump()
    assert received.payloads == [b"from peer"]
    assert port.connected_to == Endpoint("192.0.2.10", 7)
    with pytest.raises(RuntimeError):
        port.connect("192.0.2.11", 7)
    with pytest.raises(ValueError, match="connected"):
        port.write(b"x", ("192.0.2.11", 7))


def test_connect_checks_address() -> None:
    """connect() wants an IPv4 address."""
    _, a, _ = two_hosts()
    port, _ = listen(a)
    with pytest.raises(InvalidAddressError):
        port.connect("example.com", 7)


def test_unconnected_write_needs_address() -> None:
    """An unconnected port cannot write without an address."""
    _, a, _ = two_hosts()
    port, _ = listen(a)
    with pytest.raises(ValueError, match="address"):
        port.write(b"x")


def test_broadcast_flag_is_remembered() -> None:
    """setBroadcastAllowed is remembered (there is no broadcast to allow)."""
    _, a, _ = two_hosts()
    port, _ = listen(a)
    assert not port.getBroadcastAllowed()
    port.setBroadcastAllowed(True)
    assert port.getBroadcastAllowed()


def test_loopback() -> None:
    """127.0.0.1 reaches the host's own ports bound to all addresses or loopback."""
    network, a, _ = two_hosts()
    port, _ = listen(a, 1000)
    _, received = listen(a, 2000, interface="127.0.0.1")
    port.write(b"self", ("127.0.0.1", 2000))
    network.pump()
    assert received.received == [(b"self", ("127.0.0.1", 1000))]


def test_loopback_port_cannot_send_out() -> None:
    """A port bound to loopback cannot send to other hosts."""
    _, a, b = two_hosts()
    port, _ = listen(a, 1000, interface="127.0.0.1")
    with pytest.raises(OSError, match="loopback"):
        port.write(b"x", (b.address, 7))


def test_alias_sends_from_its_address() -> None:
    """A port bound to an alias sends from the alias; one bound to all, from the primary."""
    network = Network()
    host = network.host("h", address="192.0.2.10", aliases=["192.0.2.11"])
    other = network.host("o")
    _, received = listen(other, 7)
    listen(host, 1000, interface="192.0.2.11")[0].write(b"x", (other.address, 7))
    listen(host, 1001)[0].write(b"y", (other.address, 7))
    network.pump()
    assert received.sources == [Endpoint("192.0.2.11", 1000), Endpoint("192.0.2.10", 1001)]


def test_datagram_to_own_alias() -> None:
    """A host reaches its own other address without the network."""
    network = Network()
    host = network.host("h", address="192.0.2.10", aliases=["192.0.2.11"])
    port, _ = listen(host, 1000, interface="192.0.2.10")
    _, received = listen(host, 1000, interface="192.0.2.11")
    port.write(b"x", ("192.0.2.11", 1000))
    network.pump()
    assert received.sources == [Endpoint("192.0.2.10", 1000)]


class Broken(DatagramProtocol):
    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        raise ZeroDivisionError("bug in the protocol")


def test_protocol_errors_are_logged_not_raised() -> None:
    """An exception in datagramReceived is counted and logged, as Twisted does."""
    network, a, b = two_hosts()
    port, _ = listen(a)
    b.reactor.listenUDP(7, Broken())
    port.write(b"x", (b.address, 7))
    network.pump()
    assert network.stats.protocol_errors == 1


def test_run_fires_each_call_at_its_time() -> None:
    """run() fires each timer at its own time, not all at the end."""
    network, a, _ = two_hosts()
    seen: list[float] = []
    for delay in (0.3, 0.1, 0.2):
        a.reactor.callLater(delay, lambda: seen.append(a.reactor.seconds()))
    network.run(1.0)
    assert seen == [0.1, 0.2, 0.3]
    assert network.clock.seconds() == 1.0


def test_pump_gives_up_on_endless_traffic() -> None:
    """pump() raises when datagrams keep flying."""
    network = Network()
    a = network.host("a", link=Link(delay=0.5))
    b = network.host("b")
    a.reactor.listenUDP(1, Echo())
    b.reactor.listenUDP(2, Echo())
    listen(a)[0].write(b"ball", (b.address, 2))
    b.ports[0].write(b"ball", (a.address, 1))
    with pytest.raises(RuntimeError, match="in flight"):
        network.pump(timeout=5)


def test_pump_stops_when_nothing_flies() -> None:
    """pump() returns once every datagram has arrived, leaving timers pending."""
    network, a, b = two_hosts()
    listen(b, 7)
    a.reactor.callLater(30, lambda: None)
    listen(a)[0].write(b"x", (b.address, 7))
    assert network.pump() == 0.0
    assert len(a.reactor.getDelayedCalls()) == 1


def test_pump_returns_time_taken() -> None:
    """pump() returns the seconds it ran."""
    network = Network()
    a = network.host("a", link=Link(delay=0.25))
    b = network.host("b")
    listen(b, 7)
    listen(a)[0].write(b"x", (b.address, 7))
    assert network.pump() == 0.25


def test_run_until_result_and_failure() -> None:
    """run_until returns a Deferred's result, or raises its failure."""
    network, a, _ = two_hosts()
    later: Deferred[str] = Deferred()
    a.reactor.callLater(3, later.callback, "done")
    assert network.run_until(later) == "done"
    assert network.clock.seconds() == 3
    assert network.run_until(succeed(5)) == 5
    failing: Deferred[None] = Deferred()
    a.reactor.callLater(1, failing.errback, KeyError("boom"))
    with pytest.raises(KeyError):
        network.run_until(failing)


def test_run_until_timeout_and_idle() -> None:
    """run_until raises TimeoutError at the deadline, RuntimeError when nothing can happen."""
    network, a, _ = two_hosts()
    slow: Deferred[None] = Deferred()
    a.reactor.callLater(100, slow.callback, None)
    with pytest.raises(TimeoutError):
        network.run_until(slow, timeout=10)
    assert network.clock.seconds() == 10
    with pytest.raises(RuntimeError, match="nothing is scheduled"):
        Network().run_until(Deferred())
