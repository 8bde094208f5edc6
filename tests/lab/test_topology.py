"""
Topologies beyond one NAT: two levels (carrier-grade style), delayed and
lossy links, and what building and removing a lab costs.
"""

from __future__ import annotations

import ipaddress
import socket
import statistics
import threading
import time
from collections.abc import Callable

import pytest

from tests.natlab import (
    Filtering,
    Lab,
    Mapping,
    Observation,
    Preset,
    PublicHost,
    Reflector,
    classify,
)
from tests.natlab.probe import arrivals, round_trips, token


@pytest.mark.lab
def test_two_level_nat(lab: Lab, reflector: Reflector) -> None:
    """A host behind a NAT behind a carrier-grade NAT is seen at the outer NAT's address."""
    cgn = lab.nat("cgn", Preset.PORT_RESTRICTED, lan="100.64.0.0/24")
    home = lab.nat("home", Preset.FULL_CONE, wan=cgn)
    host = lab.host("a", behind=home)
    assert ipaddress.IPv4Address(home.wan_address) in ipaddress.IPv4Network("100.64.0.0/10")
    observed = classify(host, reflector)
    assert {address for address, _ in observed.mapped} == {cgn.wan_address}
    # The stricter NAT decides: the outer port-restricted filtering shows.
    assert (observed.mapping, observed.filtering) == (
        Mapping.ENDPOINT_INDEPENDENT,
        Filtering.ADDRESS_AND_PORT_DEPENDENT,
    )
    assert observed.port_preserved
    assert host.public_address == cgn.wan_address


#: RFC 5737, the only prefixes allowed on the lab's internet.
DOCUMENTATION = [
    ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
]


@pytest.mark.lab
def test_internet_sees_documentation_addresses_only(lab: Lab, reflector: Reflector) -> None:
    """Every IPv4 packet on the internet bridge, behind one or two NATs, has public addresses."""
    internet = lab.internet()
    cgn = lab.nat("cgn", Preset.SYMMETRIC, lan="100.64.0.0/24")
    hosts = [
        lab.host("a", behind=lab.nat("home", Preset.FULL_CONE, wan=cgn)),
        lab.host("b", behind=lab.nat("fw", Preset.SYMMETRIC_UDP_FIREWALL)),
        lab.host("c", behind=lab.nat("pr", Preset.PORT_RESTRICTED, inbound="reject")),
    ]
    # Unbound, it sees the frames of every port of the bridge (the namespace's only links).
    capture = internet.call(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300))
    with capture:
        for host in hosts:
            classify(host, reflector)
        capture.setblocking(False)
        addresses = set()
        for _ in range(100_000):
            try:
                frame = capture.recv(65535)
            except BlockingIOError:
                break
            if frame[12:14] == b"\x08\x00":  # IPv4
                addresses |= {
                    ipaddress.IPv4Address(frame[26:30]),
                    ipaddress.IPv4Address(frame[30:34]),
                }
    assert len(addresses) > 3
    assert all(any(a in n for n in DOCUMENTATION) for a in addresses), sorted(map(str, addresses))


@pytest.mark.lab
def test_delay_round_trip(lab: Lab, require_delay: None) -> None:
    """A round trip over delayed links takes twice the sum of their one-way delays."""
    server = lab.public_host("server", delay_ms=5)
    nat = lab.nat("nat", delay_ms=10)
    host = lab.host("a", behind=nat, delay_ms=2)
    expected = 2 * (host.delay_to_internet_ms + server.delay_to_internet_ms) / 1000
    times = round_trips(host.udp_socket(), server.udp_socket(0, server.address), count=9)
    assert expected == pytest.approx(0.034)
    assert min(times) >= expected - 0.001
    # Each of six crossings may add about a millisecond; allow plenty more on busy machines.
    assert statistics.median(times) <= expected + 0.020


@pytest.mark.lab
def test_loss(lab: Lab, server: PublicHost) -> None:
    """A link with 30 % loss delivers about 70 % of the datagrams sent over it."""
    host = lab.host("a", behind=lab.nat("nat", loss=0.3))
    sink = server.udp_socket(0, server.address)
    client = host.udp_socket()
    sent = {token(): i for i in range(400)}
    for payload in sent:
        client.sendto(payload, sink.getsockname())
    delivered = len(arrivals(sink, sent, 1.0)) / len(sent)
    assert 0.55 < delivered < 0.85


def _two_nat_lab(lab: Lab) -> None:
    """Six namespaces: internet, a server, two NATs, a host behind each."""
    lab.public_host("server", ["192.0.2.10", "192.0.2.11"])
    for index, preset in enumerate((Preset.PORT_RESTRICTED, Preset.SYMMETRIC), 1):
        lab.host(f"h{index}", behind=lab.nat(f"n{index}", preset))


@pytest.mark.lab
def test_build_speed(
    require_lab: None,
    stale_labs_swept: None,
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    """Measure (and print) building and removing a two-NAT topology; nothing is asserted."""
    builds, totals = [], []
    for _ in range(5):
        started = time.monotonic()
        with Lab() as lab:
            _two_nat_lab(lab)
            lab.build()
            builds.append(lab.build_seconds)
            assert len(lab.namespaces) == 6
        totals.append(time.monotonic() - started)
    build, total = statistics.median(builds), statistics.median(totals)
    record_property("two_nat_build_seconds", build)
    record_property("two_nat_build_and_teardown_seconds", total)
    with capsys.disabled():
        print(
            f"\nnatlab: two-NAT lab (6 namespaces): build {build * 1000:.0f} ms, "
            f"build + teardown {total * 1000:.0f} ms (median of 5)"
        )


@pytest.mark.lab
def test_parallel_labs(
    require_lab: None, stale_labs_swept: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Independent labs build and probe correctly side by side in threads."""
    presets = [Preset.FULL_CONE, Preset.RESTRICTED_CONE, Preset.PORT_RESTRICTED, Preset.SYMMETRIC]
    observed: dict[Preset, Observation] = {}
    errors: list[BaseException] = []

    def probe(preset: Preset) -> None:
        try:
            with Lab() as lab:
                server = lab.public_host("server", ["192.0.2.10", "192.0.2.11"])
                host = lab.host("a", behind=lab.nat("nat", preset))
                observed[preset] = classify(host, Reflector(server))
        except BaseException as e:
            errors.append(e)

    started = time.monotonic()
    threads = [threading.Thread(target=probe, args=(p,)) for p in presets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    assert not errors, errors
    for preset in presets:
        assert (observed[preset].mapping, observed[preset].filtering) == (
            preset.mapping,
            preset.filtering,
        )
    with capsys.disabled():
        print(f"\nnatlab: {len(presets)} labs built and classified in parallel: {elapsed:.2f} s")
