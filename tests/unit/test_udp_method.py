"""
The ``udp`` traversal method (:mod:`nattraverse.methods.udp`): its plugin,
when it applies and why not, the candidates it takes from an introduction,
and what it hands the punching port on each side.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from nattraverse._types import Endpoint
from nattraverse.identity import Identity
from nattraverse.interfaces import CalleeContext, CallerContext, ITraversalMethod
from nattraverse.methods import available_methods
from nattraverse.methods.udp import UdpMethod, udp_candidates
from nattraverse.punch.candidates import Candidate, CandidateKind
from nattraverse.rendezvous.client import Introduction, PeerInfo

CALLER = Identity.generate()
CALLEE = Identity.generate()
SESSION = bytes(range(16))
SECRET = bytes(range(32))


PEER_SRFLX = Endpoint("198.51.100.7", 40000)
PEER_HOST = Endpoint("10.0.0.7", 5000)


def _peer(
    udp: Endpoint | None = PEER_SRFLX,
    udp_private: tuple[Endpoint, ...] = (PEER_HOST,),
) -> PeerInfo:
    return PeerInfo(
        peer_id=CALLEE.peer_id,
        name="bob",
        observed=("198.51.100.7", 41000),
        listen_port=0,
        private=(),
        udp=udp,
        udp_private=udp_private,
    )


def _introduction(peer: PeerInfo, methods: tuple[str, ...] = ("udp",)) -> Introduction:
    return Introduction(session=SESSION, secret=SECRET, peer=peer, methods=methods, relay=False)


@dataclass
class FakePort:
    """A punching port that records what each side asked of it."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)

    def call(self, secrets: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls.append({"secrets": secrets, **kwargs})
        return Deferred()

    def answer(self, secrets: Any, **kwargs: Any) -> Deferred[Any]:
        self.answers.append({"secrets": secrets, **kwargs})
        return Deferred()


LOCAL = (Candidate.host(("10.0.1.2", 6000)), Candidate.server_reflexive(("203.0.113.2", 6000)))


def _caller(peer: PeerInfo, udp: Any = None, problem: str | None = None) -> CallerContext:
    return CallerContext(
        reactor=None,
        identity=CALLER,
        introduction=_introduction(peer),
        session=None,  # type: ignore[arg-type]
        rendezvous=None,  # type: ignore[arg-type]
        peer="bob",
        timeout=12.0,
        udp=udp,
        udp_local=LOCAL,
        udp_problem=problem,
    )


def _callee(udp: Any) -> CalleeContext:
    return CalleeContext(
        reactor=None,
        identity=CALLEE,
        name="bob",
        rendezvous=None,  # type: ignore[arg-type]
        timeout=9.0,
        udp=udp,
        udp_candidates=lambda: list(LOCAL),
    )


def test_udp_is_a_plugin() -> None:
    """getPlugins finds the udp method; it provides ITraversalMethod and uses the UDP port."""
    method = available_methods()["udp"]
    assert isinstance(method, UdpMethod)
    assert verifyObject(ITraversalMethod, method)
    assert method.uses_udp
    assert not method.callee_listens
    assert not method.last_resort


def test_candidates_from_the_introduction() -> None:
    """Host candidates (hints) first, then the observed server-reflexive address."""
    found = udp_candidates(_peer())
    assert [c.kind for c in found] == [CandidateKind.HOST, CandidateKind.SERVER_REFLEXIVE]
    assert [c.address for c in found] == [
        Endpoint("10.0.0.7", 5000),
        Endpoint("198.51.100.7", 40000),
    ]
    assert udp_candidates(_peer(udp=None, udp_private=())) == []


def test_not_applicable_without_a_port_says_why() -> None:
    """Without this side's punching port the reason given is the endpoint's."""
    reason = UdpMethod().applies(_caller(_peer(), problem="the rendezvous has no STUN port"))
    assert reason == "the rendezvous has no STUN port"


def test_not_applicable_when_the_peer_does_not_punch() -> None:
    """A peer without UDP candidates: the method does not apply, and says so."""
    reason = UdpMethod().applies(_caller(_peer(udp=None, udp_private=()), udp=FakePort()))
    assert reason is not None
    assert "no UDP candidates" in reason


def test_caller_punches_with_both_sides_candidates() -> None:
    """attempt() hands the port the session's secrets, our candidates and the peer's."""
    port = FakePort()
    context = _caller(_peer(), udp=port)
    assert UdpMethod().applies(context) is None
    UdpMethod().attempt(context)
    (call,) = port.calls
    assert call["secrets"].method == "udp"
    assert call["secrets"].session == SESSION
    assert call["secrets"].expected == CALLEE.peer_id
    assert call["local"] == LOCAL
    assert call["remote"] == udp_candidates(_peer())
    assert call["timeout"] == 12.0


def test_callee_answers_only_callers_that_punch() -> None:
    """introduced() answers when the caller tries udp and has candidates; else it opens nothing."""
    port = FakePort()
    method = UdpMethod()
    assert method.introduced(_callee(port), _introduction(_peer(), ("direct",))) is None
    assert method.introduced(_callee(port), _introduction(_peer(udp=None, udp_private=()))) is None
    assert method.introduced(_callee(None), _introduction(_peer())) is None
    assert port.answers == []
    assert method.introduced(_callee(port), _introduction(_peer())) is not None
    (answer,) = port.answers
    assert answer["local"] == list(LOCAL)
    assert answer["timeout"] == 9.0


_IMPORTS_PROBE = """
import sys
from nattraverse.endpoints import PunchClientEndpoint
assert "aioquic" not in sys.modules, "imported before any endpoint"
PunchClientEndpoint(None, None, "bob", methods=["direct"])
assert "aioquic" not in sys.modules, "imported for an endpoint without udp"
PunchClientEndpoint(None, None, "bob", methods=["udp"])
assert "nattraverse.punch.port" in sys.modules, "not imported for udp"
"""


def test_udp_machinery_is_loaded_with_the_endpoint_not_in_connect() -> None:
    """
    An endpoint that may punch UDP imports the punching port (aioquic) when
    it is made, so the first ``connect()`` does not spend ~40 ms on imports;
    one that may not leaves it unloaded.
    """
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
