"""
Building a simulated network: names, addresses, realms, presets and NAT
behaviour values.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from nattraverse.testing import (
    PRESETS,
    Allocation,
    Filtering,
    Mapping,
    NatBehaviour,
    Network,
)


def test_default_addresses() -> None:
    """Hosts and NATs get documentation addresses; LANs get 10.0.N.0/24."""
    network = Network()
    nat = network.nat("home")
    second = network.nat("office")
    assert (nat.address, second.address) == ("203.0.113.1", "203.0.113.2")
    assert network.host("server").address == "192.0.2.1"
    assert network.host("laptop", nat.lan).address == "10.0.1.2"
    assert network.host("desk", second.lan).address == "10.0.2.2"
    assert nat.lan_address == "10.0.1.1"


def test_explicit_addresses_and_lan() -> None:
    """Addresses and the LAN subnet may be given."""
    network = Network()
    nat = network.nat("home", public_address="198.51.100.40", lan="192.168.1.0/24")
    host = network.host("laptop", nat.lan, address="192.168.1.77")
    assert nat.address == "198.51.100.40"
    assert nat.lan_address == "192.168.1.1"
    assert host.address == "192.168.1.77"
    assert network.host("next", nat.lan).address == "192.168.1.2"


def test_overlapping_private_networks() -> None:
    """Two homes may use the same private addresses: they are different realms."""
    network = Network()
    one = network.nat("one", lan="192.168.1.0/24")
    two = network.nat("two", lan="192.168.1.0/24")
    assert network.host("a", one.lan).address == network.host("b", two.lan).address


def test_address_in_use() -> None:
    """An address is used once per realm."""
    network = Network()
    network.host("a", address="192.0.2.50")
    with pytest.raises(ValueError, match="already in use"):
        network.host("b", address="192.0.2.50")
    with pytest.raises(ValueError, match="already in use"):
        network.nat("n", public_address="192.0.2.50")
    with pytest.raises(ValueError, match="twice"):
        network.host("c", address="192.0.2.60", aliases=["192.0.2.60"])


def test_gateway_address_reserved() -> None:
    """A NAT's inside address cannot be given to a host."""
    network = Network()
    nat = network.nat("home")
    with pytest.raises(ValueError, match="already in use"):
        network.host("h", nat.lan, address="10.0.1.1")


def test_names_are_unique() -> None:
    """Hosts and NATs share one namespace."""
    network = Network()
    network.host("x")
    with pytest.raises(ValueError, match="already has"):
        network.nat("x")
    with pytest.raises(ValueError, match="non-empty"):
        network.host("")


def test_bad_addresses() -> None:
    """Addresses must be IPv4."""
    network = Network()
    with pytest.raises(ValueError, match="IPv4"):
        network.host("h", address="2001:db8::1")
    with pytest.raises(ValueError, match="not an IPv4 network"):
        network.nat("n", lan="10.0.0.0/33")
    with pytest.raises(ValueError, match="no room"):
        network.nat("m", lan="10.0.0.0/31")


def test_realm_of_another_network() -> None:
    """Realms belong to one network."""
    other = Network().nat("elsewhere")
    with pytest.raises(ValueError, match="not a realm of this network"):
        Network().host("h", other.lan)


def test_shared_clock() -> None:
    """A given clock is used by every host."""
    clock = Clock()
    network = Network(clock)
    assert network.host("h").reactor.clock is clock


def test_preset_with_changes() -> None:
    """A preset's behaviour can be changed by keyword."""
    network = Network()
    nat = network.nat("n", preset="symmetric", hairpin=True, mapping_lifetime=30.0)
    assert nat.behaviour == PRESETS["symmetric"].replace(hairpin=True, mapping_lifetime=30.0)


def test_behaviour_as_preset() -> None:
    """A NatBehaviour may be given as the preset."""
    behaviour = NatBehaviour(mapping=Mapping.ADDRESS_DEPENDENT)
    nat = Network().nat("n", preset=behaviour, filtering=Filtering.ENDPOINT_INDEPENDENT)
    assert nat.behaviour.mapping is Mapping.ADDRESS_DEPENDENT
    assert nat.behaviour.filtering is Filtering.ENDPOINT_INDEPENDENT


def test_default_is_port_restricted() -> None:
    """Without a preset, a NAT behaves as Linux masquerade does."""
    assert Network().nat("n").behaviour == PRESETS["port-restricted"]


def test_unknown_preset() -> None:
    """An unknown preset is named, with the known ones."""
    with pytest.raises(ValueError, match=r"'moderate'.*full-cone"):
        Network().nat("n", preset="moderate")


def test_lab_presets() -> None:
    """The presets are the real lab's, with their RFC 4787 behaviours."""
    assert sorted(PRESETS) == sorted(
        [
            "open",
            "full-cone",
            "restricted-cone",
            "port-restricted",
            "symmetric",
            "symmetric-sequential",
            "udp-blocked",
            "symmetric-udp-firewall",
        ]
    )
    assert PRESETS["symmetric"].allocation is Allocation.RANDOM
    assert PRESETS["symmetric-sequential"].allocation is Allocation.SEQUENTIAL
    assert not PRESETS["open"].translate
    assert PRESETS["udp-blocked"].block_udp


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"port_range": (0, 10)}, ValueError, "port_range"),
        ({"port_range": (200, 100)}, ValueError, "port_range"),
        ({"step": 0}, ValueError, "step"),
        ({"mapping_lifetime": 0}, ValueError, "mapping_lifetime"),
        ({"mapping": "symmetric"}, TypeError, "mapping"),
        ({"colour": "blue"}, TypeError, "colour"),
    ],
)
def test_behaviour_checks(changes: dict[str, object], error: type[Exception], match: str) -> None:
    """NatBehaviour rejects bad values and unknown fields, naming them."""
    with pytest.raises(error, match=match):
        NatBehaviour().replace(**changes)


def test_realm_addresses() -> None:
    """A realm lists its addresses and who has them."""
    network = Network()
    nat = network.nat("home")
    network.host("laptop", nat.lan)
    assert network.internet.addresses == {"203.0.113.1": "home"}
    assert nat.lan.addresses == {"10.0.1.2": "laptop"}
    assert repr(nat.lan) == "<Realm home.lan>"


def test_uplink_can_change() -> None:
    """A NAT's uplink can be replaced while running."""
    from nattraverse.testing import Link

    nat = Network().nat("home")
    nat.uplink = Link(delay=0.1)
    assert nat.link == Link(delay=0.1)
