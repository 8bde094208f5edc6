"""
``Lab.public_host(..., delay_only_to=...)``: a public host whose link delay
applies only to what it sends to some addresses (one NAT's WAN address),
so that one peer hears a rendezvous late and the other does not.  The
first tests build real labs; the last ones check validation and the
generated rules without root.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Iterator

import pytest

from tests.natlab import Lab, LabError, Preset, _impair
from tests.natlab.nfqueue import wire_rules_to
from tests.natlab.probe import arrivals, receive_token, round_trips, seen_from, token

#: The delay of the server's link, towards natb's WAN address only.
DELAY_MS = 150
#: Seconds any one probe or echo may take.
PROBE_TIMEOUT = 3.0
#: A round trip over undelayed links stays well under this (seconds).
UNDELAYED = 0.050


def _echo_times(
    client: socket.socket, echo: socket.socket, target: tuple[str, int], count: int
) -> list[float]:
    """*count* round trips: *client* sends to *target*, where *echo* answers its source."""
    times = []
    for _ in range(count):
        payload = token()
        started = time.monotonic()
        client.sendto(payload, target)
        source = receive_token(echo, payload, PROBE_TIMEOUT)
        assert source is not None, f"probe to {target} lost"
        echo.sendto(payload, source)
        assert receive_token(client, payload, PROBE_TIMEOUT) is not None, "echo lost"
        times.append(time.monotonic() - started)
    return times


@pytest.mark.lab
def test_delay_only_to_one_nat(lab: Lab, require_delay: None) -> None:
    """Only the server's packets to natb's WAN address are delayed; nothing else is."""
    nata = lab.nat("nata", Preset.FULL_CONE)
    natb = lab.nat("natb", Preset.FULL_CONE)
    server = lab.public_host("server", delay_ms=DELAY_MS, delay_only_to=[natb.wan_address])
    a, b = lab.host("a", behind=nata), lab.host("b", behind=natb)
    assert server.delay_only_to == (natb.wan_address,)
    echo = server.udp_socket(0, server.address)
    from_a, from_b = a.udp_socket(), b.udp_socket()
    delay = DELAY_MS / 1000

    to_server_b = round_trips(from_b, echo, count=4, timeout=PROBE_TIMEOUT)
    assert min(to_server_b) >= delay - 0.002
    # One delayed crossing, not two: what b sends to the server is not delayed.
    assert statistics.median(to_server_b) < 2 * delay - 0.030

    to_server_a = round_trips(from_a, echo, count=4, timeout=PROBE_TIMEOUT)
    assert statistics.median(to_server_a) < UNDELAYED

    mapped_a = seen_from(from_a, echo, timeout=PROBE_TIMEOUT)
    mapped_b = seen_from(from_b, echo, timeout=PROBE_TIMEOUT)
    assert mapped_a is not None
    assert mapped_b is not None
    assert mapped_b[0] == natb.wan_address
    # The server's own round trips: delayed towards natb only.
    assert statistics.median(_echo_times(echo, from_a, mapped_a, 4)) < UNDELAYED
    assert min(_echo_times(echo, from_b, mapped_b, 3)) >= delay - 0.002
    # The peers' direct path (full-cone mappings) is not delayed either way.
    assert statistics.median(_echo_times(from_a, from_b, mapped_b, 4)) < UNDELAYED
    assert statistics.median(_echo_times(from_b, from_a, mapped_a, 4)) < UNDELAYED


@pytest.mark.lab
def test_delay_only_to_keeps_loss_everywhere(lab: Lab, require_delay: None) -> None:
    """The link's loss still applies to undelayed packets, both ways."""
    nata = lab.nat("nata", Preset.FULL_CONE)
    natb = lab.nat("natb", Preset.FULL_CONE)
    server = lab.public_host(
        "server", delay_ms=DELAY_MS, loss=0.3, delay_only_to=[natb.wan_address]
    )
    a = lab.host("a", behind=nata)
    sink, client = server.udp_socket(0, server.address), a.udp_socket()
    mapped = seen_from(client, sink, timeout=0.5, attempts=10)
    assert mapped is not None
    for sender, receiver, target in ((client, sink, sink.getsockname()), (sink, client, mapped)):
        sent = {token(): i for i in range(400)}
        for payload in sent:
            sender.sendto(payload, target)
        delivered = len(arrivals(receiver, sent, 1.0)) / len(sent)
        assert 0.55 < delivered < 0.85


