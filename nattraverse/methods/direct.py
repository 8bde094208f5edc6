"""
Direct TCP (DESIGN section 3, step 5): the caller dials the callee's
listening port at the address the rendezvous observes the callee at, and at
each private address the callee announced, all at once; the first path
that authenticates wins and the other connections are closed (what
:class:`~twisted.internet.endpoints.HostnameEndpoint` does with a name's
addresses).

A private address that reaches an unrelated host fails the pin check of the
path's TLS and is dropped.  On the callee, the server endpoint's listening
port accepts these paths (:attr:`DirectMethod.callee_listens`).

Plugin scans import this module: heavy modules are imported in the methods.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from twisted.plugin import IPlugin
from zope.interface import implementer

from nattraverse.interfaces import CallerContext, ITraversalMethod, TraversalMethod

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from nattraverse.rendezvous.client import PeerInfo
    from nattraverse.secure import SecurePath

__all__ = ["DirectMethod", "direct_targets"]


def direct_targets(peer: PeerInfo) -> list[tuple[str, int]]:
    """
    Where to dial *peer*: its observed address at its listening port (when
    it announced one), then its private addresses, without repeats.
    """
    targets: list[tuple[str, int]] = []
    if peer.listen_port:
        targets.append((peer.observed[0], peer.listen_port))
    for candidate in peer.private:
        if candidate not in targets:
            targets.append(candidate)
    return targets


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _all_failed(expected: object, failures: dict[str, BaseException]) -> BaseException:
    """The one exception for every address failing: the pin failure first."""
    from twisted.internet.error import ConnectError

    from nattraverse.errors import PeerAuthenticationFailed

    if len(failures) == 1:
        return next(iter(failures.values()))
    detail = "; ".join(f"{where}: {error}" for where, error in failures.items())
    if any(isinstance(error, PeerAuthenticationFailed) for error in failures.values()):
        return PeerAuthenticationFailed(f"no address reached the peer ({detail})", expected)
    return ConnectError(string=f"no address answered ({detail})")


@implementer(IPlugin, ITraversalMethod)
class DirectMethod(TraversalMethod):
    """
    Direct TCP to the callee's observed and private addresses.
    """

    name = "direct"
    callee_listens = True

    def applies(self, context: CallerContext) -> str | None:
        """Applies when the callee announced a listening port or a private address."""
        if direct_targets(context.introduction.peer):
            return None
        return "the peer accepts no direct connections (it announced no listening port)"

    def attempt(self, context: CallerContext) -> Deferred[SecurePath]:
        """Dial every address at once; the first authenticated path wins."""
        from nattraverse._race import Contender, Race, discard_path, open_tcp_path

        def dial(host: str, port: int) -> Deferred[SecurePath]:
            path = context.opening_path(self.name)
            return open_tcp_path(context.reactor, host, port, path, context.timeout)

        expected = context.introduction.peer.peer_id
        race: Race[SecurePath] = Race(
            context.reactor,
            [
                Contender(_label(host, port), partial(dial, host, port))
                for host, port in direct_targets(context.introduction.peer)
            ],
            on_lost=partial(_all_failed, expected),
            discard=discard_path,
        )
        return race.run().addCallback(lambda won: won[1])
