"""
The ``punch:`` endpoints (DESIGN section 1; ``docs/endpoints.rst``).

:class:`PunchClientEndpoint` reaches a named peer: it asks the rendezvous
for an introduction, races the traversal methods (Happy-Eyeballs style:
direct TCP, connection reversal and UDP hole punching at once, the relay
after a short stagger), keeps the first path that authenticates and
cancels the rest.
:class:`PunchServerEndpoint` registers a name at the rendezvous and hands
every path a caller selects to the application.

Both hand the application a :class:`~nattraverse.secure.PunchTransport`
(a TLS path over TCP) or a :class:`~nattraverse.quic.QuicStreamTransport`
(a QUIC stream over a punched UDP path); either says which method carried
the connection (``transport.method``) and who the peer is
(``transport.peer_id``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import NoProtocol
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse._listener import PunchAddress, PunchListener, local_ipv4_addresses
from nattraverse._race import Contender, Race, discard_path
from nattraverse.errors import MethodNotApplicable, PeerAuthenticationFailed, PunchFailed
from nattraverse.identity import Identity
from nattraverse.interfaces import CallerContext, ITraversalMethod, Path
from nattraverse.methods import choose_methods
from nattraverse.punch.checks import CheckConfig
from nattraverse.punch.tcppunch import tcp_punch_config
from nattraverse.rendezvous.client import Introduction, RendezvousSession, open_session
from nattraverse.rendezvous.commands import MAX_CANDIDATES, check_name, is_peer_id
from nattraverse.report import ConnectionReport, MethodAttempt, Outcome, Upgrade

if TYPE_CHECKING:
    from nattraverse.punch.birthday import BirthdayConfig

__all__ = ["PunchAddress", "PunchClientEndpoint", "PunchServerEndpoint"]

_log = Logger()

#: Seconds the rendezvous' STUN service may take to answer the binding of
#: the punching port.
UDP_BINDING_TIMEOUT = 3.0


def _seconds(value: float, what: str, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what}: {value!r} is not a number of seconds")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(
            f"{what}: {value!r} is not a {'' if zero else 'positive '}number of seconds"
        )
    return float(value)


def _check_peer(peer: str) -> str:
    if not isinstance(peer, str):
        raise TypeError(f"peer: {peer!r} is not a name or a peer id")
    if is_peer_id(peer):
        return peer
    try:
        return check_name(peer)
    except Exception as e:
        raise ValueError(f"peer: {e}") from None


def _cancelled_means_cancelled(task: Deferred[Any]) -> Deferred[Any]:
    """
    *task*, as a Deferred that fails with ``CancelledError`` when it is
    cancelled, whatever error the step in progress turned the cancellation
    into (a TCP connection being made fails with ``ConnectingCancelledError``).
    """
    cancelled = False

    def cancel(result: Deferred[Any]) -> None:
        nonlocal cancelled
        cancelled = True
        task.cancel()

    result: Deferred[Any] = Deferred(cancel)

    def settle(outcome: object) -> None:
        if result.called:
            return
        if isinstance(outcome, Failure):
            if cancelled and not outcome.check(CancelledError):
                outcome = Failure(CancelledError(f"cancelled ({outcome.getErrorMessage()})"))
            result.errback(outcome)
        else:
            result.callback(outcome)

    task.addBoth(settle)
    return result


def race_report(
    race: Race[Any],
    peer: str,
    peer_id: str,
    started: float,
    introduced: float,
    nats: str | None = None,
    relayed: bool = False,
) -> ConnectionReport:
    """
    The :class:`~nattraverse.report.ConnectionReport` of a race that is
    over: times from *introduced* (when every method started), the
    introduction's own time from *started* (when ``connect()`` was called),
    how both sides' NATs map (*nats*, when known), and whether the winner's
    path goes through the rendezvous' UDP relay (*relayed*).
    """
    attempts = race.attempts
    winner = next((a for a in attempts if a.outcome == "won"), None)

    def since(when: float | None) -> float | None:
        return None if when is None else when - introduced

    def reason(outcome: str, error: BaseException | None) -> str:
        if outcome in ("failed", "skipped", "not started") and error is not None:
            return str(error) or type(error).__name__
        if winner is None:
            return "stopped: the connection attempt was cancelled"
        return {
            "cancelled": f"stopped when {winner.name} won",
            "not started": f"{winner.name} won before its turn came",
            "too late": f"succeeded after {winner.name} had won; closed",
            "displaced": f"{winner.name} is preferred and succeeded within its grace period",
        }.get(outcome, "")

    found = tuple(
        MethodAttempt(
            a.name,
            Outcome(a.outcome),  # the race is over: no "running" or "waiting" left
            since(a.started),
            since(a.ended),
            reason(a.outcome, a.error),
            a.last_resort,
            relayed and a is winner,
        )
        for a in attempts
    )
    return ConnectionReport(
        peer=peer,
        peer_id=peer_id,
        method=None if winner is None else winner.name,
        introduced=introduced - started,
        connected=None if winner is None else since(winner.ended),
        attempts=found,
        nats=nats,
    )


@implementer(IStreamClientEndpoint)
class PunchClientEndpoint:
    """
    Reach *peer* through the rendezvous at *rendezvous*.

    :param reactor: Provides ``IReactorTCP`` and ``IReactorTime``.
    :param rendezvous: The rendezvous' client endpoint.
    :param peer: A registered name, or a peer id: then only the holder of
        that key is accepted, whatever the rendezvous says.
    :param identity: This peer's key; ``None``: a new one for this endpoint.
    :param methods: Method names (plugins) or
        :class:`~nattraverse.interfaces.ITraversalMethod` objects to race;
        ``None``: every method plugin.
    :param timeout: Seconds for the whole ``connect()``, introduction
        included.
    :param stagger: Seconds before the last-resort methods (the relay)
        start, unless every other method has already failed.
    :param access_key: The rendezvous' access key, when it wants one.
    :param private: This host's addresses to announce as the host
        candidates of its punching UDP port (for a peer behind the same
        NAT); ``None``: this host's non-loopback IPv4 addresses.
    :param checks: The UDP connectivity checks' pacing, retransmission,
        budget and deadline (:class:`~nattraverse.punch.checks.CheckConfig`);
        ``None``: the defaults (a check every 50 ms, 10 s at most).
    :param birthday: Birthday-paradox probing's sockets, rates and budget
        (:class:`~nattraverse.punch.birthday.BirthdayConfig`), for a pair
        of NATs only it can connect; ``None``: the defaults (256 sockets,
        at most 1500 probes, 200 a second).
    :param prefer_tcp: Seconds a direct TCP path (``direct``, ``reversal``,
        ``tcp``: the kernel's TCP end to end, for bulk throughput) still
        running may take to beat a path another method made first; 0: the
        first path wins.
    :raises ValueError: naming the argument, when one is not acceptable.
    """

    #: The methods whose paths are one direct TCP connection.
    TCP_METHODS = frozenset({"direct", "reversal", "tcp"})

    def __init__(
        self,
        reactor: Any,
        rendezvous: IStreamClientEndpoint,
        peer: str,
        *,
        identity: Identity | None = None,
        methods: Sequence[str | ITraversalMethod] | None = None,
        timeout: float = 30.0,
        stagger: float = 0.5,
        access_key: bytes | None = None,
        private: Sequence[str] | None = None,
        checks: CheckConfig | None = None,
        prefer_tcp: float = 0.0,
        birthday: BirthdayConfig | None = None,
    ) -> None:
        self._reactor = reactor
        self._rendezvous = rendezvous
        self._peer = _check_peer(peer)
        self._prefer_tcp = _seconds(prefer_tcp, "prefer_tcp", zero=True)
        self._checks = checks
        self._birthday = birthday
        self._methods = choose_methods(methods)
        self._timeout = _seconds(timeout, "timeout")
        self._stagger = _seconds(stagger, "stagger", zero=True)
        self._identity = identity if identity is not None else Identity.generate()
        self._access_key = access_key
        self._private = None if private is None else tuple(private)
        self._open_session: Callable[..., Deferred[RendezvousSession]] = open_session
        if any(getattr(method, "uses_udp", False) for method in self._methods):
            # The punching machinery (aioquic and its TLS) takes some 40 ms
            # to import: load it with the endpoint, not in the first connect().
            import nattraverse.punch.port  # noqa: F401

    def __repr__(self) -> str:
        return f"<PunchClientEndpoint to {self._peer!r} via {self._rendezvous!r}>"

    @property
    def peer(self) -> str:
        """The peer asked for: a name or a peer id."""
        return self._peer

    @property
    def rendezvous(self) -> IStreamClientEndpoint:
        """The rendezvous' client endpoint."""
        return self._rendezvous

    @property
    def methods(self) -> tuple[str, ...]:
        """The names of the methods this endpoint races, in order."""
        return tuple(method.name for method in self._methods)

    @property
    def timeout(self) -> float:
        """Seconds a ``connect()`` may take."""
        return self._timeout

    @property
    def checks(self) -> CheckConfig | None:
        """The UDP checks' configuration (``None``: the defaults)."""
        return self._checks

    @property
    def birthday(self) -> BirthdayConfig | None:
        """Birthday-paradox probing's configuration (``None``: the defaults)."""
        return self._birthday

    @property
    def prefer_tcp(self) -> float:
        """Seconds a direct TCP path may take to beat another that came first."""
        return self._prefer_tcp

    @property
    def identity(self) -> Identity:
        """The key this endpoint presents."""
        return self._identity

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Connect to the peer.

        :returns: A Deferred that fires with the protocol built by
            *protocolFactory* once a path authenticated, connected to a
            :class:`~nattraverse.secure.PunchTransport` (TCP paths) or a
            :class:`~nattraverse.quic.QuicStreamTransport` (``udp``).  It fails with
            :class:`~nattraverse.errors.PeerNotFound`,
            :class:`~nattraverse.errors.RendezvousUnavailable`,
            :class:`~nattraverse.errors.PeerAuthenticationFailed` (the
            rendezvous named another peer than the pinned id), or
            :class:`~nattraverse.errors.PunchFailed` with every method's
            failure (at the timeout, each unfinished method's is a
            :class:`~twisted.internet.defer.TimeoutError`).  Cancelling it
            stops everything: no socket, port or timer is left.
        """
        return _cancelled_means_cancelled(Deferred.fromCoroutine(self._connect(protocolFactory)))

    # -- one connect() --------------------------------------------------------

    def _timed_out(self, what: str) -> PunchFailed:
        return PunchFailed(
            self._peer,
            {
                name: TimeoutError(
                    f"timed out: {what} took longer than the {self._timeout:g} s timeout"
                )
                for name in self.methods
            },
        )

    def _within(self, waiting: Deferred[Any], deadline: float, what: str) -> Deferred[Any]:
        """*waiting*, cancelled and turned into ``PunchFailed`` at *deadline*."""

        def expired(result: object, seconds: float) -> object:
            if isinstance(result, Failure) and result.check(CancelledError):
                return Failure(self._timed_out(what))
            return result

        remaining = max(deadline - self._reactor.seconds(), 0.0)
        return waiting.addTimeout(remaining, self._reactor, onTimeoutCancel=expired)

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        reactor = self._reactor
        started = reactor.seconds()
        deadline = started + self._timeout
        udp: Any = None
        udp_problem: str | None = None
        tcp: Any = None
        tcp_problem: str | None = None
        rendezvous = self._rendezvous
        if any(getattr(method, "uses_tcp_port", False) for method in self._methods):
            tcp, rendezvous, tcp_problem = self._open_tcp()
        if any(getattr(method, "uses_udp", False) for method in self._methods):
            udp, udp_problem = self._open_udp()
        try:
            # The punching port is bound at the rendezvous while the session
            # authenticates, so that the introduction carries its address.
            # The session may take the whole budget: over a lossy link, TCP's
            # retransmissions alone can hold one exchange up for many seconds.
            session: RendezvousSession = await self._within(
                self._open_session(
                    reactor,
                    rendezvous,
                    self._identity,
                    access_key=self._access_key,
                    timeout=self._timeout,
                    **(
                        {}
                        if udp is None
                        else {"udp": udp.demux, "udp_timeout": UDP_BINDING_TIMEOUT}
                    ),
                ),
                deadline,
                "opening the rendezvous session",
            )
        except BaseException:
            if udp is not None:
                udp.close()
            if tcp is not None:
                tcp.close()
            raise
        try:
            tcp_private = self._tcp_private(tcp, session)
            if tcp is not None and session.transport is not None:
                # Counted while the introduction is asked for: a round trip.
                tcp.count_hops(session.transport.getPeer())
            udp_local: tuple[Any, ...] = ()
            udp_private: list[tuple[str, int]] = []
            if udp is not None:
                udp_local, udp_private, udp_problem = self._udp_candidates(udp, session)
                if udp_problem is not None:
                    udp.close()
                    udp = None
            introduction: Introduction = await self._within(
                session.connect(
                    self._peer,
                    0,
                    (),
                    list(self.methods),
                    udp_private=udp_private,
                    tcp_private=tcp_private,
                ),
                deadline,
                f"the introduction to {self._peer}",
            )
            expected = introduction.peer.peer_id
            if is_peer_id(self._peer) and str(expected) != self._peer:
                raise PeerAuthenticationFailed(
                    f"the rendezvous introduced {expected} when {self._peer} was asked for",
                    self._peer,
                )
            remaining = max(deadline - reactor.seconds(), 0.001)
            nats, stagger = self._nats(udp_local, introduction)
            udp_relay_leg = self._udp_relay_leg(session, udp)
            context = CallerContext(
                reactor=reactor,
                identity=self._identity,
                introduction=introduction,
                session=session,
                rendezvous=self._rendezvous,
                peer=self._peer,
                access_key=self._access_key,
                timeout=remaining,
                udp=udp,
                udp_local=udp_local,
                udp_problem=udp_problem,
                tcp=tcp,
                tcp_problem=tcp_problem,
                relay_delay=stagger,
                udp_relay_leg=udp_relay_leg,
            )
            race: Race[Path] = Race(
                reactor,
                [self._contender(method, context) for method in self._methods],
                on_lost=partial(PunchFailed, self._peer),
                discard=discard_path,
                stagger=stagger,
                preferred=self.TCP_METHODS,
                grace=self._prefer_tcp,
                timeout=remaining,
                timeout_text=f"{self._timeout:g} s",
            )
            introduced = reactor.seconds()
            try:
                name, path = await race.run()
            except PunchFailed as e:
                e.report = race_report(race, self._peer, str(expected), started, introduced, nats)
                raise
            relayed = bool(getattr(path, "relayed", False))
            report = race_report(
                race, self._peer, str(expected), started, introduced, nats, relayed
            )
            try:
                protocol = path.select(factory, started=started, report=report)
            except BaseException:
                discard_path(path)
                raise
            if relayed and protocol is not None:
                self._watch_upgrade(path, protocol, name, introduced)
        finally:
            session.close()
            if tcp is not None:
                # Its connections, the winning path's too, stay open.
                tcp.close()
            if udp is not None:
                # Kept while the QUIC path that won (if it did) carries the connection.
                udp.close_when_idle()
        if protocol is None:
            raise NoProtocol(f"the protocol factory built no protocol for the {name} path")
        _log.info(
            "connected to {peer} ({peer_id}) via {method} at {remote}: {race}",
            peer=self._peer,
            peer_id=str(expected),
            method=name,
            remote=getattr(protocol.transport, "remote", "?"),  # type: ignore[attr-defined]
            race="; ".join(str(attempt) for attempt in report.attempts),
            report=report,
        )
        return protocol

    def _udp_relay_leg(self, session: RendezvousSession, udp: Any) -> bool:
        """
        Whether the ``udp`` method races with a relayed leg (see
        :class:`CallerContext`): when the relay is enabled too, and the
        rendezvous relays UDP.
        """
        names = {m.name for m in self._methods}
        return (
            udp is not None
            and {"udp", "relay"} <= names  # methods=udp alone means direct UDP only
            and session.udp_relay_available
        )

    def _watch_upgrade(
        self, path: Any, protocol: IProtocol, method: str, introduced: float
    ) -> None:
        """Add each move of the relayed *path* to a direct one to its transport's report."""
        reactor, peer = self._reactor, self._peer

        def moved(_: Any, old: tuple[str, int], new: tuple[str, int]) -> None:
            transport: Any = getattr(protocol, "transport", None)
            report = getattr(transport, "report", None)
            if report is None:
                return
            remote = getattr(transport, "remote", f"{new[0]}:{new[1]}")
            upgrade = Upgrade(reactor.seconds() - introduced, f"{method} (relayed)", method, remote)
            transport.report = report.with_upgrade(upgrade)
            _log.info(
                "the connection to {peer} moved from the rendezvous' UDP relay to a direct "
                "path ({remote}), {at:.0f} ms after the introduction",
                peer=peer,
                remote=remote,
                at=upgrade.at * 1000,
            )

        path.on_moved.append(moved)

    def _open_tcp(self) -> tuple[Any, IStreamClientEndpoint, str | None]:
        """
        Open this ``connect()``'s TCP punching port, listening, and the
        rendezvous endpoint that connects from it.

        :returns: The port, that endpoint and ``None``; or ``None``, the
            rendezvous endpoint as given and why the port cannot be used.
        """
        from twisted.internet.error import CannotListenError

        from nattraverse.punch.tcppunch import TcpPunchingPort
        from nattraverse.punch.tcpsource import NotFromPort, from_shared_port

        port = TcpPunchingPort(self._reactor, config=tcp_punch_config(self._checks))
        try:
            port.start()
            return port, from_shared_port(self._rendezvous, port.shared), None
        except (CannotListenError, NotFromPort) as e:
            port.close()
            return None, self._rendezvous, f"no TCP punching port: {e}"

    def _tcp_private(self, port: Any, session: RendezvousSession) -> list[tuple[str, int]]:
        """The host candidates of the TCP punching *port* to announce."""
        if port is None:
            return []
        hosts = local_ipv4_addresses() if self._private is None else list(self._private)
        local = getattr(session.local_address, "host", None)
        if not hosts and local is not None:
            hosts = [local]
        return [(host, port.shared.port) for host in hosts][:MAX_CANDIDATES]

    def _open_udp(self) -> tuple[Any, str | None]:
        """
        Open this ``connect()``'s punching port.

        :returns: The port and ``None``, or ``None`` and why it could not
            be opened.
        """
        from twisted.internet.error import CannotListenError

        from nattraverse.punch.port import PunchingPort

        port = PunchingPort(
            self._reactor, self._identity, config=self._checks, birthday=self._birthday
        )
        try:
            port.start()
        except CannotListenError as e:
            return None, f"could not bind a punching UDP port: {e}"
        return port, None

    def _udp_candidates(
        self, port: Any, session: RendezvousSession
    ) -> tuple[tuple[Any, ...], list[tuple[str, int]], str | None]:
        """
        This side's candidates on *port*, once *session* bound it.

        :returns: The candidates, the host candidates to announce, and
            ``None``; or ``()``, ``[]`` and why the UDP methods cannot run.
        """
        from nattraverse.punch.candidates import gather

        observed = session.udp_observed
        if observed is None:
            return (
                (),
                [],
                f"the rendezvous did not observe the punching UDP port: {session.udp_error}",
            )
        hosts = local_ipv4_addresses() if self._private is None else self._private
        number = port.address.port
        local = gather(number, hosts, observed, session.udp_second_observed)
        return tuple(local), [(host, number) for host in hosts], None

    def _nats(
        self, udp_local: Sequence[Any], introduction: Introduction
    ) -> tuple[str | None, float]:
        """
        How both sides' NATs map, in words (``None`` unless this side's
        punching socket was observed at both of the rendezvous' ports), and
        the relay's stagger: none when no direct UDP path can be predicted
        between them (:func:`~nattraverse.punch.mapping.beyond_prediction`),
        so that such a pair is relayed at once.
        """
        from nattraverse.punch.mapping import (
            MappingKind,
            beyond_prediction,
            describe_pair,
            infer_mapping,
            own_mapping,
        )

        ours = own_mapping(udp_local)
        if ours.kind is MappingKind.UNKNOWN:
            return None, self._stagger
        peer = introduction.peer
        theirs = infer_mapping(peer.udp, peer.udp_second)
        text = describe_pair(ours, theirs)
        hopeless = beyond_prediction(ours, theirs)
        if hopeless is None:
            return text, self._stagger
        return f"{text}: {hopeless}", 0.0

    def _contender(self, method: ITraversalMethod, context: CallerContext) -> Contender[Path]:
        try:
            reason = method.applies(context)
        except Exception as e:
            _log.failure("{method}.applies() failed", method=method.name)
            reason = f"could not tell whether it applies: {e!r}"
        if reason is not None:
            _log.info("{method} does not apply: {reason}", method=method.name, reason=reason)
            return Contender(method.name, None, skipped=MethodNotApplicable(reason))
        return Contender(
            method.name, partial(method.attempt, context), last_resort=bool(method.last_resort)
        )


@implementer(IStreamServerEndpoint)
class PunchServerEndpoint:
    """
    Accept traversed connections under *name*, registered at the rendezvous
    at *rendezvous* and bound to *identity*'s key.

    :param reactor: Provides ``IReactorTCP`` and ``IReactorTime``.
    :param rendezvous: The rendezvous' client endpoint.
    :param name: The name to register.
    :param identity: This peer's key (required: the name is bound to it).
    :param port: The TCP port for direct connections (0: any free port).
    :param interface: The address that port listens on.
    :param methods: Method names or objects; ``None``: every method plugin.
    :param access_key: The rendezvous' access key, when it wants one.
    :param timeout: Seconds ``listen()`` waits for the first registration,
        each request to the rendezvous may take, and each path may take to
        be secured.
    :param private: This host's private addresses to announce to callers
        (with the direct port); ``None``: this host's non-loopback IPv4
        addresses (or *interface* alone, when it is a specific one); they
        are announced with the punching UDP port too.
    :param checks: As for :class:`PunchClientEndpoint`.
    :param birthday: As for :class:`PunchClientEndpoint`.
    :raises ValueError: naming the argument, when one is not acceptable.
    """

    def __init__(
        self,
        reactor: Any,
        rendezvous: IStreamClientEndpoint,
        name: str,
        *,
        identity: Identity,
        port: int = 0,
        interface: str = "0.0.0.0",
        methods: Sequence[str | ITraversalMethod] | None = None,
        access_key: bytes | None = None,
        timeout: float = 30.0,
        private: Sequence[str] | None = None,
        checks: CheckConfig | None = None,
        birthday: BirthdayConfig | None = None,
    ) -> None:
        if not isinstance(identity, Identity):
            raise TypeError(
                "identity: a listening peer needs its Identity (its name is bound to the key)"
            )
        try:
            self._name = check_name(name)
        except Exception as e:
            raise ValueError(f"name: {e}") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port: {port!r} is not a port number (0-65535)")
        self._reactor = reactor
        self._rendezvous = rendezvous
        self._identity = identity
        self._port = port
        self._interface = interface
        self._methods = choose_methods(methods)
        self._access_key = access_key
        self._timeout = _seconds(timeout, "timeout")
        self._private = None if private is None else tuple(private)
        self._checks = checks
        self._birthday = birthday

    def __repr__(self) -> str:
        return f"<PunchServerEndpoint {self._name!r} via {self._rendezvous!r}>"

    @property
    def name(self) -> str:
        """The name registered."""
        return self._name

    @property
    def rendezvous(self) -> IStreamClientEndpoint:
        """The rendezvous' client endpoint."""
        return self._rendezvous

    @property
    def checks(self) -> CheckConfig | None:
        """The UDP checks' configuration (``None``: the defaults)."""
        return self._checks

    @property
    def birthday(self) -> BirthdayConfig | None:
        """Birthday-paradox probing's configuration (``None``: the defaults)."""
        return self._birthday

    @property
    def identity(self) -> Identity:
        """The key the name is bound to."""
        return self._identity

    @property
    def port(self) -> int:
        """The direct port asked for (0: any)."""
        return self._port

    @property
    def interface(self) -> str:
        """The address the direct port listens on."""
        return self._interface

    @property
    def methods(self) -> tuple[str, ...]:
        """The names of the methods this endpoint serves, in order."""
        return tuple(method.name for method in self._methods)

    @property
    def timeout(self) -> float:
        """Seconds for the first registration, and for each path to be secured."""
        return self._timeout

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        Listen: open the direct port (when a method wants it), register the
        name, and hand each path a caller selects to *protocolFactory*.

        :returns: A Deferred of the listening port, fired once the name is
            registered; ``stopListening()`` unregisters, closes the port and
            drops the paths not yet selected.  It fails with the
            registration's refusal (:class:`~nattraverse.errors.NameTaken`,
            ...), or with
            :class:`~nattraverse.errors.RendezvousUnavailable` when no
            registration succeeded within the timeout.  Cancelling it stops
            everything.
        """
        listener = PunchListener(
            self._reactor,
            self._rendezvous,
            self._name,
            self._identity,
            protocolFactory,
            port=self._port,
            interface=self._interface,
            methods=self._methods,
            access_key=self._access_key,
            timeout=self._timeout,
            private=self._private,
            checks=self._checks,
            birthday=self._birthday,
        )
        return listener.start()