# -- without root ------------------------------------------------------------


@pytest.fixture
def plan_lab() -> Iterator[Lab]:
    """A lab that is only declared, never built (no root needed), using netem."""
    with Lab() as new:
        new._impairment = _impair.NETEM
        yield new


@pytest.mark.parametrize("delay_ms", [0, 0.0])
def test_delay_only_to_needs_delay(plan_lab: Lab, delay_ms: float) -> None:
    """delay_only_to without a delay is refused."""
    with pytest.raises(LabError, match="delay_only_to needs delay_ms > 0"):
        plan_lab.public_host("server", delay_ms=delay_ms, delay_only_to=["203.0.113.1"])
    assert "server" not in plan_lab.nodes


@pytest.mark.parametrize(
    "address", ["example.com", "2001:db8::1", "203.0.113.1/32", "203.0.113.256", ""]
)
def test_delay_only_to_needs_ipv4_literals(plan_lab: Lab, address: str) -> None:
    """Anything but an IPv4 literal is refused."""
    with pytest.raises(LabError, match="is not an IPv4 address"):
        plan_lab.public_host("server", delay_ms=10, delay_only_to=["203.0.113.1", address])


def test_delay_only_to_netem_plan(plan_lab: Lab) -> None:
    """With netem, the host's egress gets prio + netem + u32 filters; its port only the loss."""
    server = plan_lab.public_host(
        "server", delay_ms=150, loss=0.1, delay_only_to=["203.0.113.2", "203.0.113.1"]
    )
    internet = plan_lab.internet()
    eth = f"{plan_lab.prefix}-eth0"
    assert plan_lab._plan.tc[server.namespace] == [
        f"qdisc add dev {eth} root handle 1: prio bands 2 priomap " + " ".join(["1"] * 16),
        f"qdisc add dev {eth} parent 1:1 handle 10: netem delay 150ms loss 10% limit 100000",
        f"qdisc add dev {eth} parent 1:2 handle 20: netem delay 0ms loss 10% limit 100000",
        f"filter add dev {eth} parent 1: protocol ip prio 1 u32 match ip dst 203.0.113.2/32 "
        "flowid 1:1",
        f"filter add dev {eth} parent 1: protocol ip prio 1 u32 match ip dst 203.0.113.1/32 "
        "flowid 1:1",
    ]
    (port_line,) = plan_lab._plan.tc[internet.namespace]
    assert port_line.endswith(" root netem delay 0ms loss 10% limit 100000")


def test_delay_only_to_netem_without_loss(plan_lab: Lab) -> None:
    """Without loss, the undelayed band keeps prio's FIFO and the port has no qdisc."""
    server = plan_lab.public_host("server", delay_ms=20, delay_only_to="203.0.113.1")
    lines = plan_lab._plan.tc[server.namespace]
    assert [line.split(" handle ")[-1].split()[0] for line in lines if "qdisc" in line] == [
        "1:",
        "10:",
    ]
    assert "loss" not in " ".join(lines)
    assert sum("match ip dst 203.0.113.1/32" in line for line in lines) == 1
    assert plan_lab.internet().namespace not in plan_lab._plan.tc


def test_delay_only_to_wire_plan(plan_lab: Lab) -> None:
    """With wires, only what the host's port sends to the addresses is queued; loss stays nft."""
    plan_lab._impairment = _impair.WIRE
    server = plan_lab.public_host(
        "server", delay_ms=150, loss=0.2, delay_only_to=["203.0.113.1", "203.0.113.1"]
    )
    wire = f"{server.namespace}-wire"
    prefix = plan_lab.prefix
    assert plan_lab._plan.iptables[wire] == wire_rules_to(f"{prefix}-a", ["203.0.113.1"], 0)
    assert plan_lab._plan.delayers == [(wire, 150)]
    assert "numgen random mod 1000 < 200 drop" in plan_lab._plan.nft[wire]


def test_wire_rules_to_text() -> None:
    """The variant of wire_rules queues one port's packets per destination, nothing else."""
    assert wire_rules_to("wa", ["203.0.113.1", "203.0.113.2"], 3) == (
        "*filter\n"
        "-A FORWARD -m physdev --physdev-in wa -d 203.0.113.1/32 -j NFQUEUE --queue-num 3\n"
        "-A FORWARD -m physdev --physdev-in wa -d 203.0.113.2/32 -j NFQUEUE --queue-num 3\n"
        "COMMIT\n"
    )
