"""
NAT behaviour discovery behind every NAT preset of :mod:`nattraverse.testing`
(the presets mirror the real namespace lab), with the project's RFC 5780
STUN server 50 ms away: each preset is classified as it is built, within
3 s of simulated time, and nothing is left behind.  Then variants (hairpin,
no port preservation, steps, address-dependent mapping) and impaired links,
where a finding may become unknown but never more permissive than the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from nattraverse._types import Endpoint
from nattraverse.discovery import (
    Allocation,
    AllocationPattern,
    Filtering,
    Mapping,
    NatReport,
    Rfc3489Type,
    discover,
)
from nattraverse.stun.server import StunServer
from nattraverse.testing import PRESETS, Link, Network, SimulatedHost
from nattraverse.testing import Allocation as SimAllocation

EIM = Mapping.ENDPOINT_INDEPENDENT
ADM = Mapping.ADDRESS_DEPENDENT
APDM = Mapping.ADDRESS_AND_PORT_DEPENDENT
EIF = Filtering.ENDPOINT_INDEPENDENT
ADF = Filtering.ADDRESS_DEPENDENT
APDF = Filtering.ADDRESS_AND_PORT_DEPENDENT
PRESERVED = Allocation(AllocationPattern.PRESERVED)

SERVER = Endpoint("192.0.2.10", 3478)
OTHER_IP = "192.0.2.11"
#: One way from the client to the server: half on the NAT's uplink, half on
#: the server's link.
ONE_WAY = 0.05
#: The issue's budget for a whole check at that distance.
BUDGET = 3.0


@dataclass(frozen=True)
class Expected:
    udp: str = "ok"
    nat: bool | None = True
    mapping: Mapping | None = EIM
    filtering: Filtering | None = APDF
    hairpin: bool | None = False
    port_preservation: bool | None = True
    allocation: Allocation = PRESERVED
    rfc3489: Rfc3489Type = Rfc3489Type.PORT_RESTRICTED_CONE


#: What discovery must find behind each preset.
EXPECTED = {
    "open": Expected(nat=False, filtering=EIF, hairpin=True, rfc3489=Rfc3489Type.OPEN),
    "full-cone": Expected(filtering=EIF, rfc3489=Rfc3489Type.FULL_CONE),
    "restricted-cone": Expected(filtering=ADF, rfc3489=Rfc3489Type.RESTRICTED_CONE),
    "port-restricted": Expected(),
    "symmetric": Expected(
        mapping=APDM,
        port_preservation=False,
        allocation=Allocation(AllocationPattern.RANDOM),
        rfc3489=Rfc3489Type.SYMMETRIC,
    ),
    "symmetric-sequential": Expected(
        mapping=APDM,
        port_preservation=False,
        allocation=Allocation(AllocationPattern.SEQUENTIAL, 1),
        rfc3489=Rfc3489Type.SYMMETRIC,
    ),
    "udp-blocked": Expected(
        udp="blocked",
        nat=None,
        mapping=None,
        filtering=None,
        hairpin=None,
        port_preservation=None,
        allocation=Allocation(),
        rfc3489=Rfc3489Type.BLOCKED,
    ),
    "symmetric-udp-firewall": Expected(
        nat=False, hairpin=True, rfc3489=Rfc3489Type.SYMMETRIC_UDP_FIREWALL
    ),
}


def world(
    seed: int = 0,
    *,
    preset: str = "port-restricted",
    uplink: Link | None = None,
    server_link: Link | None = None,
    laptop_link: Link | None = None,
    **nat: Any,
) -> tuple[Network, SimulatedHost]:
    """A two-address STUN server ONE_WAY from a laptop behind a NAT."""
    network = Network(seed=seed)
    stun = network.host(
        "stun",
        address=SERVER.host,
        aliases=[OTHER_IP],
        link=server_link or Link(delay=ONE_WAY / 2),
    )
    StunServer(
        stun.reactor,
        interface=SERVER.host,
        port=SERVER.port,
        alt_address=OTHER_IP,
        alt_port=3479,
        tcp=False,
    ).startService()
    home = network.nat("home", preset=preset, uplink=uplink or Link(delay=ONE_WAY / 2), **nat)
    return network, network.host("laptop", home.lan, link=laptop_link or Link())


def check(network: Network, host: SimulatedHost, **kwargs: Any) -> tuple[NatReport, float]:
    """Run discovery; the report and the simulated seconds it took."""
    start = network.clock.seconds()
    report = network.run_until(discover(host.reactor, SERVER, **kwargs), timeout=1000)
    assert host.ports == ()
    assert host.reactor.getDelayedCalls() == []
    return report, network.clock.seconds() - start


def findings(report: NatReport) -> Expected:
    return Expected(
        udp=report.udp,
        nat=report.nat,
        mapping=report.mapping,
        filtering=report.filtering,
        hairpin=report.hairpin,
        port_preservation=report.port_preservation,
        allocation=report.allocation,
        rfc3489=report.rfc3489,
    )


def test_every_preset_has_an_expectation() -> None:
    """A new preset must say what discovery should find behind it."""
    assert set(EXPECTED) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset(preset: str) -> None:
    """Behind each preset, discovery finds what the preset is, within 3 s."""
    network, host = world(preset=preset)
    report, took = check(network, host)
    assert findings(report) == EXPECTED[preset]
    assert took <= BUDGET


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_external_addresses(preset: str) -> None:
    """The external addresses are the NAT's (or the host's own, untranslated)."""
    network, host = world(preset=preset)
    report, _ = check(network, host)
    if report.udp == "blocked":
        assert report.external == ()
        return
    public = network.nats["home"].address if report.nat else host.address
    assert {e.host for e in report.external} == {public}
    # A symmetric NAT shows one external address per destination.
    assert len(report.external) == (4 if report.mapping is APDM else 1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_json(preset: str) -> None:
    """The JSON of each preset's report has exactly the documented keys."""
    network, host = world(preset=preset)
    report, _ = check(network, host)
    out = report.to_json()
    assert set(out) == {
        "udp",
        "mapping",
        "filtering",
        "hairpin",
        "port_preservation",
        "allocation",
        "external",
        "rfc3489",
    }
    assert out["rfc3489"] == EXPECTED[preset].rfc3489.value


