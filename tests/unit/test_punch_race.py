"""
The race of the traversal methods, on a fake clock: :class:`nattraverse._race.Race`
itself, then :class:`~nattraverse.endpoints.PunchClientEndpoint` with fake
methods and a fake rendezvous session (first wins, losers cancelled, the
stagger, every failure reported, the timeout, cancellation leaving nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from zope.interface import implementer

from nattraverse._race import Contender, Race
from nattraverse.endpoints import PunchClientEndpoint
from nattraverse.errors import (
    MethodNotApplicable,
    PeerAuthenticationFailed,
    PeerNotFound,
    PunchFailed,
)
from nattraverse.identity import Identity, PeerId
from nattraverse.interfaces import CallerContext, ITraversalMethod, TraversalMethod
from nattraverse.rendezvous.client import Introduction, PeerInfo
from tests.deferreds import failure_of as _failure
from tests.deferreds import succeeded as _result

CALLEE = Identity.generate()
CALLER = Identity.generate()


class Lost(Exception):
    """A contender's failure."""


@dataclass
class Tracked:
    """A contender's Deferred that remembers whether it was cancelled."""

    cancelled: bool = False
    deferred: Deferred[Any] = field(init=False)

    def __post_init__(self) -> None:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled = True

        self.deferred = Deferred(cancel)


def _lost(failures: dict[str, BaseException]) -> BaseException:
    return PunchFailed("bob", failures)


def _race(
    clock: Clock,
    contenders: list[Contender[Any]],
    *,
    stagger: float = 0.0,
    timeout: float | None = None,
    discarded: list[Any] | None = None,
) -> Deferred[tuple[str, Any]]:
    sink = discarded if discarded is not None else []
    race: Race[Any] = Race(
        clock, contenders, on_lost=_lost, discard=sink.append, stagger=stagger, timeout=timeout
    )
    return race.run()


# -- Race ------------------------------------------------------------------------


def test_first_success_wins_and_losers_are_cancelled() -> None:
    """The first contender to succeed wins; the others still running are cancelled."""
    clock = Clock()
    a, b, c = Tracked(), Tracked(), Tracked()
    race = _race(
        clock,
        [Contender("a", lambda: a.deferred), Contender("b", lambda: b.deferred),
         Contender("c", lambda: c.deferred)],
    )  # fmt: skip
    b.deferred.callback("path-b")
    assert _result(race) == ("b", "path-b")
    assert a.cancelled
    assert c.cancelled
    assert not b.cancelled
    assert clock.getDelayedCalls() == []


def test_a_late_winner_is_discarded() -> None:
    """A loser that succeeds while being cancelled is handed to discard, not lost."""
    clock = Clock()
    discarded: list[Any] = []
    # Its canceller fires it with a value: a path that authenticated just then.
    late: Deferred[str] = Deferred(lambda d: d.callback("path-late"))
    winner: Deferred[str] = Deferred()
    race = _race(
        clock,
        [Contender("late", lambda: late), Contender("winner", lambda: winner)],
        discarded=discarded,
    )
    winner.callback("path-winner")
    assert _result(race) == ("winner", "path-winner")
    assert discarded == ["path-late"]


def test_all_failures_are_reported_in_order() -> None:
    """When every contender fails, on_lost gets every failure, skipped ones included, in order."""
    clock = Clock()
    a, c = Tracked(), Tracked()
    race = _race(
        clock,
        [Contender("a", lambda: a.deferred),
         Contender("b", None, skipped=MethodNotApplicable("no port")),
         Contender("c", lambda: c.deferred)],
    )  # fmt: skip
    c.deferred.errback(Lost("c refused"))
    assert not race.called
    a.deferred.errback(Lost("a reset"))
    error = _failure(race).value
    assert isinstance(error, PunchFailed)
    assert list(error.failures) == ["a", "b", "c"]
    assert isinstance(error.failures["b"], MethodNotApplicable)
    assert str(error.failures["a"]) == "a reset"
    assert "a: a reset" in str(error)


def test_nothing_runnable_fails_at_once() -> None:
    """A race with only skipped contenders fails immediately."""
    clock = Clock()
    race = _race(clock, [Contender("a", None, skipped=MethodNotApplicable("off"))], timeout=5)
    assert isinstance(_failure(race).value, PunchFailed)
    assert clock.getDelayedCalls() == []


def test_a_start_that_raises_is_a_failure() -> None:
    """A contender whose start raises is reported, not propagated."""
    clock = Clock()

    def broken() -> Deferred[Any]:
        raise Lost("cannot start")

    race = _race(clock, [Contender("a", broken)])
    error = _failure(race).value
    assert isinstance(error, PunchFailed)
    assert isinstance(error.failures["a"], Lost)


