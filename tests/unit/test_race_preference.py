"""
The race's preference (``Race(preferred=..., grace=...)``): a preferred
contender may beat an earlier winner within the grace period.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from nattraverse._race import Contender, Race
from nattraverse.errors import PunchFailed
from tests.deferreds import succeeded

GRACE = 0.25


class Slot:
    """A contender's Deferred, remembering cancellation."""

    def __init__(self) -> None:
        self.cancelled = False

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled = True

        self.deferred: Deferred[Any] = Deferred(cancel)


def _run(
    clock: Clock, discarded: list[Any], *, timeout: float | None = None
) -> tuple[Deferred[tuple[str, Any]], Slot, Slot]:
    tcp, udp = Slot(), Slot()
    race: Race[Any] = Race(
        clock,
        [Contender("tcp", lambda: tcp.deferred), Contender("udp", lambda: udp.deferred)],
        on_lost=lambda failures: PunchFailed("bob", failures),
        discard=discarded.append,
        timeout=timeout,
        preferred=frozenset({"tcp"}),
        grace=GRACE,
    )
    return race.run(), tcp, udp


def test_a_preferred_contender_beats_an_earlier_winner_within_the_grace() -> None:
    """udp wins first, tcp follows within the grace: tcp wins, udp's path is discarded."""
    clock = Clock()
    discarded: list[Any] = []
    result, tcp, udp = _run(clock, discarded)
    udp.deferred.callback("quic")
    assert not result.called
    clock.advance(GRACE / 2)
    tcp.deferred.callback("tls")
    assert succeeded(result) == ("tcp", "tls")
    assert discarded == ["quic"]
    assert clock.getDelayedCalls() == []


def test_the_earlier_winner_wins_when_the_grace_runs_out() -> None:
    """Without tcp within the grace, udp wins and tcp is cancelled."""
    clock = Clock()
    discarded: list[Any] = []
    result, tcp, udp = _run(clock, discarded)
    udp.deferred.callback("quic")
    clock.advance(GRACE * 0.99)
    assert not result.called
    clock.advance(GRACE * 0.02)
    assert succeeded(result) == ("udp", "quic")
    assert tcp.cancelled
    assert discarded == []
    assert clock.getDelayedCalls() == []


def test_the_earlier_winner_wins_at_once_when_the_preferred_one_fails() -> None:
    """tcp failing during the grace releases udp's path at once."""
    clock = Clock()
    discarded: list[Any] = []
    result, tcp, udp = _run(clock, discarded)
    udp.deferred.callback("quic")
    tcp.deferred.errback(ConnectionError("no SYN through"))
    assert succeeded(result) == ("udp", "quic")
    assert clock.getDelayedCalls() == []


def test_a_preferred_winner_wins_at_once() -> None:
    """tcp winning first needs no grace."""
    clock = Clock()
    discarded: list[Any] = []
    result, tcp, udp = _run(clock, discarded)
    tcp.deferred.callback("tls")
    assert succeeded(result) == ("tcp", "tls")
    assert udp.cancelled


def test_cancelling_during_the_grace_discards_the_held_winner() -> None:
    """Cancelling the race while udp's path is held discards it and cancels tcp."""
    clock = Clock()
    discarded: list[Any] = []
    result, tcp, udp = _run(clock, discarded)
    udp.deferred.callback("quic")
    result.cancel()
    assert discarded == ["quic"]
    assert tcp.cancelled
    assert clock.getDelayedCalls() == []
    result.addErrback(lambda _: None)


def test_the_timeout_during_the_grace_gives_the_held_winner() -> None:
    """The race's timeout falling in the grace ends only the wait."""
    clock = Clock()
    discarded: list[Any] = []
    result, tcp, udp = _run(clock, discarded, timeout=1.0)
    clock.advance(0.9)
    udp.deferred.callback("quic")
    clock.advance(0.11)
    assert succeeded(result) == ("udp", "quic")
    assert tcp.cancelled
