"""
nattraverse's own STUN stack, unchanged, on the simulated network: a
StunServer with two addresses (RFC 5780) on the internet, and a
StunDemultiplexer behind each NAT preset.  The mapped address and the RFC
5780 behaviour discovery tests (sections 4.3 and 4.4) come out as each
preset's RFC 4787 behaviour says.
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random

import pytest

from nattraverse._types import Endpoint
from nattraverse.errors import StunTimeout
from nattraverse.stun.attributes import ChangeRequest
from nattraverse.stun.client import StunClient
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.server import StunServer
from nattraverse.stun.transaction import StunResponse
from nattraverse.testing import (
    PRESETS,
    Filtering,
    Link,
    Mapping,
    Network,
    SimulatedHost,
    SimulatedNAT,
)

A = "192.0.2.1"
B = "192.0.2.2"
PRIMARY = Endpoint(A, 3478)
LOCAL_PORT = 40000

EIM = Mapping.ENDPOINT_INDEPENDENT
ADM = Mapping.ADDRESS_DEPENDENT
APDM = Mapping.ADDRESS_AND_PORT_DEPENDENT
EIF = Filtering.ENDPOINT_INDEPENDENT
ADF = Filtering.ADDRESS_DEPENDENT
APDF = Filtering.ADDRESS_AND_PORT_DEPENDENT

#: What RFC 5780 discovery should find behind each preset; routers that do
#: not translate map endpoint-independently by nature.
EXPECTED = {
    "open": (EIM, EIF),
    "full-cone": (EIM, EIF),
    "restricted-cone": (EIM, ADF),
    "port-restricted": (EIM, APDF),
    "symmetric": (APDM, APDF),
    "symmetric-sequential": (APDM, APDF),
    "symmetric-udp-firewall": (EIM, APDF),
}


@dataclass
class StunWorld:
    network: Network
    server: StunServer
    nat: SimulatedNAT
    client_host: SimulatedHost
    client: StunClient

    def ask(self, server: Endpoint, change: ChangeRequest | None = None) -> StunResponse:
        attributes = [] if change is None else [change]
        return self.network.run_until(
            self.client.binding(server, attributes, match_source=change is None)
        )


def stun_world(
    preset: str, *, seed: int = 0, nat_behind: int = 0, **behaviour: object
) -> StunWorld:
    """A two-address STUN server on the internet, a client behind *preset*
    (behind *nat_behind* more port-restricted NATs)."""
    network = Network(seed=seed)
    host = network.host("stun", address=A, aliases=[B])
    server = StunServer(
        host.reactor,
        interface=A,
        port=3478,
        alt_address=B,
        alt_port=3479,
        tcp=False,
        fast_path=False,
    )
    server.startService()
    realm = network.internet
    for level in range(nat_behind):
        realm = network.nat(f"outer{level}", realm).lan
    nat = network.nat("nat", realm, preset=preset, **behaviour)  # type: ignore[arg-type]
    client_host = network.host("client", nat.lan)
    demux = StunDemultiplexer(client_host.reactor, random_bytes=Random(seed).randbytes)
    client_host.reactor.listenUDP(LOCAL_PORT, demux)
    return StunWorld(network, server, nat, client_host, demux.client)


def discover_mapping(w: StunWorld) -> Mapping:
    """RFC 5780 section 4.3."""
    first = w.ask(PRIMARY).mapped_address
    second = w.ask(Endpoint(B, 3478)).mapped_address
    if second == first:
        return EIM
    third = w.ask(Endpoint(B, 3479)).mapped_address
    return ADM if third == second else APDM


def discover_filtering(w: StunWorld) -> Filtering:
    """RFC 5780 section 4.4."""
    w.ask(PRIMARY)
    try:
        answer = w.ask(PRIMARY, ChangeRequest(change_ip=True, change_port=True))
    except StunTimeout:
        pass
    else:
        assert answer.source == Endpoint(B, 3479)
        return EIF
    try:
        answer = w.ask(PRIMARY, ChangeRequest(change_port=True))
    except StunTimeout:
        return APDF
    assert answer.source == Endpoint(A, 3479)
    return ADF


def test_server_runs_on_simulated_host() -> None:
    """The server binds its four RFC 5780 sockets on the host's two addresses."""
    w = stun_world("full-cone")
    assert sorted(str(w.server.endpoint(k)) for k in w.server._udp) == [
        "192.0.2.1:3478",
        "192.0.2.1:3479",
        "192.0.2.2:3478",
        "192.0.2.2:3479",
    ]


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_mapped_address(preset: str) -> None:
    """XOR-MAPPED-ADDRESS is the NAT's mapping of the client's socket."""
    w = stun_world(preset)
    response = w.ask(PRIMARY)
    mapping = w.nat.mapping_of((w.client_host.address, LOCAL_PORT))
    assert mapping is not None
    assert response.mapped_address == mapping.external
    assert response.other_address == Endpoint(B, 3479)
    if PRESETS[preset].translate:
        assert response.mapped_address.host == w.nat.address
    else:
        assert response.mapped_address == Endpoint(w.client_host.address, LOCAL_PORT)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_rfc5780_mapping_discovery(preset: str) -> None:
    """RFC 5780 mapping discovery finds each preset's mapping behaviour."""
    assert discover_mapping(stun_world(preset)) is EXPECTED[preset][0]