def test_fast_on_a_lossless_path() -> None:
    """With every answer arriving, the check takes a few round trips: about
    the first answer plus four round trips of waiting for filtered answers."""
    network, host = world(preset="port-restricted")
    _, took = check(network, host)
    assert took == pytest.approx(2 * ONE_WAY + 4 * 2 * ONE_WAY, abs=0.01)


def test_far_server_still_within_budget() -> None:
    """At 150 ms one way the waits scale with the round trip and still fit."""
    network, host = world(
        preset="symmetric", uplink=Link(delay=0.075), server_link=Link(delay=0.075)
    )
    report, took = check(network, host)
    assert report.mapping is APDM
    assert report.filtering is APDF
    assert took <= BUDGET


@pytest.mark.parametrize("preset", ["full-cone", "restricted-cone", "port-restricted"])
def test_hairpin(preset: str) -> None:
    """A cone NAT that hairpins is reported as hairpinning."""
    network, host = world(preset=preset, hairpin=True)
    report, _ = check(network, host)
    assert report.hairpin is True


@pytest.mark.parametrize("preset", ["symmetric", "symmetric-sequential"])
def test_hairpin_symmetric(preset: str) -> None:
    """A symmetric NAT that hairpins still filters: each socket's datagram
    leaves through a new mapping the other socket never sent to, so peers
    behind it cannot reach each other at their external addresses."""
    network, host = world(preset=preset, hairpin=True)
    report, _ = check(network, host)
    assert report.hairpin is False