def test_last_resort_waits_for_the_stagger() -> None:
    """A last-resort contender starts only once the stagger has passed."""
    clock = Clock()
    started: list[str] = []
    first, last = Tracked(), Tracked()

    def start(name: str, tracked: Tracked) -> Callable[[], Deferred[Any]]:
        def go() -> Deferred[Any]:
            started.append(name)
            return tracked.deferred

        return go

    race = _race(
        clock,
        [Contender("direct", start("direct", first)),
         Contender("relay", start("relay", last), last_resort=True)],
        stagger=0.5,
    )  # fmt: skip
    assert started == ["direct"]
    clock.advance(0.49)
    assert started == ["direct"]
    clock.advance(0.01)
    assert started == ["direct", "relay"]
    last.deferred.callback("relayed")
    assert _result(race) == ("relay", "relayed")
    assert first.cancelled


def test_last_resort_starts_early_when_all_others_failed() -> None:
    """When every other contender has failed, the last resort starts without waiting."""
    clock = Clock()
    started: list[str] = []
    first = Tracked()

    def relay() -> Deferred[Any]:
        started.append("relay")
        return Deferred()

    race = _race(
        clock,
        [Contender("direct", lambda: first.deferred),
         Contender("relay", relay, last_resort=True)],
        stagger=0.5,
    )  # fmt: skip
    first.deferred.errback(Lost("refused"))
    assert started == ["relay"]
    assert clock.getDelayedCalls() == []  # the stagger timer is gone
    race.cancel()


def test_last_resort_alone_starts_at_once() -> None:
    """With no other contender, a last resort starts immediately."""
    clock = Clock()
    race = _race(clock, [Contender("relay", lambda: succeed("r"), last_resort=True)], stagger=9)
    assert _result(race) == ("relay", "r")
    assert clock.getDelayedCalls() == []


def test_timeout_fails_every_unfinished_contender() -> None:
    """At the timeout, running and not-started contenders fail with TimeoutError."""
    clock = Clock()
    a, b = Tracked(), Tracked()
    race = _race(
        clock,
        [Contender("direct", lambda: a.deferred),
         Contender("reversal", lambda: b.deferred),
         Contender("relay", lambda: Deferred(), last_resort=True)],
        stagger=20,
        timeout=10,
    )  # fmt: skip
    b.deferred.errback(Lost("refused"))
    clock.advance(10)
    error = _failure(race).value
    assert isinstance(error, PunchFailed)
    assert isinstance(error.failures["direct"], TimeoutError)
    assert isinstance(error.failures["reversal"], Lost)
    assert isinstance(error.failures["relay"], TimeoutError)
    assert "not started" in str(error.failures["relay"])
    assert a.cancelled
    assert clock.getDelayedCalls() == []


def test_cancelling_the_race_cancels_everything() -> None:
    """Cancelling the race cancels every contender, the stagger and the timeout."""
    clock = Clock()
    a = Tracked()
    race = _race(
        clock,
        [Contender("direct", lambda: a.deferred),
         Contender("relay", lambda: Deferred(), last_resort=True)],
        stagger=1,
        timeout=10,
    )  # fmt: skip
    assert len(clock.getDelayedCalls()) == 2
    race.cancel()
    assert a.cancelled
    assert _failure(race).check(CancelledError)
    assert clock.getDelayedCalls() == []


def test_a_race_runs_once() -> None:
    """run() twice is a programming error."""
    race: Race[Any] = Race(Clock(), [], on_lost=_lost, discard=lambda value: None)
    race.run().addErrback(lambda failure: None)
    with pytest.raises(RuntimeError):
        race.run()


def test_contender_names_are_distinct() -> None:
    """Two contenders with one name are refused."""
    with pytest.raises(ValueError, match="distinct"):
        Race(
            Clock(),
            [Contender("a", None), Contender("a", None)],
            on_lost=_lost,
            discard=lambda value: None,
        )


# -- the client endpoint ---------------------------------------------------------


