"""
Links of the simulated network: delay, jitter, loss, duplication and
reordering, all from seeded generators; asynchronous delivery; traces.
"""

from __future__ import annotations

import pytest

from nattraverse.testing import Link, Network, TraceEntry
from tests.unit.testing.sim_support import Echo, listen


def blast(link: Link, count: int = 200, *, seed: int = 0) -> tuple[Network, list[bytes]]:
    """Send *count* numbered datagrams over *link*; what arrived, in order."""
    network = Network(seed=seed)
    sender = network.host("sender", link=link)
    receiver = network.host("receiver")
    port, _ = listen(sender, 1000)
    _, received = listen(receiver, 2000)
    for i in range(count):
        port.write(b"%d" % i, (receiver.address, 2000))
    network.pump()
    return network, received.payloads


def test_delivery_is_never_synchronous() -> None:
    """A datagram arrives through the clock, never inside write()."""
    network = Network()
    a, b = network.host("a"), network.host("b")
    port, _ = listen(a, 1000)
    _, received = listen(b, 2000)
    port.write(b"x", (b.address, 2000))
    assert received.received == []
    assert network.in_flight == 1
    network.clock.advance(0)
    assert received.payloads == [b"x"]
    assert network.in_flight == 0


def test_delays_add_up_along_the_path() -> None:
    """Sender link, realm core and receiver link delays add up."""
    network = Network()
    network.internet.link = Link(delay=0.001)
    a = network.host("a", link=Link(delay=0.01))
    b = network.host("b", link=Link(delay=0.1))
    port, _ = listen(a, 1000)
    _, received = listen(b, 2000)
    port.write(b"x", (b.address, 2000))
    network.pump()
    assert received.times == [pytest.approx(0.111)]


def test_round_trip_between_two_nats() -> None:
    """10 ms on each NAT's uplink: 40 ms round trip between peers behind them
    (the namespace lab's ground truth)."""
    network = Network()
    nats = [network.nat(f"nat{i}", preset="full-cone", uplink=Link(delay=0.01)) for i in (1, 2)]
    alice = network.host("alice", nats[0].lan)
    bob = network.host("bob", nats[1].lan)
    echo = bob.reactor.listenUDP(5000, Echo())
    echo.write(b"open my NAT", (nats[0].address, 4000))
    network.pump()
    port, received = listen(alice, 4000)
    start = network.clock.seconds()
    port.write(b"ping", (nats[1].address, 5000))
    network.pump()
    assert received.payloads == [b"ping"]
    assert received.times[0] - start == pytest.approx(0.04)


def test_total_loss() -> None:
    """A link with loss 1 delivers nothing and counts every loss."""
    network, arrived = blast(Link(loss=1.0), 50)
    assert arrived == []
    assert network.stats.lost == 50


def test_partial_loss_is_seeded() -> None:
    """About the given fraction is lost, the same datagrams for the same seed."""
    network, arrived = blast(Link(loss=0.3), 1000, seed=7)
    assert 600 < len(arrived) < 800
    assert network.stats.lost == 1000 - len(arrived)
    assert blast(Link(loss=0.3), 1000, seed=7)[1] == arrived
    assert blast(Link(loss=0.3), 1000, seed=8)[1] != arrived


def test_duplication() -> None:
    """With duplicate 1, every datagram arrives twice."""
    network, arrived = blast(Link(duplicate=1.0), 10)
    assert sorted(arrived) == sorted([b"%d" % i for i in range(10)] * 2)
    assert network.stats.duplicated == 10


def test_reordering() -> None:
    """Held-back datagrams are overtaken; none is lost."""
    network, arrived = blast(Link(reorder=0.25, reorder_delay=0.01), 100)
    expected = [b"%d" % i for i in range(100)]
    assert arrived != expected
    assert sorted(arrived) == sorted(expected)
    assert 10 < network.stats.reordered < 40


def test_jitter_bounds() -> None:
    """Jitter adds up to its value to the delay, differently for each datagram."""
    network = Network(seed=3)
    a = network.host("a", link=Link(delay=0.05, jitter=0.02))
    b = network.host("b")
    port, _ = listen(a, 1000)
    _, received = listen(b, 2000)
    for _ in range(50):
        port.write(b"x", (b.address, 2000))
    network.pump()
    assert all(0.05 <= t <= 0.07 for t in received.times)
    assert len(set(received.times)) > 40


def test_same_seed_same_trace() -> None:
    """A run is reproducible: the same seed gives the same trace."""

    def run(seed: int) -> list[TraceEntry]:
        network = Network(seed=seed, trace=True)
        nat = network.nat("nat", preset="symmetric", uplink=Link(delay=0.01, jitter=0.01, loss=0.2))
        a = network.host("a", nat.lan)
        b = network.host("b")
        b.reactor.listenUDP(7, Echo())
        port, _ = listen(a)
        for i in range(20):
            port.write(b"%d" % i, (b.address, 7))
        network.pump()
        assert network.trace is not None
        return network.trace

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_adding_a_host_does_not_change_others() -> None:
    """Each host and NAT draws from its own generator."""

    def ports(extra: bool) -> list[int]:
        network = Network(seed=1)
        if extra:
            network.host("unrelated").reactor.listenUDP(0, Echo())
        host = network.host("h")
        return [host.reactor.listenUDP(0, Echo()).getHost().port for _ in range(3)]

    assert ports(False) == ports(True)


def test_trace_follows_a_packet() -> None:
    """The trace shows a datagram's send, translation and delivery under one number."""
    network = Network(trace=True)
    nat = network.nat("nat", preset="full-cone")
    a = network.host("a", nat.lan)
    b = network.host("b")
    port, _ = listen(a, 4000)
    listen(b, 7)
    port.write(b"x", (b.address, 7))
    network.pump()
    assert network.trace is not None
    assert [(e.event, e.where, e.number) for e in network.trace] == [
        ("send", "a", 1),
        ("out", "nat", 1),
        ("deliver", "b", 1),
    ]
    assert "203.0.113.1:4000 -> 192.0.2.1:7" in str(network.trace[1])


def test_no_trace_by_default() -> None:
    """Tracing is off unless asked for."""
    assert Network().trace is None


def test_lost_packets_are_traced() -> None:
    """A lost datagram shows where it was lost."""
    network = Network(trace=True)
    a = network.host("a", link=Link(loss=1.0))
    b = network.host("b")
    port, _ = listen(a)
    port.write(b"x", (b.address, 9))
    network.pump()
    assert network.trace is not None
    assert [(e.event, e.where) for e in network.trace] == [("send", "a"), ("lost", "a")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": -1.0},
        {"jitter": float("inf")},
        {"loss": 1.5},
        {"duplicate": -0.1},
        {"reorder": 2},
    ],
)
def test_link_rejects_bad_values(kwargs: dict[str, float]) -> None:
    """Link checks delays and probabilities, naming the field."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Link(**kwargs)
