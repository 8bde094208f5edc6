"""
TCP hole punching (the ``tcp`` method of ``punch:``) behind real kernel
NATs, driven through ``natcat`` (issue 6, "Tests in the real lab").

Each test builds a lab with our ``twistd natrendezvous`` on a public host,
a callee (``natcat --listen alice``) and a caller (``natcat alice``), both
with ``--methods tcp``, and checks what their ``--json-report`` say.  Every
NAT test runs twice: with NATs that drop unsolicited SYNs, on the lab's
internet, and with NATs that answer them with a RST (``reject with tcp
reset``), each behind an ISP's router (see :func:`_nat_pair` for why).

- The 5x5 matrix of the callee's NAT x the caller's NAT: the 17 pairs plain
  UDP punching serves connect by TCP too and echo 1 MiB intact (the 9
  cone-to-cone pairs by simultaneous open or by the accept of a SYN that
  found the other NAT open; the cone-to-symmetric ones through ``accept()``
  on the cone side, the symmetric side's SYN coming from a port its NAT
  picked), and so do the 2 pairs of a port-restricted NAT with a
  sequential one, by port prediction (issue 7: the port-restricted side
  punches the sequential side's predicted next ports too); the other 6
  fail within the punching budget with a clear error, and nothing reaches
  the callee's application.
- Both peers behind one NAT: the pair of private addresses.

Test ids name the callee's NAT first, then the inbound policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.lab.punch_support import (
    RENDEZVOUS_ADDRESS,
    Refused,
    echo_through,
    host_of,
    refused_through,
)
from tests.lab.test_udp_lab import PAIRS, punching_serves
from tests.natlab import Host, Inbound, Lab, Nat, Preset

pytestmark = [pytest.mark.lab, pytest.mark.slow]

#: natcat's arguments that restrict a side to TCP hole punching.
TCP_ONLY = ("--methods", "tcp")
#: The punching deadline of the pairs that cannot connect (``--punch-timeout``).
FAILING_PUNCH_TIMEOUT = 4.0
#: Seconds a failing caller may take beyond that deadline: interpreter
#: start, the rendezvous session and the introduction.
PUNCH_SLACK = 8.0

INBOUNDS = (Inbound.DROP, Inbound.REJECT)


def _cases(pairs: list[tuple[Preset, Preset]]) -> list[tuple[Preset, Preset, Inbound]]:
    return [(callee, caller, inbound) for callee, caller in pairs for inbound in INBOUNDS]


def _params(cases: list[tuple[Preset, Preset, Inbound]]) -> list[Any]:
    return [pytest.param(*case, id=_case_id(case)) for case in cases]


def _case_id(case: tuple[Preset, Preset, Inbound]) -> str:
    callee, caller, inbound = case
    return f"{callee.value}-vs-{caller.value}-{inbound.value}"


def _nat_pair(
    lab: Lab, callee_nat: Preset, caller_nat: Preset, inbound: Inbound
) -> tuple[Nat, Nat]:
    """
    The callee's NAT ``nata`` and the caller's ``natb``.  NATs that drop sit
    on the lab's internet, side by side; NATs that reject each sit behind an
    ISP's router (``ispa``, ``ispb``: a public hop), as on the internet.

    Why: two NATs that answer unsolicited SYNs with a RST on one segment
    cannot be punched, only raced.  Any SYN that opens one NAT reaches the
    other whatever its TTL (it is addressed to that NAT itself), the other's
    RST makes a Linux NAT forget the entry of the SYN it answers, so the
    two SYNs would have to cross within the one-way delay between the NATs,
    zero here.  Behind a router, a priming SYN opens each NAT and dies
    before the other (docs/tcp_punching.rst).
    """
    if inbound is Inbound.DROP:
        return (
            lab.nat("nata", callee_nat, inbound=inbound),
            lab.nat("natb", caller_nat, inbound=inbound),
        )
    isp_a, isp_b = lab.nat("ispa", Preset.OPEN), lab.nat("ispb", Preset.OPEN)
    return (
        lab.nat("nata", callee_nat, inbound=inbound, wan=isp_a),
        lab.nat("natb", caller_nat, inbound=inbound, wan=isp_b),
    )


def _two_nats(
    lab: Lab, callee_nat: Preset, caller_nat: Preset, inbound: Inbound
) -> tuple[Host, Host]:
    """The rendezvous, and a callee and a caller each behind a NAT of its own."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    nata, natb = _nat_pair(lab, callee_nat, caller_nat, inbound)
    return lab.host("callee", behind=nata), lab.host("caller", behind=natb)


