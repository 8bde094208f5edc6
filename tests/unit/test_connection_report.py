"""
The connection report (:mod:`nattraverse.report`): what :class:`~nattraverse._race.Race`
records of each contender, how the client endpoint turns it into a
:class:`~nattraverse.report.ConnectionReport` on the transport and on
``PunchFailed``, why a connection is relayed, and its JSON and text forms.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from nattraverse._race import Contender, Race
from nattraverse.errors import MethodNotApplicable, PunchFailed
from nattraverse.natcat import report, report_failure
from nattraverse.report import ConnectionReport, MethodAttempt, Outcome, Upgrade
from tests.deferreds import failure_of, succeeded
from tests.unit.test_punch_race import (
    FakeMethod,
    FakeSession,
    Lost,
    Tracked,
    _endpoint,
    _factory,
    _introduction,
)


def _lost(failures: dict[str, BaseException]) -> BaseException:
    return PunchFailed("bob", failures)


class Transport:
    """What a path's protocol is connected to: where the endpoint puts the report."""

    report: ConnectionReport | None = None
    method = "relay"
    peer_id = "nt1peer"
    remote = "192.0.2.1:8478"


class TransportPath:
    """An authenticated path whose select() connects a protocol to a transport."""

    def __init__(self) -> None:
        self.authenticated: Deferred[Any] = Deferred()
        self.transport = Transport()
        self.aborted = False

    def select(self, factory: Any, *, started: float | None = None, report: Any = None) -> Any:
        self.transport.report = report
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(self.transport)
        return protocol

    def abort(self) -> None:
        self.aborted = True


# -- Race.attempts -----------------------------------------------------------------


def test_race_records_how_each_contender_fared() -> None:
    """Won, failed, cancelled, skipped and not started are told apart, with their times."""
    clock = Clock()
    a, b, c = Tracked(), Tracked(), Tracked()
    race: Race[Any] = Race(
        clock,
        [Contender("a", lambda: a.deferred),
         Contender("b", lambda: b.deferred),
         Contender("c", lambda: c.deferred),
         Contender("off", None, skipped=MethodNotApplicable("no port")),
         Contender("relay", lambda: Deferred(), last_resort=True)],
        on_lost=_lost,
        discard=lambda value: None,
        stagger=5,
    )  # fmt: skip
    clock.advance(1)
    result = race.run()
    clock.advance(0.25)
    a.deferred.errback(Lost("refused"))
    clock.advance(0.5)
    b.deferred.callback("path")
    assert succeeded(result) == ("b", "path")
    found = {attempt.name: attempt for attempt in race.attempts}
    assert [attempt.name for attempt in race.attempts] == ["a", "b", "c", "off", "relay"]
    assert (found["a"].outcome, found["a"].started, found["a"].ended) == ("failed", 1, 1.25)
    assert isinstance(found["a"].error, Lost)
    assert (found["b"].outcome, found["b"].ended) == ("won", 1.75)
    assert (found["c"].outcome, found["c"].ended) == ("cancelled", 1.75)
    assert found["off"].outcome == "skipped"
    assert isinstance(found["off"].error, MethodNotApplicable)
    assert (found["relay"].outcome, found["relay"].started) == ("not started", None)
    assert found["relay"].last_resort


def _running_and_waiting(
    clock: Clock, *, stagger: float, timeout: float | None = None
) -> Race[Any]:
    """A race of "a", which never ends by itself, and "r", a last resort after *stagger*."""
    return Race(
        clock,
        [Contender("a", lambda: Deferred()), Contender("r", lambda: Deferred(), last_resort=True)],
        on_lost=_lost,
        discard=lambda value: None,
        stagger=stagger,
        timeout=timeout,
    )


def test_race_records_running_contenders_as_running() -> None:
    """Before the race ends, running and waiting contenders say so."""
    race = _running_and_waiting(Clock(), stagger=1)
    result = race.run()
    assert [a.outcome for a in race.attempts] == ["running", "waiting"]
    result.cancel()
    assert [a.outcome for a in race.attempts] == ["cancelled", "not started"]


