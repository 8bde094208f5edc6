"""
:func:`~nattraverse.punch.hops.priming_ttl`, the choice of a priming SYN's
TTL from the routers whose Time Exceeded came back, and
:class:`~nattraverse.punch.hops.HopCount` where it can run without a lab
(loopback: no router answers).  The lab's topologies are in
``tests/lab/test_hops_lab.py``.
"""

from __future__ import annotations

import pytest

from nattraverse.punch.hops import HopCount, priming_ttl


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        # One home NAT, then the ISP's router: the SYN dies at the router.
        ({1: "192.168.1.1", 2: "198.51.100.1", 3: "198.51.100.9"}, 2),
        # Two levels: a home NAT behind a carrier-grade NAT (RFC 6598).
        ({1: "10.0.0.1", 2: "100.64.0.1", 3: "203.0.113.1"}, 3),
        # Link-local and 172.16/12 inside addresses count as NATs too.
        ({1: "169.254.0.1", 2: "172.20.0.1", 3: "192.0.2.1"}, 3),
        # The router's answer only: later hops need not have answered.
        ({1: "10.1.0.1", 2: "203.0.113.5"}, 2),
    ],
)
def test_router_past_the_nats(answers: dict[int, str], expected: int) -> None:
    """The TTL passes every NAT and ends at the public router after them."""
    assert priming_ttl(answers) == expected


@pytest.mark.parametrize(
    "answers",
    [
        # Nothing came back (no IP_RECVERR, or every router silent).
        {},
        # No NAT: the first router is public, nothing to open.
        {1: "198.51.100.1", 2: "198.51.100.9"},
        # A NAT, but no router answered after it: its WAN shares a segment
        # with the rendezvous, and maybe with the peer's NAT.
        {1: "10.1.0.1"},
        # The same two levels deep.
        {1: "10.2.0.1", 2: "100.64.0.1"},
        # The first hop silent: nothing is known about the NATs.
        {2: "10.0.0.1", 3: "203.0.113.1"},
        # A gap right after the NATs: the router there did not answer (yet).
        {1: "10.1.0.1", 3: "203.0.113.1"},
    ],
)
def test_no_priming(answers: dict[int, str]) -> None:
    """Without a known public router right after the NATs, no priming."""
    assert priming_ttl(answers) is None


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        # A NAT on the segment of the rendezvous: the SYN may die at the peer's NAT.
        ({1: "10.1.0.1"}, 2),
        ({1: "10.2.0.1", 2: "100.64.0.1"}, 3),
        # A router past the NATs: the same TTL as without one ISN.
        ({1: "192.168.1.1", 2: "198.51.100.1"}, 2),
        # Still no NAT, nothing known, or a silent first hop: no priming.
        ({}, None),
        ({1: "198.51.100.1"}, None),
        ({2: "10.0.0.1", 3: "203.0.113.1"}, None),
    ],
)
def test_priming_that_may_reach_the_peer(answers: dict[int, str], expected: int | None) -> None:
    """With one ISN per candidate, priming needs no router past the NATs, only a NAT."""
    assert priming_ttl(answers, may_reach_peer=True) == expected


def test_loopback_draws_no_time_exceeded() -> None:
    """On loopback every datagram arrives: no router answers, no priming."""
    count = HopCount(("127.0.0.1", 9), max_ttl=3)
    try:
        assert count.answers() == {}
        assert priming_ttl(count.answers()) is None
    finally:
        count.close()
    count.close()  # idempotent


def test_ipv6_is_not_counted() -> None:
    """IPv6 paths have no NATs to count: no datagram leaves."""
    count = HopCount(("::1", 9))
    assert count.answers() == {}
    count.close()


@pytest.mark.parametrize("max_ttl", [0, 256])
def test_max_ttl_bounds(max_ttl: int) -> None:
    with pytest.raises(ValueError, match="max_ttl must be 1 to 255"):
        HopCount(("127.0.0.1", 9), max_ttl=max_ttl)
