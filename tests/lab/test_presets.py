"""
Every NAT preset of the lab, probed from inside: its mapping and filtering
behaviour (RFC 4787) as a host behind it sees them against a public host
with two addresses, and the port allocation each one promises.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.natlab import Lab, Mapping, Preset, PublicHost, Reflector, classify
from tests.natlab.probe import seen_from
from tests.natlab.ruleset import SEQUENTIAL_BASE


@pytest.mark.lab
@pytest.mark.parametrize("preset", list(Preset), ids=str)
def test_preset_behaviour(lab: Lab, reflector: Reflector, preset: Preset) -> None:
    """A host behind each preset observes the mapping and filtering the preset claims."""
    nat = lab.nat("nat", preset)
    host = lab.host("a", behind=nat)
    observed = classify(host, reflector)
    assert (observed.mapping, observed.filtering) == (preset.mapping, preset.filtering)
    if preset.mapping is Mapping.NONE:
        assert {address for address, _ in observed.mapped} == {host.address}
    elif preset.mapping is not None:
        assert {address for address, _ in observed.mapped} == {nat.wan_address}


@pytest.mark.lab
@pytest.mark.parametrize("preset", [Preset.SYMMETRIC_UDP_FIREWALL, Preset.OPEN], ids=str)
def test_routers_keep_public_addresses(lab: Lab, preset: Preset) -> None:
    """Hosts behind the non-translating presets have public (documentation) addresses."""
    nat = lab.nat("fw", preset)
    host = lab.host("a", behind=nat)
    assert ipaddress.IPv4Address(host.address) in ipaddress.IPv4Network("198.51.100.0/24")
    assert host.public_address == host.address


@pytest.mark.lab
def test_symmetric_ports_are_random(lab: Lab, reflector: Reflector) -> None:
    """A symmetric NAT gives each new flow an unpredictable port, never the inside one."""
    host = lab.host("a", behind=lab.nat("nat", Preset.SYMMETRIC))
    observed = classify(host, reflector)
    assert len(set(observed.ports)) == 4
    assert not observed.sequential
    assert observed.local[1] not in observed.ports


@pytest.mark.lab
def test_sequential_ports_count_up(lab: Lab, reflector: Reflector) -> None:
    """A symmetric-sequential NAT gives each new flow the port after the previous flow's."""
    host = lab.host("a", behind=lab.nat("nat", Preset.SYMMETRIC_SEQUENTIAL))
    first = classify(host, reflector)
    second = classify(host, reflector)
    assert first.sequential
    assert first.ports == tuple(range(SEQUENTIAL_BASE, SEQUENTIAL_BASE + 4))
    # The filtering probe of the first classify took the next port.
    assert second.ports[0] == first.ports[-1] + 2
    assert second.sequential


@pytest.mark.lab
@pytest.mark.parametrize("preservation", [True, False], ids=["preserved", "changed"])
@pytest.mark.parametrize("preset", [Preset.FULL_CONE, Preset.PORT_RESTRICTED], ids=str)
def test_port_preservation(
    lab: Lab, reflector: Reflector, preset: Preset, preservation: bool
) -> None:
    """Port preservation keeps the inside port; without it the port changes, EIM still."""
    nat = lab.nat("nat", preset, port_preservation=preservation)
    host = lab.host("a", behind=nat)
    observed = classify(host, reflector)
    assert observed.mapping is Mapping.ENDPOINT_INDEPENDENT
    assert observed.port_preserved is preservation


@pytest.mark.lab
def test_udp_blocked_passes_tcp(lab: Lab, server: PublicHost) -> None:
    """A udp-blocked NAT lets no UDP through, but TCP connects."""
    host = lab.host("a", behind=lab.nat("nat", Preset.UDP_BLOCKED))
    udp_server = server.udp_socket(0, server.address)
    assert seen_from(host.udp_socket(), udp_server, timeout=0.3, attempts=2) is None
    listener = server.tcp_socket()
    listener.bind((server.address, 0))
    listener.listen()
    client = host.tcp_socket()
    client.settimeout(2.0)
    client.connect(listener.getsockname())
    listener.settimeout(2.0)
    accepted, peer = listener.accept()
    accepted.close()
    assert peer[0] == lab.nodes["nat"].address
    assert client.getpeername() == listener.getsockname()