def test_race_records_a_late_success_and_a_displaced_winner() -> None:
    """A success after the end is 'too late'; a held winner a preferred one beat is 'displaced'."""
    clock = Clock()
    udp, tcp, late = Tracked(), Tracked(), Deferred[str](lambda d: d.callback("late path"))
    discarded: list[Any] = []
    race: Race[Any] = Race(
        clock,
        [Contender("udp", lambda: udp.deferred),
         Contender("tcp", lambda: tcp.deferred),
         Contender("late", lambda: late)],
        on_lost=_lost,
        discard=discarded.append,
        preferred=frozenset({"tcp"}),
        grace=0.5,
    )  # fmt: skip
    result = race.run()
    udp.deferred.callback("udp path")
    clock.advance(0.25)
    tcp.deferred.callback("tcp path")
    assert succeeded(result) == ("tcp", "tcp path")
    found = {attempt.name: attempt.outcome for attempt in race.attempts}
    assert found == {"udp": "displaced", "tcp": "won", "late": "too late"}
    assert discarded == ["udp path", "late path"]


def test_race_records_timeouts_as_failures() -> None:
    """At the timeout a running contender failed (timed out); a waiting one was not started."""
    clock = Clock()
    race = _running_and_waiting(clock, stagger=20, timeout=10)
    result = race.run()
    clock.advance(10)
    assert isinstance(failure_of(result).value, PunchFailed)
    a, r = race.attempts
    assert (a.outcome, a.ended) == ("failed", 10)
    assert "timed out" in str(a.error)
    assert r.outcome == "not started"
    assert "not started" in str(r.error)


# -- the report --------------------------------------------------------------------


def _report(*attempts: MethodAttempt, connected: float | None = 0.6) -> ConnectionReport:
    winner = next((a.method for a in attempts if a.outcome is Outcome.WON), None)
    return ConnectionReport("bob", "nt1bob", winner, 0.04, connected, attempts)


def test_why_relayed_when_every_direct_method_failed() -> None:
    """A relay that won after every direct method failed says each one's reason."""
    found = _report(
        MethodAttempt("direct", Outcome.SKIPPED, reason="no listening port"),
        MethodAttempt("udp", Outcome.FAILED, 0.0, 0.4, "check budget spent"),
        MethodAttempt("relay", Outcome.WON, 0.4, 0.6, relay=True),
    )
    assert found.relayed
    assert found.why_relayed == (
        "no direct method worked: direct skipped: no listening port; "
        "udp failed after 400 ms: check budget spent"
    )


def test_why_relayed_when_the_relay_was_first() -> None:
    """A relay that won while direct methods ran names them and how long they had."""
    found = _report(
        MethodAttempt("udp", Outcome.CANCELLED, 0.0, 0.7, "stopped when relay won"),
        MethodAttempt("relay", Outcome.WON, 0.5, 0.7, relay=True),
        connected=0.7,
    )
    assert found.why_relayed == (
        "the relay connected first, 700 ms after the introduction, while udp "
        "(running for 700 ms) had not yet reached the peer"
    )


def test_a_direct_connection_is_not_relayed() -> None:
    """A direct winner: relayed is false and there is no reason."""
    found = _report(
        MethodAttempt("udp", Outcome.WON, 0.0, 0.1),
        MethodAttempt("relay", Outcome.NOT_STARTED, relay=True),
    )
    assert not found.relayed
    assert found.why_relayed is None


def test_report_json_and_text() -> None:
    """to_json gives milliseconds and outcomes; describe() has a line per method."""
    found = _report(
        MethodAttempt("udp", Outcome.CANCELLED, 0.0, 0.7, "stopped when relay won"),
        MethodAttempt("relay", Outcome.WON, 0.5, 0.7, relay=True),
        connected=0.7,
    ).with_upgrade(Upgrade(2.5, "relay", "udp", "203.0.113.5:20001"))
    data = json.loads(json.dumps(found.to_json()))
    assert data["method"] == "relay"
    assert data["connected_ms"] == 700.0
    assert data["introduced_ms"] == 40.0
    assert data["attempts"][0] == {
        "method": "udp",
        "outcome": "cancelled",
        "started_ms": 0.0,
        "duration_ms": 700.0,
        "reason": "stopped when relay won",
        "relayed": False,
    }
    assert data["upgrades"] == [
        {"at_ms": 2500.0, "from": "relay", "to": "udp", "remote": "203.0.113.5:20001"}
    ]
    text = found.describe().splitlines()
    assert text[0] == "bob via relay in 700 ms after the introduction (introduction took 40 ms)"
    assert text[1] == "  udp cancelled after 700 ms: stopped when relay won"
    assert text[-1] == "  moved from relay to udp (203.0.113.5:20001) at 2500 ms"
    with pytest.raises(KeyError, match="'tcp' was not in the race"):
        found.attempt("tcp")


