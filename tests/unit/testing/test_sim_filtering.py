"""
Filtering of simulated NATs and firewalls (RFC 4787 section 5),
hairpinning (section 6), ICMP port unreachable (section 9) and the
presets that block or route.
"""

from __future__ import annotations

import pytest

from nattraverse._types import Endpoint
from nattraverse.testing import Filtering, Network
from tests.unit.testing.sim_support import P1, P2, A, B, listen, world

EIF = Filtering.ENDPOINT_INDEPENDENT
ADF = Filtering.ADDRESS_DEPENDENT
APDF = Filtering.ADDRESS_AND_PORT_DEPENDENT


@pytest.mark.parametrize(
    ("filtering", "same_endpoint", "same_address", "other_address"),
    [
        (EIF, True, True, True),
        (ADF, True, True, False),
        (APDF, True, False, False),
    ],
)
def test_filtering_behaviour(
    filtering: Filtering, same_endpoint: bool, same_address: bool, other_address: bool
) -> None:
    """After X:x sends to A:P1, which sources reach X:x (RFC 4787 section 5)."""
    w = world(filtering=filtering)
    external = w.seen_by((A, P1))
    assert w.probe((A, P1), external) is same_endpoint
    assert w.probe((A, P2), external) is same_address
    assert w.probe((B, P1), external) is other_address
    assert w.nat.stats.filtered == [same_endpoint, same_address, other_address].count(False)


def test_sources_are_seen_as_they_are() -> None:
    """Inbound datagrams keep their outside source; only the destination changes."""
    w = world("full-cone")
    external = w.seen_by((A, P1))
    w.probe((B, P2), external)
    assert w.recorder.sources == [Endpoint(B, P2)]


@pytest.mark.parametrize("preset", ["full-cone", "restricted-cone", "port-restricted"])
def test_no_mapping_no_entry(preset: str) -> None:
    """Without a mapping, nothing gets in, whatever the filtering."""
    w = world(preset)
    assert not w.probe((A, P1), (w.nat.address, 40000))
    assert w.nat.stats.no_mapping == 1


def test_address_dependent_filter_opens_per_address() -> None:
    """ADF lets in a new address once the inside has sent to it (any port)."""
    w = world("restricted-cone")
    external = w.seen_by((A, P1))
    assert not w.probe((B, P2), external)
    w.send((B, P1))
    assert w.probe((B, P2), external)


def test_permission_expires_with_its_own_timer() -> None:
    """A remote endpoint stays permitted only mapping_lifetime after the last packet to it."""
    w = world("port-restricted", mapping_lifetime=60.0)
    external = w.seen_by((A, P1))
    w.network.run(50)
    w.send((B, P1))
    w.network.run(20)
    assert not w.probe((A, P1), external)
    assert w.probe((B, P1), external)
    (mapping,) = w.nat.mappings
    assert mapping.permitted == frozenset({Endpoint(B, P1)})


def test_symmetric_nat_filters_per_mapping() -> None:
    """Through an APDM mapping, only its own destination gets in."""
    w = world("symmetric")
    first = w.seen_by((A, P1))
    second = w.seen_by((A, P2))
    assert w.probe((A, P1), first)
    assert not w.probe((A, P2), first)
    assert w.probe((A, P2), second)


def test_unsolicited_inbound_dropped_silently_by_default() -> None:
    """A NAT drops unsolicited datagrams without an ICMP answer by default."""
    w = world("port-restricted")
    external = w.seen_by((A, P1))
    prober, recorder = listen(w.server, 9000, interface=B)
    prober.connect(*external)
    prober.write(b"knock")
    w.network.pump()
    assert recorder.refused == 0
    assert w.nat.stats.refused == 0


def test_inbound_refused_reaches_connected_port() -> None:
    """With inbound_refused, a filtered datagram is refused: a connected port is told."""
    w = world("port-restricted", inbound_refused=True)
    external = w.seen_by((A, P1))
    prober, recorder = listen(w.server, 9000, interface=B)
    prober.connect(*external)
    prober.write(b"knock")
    w.network.pump()
    assert recorder.refused == 1
    assert w.nat.stats.refused == 1
    assert w.network.stats.refusals_reported == 1


def test_inbound_refused_ignored_by_unconnected_port() -> None:
    """An unconnected UDP port never sees ICMP port unreachable, as on Linux."""
    w = world("port-restricted", inbound_refused=True)
    external = w.seen_by((A, P1))
    w.probe((B, P1), external)
    assert w.server_ports[Endpoint(B, P1)][1].refused == 0
    assert w.nat.stats.refused == 1


def test_closed_port_refusal_crosses_the_nat() -> None:
    """A host with nothing on a port refuses; the NAT takes the ICMP back inside."""
    w = world("port-restricted")
    w.port.connect(A, 4444)
    w.port.write(b"anyone?")
    w.network.pump()
    assert w.network.stats.unreachable == 1
    assert w.recorder.refused == 1


