"""
UDP hole punching (DESIGN section 3, step 5): ICE-style connectivity
checks between the two peers' punching ports, both sides starting at the
introduction, then QUIC (TLS 1.3, both certificates pinned) on the first
pair validated in both directions; one QUIC stream is the application's
transport (``transport.method == "udp"``).

Both endpoints open their punching port, and bind it at the rendezvous
(which observes its server-reflexive address), only when an enabled
method :attr:`~nattraverse.interfaces.ITraversalMethod.uses_udp`: the
caller before it asks for the introduction, so that the callee learns the
caller's address with it; the listener once, with keepalives.  The
candidates are each side's host addresses on that port (hints) and its
server-reflexive address (observed); peer-reflexive ones are learned from
the checks (:mod:`nattraverse.punch`).  When the peer's NAT maps per
destination and allocates ports sequentially (the rendezvous observed the
peer's socket at two ports, a small step apart), the peer's predicted next
mappings are checked too, first (port prediction,
:mod:`nattraverse.punch.mapping`).  When one side's NAT allocates random
ports per destination and the other's maps independently, both sides also
take part in birthday-paradox probing (:mod:`nattraverse.punch.birthday`)
if nothing authenticated came from the peer shortly after the start.  A
failure says which NATs the two sides are behind.

When the rendezvous relays UDP, the caller's session has a relayed leg
(:mod:`nattraverse.punch.relayleg`): after the relays' head start it asks
for the rendezvous' UDP relay (``UdpRelay``), latches its punching socket to
it, and starts QUIC through it (the callee latches when it gets
``UdpRelayOffer``).  If that path authenticates first the connection is
made through the relay (``transport.relayed``), and the checks go on: a
direct pair validated later takes the connection over without a new
handshake (relay first, then upgrade; :mod:`nattraverse.punch.session`).

Plugin scans import this module: heavy modules are imported in the methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse.interfaces import CalleeContext, CallerContext, ITraversalMethod, TraversalMethod

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from nattraverse._types import Endpoint
    from nattraverse.punch.birthday import BirthdayPlan
    from nattraverse.punch.candidates import Candidate
    from nattraverse.punch.mapping import NatMapping
    from nattraverse.punch.relayleg import RelayLeg
    from nattraverse.quic import QuicPath
    from nattraverse.rendezvous.client import Introduction, PeerInfo

__all__ = ["LATCH_TIMEOUT", "UdpMethod", "udp_candidates"]

#: Seconds a punching socket waits for the rendezvous' UDP relay to answer its latch.
LATCH_TIMEOUT = 3.0


def udp_candidates(peer: PeerInfo) -> list[Candidate]:
    """
    *peer*'s UDP candidates, as its introduction gives them: its host
    addresses (announced hints), then its server-reflexive address (observed
    by the rendezvous), when known.
    """
    from nattraverse.punch.candidates import Candidate

    found = [Candidate.host(address) for address in peer.udp_private]
    if peer.udp is not None:
        found.append(Candidate.server_reflexive(peer.udp))
    return found


def _remote(
    peer: PeerInfo, local: Sequence[Candidate], *, caller: bool
) -> tuple[list[Candidate], NatMapping, NatMapping, BirthdayPlan | None]:
    """
    The candidates to check, predicted ones included when *peer*'s NAT
    allocates sequentially, both sides' NAT mappings, and this side's part
    in birthday-paradox probing, if any.
    """
    from nattraverse.punch.birthday import birthday_plan
    from nattraverse.punch.candidates import Candidate
    from nattraverse.punch.mapping import infer_mapping, own_mapping, predicted_ports

    theirs = infer_mapping(peer.udp, peer.udp_second)
    ours = own_mapping(local)
    remote = udp_candidates(peer)
    remote.extend(Candidate.predicted(a) for a in predicted_ports(theirs, ours, caller=caller))
    return remote, ours, theirs, birthday_plan(ours, theirs)


def _relay_leg(context: CallerContext) -> RelayLeg | None:
    """The caller's relayed leg, when the race has one (:attr:`CallerContext.udp_relay_leg`)."""
    from twisted.internet.defer import Deferred

    from nattraverse.punch.relayleg import RelayLeg
    from nattraverse.rendezvous.client import latch_udp_relay

    udp = context.udp
    if not context.udp_relay_leg or udp is None:
        return None

    async def open_leg() -> Endpoint:
        port, token, _lifetime = await context.session.udp_relay(context.introduction.session)
        return await latch_udp_relay(
            context.reactor, context.session, udp.demux, port, token, LATCH_TIMEOUT
        )

    return RelayLeg(context.relay_delay, lambda: Deferred.fromCoroutine(open_leg()))


