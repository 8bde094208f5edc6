"""
TCP hole punching (DESIGN section 3, step 5): at the introduction both
peers connect to each other from their TCP punching port, the local port
their rendezvous session comes from, while accepting on it
(:mod:`nattraverse.punch.tcppunch`); whichever connection authenticates
first is the path.

A peer's TCP candidates are the address the rendezvous observes its
session at (the punching port's public mapping) and its announced host
addresses on that port (``tcp_private``).  When the peer's NAT allocates sequentially and this
side's maps independently of the destination, the peer's predicted next
mappings are candidates too (port prediction,
:func:`~nattraverse.punch.mapping.predicted_tcp_ports`).  Both sides' NATs
are known from the UDP punching port's binding at the rendezvous' two STUN
ports, which is why this method binds that port too (:attr:`uses_udp`)
even when ``udp`` is not among the methods: no UDP check runs then.  The
path is a
:class:`~nattraverse.secure.SecurePath`, TLS 1.3 pinned to both peer ids as
for ``direct`` and ``reversal``; the *caller* sends the preamble whichever
side's ``connect()`` made the connection, since in a simultaneous open
both did.  On the callee, connections its port accepts are found their
introduction by that preamble, as on the direct port.

Plugin scans import this module: heavy modules are imported in the methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.plugin import IPlugin
from zope.interface import implementer

from nattraverse.interfaces import CalleeContext, CallerContext, ITraversalMethod, TraversalMethod

if TYPE_CHECKING:
    from collections.abc import Sequence

    from twisted.internet.defer import Deferred

    from nattraverse._types import Endpoint
    from nattraverse.punch.candidates import Candidate
    from nattraverse.rendezvous._protocol import PeerInfo
    from nattraverse.rendezvous.client import Introduction
    from nattraverse.secure import SecurePath

__all__ = ["TcpMethod", "predicted_tcp"]


def predicted_tcp(peer: PeerInfo, local: Sequence[Candidate]) -> list[Endpoint]:
    """
    *peer*'s predicted next TCP mappings for this side to punch too, from
    both sides' UDP bindings (this side's candidates *local*); empty unless
    the peer's NAT allocates sequentially and this side's does not map per
    destination (:func:`~nattraverse.punch.mapping.predicted_tcp_ports`).
    """
    from nattraverse._types import Endpoint
    from nattraverse.punch.mapping import infer_mapping, own_mapping, predicted_tcp_ports

    if not peer.tcp_candidates:
        return []
    theirs = infer_mapping(peer.udp, peer.udp_second)
    return predicted_tcp_ports(Endpoint(*peer.observed), theirs, own_mapping(local))


@implementer(IPlugin, ITraversalMethod)
class TcpMethod(TraversalMethod):
    """
    TCP hole punching: simultaneous open and accept on the session's port.
    """

    name = "tcp"
    uses_tcp_port = True
    #: The UDP port's binding measures both NATs (port prediction).
    uses_udp = True

    def applies(self, context: CallerContext) -> str | None:
        """Applies when both peers punch TCP from their session's port."""
        if context.tcp is None:
            return context.tcp_problem or "this side has no TCP punching port"
        if not context.introduction.peer.tcp_candidates:
            return "the peer does not punch TCP (it announced no TCP punching port)"
        return None

    def attempt(self, context: CallerContext) -> Deferred[SecurePath]:
        """Connect to every candidate (and accept); the first authenticated path wins."""
        assert context.tcp is not None, "attempt() without applies()"
        peer = context.introduction.peer
        return context.tcp.punch(
            peer.tcp_candidates,
            lambda: context.opening_path(self.name),
            timeout=context.timeout,
            predicted=predicted_tcp(peer, context.udp_local),
        )

    def introduced(
        self, context: CalleeContext, introduction: Introduction
    ) -> Deferred[SecurePath] | None:
        """Connect to the caller's candidates; the caller selects a path."""
        if context.tcp is None or self.name not in introduction.methods:
            return None
        remotes = introduction.peer.tcp_candidates
        if not remotes:
            return None
        local = context.udp_candidates() if context.udp_candidates is not None else ()
        return context.tcp.punch(
            remotes,
            lambda: context.known_path(introduction, self.name, send_preamble=False),
            timeout=context.timeout,
            predicted=predicted_tcp(introduction.peer, local),
        )