def test_refusal_from_behind_a_nat_reaches_public_sender() -> None:
    """ICMP from an inside host goes out through the mapping the datagram came in by."""
    w = world("full-cone")
    external = w.seen_by((A, P1))
    w.port.stopListening()
    w.network.pump()
    prober, recorder = listen(w.server, 9000, interface=B)
    prober.connect(*external)
    prober.write(b"knock")
    w.network.pump()
    assert recorder.refused == 1


def test_hairpin_on() -> None:
    """With hairpinning, inside hosts reach each other's external endpoints,
    seen from the sender's external endpoint (RFC 4787 REQ-9a)."""
    w = world("full-cone", hairpin=True)
    external = w.seen_by((A, P1))
    other = w.network.host("other", w.nat.lan)
    port, _ = listen(other, 5000)
    port.write(b"via the NAT", external)
    w.network.pump()
    assert w.recorder.sources == [Endpoint(w.nat.address, 5000)]
    assert w.nat.stats.hairpinned == 1


def test_hairpin_off() -> None:
    """Without hairpinning, packets to the NAT's own external endpoints are dropped."""
    w = world("full-cone")
    external = w.seen_by((A, P1))
    other = w.network.host("other", w.nat.lan)
    port, _ = listen(other, 5000)
    port.write(b"via the NAT", external)
    w.network.pump()
    assert w.recorder.received == []
    assert w.nat.stats.hairpin_dropped == 1


def test_hairpin_is_filtered() -> None:
    """A hairpinned packet passes the destination mapping's filter like any other."""
    w = world("port-restricted", hairpin=True)
    external = w.seen_by((A, P1))
    other = w.network.host("other", w.nat.lan)
    port, other_rx = listen(other, 5000)
    port.write(b"first", external)
    w.network.pump()
    assert w.recorder.received == []
    w.send((w.nat.address, 5000), b"back")
    assert other_rx.payloads == [b"back"]
    port.write(b"second", external)
    w.network.pump()
    assert w.recorder.payloads == [b"second"]


def test_nested_hairpin_through_outer_nat() -> None:
    """Two homes behind one carrier NAT reach each other through its hairpin."""
    network = Network()
    carrier = network.nat("carrier", preset="full-cone", hairpin=True)
    homes = [network.nat(f"home{i}", carrier.lan, preset="full-cone") for i in (1, 2)]
    server = network.host("server")
    _, server_rx = listen(server, 3478)
    ports = []
    for i, home in enumerate(homes):
        port, rx = listen(network.host(f"peer{i}", home.lan), 4000 + i)
        port.write(b"register", (server.address, 3478))
        ports.append((port, rx))
    network.pump()
    first, second = server_rx.sources
    ports[0][0].write(b"hello", second)
    network.pump()
    assert ports[1][1].received == [(b"hello", tuple(first))]


def test_udp_blocked() -> None:
    """udp-blocked lets no UDP out (nor in)."""
    w = world("udp-blocked")
    w.send((A, P1))
    assert w.server_ports[Endpoint(A, P1)][1].received == []
    assert not w.probe((A, P1), (w.nat.address, 40000))
    assert w.nat.stats.blocked == 2


def test_open_router_lets_everything_in() -> None:
    """Behind an open router, unsolicited datagrams reach the host."""
    w = world("open")
    assert w.probe((B, P2), (w.inside.address, 40000))
    assert w.seen_by((A, P1)) == Endpoint(w.inside.address, 40000)


def test_firewall_filters_unsolicited() -> None:
    """A symmetric UDP firewall lets in only answers from where the host sent."""
    w = world("symmetric-udp-firewall")
    own = Endpoint(w.inside.address, 40000)
    assert not w.probe((A, P1), own)
    w.send((A, P1))
    assert w.probe((A, P1), own)
    assert not w.probe((A, P2), own)


def test_gateway_address_is_not_a_host() -> None:
    """The NAT's inside address takes no datagrams."""
    w = world()
    assert w.nat.lan_address == "10.0.1.1"
    w.send((w.nat.lan_address, 53))
    assert w.network.stats.unreachable == 1
    assert w.nat.stats.outbound == 0


def test_no_route_on_the_internet() -> None:
    """A datagram to an address nobody has is counted and dropped."""
    w = world("full-cone")
    w.send(("198.51.100.99", 9))
    assert w.network.stats.no_route == 1


def test_delivery_at_clock_time() -> None:
    """Datagrams arrive at the clock time they were sent, on perfect links."""
    w = world("full-cone")
    w.network.run(3)
    external = w.seen_by((A, P1))
    w.probe((A, P1), external)
    assert w.recorder.times == [3.0]