class FakePath:
    """What a method's attempt gives: an authenticated path."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.authenticated: Deferred[Any] = succeed(self)
        self.selected_with: Any = None
        self.started: float | None = None
        self.report: Any = None
        self.aborted = False

    def select(self, factory: Any, *, started: float | None = None, report: Any = None) -> Any:
        self.selected_with = factory
        self.started = started
        self.report = report
        return factory.buildProtocol(None)

    def abort(self) -> None:
        self.aborted = True


@implementer(ITraversalMethod)
class FakeMethod(TraversalMethod):
    """A method whose attempts the test settles by hand."""

    def __init__(self, name: str, *, last_resort: bool = False, reason: str | None = None) -> None:
        self.name = name
        self.last_resort = last_resort
        self.reason = reason
        self.attempts: list[Tracked] = []
        self.contexts: list[CallerContext] = []

    def applies(self, context: CallerContext) -> str | None:
        return self.reason

    def attempt(self, context: CallerContext) -> Deferred[Any]:
        self.contexts.append(context)
        tracked = Tracked()
        self.attempts.append(tracked)
        return tracked.deferred


@dataclass
class FakeSession:
    """A rendezvous session whose Connect the test settles by hand."""

    introduction: Introduction | None = None
    error: Exception | None = None
    connects: list[tuple[Any, ...]] = field(default_factory=list)
    pending: Tracked | None = None
    closed: bool = False
    where: str = "127.0.0.1:8478"

    def connect(
        self,
        peer: str,
        listen_port: int,
        private: Any,
        methods: Any,
        *,
        udp_private: Any = (),
        tcp_private: Any = (),
    ) -> Deferred[Any]:
        self.connects.append((peer, listen_port, tuple(private), tuple(methods)))
        if self.error is not None:
            return fail(self.error)
        if self.introduction is not None:
            return succeed(self.introduction)
        self.pending = Tracked()
        return self.pending.deferred

    def close(self) -> None:
        self.closed = True


def _introduction(peer_id: PeerId | None = None) -> Introduction:
    return Introduction(
        session=b"s" * 16,
        secret=b"k" * 32,
        peer=PeerInfo(
            peer_id=peer_id or CALLEE.peer_id,
            name="bob",
            observed=("192.0.2.20", 40000),
            listen_port=8479,
            private=(),
        ),
        methods=("direct", "relay"),
        relay=True,
    )


class Opener:
    """Stands in for open_session: returns the fake session, or waits."""

    def __init__(self, session: FakeSession | None) -> None:
        self.session = session
        self.waiting: Tracked | None = None
        self.calls: list[dict[str, Any]] = []

    def __call__(self, reactor: Any, endpoint: Any, identity: Any, **kw: Any) -> Deferred[Any]:
        self.calls.append(kw)
        if self.session is not None:
            return succeed(self.session)
        self.waiting = Tracked()
        return self.waiting.deferred


def _endpoint(
    clock: Clock,
    methods: list[FakeMethod],
    session: FakeSession | None,
    *,
    peer: str = "bob",
    timeout: float = 30.0,
    stagger: float = 0.5,
    prefer_tcp: float = 0.0,
) -> tuple[PunchClientEndpoint, Opener]:
    endpoint = PunchClientEndpoint(
        clock,
        object(),  # type: ignore[arg-type]  # never connected: the opener is fake
        peer,
        identity=CALLER,
        methods=methods,
        timeout=timeout,
        stagger=stagger,
        prefer_tcp=prefer_tcp,
    )
    opener = Opener(session)
    endpoint._open_session = opener
    return endpoint, opener


def _factory() -> Factory:
    return Factory.forProtocol(Protocol)


def test_endpoint_selects_the_winner_and_closes_the_session() -> None:
    """The first authenticated path is selected with the factory; the session is closed."""
    clock = Clock()
    direct, reversal = FakeMethod("direct"), FakeMethod("reversal")
    session = FakeSession(introduction=_introduction())
    endpoint, _ = _endpoint(clock, [direct, reversal], session)
    factory = _factory()
    clock.advance(5)
    connecting = endpoint.connect(factory)
    assert session.connects == [("bob", 0, (), ("direct", "reversal"))]
    path = FakePath("reversal")
    reversal.attempts[0].deferred.callback(path)
    protocol = _result(connecting)
    assert isinstance(protocol, Protocol)
    assert path.selected_with is factory
    assert path.started == 5  # connect_ms counts from connect()
    assert direct.attempts[0].cancelled
    assert session.closed
    assert clock.getDelayedCalls() == []


def test_endpoint_gives_methods_the_introduction() -> None:
    """Each method's context carries the introduction, the session and the identity."""
    clock = Clock()
    direct = FakeMethod("direct")
    introduction = _introduction()
    session = FakeSession(introduction=introduction)
    endpoint, _ = _endpoint(clock, [direct], session, timeout=12)
    endpoint.connect(_factory()).addErrback(lambda failure: None)
    context = direct.contexts[0]
    assert context.introduction is introduction
    assert context.session is cast(Any, session)
    assert context.identity is CALLER
    assert context.peer == "bob"
    assert context.timeout == pytest.approx(12)
    assert context.secrets("direct").expected == CALLEE.peer_id


