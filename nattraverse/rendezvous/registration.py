"""
The registration of a listening peer (DESIGN section 3, step 2): keep a
name registered at the rendezvous, whatever happens to the server.

:class:`Registration` is a service built on Twisted's
:class:`~twisted.application.internet.ClientService`: every connection it
makes runs ``Hello``, ``Authenticate`` and ``Register`` before the
ClientService counts it as made, so a server that accepts connections but
refuses the registration is retried with the same backoff as one that is
down.  Once registered it refreshes at a third of the TTL; when the server
goes away it reconnects and registers again by itself.  Refusals that no
retry can cure stop it.

Given the peer's punching UDP socket (a
:class:`~nattraverse.stun.demux.StunDemultiplexer`), every connection
binds it (:meth:`~nattraverse.rendezvous.client.RendezvousSession.bind_udp`)
before ``Register``, so that callers learn the address the rendezvous'
STUN service observes it at; then it binds it again every
``udp_keepalive`` seconds, which also keeps the NAT mapping of the socket
alive (DESIGN section 3, step 2).  A failed binding is logged and retried
on that schedule; it never holds the registration back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse._types import Endpoint
from nattraverse.errors import (
    InvalidRequest,
    NameTaken,
    NotAuthenticated,
    PeerAuthenticationFailed,
    RendezvousUnavailable,
)
from nattraverse.identity import Identity
from nattraverse.rendezvous.client import (
    IRendezvousHandler,
    RendezvousSession,
    check_timeout,
    describe_endpoint,
    open_session,
)
from nattraverse.rendezvous.commands import check_candidates, check_name, check_port

if TYPE_CHECKING:
    from nattraverse.stun.demux import StunDemultiplexer

__all__ = [
    "FATAL_ERRORS",
    "MAX_UDP_KEEPALIVE",
    "MIN_REFRESH_INTERVAL",
    "UDP_BIND_TIMEOUT",
    "Registration",
]

_log = Logger()

#: Refusals that end a :class:`Registration`: retrying cannot cure them.
FATAL_ERRORS: tuple[type[Exception], ...] = (
    NameTaken,
    PeerAuthenticationFailed,
    NotAuthenticated,
    InvalidRequest,
)

#: Never refresh more often than this, in seconds, whatever the TTL.
MIN_REFRESH_INTERVAL = 1.0

#: Seconds before a failed UDP binding is tried again (the keepalive
#: interval applies once it succeeds): until then callers cannot punch.
UDP_RETRY = 1.0
#: Longest UDP keepalive interval accepted, in seconds: NATs may forget an
#: idle UDP mapping after 30 s (RFC 4787 REQ-5 asks for 2 minutes, many
#: keep less).
MAX_UDP_KEEPALIVE = 25.0

#: Longest wait for the answer to one UDP binding, in seconds.
UDP_BIND_TIMEOUT = 3.0


class _SessionWatcher(Protocol):
    """What ClientService sees of a registered session's connection."""


@implementer(IStreamClientEndpoint)
class _RegisteringEndpoint:
    """
    The endpoint ClientService connects with: a connection counts as made
    once the session is open and registered, and as failed otherwise.
    """

    def __init__(self, registration: Registration) -> None:
        self._registration = registration

    def __repr__(self) -> str:
        return f"<registration of {self._registration.peer_name!r} at {self._registration.where}>"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._registration._attempt(protocolFactory)