@pytest.mark.parametrize(
    ("changes", "allocation"),
    [
        ({"port_preservation": False}, Allocation(AllocationPattern.SEQUENTIAL, 1)),
        ({"port_preservation": False, "step": 2}, Allocation(AllocationPattern.SEQUENTIAL, 2)),
        (
            {"port_preservation": False, "allocation": SimAllocation.RANDOM},
            Allocation(AllocationPattern.RANDOM),
        ),
    ],
)
def test_allocation_without_port_preservation(
    changes: dict[str, Any], allocation: Allocation
) -> None:
    """An EIM NAT that does not keep ports: its allocation pattern is measured."""
    network, host = world(preset="port-restricted", **changes)
    report, _ = check(network, host)
    assert report.mapping is EIM
    assert report.port_preservation is False
    assert report.allocation == allocation
    assert report.rfc3489 is Rfc3489Type.PORT_RESTRICTED_CONE


def test_symmetric_sequential_step() -> None:
    """A symmetric NAT stepping by 3 is sequential with step 3."""
    network, host = world(preset="symmetric-sequential", step=3)
    report, _ = check(network, host)
    assert report.allocation == Allocation(AllocationPattern.SEQUENTIAL, 3)


def test_address_dependent_mapping() -> None:
    """A NAT mapping per destination address: address-dependent, symmetric."""
    network, host = world(preset="port-restricted", mapping=Mapping.ADDRESS_DEPENDENT)
    report, _ = check(network, host)
    assert report.mapping is ADM
    assert report.rfc3489 is Rfc3489Type.SYMMETRIC
    assert len(report.external) == 2


def test_jitter_reordering_first_datagrams_keeps_sequential() -> None:
    """Jitter on the laptop's link reorders the first datagrams on their way to
    the NAT; a sequential NAT is still found sequential."""
    seen = set()
    reordered = 0
    for seed in range(10):
        network, host = world(seed, preset="symmetric-sequential", laptop_link=Link(jitter=0.01))
        report, _ = check(network, host)
        seen.add(report.allocation)
        reordered += report.external[0].port != 20000
    assert seen == {Allocation(AllocationPattern.SEQUENTIAL, 1)}
    assert reordered > 0


#: From most to least permissive.
ORDER = [EIF, ADF, APDF]


@pytest.mark.parametrize(
    "preset", ["full-cone", "restricted-cone", "port-restricted", "symmetric", "open"]
)
def test_loss_never_makes_a_nat_look_more_open(preset: str) -> None:
    """
    On a lossy path findings may be unknown, or filtering stricter than the
    truth (a lost answer looks filtered), but never more permissive, and
    mapping is right or unknown.
    """
    truth = EXPECTED[preset]
    for seed in range(20):
        network, host = world(seed, preset=preset, uplink=Link(delay=0.025, loss=0.15))
        report, took = check(network, host)
        if report.udp == "blocked":
            continue
        assert report.mapping in (truth.mapping, None)
        if report.filtering is not None:
            assert truth.filtering is not None
            assert ORDER.index(report.filtering) >= ORDER.index(truth.filtering)
        assert report.nat is truth.nat
        assert took <= 2 * BUDGET


def test_loss_mostly_still_classifies() -> None:
    """With 5% loss each way, most checks still find the truth."""
    right = 0
    for seed in range(20):
        network, host = world(seed, preset="restricted-cone", uplink=Link(delay=0.025, loss=0.05))
        report, _ = check(network, host)
        right += (report.mapping, report.filtering) == (EIM, ADF)
    assert right >= 15


def test_lifetime_behind_preset() -> None:
    """The lifetime test brackets a preset's mapping lifetime."""
    network, host = world(preset="symmetric", mapping_lifetime=25.0)
    report, took = check(network, host, lifetime=True)
    assert report.lifetime is not None
    assert (report.lifetime.at_least, report.lifetime.less_than) == (20.0, 30.0)
    assert took < 32