def test_endpoint_staggers_the_relay() -> None:
    """The relay (a last resort) starts after the stagger while the others run."""
    clock = Clock()
    direct, relay = FakeMethod("direct"), FakeMethod("relay", last_resort=True)
    endpoint, _ = _endpoint(clock, [direct, relay], FakeSession(introduction=_introduction()))
    connecting = endpoint.connect(_factory())
    assert (len(direct.attempts), len(relay.attempts)) == (1, 0)
    clock.advance(0.5)
    assert len(relay.attempts) == 1
    connecting.cancel()


def test_endpoint_failure_lists_every_method() -> None:
    """When all fail, PunchFailed lists each method: its error, or why it did not apply."""
    clock = Clock()
    direct = FakeMethod("direct", reason="no listening port")
    reversal, relay = FakeMethod("reversal"), FakeMethod("relay", last_resort=True)
    session = FakeSession(introduction=_introduction())
    endpoint, _ = _endpoint(clock, [direct, reversal, relay], session)
    connecting = endpoint.connect(_factory())
    assert direct.attempts == []
    assert relay.attempts == []
    reversal.attempts[0].deferred.errback(Lost("refused"))
    assert len(relay.attempts) == 1  # no need to wait for the stagger any more
    relay.attempts[0].deferred.errback(Lost("relay off"))
    error = _failure(connecting).value
    assert isinstance(error, PunchFailed)
    assert list(error.failures) == ["direct", "reversal", "relay"]
    assert isinstance(error.failures["direct"], MethodNotApplicable)
    assert "no listening port" in str(error)
    assert session.closed
    assert clock.getDelayedCalls() == []


def test_endpoint_timeout_reports_unfinished_methods() -> None:
    """At the timeout PunchFailed names each unfinished method with a TimeoutError."""
    clock = Clock()
    direct, reversal = FakeMethod("direct"), FakeMethod("reversal")
    session = FakeSession(introduction=_introduction())
    endpoint, _ = _endpoint(clock, [direct, reversal], session, timeout=5)
    connecting = endpoint.connect(_factory())
    direct.attempts[0].deferred.errback(Lost("reset"))
    clock.advance(5)
    error = _failure(connecting).value
    assert isinstance(error, PunchFailed)
    assert isinstance(error.failures["direct"], Lost)
    assert isinstance(error.failures["reversal"], TimeoutError)
    assert reversal.attempts[0].cancelled
    assert session.closed
    assert clock.getDelayedCalls() == []


def test_endpoint_timeout_while_introducing() -> None:
    """A Connect that never answers ends at the timeout with PunchFailed, the request cancelled."""
    clock = Clock()
    direct = FakeMethod("direct")
    session = FakeSession()
    endpoint, _ = _endpoint(clock, [direct], session, timeout=5)
    connecting = endpoint.connect(_factory())
    clock.advance(5)
    error = _failure(connecting).value
    assert isinstance(error, PunchFailed)
    assert isinstance(error.failures["direct"], TimeoutError)
    assert session.pending is not None
    assert session.pending.cancelled
    assert session.closed
    assert direct.attempts == []
    assert clock.getDelayedCalls() == []


def test_cancel_during_the_race_leaves_nothing() -> None:
    """Cancelling connect() mid-race cancels every attempt and timer and closes the session."""
    clock = Clock()
    direct, relay = FakeMethod("direct"), FakeMethod("relay", last_resort=True)
    session = FakeSession(introduction=_introduction())
    endpoint, _ = _endpoint(clock, [direct, relay], session)
    connecting = endpoint.connect(_factory())
    assert clock.getDelayedCalls() != []
    connecting.cancel()
    assert _failure(connecting).check(CancelledError)
    assert direct.attempts[0].cancelled
    assert relay.attempts == []
    assert session.closed
    assert clock.getDelayedCalls() == []


def test_cancel_while_opening_the_session() -> None:
    """Cancelling connect() before the session is open cancels the opening."""
    clock = Clock()
    endpoint, opener = _endpoint(clock, [FakeMethod("direct")], None)
    connecting = endpoint.connect(_factory())
    connecting.cancel()
    assert _failure(connecting).check(CancelledError)
    assert opener.waiting is not None
    assert opener.waiting.cancelled
    assert clock.getDelayedCalls() == []