class Registration(Service):
    """
    Keep *name* registered at the rendezvous at *endpoint* as *identity*.

    :param listen_port: The TCP port this peer accepts direct connections
        on, 0 when none.
    :param private: This peer's private addresses (hints for callers).
    :param handler: Receives the introductions, dial-back requests and
        relay offers of every session.
    :param access_key: The rendezvous' access key, when it wants one.
    :param retry_policy: Seconds to wait before attempt *n* (counting
        failed attempts in a row), as for
        :class:`~twisted.application.internet.ClientService`; exponential
        backoff with jitter by default.
    :param timeout: Seconds for each connection and handshake, and for
        each request.
    :param udp: This peer's punching UDP socket, bound to every session
        before ``Register`` and again every *udp_keepalive* seconds; ``None``
        for none.
    :param udp_private: The host addresses of that socket (hints for
        callers).
    :param udp_keepalive: Seconds between bindings of *udp*, above 0 and
        at most :data:`MAX_UDP_KEEPALIVE`.
    :param tcp_private: The host addresses of this peer's TCP punching port
        (hints for callers): the local port *endpoint* connects from, which
        this peer also accepts on; empty when this peer does not punch TCP.
    :raises InvalidRequest: when *name*, *listen_port*, *private*,
        *udp_private* or *tcp_private* could not be registered.
    :raises ValueError: when *timeout* is not a positive number of seconds,
        or *udp_keepalive* is out of range.

    :ivar peer_name: The name registered.
    :ivar session: The registered session, ``None`` while there is none.
    :ivar ttl: The TTL of the current registration, ``None`` while there
        is none.
    :ivar error: The refusal that stopped the registration, if one did.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        identity: Identity,
        name: str,
        *,
        listen_port: int,
        private: Sequence[tuple[str, int]],
        handler: IRendezvousHandler,
        access_key: bytes | None = None,
        retry_policy: Callable[[int], float] | None = None,
        timeout: float = 10.0,
        udp: StunDemultiplexer | None = None,
        udp_private: Sequence[tuple[str, int]] = (),
        udp_keepalive: float = 15.0,
        tcp_private: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.peer_name = check_name(name)
        self.listen_port = check_port(listen_port, "listen_port")
        self.private = tuple(check_candidates([{"host": h, "port": p} for h, p in private]))
        self.udp_private = tuple(
            check_candidates([{"host": h, "port": p} for h, p in udp_private], "udp_private")
        )
        self.tcp_private = tuple(
            check_candidates([{"host": h, "port": p} for h, p in tcp_private], "tcp_private")
        )
        self.udp_keepalive = _check_keepalive(udp_keepalive)
        self.where = describe_endpoint(endpoint)
        self.session: RendezvousSession | None = None
        self.ttl: float | None = None
        self.error: Exception | None = None
        self._reactor = reactor
        self._endpoint = endpoint
        self._identity = identity
        self._handler = handler
        self._access_key = access_key
        self._timeout = check_timeout(timeout)
        self._registered = False
        self._stopped = False
        self._waiters: list[Deferred[None]] = []
        self._refresh_call: IDelayedCall | None = None
        self._refreshing: Deferred[float] | None = None
        self._udp = udp
        self._bind_timeout = min(UDP_BIND_TIMEOUT, self._timeout, self.udp_keepalive)
        self._keepalive_call: IDelayedCall | None = None
        self._binding: Deferred[Endpoint] | None = None
        self._client = ClientService(
            _RegisteringEndpoint(self),
            Factory.forProtocol(_SessionWatcher),
            retryPolicy=retry_policy,
            clock=reactor,
        )

    def __repr__(self) -> str:
        return f"<Registration of {self.peer_name!r} at {self.where}>"

    @property
    def udp_observed(self) -> Endpoint | None:
        """
        Where the rendezvous' STUN service last observed the UDP socket, on
        the current session; ``None`` while there is no session or the
        socket has not been bound on it.
        """
        session = self.session
        return session.udp_observed if session is not None else None

    @property
    def udp_second_observed(self) -> Endpoint | None:
        """
        Where the STUN service's second port observed the UDP socket, on
        the current session, when it did.
        """
        session = self.session
        return session.udp_second_observed if session is not None else None

    # -- the service --------------------------------------------------------

    def startService(self) -> None:
        """Start connecting and registering."""
        if self.running:
            return
        super().startService()  # type: ignore[no-untyped-call]
        self.error = None
        self._stopped = False
        self._client.startService()

    def stopService(self) -> Deferred[None]:
        """
        Stop: cancel any attempt and timer, close the session.  Waiters of
        :meth:`when_registered` that are still waiting fail with
        :class:`RendezvousUnavailable`.

        :returns: A Deferred that fires once the connection is closed.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopped = True
        self._stop_refreshing()
        self._stop_keepalive()
        stopped = self._client.stopService()
        if self.session is not None:
            self.session.close()
        self._wake(self._stopped_error())
        return stopped

    def _stopped_error(self) -> RendezvousUnavailable:
        return RendezvousUnavailable(
            f"the registration of {self.peer_name!r} was stopped before it succeeded"
        )

    def when_registered(self) -> Deferred[None]:
        """
        A Deferred that fires when the first ``Register`` has succeeded
        (at once if it has).  It fails with the refusal that stopped the
        registration (:data:`FATAL_ERRORS`), or with
        :class:`RendezvousUnavailable` when the service is stopped first;
        it waits through any number of retries otherwise (add a timeout
        if needed).
        """
        if self._registered:
            return succeed(None)
        if self.error is not None:
            return fail(self.error)
        if self._stopped:
            return fail(self._stopped_error())

        def forget(waiting: Deferred[None]) -> None:
            if waiting in self._waiters:
                self._waiters.remove(waiting)

        waiting: Deferred[None] = Deferred(forget)
        self._waiters.append(waiting)
        return waiting

    def _wake(self, error: Exception | None) -> None:
        waiters, self._waiters = self._waiters, []
        for waiting in waiters:
            if error is None:
                waiting.callback(None)
            else:
                waiting.errback(error)

    # -- connecting ---------------------------------------------------------

    def _attempt(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """One connection attempt for the ClientService."""

        async def run() -> tuple[RendezvousSession, float]:
            session = await open_session(
                self._reactor,
                self._endpoint,
                self._identity,
                handler=self._handler,
                access_key=self._access_key,
                timeout=self._timeout,
            )
            try:
                if self._udp is not None:
                    await self._first_binding(session, self._udp)
                ttl = await session.register(
                    self.peer_name,
                    self.listen_port,
                    self.private,
                    udp_private=self.udp_private,
                    tcp_private=self.tcp_private,
                )
            except BaseException:
                session.close()
                raise
            return session, ttl

        attempt: Deferred[Any] = Deferred.fromCoroutine(run())
        return attempt.addCallbacks(self._registered_on, self._attempt_failed, (factory,))

    async def _first_binding(self, session: RendezvousSession, udp: StunDemultiplexer) -> None:
        """Bind *udp* before ``Register``; a failure is logged, not raised."""
        try:
            await session.bind_udp(udp, timeout=self._bind_timeout, second=True)
        except RendezvousUnavailable as e:
            _log.warn(
                "binding the UDP socket of {name} to the rendezvous at {where} failed: "
                "{error}; registering without it, retrying in {retry} s",
                name=self.peer_name,
                where=self.where,
                error=e,
                retry=UDP_RETRY,
            )

    def _registered_on(
        self, outcome: tuple[RendezvousSession, float], factory: IProtocolFactory
    ) -> IProtocol:
        session, ttl = outcome
        transport = session.transport
        watcher = factory.buildProtocol(transport.getPeer()) if transport is not None else None
        if watcher is None or transport is None or not session.is_open:
            session.close()
            raise RendezvousUnavailable(
                f"the rendezvous connection to {self.where} went away while registering"
            )
        self.session = session
        self.ttl = ttl
        session.watch_loss(lambda reason: self._lost(session, reason))
        session.watch_loss(watcher.connectionLost)
        watcher.makeConnection(transport)
        _log.info(
            "registered {name} at {where} as {peer_id}, observed at {observed}, ttl {ttl} s",
            name=self.peer_name,
            where=self.where,
            peer_id=str(session.peer_id),
            observed=session.hello.observed,
            ttl=ttl,
        )
        self._schedule_refresh(session, ttl)
        bound = session.udp_observed is not None
        self._schedule_keepalive(session, self.udp_keepalive if bound else UDP_RETRY)
        if not self._registered:
            self._registered = True
            self._wake(None)
        return watcher

    def _attempt_failed(self, failure: Failure) -> Failure:
        error = failure.value
        if failure.check(CancelledError) or not self.running:
            return failure
        if isinstance(error, FATAL_ERRORS):
            assert isinstance(error, Exception)
            _log.error(
                "the rendezvous at {where} refused the registration of {name}: {error}; "
                "not retrying",
                where=self.where,
                name=self.peer_name,
                error=error,
            )
            self.error = error
            self._client.stopService()
            self._wake(error)
        else:
            _log.warn(
                "registering {name} at {where} failed: {error}; retrying",
                name=self.peer_name,
                where=self.where,
                error=error,
            )
        return failure

    def _lost(self, session: RendezvousSession, reason: Failure) -> None:
        if session is not self.session:
            return
        self.session = None
        self.ttl = None
        self._stop_refreshing()
        self._stop_keepalive()
        if self.running:
            _log.warn(
                "lost the rendezvous connection to {where} ({reason}); registering {name} again",
                where=self.where,
                reason=reason.getErrorMessage(),
                name=self.peer_name,
            )

    # -- refreshing ---------------------------------------------------------

    def _schedule_refresh(self, session: RendezvousSession, ttl: float) -> None:
        delay = max(ttl / 3, MIN_REFRESH_INTERVAL)
        self._refresh_call = self._reactor.callLater(delay, self._refresh, session)

    def _stop_refreshing(self) -> None:
        call, self._refresh_call = self._refresh_call, None
        if call is not None and call.active():
            call.cancel()
        refreshing, self._refreshing = self._refreshing, None
        if refreshing is not None:
            refreshing.cancel()

    def _refresh(self, session: RendezvousSession) -> None:
        self._refresh_call = None
        refreshing = self._refreshing = session.refresh()

        def refreshed(ttl: float) -> None:
            self._refreshing = None
            self.ttl = ttl
            _log.debug("refreshed {name}, ttl {ttl} s", name=self.peer_name, ttl=ttl)
            self._schedule_refresh(session, ttl)

        def failed(failure: Failure) -> None:
            if self._refreshing is refreshing:
                self._refreshing = None
            if failure.check(CancelledError) or not session.is_open:
                return
            _log.warn(
                "refreshing {name} at {where} failed: {error}; reconnecting",
                name=self.peer_name,
                where=self.where,
                error=failure.value,
            )
            session.close()

        refreshing.addCallbacks(refreshed, failed)

    # -- UDP keepalive ------------------------------------------------------

    def _schedule_keepalive(self, session: RendezvousSession, delay: float) -> None:
        if self._udp is None or session is not self.session or not self.running:
            return
        self._keepalive_call = self._reactor.callLater(delay, self._keepalive, session)

    def _stop_keepalive(self) -> None:
        call, self._keepalive_call = self._keepalive_call, None
        if call is not None and call.active():
            call.cancel()
        binding, self._binding = self._binding, None
        if binding is not None:
            binding.cancel()

    def _keepalive(self, session: RendezvousSession) -> None:
        """Bind the UDP socket again: the rendezvous sees a rebinding, the NAT keeps its mapping."""
        self._keepalive_call = None
        udp = self._udp
        assert udp is not None
        started = self._reactor.seconds()
        binding = self._binding = session.bind_udp(udp, timeout=self._bind_timeout)

        def done(outcome: Endpoint | Failure) -> None:
            if self._binding is binding:
                self._binding = None
            if isinstance(outcome, Failure):
                if outcome.check(CancelledError):
                    return
                _log.warn(
                    "the UDP keepalive of {name} to the rendezvous at {where} failed: {error}; "
                    "retrying in {retry} s",
                    name=self.peer_name,
                    where=self.where,
                    error=outcome.value,
                    retry=UDP_RETRY,
                )
                self._schedule_keepalive(session, UDP_RETRY)
                return
            elapsed = self._reactor.seconds() - started
            self._schedule_keepalive(session, max(self.udp_keepalive - elapsed, 0.0))

        binding.addBoth(done)


def _check_keepalive(seconds: float) -> float:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or not 0 < seconds <= MAX_UDP_KEEPALIVE
    ):
        raise ValueError(
            f"udp_keepalive: {seconds!r} is not a number of seconds above 0 and at most "
            f"{MAX_UDP_KEEPALIVE:g} (NATs may forget an idle UDP mapping after 30 s)"
        )
    return float(seconds)