def tcp_prediction_serves(callee: Preset, caller: Preset) -> bool:
    """
    Whether TCP port prediction connects a pair plain punching cannot: a
    sequential NAT with one that maps independently (port-restricted);
    never two sequential ones (nattraverse.punch.mapping, "TCP").
    """
    return {callee, caller} == {Preset.PORT_RESTRICTED, Preset.SYMMETRIC_SEQUENTIAL}


TCP_SERVED = [pair for pair in PAIRS if punching_serves(*pair) or tcp_prediction_serves(*pair)]
TCP_NOT_SERVED = [pair for pair in PAIRS if pair not in TCP_SERVED]
assert (len(TCP_SERVED), len(TCP_NOT_SERVED)) == (19, 6)
SERVED_CASES = _cases(TCP_SERVED)
NOT_SERVED_CASES = _cases(TCP_NOT_SERVED)


@pytest.mark.parametrize(("callee_nat", "caller_nat", "inbound"), _params(SERVED_CASES))
def test_tcp_connects_where_punching_can(
    lab: Lab, tmp_path: Path, callee_nat: Preset, caller_nat: Preset, inbound: Inbound
) -> None:
    """With --methods tcp, the pair connects by TCP through both NATs and echoes 1 MiB."""
    callee, caller = _two_nats(lab, callee_nat, caller_nat, inbound)
    mine, theirs = echo_through(
        lab, caller, callee, tmp_path, caller_args=TCP_ONLY, callee_args=TCP_ONLY
    )
    assert mine["method"] == "tcp"
    assert theirs["method"] == "tcp"
    assert host_of(mine["remote"]) == callee.public_address
    assert host_of(theirs["remote"]) == caller.public_address
    assert mine["connect_ms"] > 0


def _assert_clean_punching_failure(refused: Refused) -> None:
    """The caller failed for the right reason, saying so, within the budget."""
    assert refused.returncode == 1, refused.detail
    # No connection, so the JSON line says why: the race, with the method's failure.
    assert refused.report is not None, refused.detail
    assert refused.report["method"] is None, refused.detail
    (attempt,) = refused.report["race"]["attempts"]
    assert (attempt["method"], attempt["outcome"]) == ("tcp", "failed"), refused.detail
    assert "TCP hole punching failed" in refused.error, refused.detail
    assert "SYN" in refused.error, refused.detail
    assert refused.seconds < FAILING_PUNCH_TIMEOUT + PUNCH_SLACK, refused.detail


@pytest.mark.parametrize(("callee_nat", "caller_nat", "inbound"), _params(NOT_SERVED_CASES))
def test_tcp_fails_cleanly_where_punching_cannot(
    lab: Lab, tmp_path: Path, callee_nat: Preset, caller_nat: Preset, inbound: Inbound
) -> None:
    """With --methods tcp, the caller fails within the budget, naming TCP punching."""
    callee, caller = _two_nats(lab, callee_nat, caller_nat, inbound)
    args = (*TCP_ONLY, "--punch-timeout", f"{FAILING_PUNCH_TIMEOUT:g}")
    refused = refused_through(lab, caller, callee, tmp_path, caller_args=args, callee_args=args)
    _assert_clean_punching_failure(refused)