# -- the endpoint ------------------------------------------------------------------


def test_endpoint_puts_the_report_on_the_transport() -> None:
    """The winner's transport carries the report: times from the introduction, every method."""
    clock = Clock()
    udp, relay = FakeMethod("udp"), FakeMethod("relay", last_resort=True)
    session = FakeSession()
    endpoint, _ = _endpoint(clock, [udp, relay], session)
    connecting = endpoint.connect(_factory())
    clock.advance(0.1)
    assert session.pending is not None
    session.pending.deferred.callback(_introduction())
    clock.advance(0.5)  # the stagger: the relay starts
    path = TransportPath()
    clock.advance(0.25)
    relay.attempts[0].deferred.callback(path)
    protocol = succeeded(connecting)
    assert isinstance(protocol, Protocol)
    found = path.transport.report
    assert found is not None
    assert (found.peer, found.method) == ("bob", "relay")
    assert found.introduced == pytest.approx(0.1)
    assert found.connected == pytest.approx(0.75)
    assert found.attempt("udp").outcome is Outcome.CANCELLED
    assert found.attempt("udp").reason == "stopped when relay won"
    assert found.attempt("relay").started == pytest.approx(0.5)
    assert found.why_relayed is not None
    assert "udp (running for 750 ms)" in found.why_relayed


def test_punch_failed_carries_the_report() -> None:
    """When every method fails, PunchFailed.report says when each failed and why."""
    clock = Clock()
    direct = FakeMethod("direct", reason="no listening port")
    udp = FakeMethod("udp")
    endpoint, _ = _endpoint(clock, [direct, udp], FakeSession(introduction=_introduction()))
    connecting = endpoint.connect(_factory())
    clock.advance(2)
    udp.attempts[0].deferred.errback(Lost("budget spent"))
    error = failure_of(connecting).value
    assert isinstance(error, PunchFailed)
    assert error.report is not None
    assert error.report.method is None
    assert error.report.attempt("direct").outcome is Outcome.SKIPPED
    assert error.report.attempt("direct").reason == "no listening port"
    udp_attempt = error.report.attempt("udp")
    assert (udp_attempt.outcome, udp_attempt.duration) == (Outcome.FAILED, 2)
    assert udp_attempt.reason == "budget spent"


def test_punch_failed_before_the_introduction_has_no_report() -> None:
    """A timeout before the introduction: nothing was raced, report is None."""
    clock = Clock()
    endpoint, _ = _endpoint(clock, [FakeMethod("direct")], FakeSession(), timeout=5)
    connecting = endpoint.connect(_factory())
    clock.advance(5)
    error = failure_of(connecting).value
    assert isinstance(error, PunchFailed)
    assert error.report is None


# -- natcat ------------------------------------------------------------------------


def test_natcat_json_report_includes_the_race() -> None:
    """natcat's JSON line has the report under 'race'."""
    transport = Transport()
    transport.report = _report(
        MethodAttempt("udp", Outcome.FAILED, 0.0, 0.4, "budget"),
        MethodAttempt("relay", Outcome.WON, 0.4, 0.6, relay=True),
    )
    stream = io.StringIO()
    report(stream, transport, 640.0)  # type: ignore[arg-type]
    line = json.loads(stream.getvalue())
    assert line["method"] == "relay"
    assert line["race"]["relayed"] is True
    assert line["race"]["why_relayed"].startswith("no direct method worked: udp failed")


def test_natcat_json_report_of_a_failure() -> None:
    """When no connection was made, the JSON line has the error and the race."""
    error = PunchFailed("bob", {"udp": Lost("budget")})
    error.report = _report(MethodAttempt("udp", Outcome.FAILED, 0.0, 0.4, "budget"), connected=None)
    stream = io.StringIO()
    report_failure(stream, error)
    line = json.loads(stream.getvalue())
    assert line["method"] is None
    assert line["error"] == "could not reach bob: udp: budget"
    assert line["race"]["attempts"][0]["outcome"] == "failed"


# -- the NATs ------------------------------------------------------------------------


