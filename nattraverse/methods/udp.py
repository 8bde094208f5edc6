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
the checks (:mod:`nattraverse.punch`).

Plugin scans import this module: heavy modules are imported in the methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.plugin import IPlugin
from zope.interface import implementer

from nattraverse.interfaces import CalleeContext, CallerContext, ITraversalMethod, TraversalMethod

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from nattraverse.punch.candidates import Candidate
    from nattraverse.quic import QuicPath
    from nattraverse.rendezvous.client import Introduction, PeerInfo

__all__ = ["UdpMethod", "udp_candidates"]


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
        """Check every pair; secure the first one validated in both directions."""
        assert context.udp is not None, "attempt() without applies()"
        return context.udp.call(
            context.secrets(self.name),
            local=context.udp_local,
            remote=udp_candidates(context.introduction.peer),
            timeout=context.timeout,
        )

    def introduced(
        self, context: CalleeContext, introduction: Introduction
    ) -> Deferred[QuicPath] | None:
        """Answer the caller's checks and its QUIC connection."""
        if context.udp is None or context.udp_candidates is None:
            return None
        if self.name not in introduction.methods:
            return None
        remote = udp_candidates(introduction.peer)
        if not remote:
            return None
        return context.udp.answer(
            context.secrets(introduction, self.name),
            local=context.udp_candidates(),
            remote=remote,
            timeout=context.timeout,
        )