def relay_offered(
    context: CalleeContext, session: Any, introduction: bytes, port: int, token: bytes
) -> bool:
    """
    Callee: the caller of *introduction* asked for the rendezvous' UDP
    relay (``UdpRelayOffer``): latch the listener's punching socket to it,
    for that introduction's session.

    :param session: The listener's rendezvous session.
    :returns: Whether a punching session took it.
    """
    from nattraverse.rendezvous.client import latch_udp_relay

    udp = context.udp
    if udp is None:
        return False
    return udp.relay_offered(
        introduction,
        lambda: latch_udp_relay(context.reactor, session, udp.demux, port, token, LATCH_TIMEOUT),
    )


def _explain(failure: Failure, ours: NatMapping, theirs: NatMapping) -> Failure:
    """A checks failure that says which NATs the two sides are behind, and what that means."""
    from nattraverse.errors import PunchChecksFailed
    from nattraverse.punch.mapping import MappingKind, beyond_prediction, describe_pair

    error = failure.value
    if not isinstance(error, PunchChecksFailed):
        return failure
    kinds = {ours.kind, theirs.kind}
    meaning = beyond_prediction(ours, theirs)
    if meaning is None and {MappingKind.RANDOM, MappingKind.INDEPENDENT} <= kinds:
        meaning = "birthday-paradox probing reached none of the random ports within its budget"
    elif meaning is None and MappingKind.SEQUENTIAL in kinds:
        meaning = "the predicted ports did not answer"
    note = describe_pair(ours, theirs)
    if meaning is not None:
        note += f": {meaning}"
    return Failure(PunchChecksFailed(error.reason, f"{note}; {error.seen}", error.stats))


@implementer(IPlugin, ITraversalMethod)
class UdpMethod(TraversalMethod):
    """
    UDP hole punching, then QUIC.
    """

    name = "udp"
    uses_udp = True

    def applies(self, context: CallerContext) -> str | None:
        """Applies when both peers have a punching port the rendezvous knows of."""
        if context.udp is None:
            return context.udp_problem or "this side has no punching UDP port"
        if not udp_candidates(context.introduction.peer):
            return (
                "the peer has no UDP candidates (it does not punch UDP, or the rendezvous "
                "did not observe its punching port)"
            )
        return None

    def attempt(self, context: CallerContext) -> Deferred[QuicPath]:
        """
        Check every pair (predicted ones too, when the callee's NAT allocates
        sequentially; birthday-paradox probing when one NAT is random and the
        other independent); secure the first one validated in both directions.
        """
        assert context.udp is not None, "attempt() without applies()"
        remote, ours, theirs, plan = _remote(
            context.introduction.peer, context.udp_local, caller=True
        )
        result = context.udp.call(
            context.secrets(self.name),
            local=context.udp_local,
            remote=remote,
            timeout=context.timeout,
            birthday=plan,
            relay=_relay_leg(context),
        )
        return result.addErrback(_explain, ours, theirs)

    def introduced(
        self, context: CalleeContext, introduction: Introduction
    ) -> Deferred[QuicPath] | None:
        """Answer the caller's checks and its QUIC connection."""
        if context.udp is None or context.udp_candidates is None:
            return None
        if self.name not in introduction.methods:
            return None
        if not udp_candidates(introduction.peer):
            return None
        local = context.udp_candidates()
        remote, ours, theirs, plan = _remote(introduction.peer, local, caller=False)
        result = context.udp.answer(
            context.secrets(introduction, self.name),
            local=local,
            remote=remote,
            timeout=context.timeout,
            birthday=plan,
        )
        return result.addErrback(_explain, ours, theirs)
