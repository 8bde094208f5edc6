"""
The relay (DESIGN section 3, step 5): the last resort, through the
rendezvous' own relay, which splices two connections opened to it.

The caller asks for a relay (``Relay``) and gets a token; the callee gets
its own in ``RelayOffer``.  Each opens a fresh connection to the rendezvous
and joins with its token (:func:`~nattraverse.rendezvous.client.join_relay`);
the caller sends the path preamble, and the path is secured end to end
like any other: the relay sees only TLS.

When the ``udp`` method races with a relayed leg through the rendezvous'
UDP relay (which can move to a direct path later), this TCP relay is the
fallback for networks where that leg fails: it waits
:data:`UDP_RELAY_GRACE` seconds more.

Plugin scans import this module: heavy modules are imported in the methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.plugin import IPlugin
from zope.interface import implementer

from nattraverse.interfaces import CalleeContext, CallerContext, ITraversalMethod, TraversalMethod

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IStreamClientEndpoint

    from nattraverse.identity import Identity
    from nattraverse.rendezvous.client import Introduction
    from nattraverse.secure import SecurePath

__all__ = ["UDP_RELAY_GRACE", "RelayMethod"]

#: Seconds the TCP relay leaves the ``udp`` method's relayed leg (see the module docstring).
UDP_RELAY_GRACE = 1.0


async def _join(
    reactor: object,
    rendezvous: IStreamClientEndpoint,
    identity: Identity,
    token: bytes,
    path: SecurePath,
    access_key: bytes | None,
    timeout: float,
) -> SecurePath:
    """Join the relay with *path* as the protocol; wait for it to authenticate."""
    from nattraverse._race import discard_path
    from nattraverse.rendezvous.client import join_relay

    try:
        await join_relay(
            reactor,  # type: ignore[arg-type]
            rendezvous,
            identity,
            token,
            path,
            access_key=access_key,
            timeout=timeout,
        )
        return await path.authenticated
    except BaseException:
        discard_path(path)
        raise


@implementer(IPlugin, ITraversalMethod)
class RelayMethod(TraversalMethod):
    """
    The rendezvous' relay: always works when the relay is on, so it starts
    last (after the endpoint's stagger) to leave the direct paths a chance.
    """

    name = "relay"
    last_resort = True

    def applies(self, context: CallerContext) -> str | None:
        """Applies when the rendezvous relays."""
        if context.introduction.relay:
            return None
        return f"the rendezvous at {context.session.where} does not relay"

    def attempt(self, context: CallerContext) -> Deferred[SecurePath]:
        """
        Ask for a relay (after :data:`UDP_RELAY_GRACE` more when the udp
        method has a relayed leg), join it, secure the path.
        """
        from twisted.internet.defer import Deferred

        async def run() -> SecurePath:
            if context.udp_relay_leg:
                from twisted.internet.task import deferLater

                await deferLater(context.reactor, UDP_RELAY_GRACE)
            token, _lifetime = await context.session.relay(context.introduction.session)
            path = context.opening_path(self.name)
            return await _join(
                context.reactor,
                context.rendezvous,
                context.identity,
                token,
                path,
                context.access_key,
                context.timeout,
            )

        return Deferred.fromCoroutine(run())

    def relay_offer(
        self, context: CalleeContext, introduction: Introduction, token: bytes, lifetime: float
    ) -> Deferred[SecurePath] | None:
        """Join the relay the caller allocated; the caller sends the preamble."""
        from twisted.internet.defer import Deferred

        path = context.known_path(introduction, self.name, send_preamble=False)
        return Deferred.fromCoroutine(
            _join(
                context.reactor,
                context.rendezvous,
                context.identity,
                token,
                path,
                context.access_key,
                min(context.timeout, lifetime),
            )
        )