def test_cancel_while_introducing() -> None:
    """Cancelling connect() during Connect cancels the request and closes the session."""
    clock = Clock()
    session = FakeSession()
    endpoint, _ = _endpoint(clock, [FakeMethod("direct")], session)
    connecting = endpoint.connect(_factory())
    connecting.cancel()
    assert _failure(connecting).check(CancelledError)
    assert session.pending is not None
    assert session.pending.cancelled
    assert session.closed
    assert clock.getDelayedCalls() == []


def test_rendezvous_errors_pass_through() -> None:
    """PeerNotFound from the rendezvous is what connect() fails with; no method starts."""
    clock = Clock()
    direct = FakeMethod("direct")
    session = FakeSession(error=PeerNotFound("'bob' is not registered"))
    endpoint, _ = _endpoint(clock, [direct], session)
    assert _failure(endpoint.connect(_factory())).check(PeerNotFound)
    assert direct.attempts == []
    assert session.closed


def test_pinned_peer_id_must_match_the_introduction() -> None:
    """With peer=<peer id>, an introduction to anyone else fails PeerAuthenticationFailed."""
    clock = Clock()
    direct = FakeMethod("direct")
    stranger = Identity.generate().peer_id
    session = FakeSession(introduction=_introduction(stranger))
    endpoint, _ = _endpoint(clock, [direct], session, peer=str(CALLEE.peer_id))
    error = _failure(endpoint.connect(_factory())).value
    assert isinstance(error, PeerAuthenticationFailed)
    assert str(stranger) in str(error)
    assert direct.attempts == []
    assert session.closed


def test_a_factory_without_protocol_drops_the_path() -> None:
    """When the factory builds no protocol, connect() fails and the session is closed."""
    clock = Clock()
    direct = FakeMethod("direct")
    session = FakeSession(introduction=_introduction())
    endpoint, _ = _endpoint(clock, [direct], session)

    class Refusing(Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    connecting = endpoint.connect(Refusing())
    direct.attempts[0].deferred.callback(FakePath("direct"))
    assert _failure(connecting).value.__class__.__name__ == "NoProtocol"
    assert session.closed


def test_session_timeout_is_bounded_by_the_endpoint_timeout() -> None:
    """The rendezvous requests time out no later than the endpoint itself."""
    clock = Clock()
    endpoint, opener = _endpoint(clock, [FakeMethod("direct")], None, timeout=3)
    endpoint.connect(_factory()).cancel()
    assert opener.calls[0]["timeout"] == 3


def test_session_may_take_the_whole_endpoint_timeout() -> None:
    """
    A slow rendezvous (TCP retransmitting over a lossy link) is waited for
    as long as the endpoint's own budget allows, not a fixed 10 s.
    """
    clock = Clock()
    endpoint, opener = _endpoint(clock, [FakeMethod("direct")], None, timeout=60)
    endpoint.connect(_factory()).cancel()
    assert opener.calls[0]["timeout"] == 60


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"stagger": -1}, "stagger"),
        ({"peer": "not a name"}, "peer"),
        ({"methods": []}, "methods"),
    ],
)
def test_endpoint_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    """Bad constructor arguments raise ValueError naming the argument."""
    arguments: dict[str, Any] = {"peer": "bob", "identity": CALLER, **kwargs}
    peer = arguments.pop("peer")
    with pytest.raises(ValueError, match=match):
        PunchClientEndpoint(Clock(), object(), peer, **arguments)  # type: ignore[arg-type]


def test_endpoint_prefers_a_tcp_path_within_the_grace() -> None:
    """With prefer_tcp, a tcp path that follows a udp one within the grace is selected."""
    clock = Clock()
    tcp, udp = FakeMethod("tcp"), FakeMethod("udp")
    session = FakeSession(introduction=_introduction())
    endpoint, _ = _endpoint(clock, [tcp, udp], session, prefer_tcp=0.2)
    connecting = endpoint.connect(_factory())
    quic, tls = FakePath("udp"), FakePath("tcp")
    udp.attempts[0].deferred.callback(quic)
    assert not connecting.called
    clock.advance(0.1)
    tcp.attempts[0].deferred.callback(tls)
    _result(connecting)
    assert tls.selected_with is not None
    assert quic.aborted
    assert clock.getDelayedCalls() == []


def test_endpoint_without_preference_takes_the_first_path() -> None:
    """By default the first authenticated path wins, whatever its method."""
    clock = Clock()
    tcp, udp = FakeMethod("tcp"), FakeMethod("udp")
    endpoint, _ = _endpoint(clock, [tcp, udp], FakeSession(introduction=_introduction()))
    connecting = endpoint.connect(_factory())
    quic = FakePath("udp")
    udp.attempts[0].deferred.callback(quic)
    _result(connecting)
    assert quic.selected_with is not None
    assert tcp.attempts[0].cancelled
