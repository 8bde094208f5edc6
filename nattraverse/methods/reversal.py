"""
Connection reversal (DESIGN section 3, step 5): when only the caller is
reachable, the callee dials it back.

The caller listens on a temporary TCP port (any interface, a port the
system picks) for this one ``connect()`` and sends ``Reverse`` with it; the
rendezvous sends the callee ``DialBack`` with the caller's *observed*
address and that port, and the callee dials it, sending the path preamble.
The caller accepts only a preamble for this introduction, and the path
authenticates like any other.  The temporary port is closed as soon as the
attempt ends, whichever way.

Plugin scans import this module: heavy modules are imported in the methods.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from nattraverse.interfaces import CalleeContext, CallerContext, ITraversalMethod, TraversalMethod

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IAddress
    from twisted.python.failure import Failure

    from nattraverse.rendezvous.client import Introduction
    from nattraverse.secure import PathSecrets, SecurePath

__all__ = ["ReversalMethod"]


class _DialedBack:
    """
    The factory of the caller's temporary port: each connection becomes a
    caller :class:`~nattraverse.secure.SecurePath` that accepts only this
    introduction's preamble; :attr:`first` fires with the first that
    authenticates.
    """

    #: Most connections the temporary port takes (strays included).
    MAX_CONNECTIONS = 8

    def __init__(self, context: CallerContext, method: str) -> None:
        from twisted.internet.defer import Deferred

        self._context = context
        self._secrets = context.secrets(method)
        self._paths: list[SecurePath] = []
        self.first: Deferred[SecurePath] = Deferred()

    def _resolve(self, session: bytes, tag: bytes) -> PathSecrets | None:
        from nattraverse.secure import path_tag

        secrets = self._secrets
        if not hmac.compare_digest(session, secrets.session):
            return None
        if not hmac.compare_digest(tag, path_tag(secrets.secret, secrets.session)):
            return None
        return secrets

    def doStart(self) -> None:
        """Part of ``IProtocolFactory``."""

    def doStop(self) -> None:
        """Part of ``IProtocolFactory``."""

    def buildProtocol(self, addr: IAddress) -> SecurePath | None:
        """A caller path for an incoming connection (none once done or too many)."""
        from nattraverse.secure import SecurePath

        if self.first.called or len(self._paths) >= self.MAX_CONNECTIONS:
            return None
        path = SecurePath(
            self._context.reactor,
            self._context.identity,
            "caller",
            resolve=self._resolve,
            timeout=self._context.timeout,
        )
        self._paths.append(path)
        path.authenticated.addCallbacks(self._authenticated, self._failed, errbackArgs=(path,))
        return path

    def _authenticated(self, path: SecurePath) -> None:
        if self.first.called:
            from nattraverse._race import discard_path

            discard_path(path)
            return
        self._paths.remove(path)
        self.first.callback(path)

    def _failed(self, failure: Failure, path: SecurePath) -> None:
        from nattraverse.errors import PeerAuthenticationFailed

        if path in self._paths:
            self._paths.remove(path)
        # A stray connection (a bad preamble) is nobody's business; a path that
        # knew the session secret but failed the pin check ends the attempt.
        if (
            failure.check(PeerAuthenticationFailed)
            and _preamble_passed(path)
            and not self.first.called
        ):
            self.first.errback(failure)

    def close_others(self) -> None:
        """Abort every path still being secured."""
        from nattraverse._race import discard_path

        paths, self._paths = self._paths, []
        for path in paths:
            discard_path(path)

    def abandon(self) -> None:
        """Abort every path, including one that authenticated but was not taken."""
        from nattraverse._race import discard_path
        from nattraverse.secure import SecurePath

        self.close_others()
        if not self.first.called:
            self.first.cancel()

        def drop(result: object) -> None:
            if isinstance(result, SecurePath):
                discard_path(result)

        self.first.addBoth(drop)


def _preamble_passed(path: SecurePath) -> bool:
    try:
        path.secrets  # noqa: B018 - known once the preamble passed
    except RuntimeError:
        return False
    return True


def _any_interface(context: CallerContext) -> str:
    """The wildcard address of the family the rendezvous session uses."""
    from twisted.internet.address import IPv6Address

    local = context.session.local_address
    return "::" if isinstance(local, IPv6Address) else "0.0.0.0"


@implementer(IPlugin, ITraversalMethod)
class ReversalMethod(TraversalMethod):
    """
    Connection reversal: the callee dials the caller's observed address.
    """

    name = "reversal"

    def attempt(self, context: CallerContext) -> Deferred[SecurePath]:
        """Listen on a temporary port, ask for a dial-back, wait for the path."""
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._attempt(context))

    async def _attempt(self, context: CallerContext) -> SecurePath:
        accepting = _DialedBack(context, self.name)
        port: Any = context.reactor.listenTCP(0, accepting, interface=_any_interface(context))
        try:
            await context.session.reverse(context.introduction.session, port.getHost().port)
            # Until a path authenticates, or fails the pin check, or the race
            # cancels this attempt (another method won, or the timeout).
            path = await accepting.first
        except BaseException:
            accepting.abandon()
            raise
        finally:
            port.stopListening()
        accepting.close_others()
        return path

    def dial_back(
        self, context: CalleeContext, introduction: Introduction, host: str, port: int
    ) -> Deferred[SecurePath] | None:
        """Dial the caller at *host*:*port* and send the preamble."""
        from nattraverse._race import open_tcp_path

        path = context.known_path(introduction, self.name, send_preamble=True)
        return open_tcp_path(context.reactor, host, port, path, context.timeout)