def test_rfc5780_finds_address_dependent_mapping() -> None:
    """RFC 5780 tells address-dependent mapping from the others."""
    assert discover_mapping(stun_world("port-restricted", mapping=ADM)) is ADM


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_rfc5780_filtering_discovery(preset: str) -> None:
    """CHANGE-REQUEST answers pass or are filtered exactly as the filtering says."""
    assert discover_filtering(stun_world(preset)) is EXPECTED[preset][1]


def test_filtered_change_request_counted_by_nat() -> None:
    """A filtered CHANGE-REQUEST answer shows in the NAT's counters, every retransmission."""
    w = stun_world("port-restricted")
    w.ask(PRIMARY)
    with pytest.raises(StunTimeout):
        w.ask(PRIMARY, ChangeRequest(change_port=True))
    assert w.nat.stats.filtered == w.server.stats.responses - 1 == 7


def test_udp_blocked_times_out() -> None:
    """Behind udp-blocked, a Binding request times out after RFC 8489's 39.5 s."""
    w = stun_world("udp-blocked")
    start = w.network.clock.seconds()
    with pytest.raises(StunTimeout):
        w.ask(PRIMARY)
    assert w.network.clock.seconds() - start == pytest.approx(39.5)
    assert w.server.stats.requests == 0


def test_nested_nats_mapped_address_is_outermost() -> None:
    """Behind two NATs, the server reports the outer NAT's mapping."""
    w = stun_world("symmetric", nat_behind=1)
    response = w.ask(PRIMARY)
    outer = w.network.nats["outer0"]
    (mapping,) = outer.mappings
    assert response.mapped_address == mapping.external
    assert response.mapped_address.host == outer.address
    assert mapping.internal.host == w.nat.address


def test_nested_behind_symmetric_inner_is_symmetric() -> None:
    """A symmetric NAT behind a cone NAT makes the whole path symmetric."""
    assert discover_mapping(stun_world("symmetric", nat_behind=1)) is APDM


def test_stun_through_lossy_link_retransmits() -> None:
    """Over a lossy uplink the client's retransmissions get the answer through
    (seed 1 loses the first request)."""
    w = stun_world("full-cone", seed=1, uplink=Link(delay=0.02, loss=0.5))
    response = w.ask(PRIMARY)
    assert response.mapped_address == Endpoint(w.nat.address, LOCAL_PORT)
    assert (w.network.stats.lost, response.transmissions) == (1, 2)
    assert response.elapsed == pytest.approx(0.54)


def test_server_stops_cleanly() -> None:
    """Stopping the server closes its simulated ports."""
    w = stun_world("full-cone")
    host = w.network.hosts["stun"]
    w.network.run_until(w.server.stopService())
    assert host.ports == ()
    assert host.reactor.getDelayedCalls() == []
