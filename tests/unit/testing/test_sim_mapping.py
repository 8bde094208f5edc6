"""
Mapping and port assignment of simulated NATs, per RFC 4787 sections 4.1
(mapping behaviour), 4.2 (port assignment) and 4.3 (lifetime and refresh).
"""

from __future__ import annotations

from typing import Any

import pytest

from nattraverse._types import Endpoint
from nattraverse.testing import Allocation, Mapping, Network
from tests.unit.testing.sim_support import P1, P2, A, B, Echo, listen, world

DESTINATIONS = [(A, P1), (A, P2), (B, P1), (B, P2)]


def external_endpoints(mapping: Mapping, **behaviour: Any) -> list[Endpoint]:
    """The source the server sees for each destination, in order."""
    w = world(mapping=mapping, **behaviour)
    return [w.seen_by(to) for to in DESTINATIONS]


def test_endpoint_independent_mapping() -> None:
    """EIM: one external endpoint for every destination (RFC 4787 4.1)."""
    seen = external_endpoints(Mapping.ENDPOINT_INDEPENDENT)
    assert set(seen) == {Endpoint("203.0.113.1", 40000)}


def test_address_dependent_mapping() -> None:
    """ADM: the same external endpoint while the destination address is the same."""
    seen = external_endpoints(Mapping.ADDRESS_DEPENDENT)
    assert seen[0] == seen[1]
    assert seen[2] == seen[3]
    assert seen[0] != seen[2]


def test_address_and_port_dependent_mapping() -> None:
    """APDM: a new external endpoint for each destination address and port."""
    seen = external_endpoints(Mapping.ADDRESS_AND_PORT_DEPENDENT)
    assert len(set(seen)) == 4
    assert {s.host for s in seen} == {"203.0.113.1"}


def test_port_preservation() -> None:
    """The external port is the internal one when it is free (RFC 4787 4.2.1)."""
    w = world("port-restricted", local_port=5555)
    assert w.seen_by((A, P1)) == Endpoint(w.nat.address, 5555)


def test_port_preservation_conflict_allocates_another_port() -> None:
    """Two inside hosts on one port do not share an external port (REQ-3)."""
    w = world("port-restricted", local_port=5000, port_range=(7000, 7100))
    other = w.network.host("other", w.nat.lan)
    port, _ = listen(other, 5000)
    first = w.seen_by((A, P1))
    port.write(b"x", (A, P1))
    w.network.pump()
    second = w.server_ports[Endpoint(A, P1)][1].sources[-1]
    assert first == Endpoint(w.nat.address, 5000)
    assert second == Endpoint(w.nat.address, 7000)


def test_sequential_allocation_step() -> None:
    """Sequential allocation hands out ports *step* apart."""
    seen = external_endpoints(
        Mapping.ADDRESS_AND_PORT_DEPENDENT,
        port_preservation=False,
        allocation=Allocation.SEQUENTIAL,
        step=2,
        port_range=(20000, 20100),
    )
    assert [s.port for s in seen] == [20000, 20002, 20004, 20006]


def test_sequential_allocation_skips_ports_in_use() -> None:
    """A sequential NAT steps over a port another mapping holds."""
    w = world("symmetric-sequential", local_port=20001, port_preservation=True)
    w.seen_by((A, P1))  # preserved: 20001
    assert [w.seen_by(to).port for to in DESTINATIONS[1:]] == [20000, 20002, 20003]


def test_sequential_allocation_wraps_around() -> None:
    """At the top of the range, sequential allocation starts again at the bottom."""
    w = world("symmetric-sequential", port_range=(30000, 30002))
    ports = [w.seen_by(to).port for to in DESTINATIONS[:3]]
    assert ports == [30000, 30001, 30002]
    w.network.run(121)
    assert w.seen_by((B, P2)).port == 30000


def test_random_allocation_in_range_and_distinct() -> None:
    """Random allocation picks distinct ports from the range."""
    seen = external_endpoints(
        Mapping.ADDRESS_AND_PORT_DEPENDENT,
        port_preservation=False,
        allocation=Allocation.RANDOM,
        port_range=(40000, 49999),
    )
    ports = [s.port for s in seen]
    assert len(set(ports)) == 4
    assert all(40000 <= p <= 49999 for p in ports)
    assert ports != sorted(ports) or ports[-1] - ports[0] > 3


def test_random_allocation_reproducible_by_seed() -> None:
    """The same seed picks the same random ports; another seed others."""

    def ports(seed: int) -> list[int]:
        w = world("symmetric", seed=seed)
        return [w.seen_by(to).port for to in DESTINATIONS]

    assert ports(1) == ports(1)
    assert ports(1) != ports(2)


def test_port_exhaustion_drops_packets() -> None:
    """When every port is taken, the packet is dropped and counted."""
    w = world("symmetric-sequential", port_range=(3000, 3001))
    w.send((A, P1))
    w.send((A, P2))
    w.send((B, P1))
    assert w.nat.stats.exhausted == 1
    assert not w.server_ports[Endpoint(B, P1)][1].received


def test_mapping_expires_without_traffic() -> None:
    """A mapping lives *mapping_lifetime* after its last outbound packet (RFC 4787 4.3)."""
    w = world("full-cone", mapping_lifetime=30.0)
    external = w.seen_by((A, P1))
    w.network.run(29.9)
    assert w.probe((A, P1), external)
    w.network.run(0.2)
    assert w.nat.mappings == ()
    assert not w.probe((A, P1), external)
    assert w.nat.stats.mappings_expired == 1
    assert w.nat.stats.no_mapping == 1


