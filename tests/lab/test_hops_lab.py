"""
:class:`~nattraverse.punch.hops.HopCount` on real kernel routers: what a
host counts towards the rendezvous, and the priming TTL it chooses, behind
a NAT on the lab's internet (no router after it: no priming), behind a NAT
behind an ISP's router, and behind two levels of NAT behind one.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.lab.natcheck_support import repo_environment
from tests.lab.punch_support import RENDEZVOUS_ADDRESS
from tests.natlab import Lab, Node, Preset

pytestmark = [pytest.mark.lab]

#: Counts from *host*, waits for the answers, prints them and the TTL as JSON.
_COUNT = """
import json, sys, time
from nattraverse.punch.hops import HopCount, priming_ttl
count = HopCount((sys.argv[1], 8478))
deadline = time.monotonic() + 2.0
answers = count.answers()
while time.monotonic() < deadline and len(answers) < int(sys.argv[2]):
    time.sleep(0.02)
    answers = count.answers()
count.close()
print(json.dumps({"answers": {str(t): a for t, a in answers.items()}, "ttl": priming_ttl(answers)}))
"""


def _count(host: Node, routers: int) -> tuple[dict[int, str], int | None]:
    """The Time Exceeded answers *host* collects (waiting for *routers*), and its TTL."""
    result = host.run(
        [sys.executable, "-c", _COUNT, RENDEZVOUS_ADDRESS, str(routers)],
        env=repo_environment(),
        timeout=20,
    )
    found = json.loads(result.stdout)
    return {int(t): a for t, a in found["answers"].items()}, found["ttl"]


def test_nat_on_the_internet_segment_means_no_priming(lab: Lab) -> None:
    """
    The NAT's WAN shares the lab's internet with the rendezvous (and with
    other NATs): only the NAT answers, from its inside address, and a SYN
    that passes it could reach the peer's NAT: no priming.
    """
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    nat = lab.nat("nat", Preset.PORT_RESTRICTED)
    host = lab.host("host", behind=nat)
    lab.build()
    answers, ttl = _count(host, 1)
    assert answers == {1: nat.lan_address}
    assert ttl is None


def test_nat_behind_an_isp_router(lab: Lab) -> None:
    """The NAT answers from inside, the ISP's router from a public address: TTL 2."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    isp = lab.nat("isp", Preset.OPEN)
    nat = lab.nat("nat", Preset.PORT_RESTRICTED, wan=isp)
    host = lab.host("host", behind=nat)
    lab.build()
    answers, ttl = _count(host, 2)
    assert answers[1] == nat.lan_address
    assert answers[2] == isp.lan_address
    assert ttl == 2


def test_two_nats_behind_an_isp_router(lab: Lab) -> None:
    """A home NAT behind a carrier-grade NAT (RFC 6598 inside) behind a router: TTL 3."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    isp = lab.nat("isp", Preset.OPEN)
    cgn = lab.nat("cgn", Preset.FULL_CONE, wan=isp, lan="100.64.0.0/24")
    home = lab.nat("home", Preset.PORT_RESTRICTED, wan=cgn)
    host = lab.host("host", behind=home)
    lab.build()
    answers, ttl = _count(host, 3)
    assert answers[1] == home.lan_address
    assert answers[2] == cgn.lan_address
    assert answers[3] == isp.lan_address
    assert ttl == 3