@pytest.mark.parametrize("inbound", INBOUNDS, ids=[i.value for i in INBOUNDS])
def test_peers_behind_one_nat_use_their_private_addresses(
    lab: Lab, tmp_path: Path, inbound: Inbound
) -> None:
    """Two peers behind one NAT (no hairpin) connect by TCP between their LAN addresses."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    nat = lab.nat("nat", Preset.PORT_RESTRICTED, inbound=inbound)
    callee = lab.host("callee", behind=nat)
    caller = lab.host("caller", behind=nat)
    mine, theirs = echo_through(
        lab, caller, callee, tmp_path, caller_args=TCP_ONLY, callee_args=TCP_ONLY
    )
    assert mine["method"] == "tcp"
    assert theirs["method"] == "tcp"
    assert host_of(mine["remote"]) == callee.address
    assert host_of(theirs["remote"]) == caller.address


#: How much later one peer starts: the rendezvous' messages reach it that late.
LATE_START_MS = 300.0
LATE_CASES = [
    pytest.param(late, inbound, id=f"{late}-late-{inbound.value}")
    for late in ("caller", "callee")
    for inbound in INBOUNDS
]


def _echo_by_tcp(lab: Lab, tmp_path: Path, nata: Nat, natb: Nat, late: str) -> Host:
    """
    The rendezvous (its messages to the *late* side, ``"caller"`` or
    ``"callee"``, 300 ms late; ``"none"``: none), the callee behind *nata*,
    the caller behind *natb*: 1 MiB echoed by TCP.  Returns the callee.
    """
    if late == "none":
        lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    else:
        slow = natb if late == "caller" else nata
        lab.public_host(
            "rendezvous",
            RENDEZVOUS_ADDRESS,
            delay_ms=LATE_START_MS,
            delay_only_to=[slow.wan_address],
        )
    callee = lab.host("callee", behind=nata)
    caller = lab.host("caller", behind=natb)
    mine, theirs = echo_through(
        lab, caller, callee, tmp_path, caller_args=TCP_ONLY, callee_args=TCP_ONLY
    )
    assert mine["method"] == "tcp"
    assert theirs["method"] == "tcp"
    assert host_of(mine["remote"]) == callee.public_address
    return callee


@pytest.mark.parametrize(("late", "inbound"), LATE_CASES)
def test_tcp_connects_when_one_peer_starts_late(
    lab: Lab, tmp_path: Path, late: str, inbound: Inbound
) -> None:
    """
    Everything the rendezvous sends one peer arrives 300 ms late, so that peer
    starts punching 300 ms after the other (its SYNs meet a NAT that has
    long dropped or rejected the other's): the pair still connects by TCP.
    """
    nata, natb = _nat_pair(lab, Preset.PORT_RESTRICTED, Preset.PORT_RESTRICTED, inbound)
    _echo_by_tcp(lab, tmp_path, nata, natb, late)
    if inbound is Inbound.REJECT:
        # The callee's log (--verbose): it measured TTL 2 (its NAT, the ISP's
        # router); started first, it met the caller's unopened NAT's RSTs and
        # primed after them.
        log = (tmp_path / "callee.err").read_text()
        assert "(TTL 2): priming TTL 2" in log, log[-2000:]
        if late == "caller":
            assert f"priming SYN to {natb.wan_address}:" in log, log[-2000:]


@pytest.mark.parametrize("late", ["none", "caller", "callee"])
def test_priming_behind_isp_routers(lab: Lab, tmp_path: Path, late: str) -> None:
    """
    Each NAT that drops sits behind an ISP's router (a public hop between it
    and the lab's internet): both sides measure a priming TTL of 2, need no
    priming (no RST closes their NATs), and connect by TCP, also with one
    peer 300 ms late.
    """
    isp_a = lab.nat("ispa", Preset.OPEN)
    isp_b = lab.nat("ispb", Preset.OPEN)
    nata = lab.nat("nata", Preset.PORT_RESTRICTED, wan=isp_a)
    natb = lab.nat("natb", Preset.PORT_RESTRICTED, wan=isp_b)
    _echo_by_tcp(lab, tmp_path, nata, natb, late)
    # The callee's log (--verbose): it counted its NAT and the ISP's router.
    log = (tmp_path / "callee.err").read_text()
    assert f"{isp_a.lan_address} (TTL 2): priming TTL 2" in log, log[-2000:]
    assert "priming SYN to" not in log, log[-2000:]