def test_expired_mapping_is_replaced_by_a_new_one() -> None:
    """After expiry a symmetric NAT maps the same flow to a fresh port."""
    w = world("symmetric")
    first = w.seen_by((A, P1))
    w.network.run(121)
    second = w.seen_by((A, P1))
    assert first != second
    assert w.nat.stats.mappings_created == 2


def test_outbound_traffic_refreshes_mapping() -> None:
    """Outbound packets restart the mapping timer (RFC 4787 REQ-6)."""
    w = world("port-restricted", mapping_lifetime=120.0)
    external = w.seen_by((A, P1))
    for _ in range(5):
        w.network.run(100)
        w.send((A, P1))
    (mapping,) = w.nat.mappings
    assert mapping.created == 0.0
    assert mapping.expires == 620.0
    assert w.probe((A, P1), external)


def test_inbound_traffic_does_not_refresh_by_default() -> None:
    """Inbound packets do not keep a mapping alive unless configured."""
    w = world("full-cone", mapping_lifetime=60.0)
    external = w.seen_by((A, P1))
    for _ in range(3):
        w.network.run(25)
        w.probe((A, P1), external)
    assert w.nat.mappings == ()


def test_inbound_refresh_keeps_mapping() -> None:
    """With inbound_refresh, inbound packets keep a mapping alive (REQ-6a)."""
    w = world("full-cone", mapping_lifetime=60.0, inbound_refresh=True)
    external = w.seen_by((A, P1))
    for _ in range(3):
        w.network.run(25)
        assert w.probe((A, P1), external)
    assert len(w.nat.mappings) == 1


def test_mapping_snapshot_fields() -> None:
    """nat.mappings shows inside and outside endpoints, key, times and permissions."""
    w = world("symmetric-sequential")
    w.network.run(5)
    w.seen_by((A, P1))
    (mapping,) = w.nat.mappings
    assert mapping.internal == Endpoint(w.inside.address, 40000)
    assert mapping.external == Endpoint(w.nat.address, 20000)
    assert mapping.remote == Endpoint(A, P1)
    assert (mapping.created, mapping.expires) == (5.0, 125.0)
    assert mapping.permitted == frozenset({Endpoint(A, P1)})
    assert w.nat.mapping_of((w.inside.address, 40000)) == mapping
    assert w.nat.mapping_of(("10.9.9.9", 1)) is None


def test_address_dependent_mapping_key_is_the_address() -> None:
    """An ADM mapping is keyed by the destination address alone."""
    w = world(mapping=Mapping.ADDRESS_DEPENDENT)
    w.seen_by((B, P2))
    (mapping,) = w.nat.mappings
    assert mapping.remote == Endpoint(B, 0)


def test_hosts_behind_one_nat_get_their_own_mappings() -> None:
    """Two hosts behind one NAT each get a mapping, and answers find them."""
    network = Network()
    nat = network.nat("nat")
    server = network.host("server")
    server.reactor.listenUDP(7, Echo())
    one, one_rx = listen(network.host("one", nat.lan), 4000)
    two, two_rx = listen(network.host("two", nat.lan), 5000)
    one.write(b"one", (server.address, 7))
    two.write(b"two", (server.address, 7))
    network.pump()
    assert one_rx.payloads == [b"one"]
    assert two_rx.payloads == [b"two"]
    assert {m.external.port for m in nat.mappings} == {4000, 5000}


def test_hosts_behind_one_nat_talk_directly() -> None:
    """Inside hosts reach each other's private addresses without the NAT."""
    network = Network()
    nat = network.nat("nat")
    one = network.host("one", nat.lan)
    two = network.host("two", nat.lan)
    port, _ = listen(one, 4000)
    _, received = listen(two, 5000)
    port.write(b"hi", (two.address, 5000))
    network.pump()
    assert received.sources == [Endpoint(one.address, 4000)]
    assert nat.stats.outbound == 0


def test_nested_nat_public_server_sees_outer_mapping() -> None:
    """Behind two NATs, the server sees the outer NAT's mapping of the inner's."""
    network = Network()
    outer = network.nat("carrier", lan="100.64.0.0/24")
    inner = network.nat("home", outer.lan, preset="symmetric-sequential")
    host = network.host("laptop", inner.lan)
    server = network.host("server")
    port, _ = listen(host, 40000)
    _, received = listen(server, 3478)
    port.write(b"x", (server.address, 3478))
    network.pump()
    assert inner.address == "100.64.0.2"
    (inner_mapping,) = inner.mappings
    (outer_mapping,) = outer.mappings
    assert inner_mapping.external == Endpoint("100.64.0.2", 20000)
    assert outer_mapping.internal == inner_mapping.external
    assert received.sources == [outer_mapping.external]
    assert outer_mapping.external == Endpoint(outer.address, 20000)


def test_firewall_does_not_translate() -> None:
    """A stateful firewall keeps the inside host's public address and port."""
    w = world("symmetric-udp-firewall")
    assert w.seen_by((A, P1)) == Endpoint(w.inside.address, 40000)
    assert w.inside.address == "192.0.2.3"


@pytest.mark.parametrize("preset", ["open", "symmetric-udp-firewall"])
def test_routed_hosts_are_public(preset: str) -> None:
    """Behind a router that does not translate, hosts get public addresses."""
    network = Network()
    router = network.nat("router", preset=preset)
    host = network.host("h", router.lan)
    assert network.internet.attachment(host.address) is router
    assert router.lan.attachment(host.address) is host


def test_flush_forgets_mappings() -> None:
    """A flushed (rebooted) NAT has no mappings; inbound traffic is dropped."""
    w = world("full-cone")
    external = w.seen_by((A, P1))
    w.nat.flush()
    assert w.nat.mappings == ()
    assert not w.probe((A, P1), external)