def _with_udp(first: int, second: int) -> Any:
    """An introduction whose callee was observed at *first* and *second* (one address)."""
    from dataclasses import replace

    from nattraverse._types import Endpoint

    introduction = _introduction()
    peer = replace(
        introduction.peer,
        udp=Endpoint("192.0.2.20", first),
        udp_second=Endpoint("192.0.2.20", second),
    )
    return replace(introduction, peer=peer)


def _local(first: int, second: int) -> list[Any]:
    from nattraverse.punch.candidates import gather

    return gather(5000, ["10.0.0.2"], ("198.51.100.9", first), ("198.51.100.9", second))


def test_why_relayed_names_the_nats() -> None:
    """A report that knows both NATs adds them to why_relayed and to its JSON."""
    found = ConnectionReport(
        "bob",
        "nt1bob",
        "relay",
        0.04,
        0.1,
        (
            MethodAttempt("udp", Outcome.CANCELLED, 0.0, 0.1, "stopped when relay won"),
            MethodAttempt("relay", Outcome.WON, 0.0, 0.1, relay=True),
        ),
        nats="this side is behind A; the peer behind B",
    )
    assert found.why_relayed is not None
    assert found.why_relayed.endswith("; this side is behind A; the peer behind B")
    assert found.to_json()["nats"] == "this side is behind A; the peer behind B"
    direct = ConnectionReport("bob", "nt1bob", "udp", 0.04, 0.1, (), nats="N")
    assert direct.describe().splitlines()[-1] == "  N"


def test_pairs_beyond_prediction_are_relayed_at_once() -> None:
    """Random per-destination ports on one side, per-destination on both: no stagger."""
    endpoint, _ = _endpoint(Clock(), [FakeMethod("udp")], FakeSession())
    nats, stagger = endpoint._nats(_local(20000, 20001), _with_udp(40000, 51234))
    assert stagger == 0.0
    assert nats is not None
    assert "sequentially (step +1)" in nats
    assert "random ports" in nats
    assert nats.endswith("so no direct UDP path can be predicted")


@pytest.mark.parametrize(
    ("local", "peer"),
    [((20000, 20001), (40000, 40001)), ((4000, 4000), (40000, 51234))],
    ids=["sequential-pair", "independent-and-random"],
)
def test_pairs_within_reach_keep_the_stagger(local: tuple[int, int], peer: tuple[int, int]) -> None:
    """Prediction or birthday probing may serve these: the relay waits its stagger."""
    endpoint, _ = _endpoint(Clock(), [FakeMethod("udp")], FakeSession())
    nats, stagger = endpoint._nats(_local(*local), _with_udp(*peer))
    assert stagger == 0.5
    assert nats is not None
    assert "no direct UDP path" not in nats


def test_without_the_second_observation_nothing_is_said() -> None:
    """A side observed at one port only: no NAT text, the usual stagger."""
    from nattraverse.punch.candidates import gather

    endpoint, _ = _endpoint(Clock(), [FakeMethod("udp")], FakeSession())
    local = gather(5000, ["10.0.0.2"], ("198.51.100.9", 20000))
    assert endpoint._nats(local, _with_udp(40000, 51234)) == (None, 0.5)


def test_udp_through_the_relay_is_relayed_until_it_moves() -> None:
    """udp winning through the UDP relay is relayed, says why, and is not once it moved."""
    found = _report(
        MethodAttempt("tcp", Outcome.FAILED, 0.0, 0.3, "connection refused"),
        MethodAttempt("udp", Outcome.WON, 0.0, 0.62, relayed=True),
        MethodAttempt("relay", Outcome.NOT_STARTED, relay=True),
        connected=0.62,
    )
    assert found.relayed
    why = found.why_relayed
    assert why is not None
    assert why.startswith("the rendezvous' UDP relay connected first, 620 ms after")
    assert "udp (running for 620 ms)" in why
    assert "to move the connection to a direct path" in why
    assert "tcp failed after 300 ms: connection refused" in why
    assert "through the rendezvous' UDP relay" in found.describe()
    assert found.to_json()["attempts"][1]["relayed"] is True
    moved = found.with_upgrade(Upgrade(1.9, "udp (relayed)", "udp", "203.0.113.5:20001"))
    assert not moved.relayed
    assert moved.why_relayed is None
    assert "moved from udp (relayed) to udp (203.0.113.5:20001) at 1900 ms" in moved.describe()
