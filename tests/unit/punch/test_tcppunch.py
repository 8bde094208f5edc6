"""
:class:`~nattraverse.punch.tcppunch.TcpPunch` driven by a ``Clock`` and a
fake shared port whose ``connect()`` calls the test settles by hand: which
SYNs leave when and with which timeout and TTL, how each kind of failure is
retried, which path wins, what the deadline reports, and that every end
(success, failure, cancellation) leaves no timer, connect or path behind.
Also :class:`~nattraverse.punch.tcppunch.TcpPunchConfig` and
:func:`~nattraverse.punch.tcppunch.tcp_punch_config`.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from nattraverse.errors import PeerAuthenticationFailed
from nattraverse.punch.checks import CheckConfig
from nattraverse.punch.isn import IsnPinningUnavailable
from nattraverse.punch.tcppunch import (
    TcpPunch,
    TcpPunchConfig,
    TcpPunchFailed,
    tcp_punch_config,
)
from tests.deferreds import failed, results, succeeded

Address = tuple[str, int]

A: Address = ("192.0.2.1", 4000)
B: Address = ("198.51.100.7", 5000)
C: Address = ("2001:db8::1", 6000)

#: A rhythm in binary fractions, so that Clock arithmetic is exact.
SYN_WAIT = 0.25
MAX_SYN_WAIT = 3.0
RETRY = 0.25
MAX_RETRY = 1.5
DEADLINE = 60.0
#: The smallest step the tests advance the clock by.
TICK = 1 / 16


class FakePath:
    """Stands for a SecurePath: an ``authenticated`` Deferred and a counted ``abort()``."""

    def __init__(self) -> None:
        self.authenticated: Deferred[Any] = Deferred()
        self.aborts = 0

    def abort(self) -> None:
        self.aborts += 1

    def win(self) -> None:
        self.authenticated.callback(self)


@dataclass
class Connect:
    """One ``connect()`` the punch asked for."""

    remote: Address
    factory: IProtocolFactory
    timeout: float
    ttl: int | None
    at: float
    isn: int | None = None
    deferred: Deferred[Any] = field(init=False)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred[Any]) -> None:
        self.cancelled = True

    @property
    def pending(self) -> bool:
        return not self.deferred.called

    def succeed(self) -> FakePath:
        """The handshake completed: build the path and hand it over."""
        path = cast(Any, self.factory).buildProtocol(None)
        assert isinstance(path, FakePath)
        self.deferred.callback(path)
        return path

    def fail(self, e: BaseException) -> None:
        self.deferred.errback(Failure(e))


class FakePort:
    """A SharedTcpPort whose connects are recorded and settled by the test."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.connects: list[Connect] = []

    def connect(
        self,
        remote: Address,
        factory: IProtocolFactory,
        *,
        timeout: float,
        ttl: int | None = None,
        isn: int | None = None,
    ) -> Deferred[Any]:
        attempt = Connect(remote, factory, timeout, ttl, self.clock.seconds(), isn)
        self.connects.append(attempt)
        return attempt.deferred

    def to(self, remote: Address) -> list[Connect]:
        """The connects to *remote*, oldest first."""
        return [c for c in self.connects if c.remote == remote]

    def last(self, remote: Address) -> Connect:
        """The newest connect to *remote*."""
        return self.to(remote)[-1]


class Harness:
    """A clock, a fake port and the paths made."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.port = FakePort(self.clock)
        self.paths: list[FakePath] = []

    def make_path(self) -> FakePath:
        path = FakePath()
        self.paths.append(path)
        return path

    def punch(
        self,
        remotes: Sequence[Address],
        *,
        timeout: float = 1000.0,
        config: TcpPunchConfig | None = None,
        predicted: Sequence[Address] = (),
    ) -> TcpPunch:
        if config is None:
            config = TcpPunchConfig(
                deadline=DEADLINE,
                syn_wait=SYN_WAIT,
                max_syn_wait=MAX_SYN_WAIT,
                retry=RETRY,
                max_retry=MAX_RETRY,
            )
        return TcpPunch(
            self.clock,
            cast(Any, self.port),
            remotes,
            cast(Any, self.make_path),
            timeout=timeout,
            config=config,
            predicted=predicted,
        )

    def start(self, remotes: Sequence[Address], **kwargs: Any) -> tuple[TcpPunch, Deferred[Any]]:
        punch = self.punch(remotes, **kwargs)
        return punch, punch.run()

    def timers(self) -> list[Any]:
        """The pending DelayedCalls."""
        return list(self.clock.getDelayedCalls())


@pytest.fixture
def h() -> Harness:
    """A fresh :class:`Harness`."""
    return Harness()


def syn_count(message: str, label: str) -> int:
    """The SYN count the failure *message* gives for the candidate *label*."""
    found = re.search(re.escape(label) + r": [^;]*? after (\d+) SYNs?\b", message)
    assert found, message
    return int(found.group(1))


# -- connecting ---------------------------------------------------------------------


def test_every_candidate_connected_at_once(h: Harness) -> None:
    """Each distinct candidate gets one connect at once, in order, duplicates dropped."""
    _, done = h.start([A, B, A, C, B])
    assert [c.remote for c in h.port.connects] == [A, B, C]
    assert all(c.at == 0.0 for c in h.port.connects)
    assert all(c.timeout == SYN_WAIT for c in h.port.connects)
    assert not done.called


def test_without_prime_ttl_every_syn_has_default_ttl(h: Harness) -> None:
    """Without prime_ttl every connect, first and later, has ttl=None."""
    h.start([A, B])
    h.port.last(A).fail(error.TimeoutError())
    h.port.last(B).fail(error.ConnectionRefusedError())
    h.clock.advance(RETRY)
    assert len(h.port.connects) == 4
    assert [c.ttl for c in h.port.connects] == [None, None, None, None]


def test_first_syn_is_a_full_one_even_with_prime_ttl(h: Harness) -> None:
    """With prime_ttl the first SYN to each candidate is a full one; a silence primes nothing."""
    config = TcpPunchConfig(deadline=DEADLINE, retry=RETRY, prime_ttl=3)
    h.start([A, B], config=config)
    assert [(c.remote, c.ttl) for c in h.port.connects] == [(A, None), (B, None)]
    h.port.last(A).fail(error.TimeoutError())  # dropped by the peer's NAT: ours is open
    assert [c.ttl for c in h.port.to(A)] == [None, None]


def test_a_rst_is_followed_by_a_primer_at_once_and_a_full_syn_later(h: Harness) -> None:
    """The peer NAT's RST closed our NAT: prime it now, send the full SYN after the pause."""
    config = TcpPunchConfig(deadline=DEADLINE, retry=RETRY, prime_ttl=3)
    h.start([A], config=config)
    h.port.last(A).fail(error.ConnectionRefusedError())
    assert [c.ttl for c in h.port.to(A)] == [None, 3]
    h.port.last(A).fail(error.NoRouteError())  # the ICMP Time Exceeded of the primer
    assert len(h.port.to(A)) == 2
    h.clock.advance(RETRY * 0.99)
    assert len(h.port.to(A)) == 2
    h.clock.advance(RETRY * 0.02)
    assert [c.ttl for c in h.port.to(A)] == [None, 3, None]
    h.port.last(A).fail(error.ConnectionRefusedError())
    assert [c.ttl for c in h.port.to(A)] == [None, 3, None, 3]


def test_a_rst_to_a_primer_ends_priming_for_that_candidate(h: Harness) -> None:
    """A RST to a priming SYN (the TTL reached a rejecting host): no more priming there."""
    config = TcpPunchConfig(deadline=DEADLINE, retry=RETRY, prime_ttl=3)
    h.start([A], config=config)
    h.port.last(A).fail(error.ConnectionRefusedError())
    h.port.last(A).fail(error.ConnectionRefusedError())  # the primer's
    h.clock.advance(RETRY * 1.01)
    assert [c.ttl for c in h.port.to(A)] == [None, 3, None]
    h.port.last(A).fail(error.ConnectionRefusedError())
    h.clock.advance(RETRY * 2.01)
    assert [c.ttl for c in h.port.to(A)] == [None, 3, None, None]


def test_one_isn_for_every_syn_to_a_candidate(h: Harness) -> None:
    """With one_isn, full, priming, restarted and retried SYNs to a candidate share one ISN."""
    config = TcpPunchConfig(deadline=DEADLINE, retry=RETRY, prime_ttl=3, one_isn=True)
    h.start([A, B], config=config)
    h.port.last(A).fail(error.TimeoutError())  # restarted
    h.port.last(A).fail(error.ConnectionRefusedError())  # primed
    h.port.last(A).fail(error.NoRouteError())
    h.clock.advance(RETRY * 1.01)  # the full SYN after the pause
    h.port.last(B).fail(error.TimeoutError())
    assert [c.ttl for c in h.port.to(A)] == [None, None, 3, None]
    isns_a = {c.isn for c in h.port.to(A)}
    isns_b = {c.isn for c in h.port.to(B)}
    assert len(isns_a) == len(isns_b) == 1
    assert None not in isns_a | isns_b
    assert isns_a != isns_b  # chosen per candidate (equal once in 2**32)


def test_without_one_isn_the_kernel_chooses(h: Harness) -> None:
    """one_isn off: no connect asks for an ISN."""
    config = TcpPunchConfig(deadline=DEADLINE, retry=RETRY, prime_ttl=3, one_isn=False)
    h.start([A], config=config)
    h.port.last(A).fail(error.ConnectionRefusedError())
    assert [c.isn for c in h.port.to(A)] == [None, None]


def test_isn_pinning_lost_falls_back_to_the_kernels_isn(h: Harness) -> None:
    """A connect that cannot pin its ISN is repeated at once without one, priming kept."""
    config = TcpPunchConfig(deadline=DEADLINE, retry=RETRY, prime_ttl=3, one_isn=True)
    _, done = h.start([A], config=config)
    h.port.last(A).fail(error.ConnectionRefusedError())
    h.port.last(A).fail(IsnPinningUnavailable(errno.EPERM, "no CAP_NET_ADMIN"))
    first, primer, again = h.port.to(A)
    assert first.isn is not None
    assert primer.isn == first.isn
    assert (again.ttl, again.isn, again.at) == (3, None, 0.0)
    again.fail(error.NoRouteError())
    h.clock.advance(RETRY * 1.01)
    assert h.port.last(A).isn is None
    h.clock.advance(DEADLINE)
    assert syn_count(str(failed(done, TcpPunchFailed)), "192.0.2.1:4000") == 3


def test_timeout_restarts_at_once_with_doubling_wait(h: Harness) -> None:
    """An unanswered connect is restarted at once; its timeout doubles up to max_syn_wait."""
    h.start([A])
    for _ in range(6):
        h.port.last(A).fail(error.TimeoutError())
    timeouts = [c.timeout for c in h.port.to(A)]
    assert timeouts == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(c.at == 0.0 for c in h.port.to(A))
    assert len(h.timers()) == 1  # the deadline only


@pytest.mark.parametrize(
    "refusal", [error.ConnectionRefusedError, error.NoRouteError], ids=["RST", "ICMP"]
)
def test_refusal_retried_with_doubling_pause(h: Harness, refusal: type[Exception]) -> None:
    """A refused or unreachable connect is retried after retry, 2*retry, ... up to max_retry."""
    h.start([A])
    for number, pause in enumerate([0.25, 0.5, 1.0, 1.5, 1.5, 1.5], start=1):
        assert len(h.port.to(A)) == number
        h.port.last(A).fail(refusal())
        h.clock.advance(pause - TICK)
        assert len(h.port.to(A)) == number, f"retried before {pause} s"
        h.clock.advance(TICK)
        assert len(h.port.to(A)) == number + 1, f"not retried after {pause} s"
        assert h.port.last(A).timeout == SYN_WAIT


def test_refusal_pause_is_per_candidate(h: Harness) -> None:
    """One candidate's backoff does not slow another's first retry."""
    h.start([A, B])
    h.port.last(A).fail(error.ConnectionRefusedError())
    h.clock.advance(RETRY)
    h.port.last(A).fail(error.ConnectionRefusedError())
    h.port.last(B).fail(error.ConnectionRefusedError())
    h.clock.advance(RETRY)
    assert (len(h.port.to(A)), len(h.port.to(B))) == (2, 2)
    h.clock.advance(RETRY)
    assert len(h.port.to(A)) == 3


def test_address_in_use_retried_after_max_retry(h: Harness) -> None:
    """EADDRNOTAVAIL (the 4-tuple was accepted) is retried after max_retry, every time."""
    h.start([A])
    for number in (1, 2, 3):
        h.port.last(A).fail(error.ConnectError(osError=errno.EADDRNOTAVAIL))
        h.clock.advance(MAX_RETRY - TICK)
        assert len(h.port.to(A)) == number
        h.clock.advance(TICK)
        assert len(h.port.to(A)) == number + 1


def test_connection_resets_refusal_backoff(h: Harness) -> None:
    """After a connection is made, the next failure waits retry again, not the grown pause."""
    h.start([A])
    for pause in (0.25, 0.5, 1.0):
        h.port.last(A).fail(error.ConnectionRefusedError())
        h.clock.advance(pause)
    path = h.port.last(A).succeed()
    path.authenticated.errback(error.ConnectionLost())
    h.clock.advance(RETRY - TICK)
    assert len(h.port.to(A)) == 4
    h.clock.advance(TICK)
    assert len(h.port.to(A)) == 5


def test_no_new_syn_while_a_path_is_pending(h: Harness) -> None:
    """A candidate whose connection is made gets no more connects while its path is pending."""
    h.start([A])
    h.port.last(A).succeed()
    h.clock.advance(DEADLINE / 2)
    assert len(h.port.to(A)) == 1
    assert len(h.timers()) == 1  # the deadline only


def test_lost_path_is_retried(h: Harness) -> None:
    """A path that fails with something else than a wrong peer (ConnectionLost) is retried."""
    _, done = h.start([A])
    path = h.port.last(A).succeed()
    path.authenticated.errback(error.ConnectionLost())
    h.clock.advance(RETRY)
    assert len(h.port.to(A)) == 2
    assert not done.called


# -- the winner ---------------------------------------------------------------------


def test_first_authenticated_path_wins(h: Harness) -> None:
    """The first path to authenticate is the result; others aborted, connects cancelled."""
    _, done = h.start([A, B, C])
    path_a = h.port.last(A).succeed()
    path_b = h.port.last(B).succeed()
    pending = h.port.last(C)
    path_b.win()
    assert succeeded(done) is path_b
    assert path_b.aborts == 0
    assert path_a.aborts == 1
    assert pending.cancelled
    assert h.timers() == []


def test_losers_failure_is_swallowed(h: Harness) -> None:
    """A discarded path's later failure is consumed (discard_path), not left unhandled."""
    _, done = h.start([A, B])
    loser = h.port.last(A).succeed()
    h.port.last(B).succeed().win()
    succeeded(done)
    loser.authenticated.errback(CancelledError())
    assert results(loser.authenticated) == [None]


def test_win_cancels_retry_timers(h: Harness) -> None:
    """A win cancels the retry timers of the other candidates; no SYN follows."""
    _, done = h.start([A, B])
    h.port.last(A).fail(error.ConnectionRefusedError())
    assert len(h.timers()) == 2
    h.port.last(B).succeed().win()
    succeeded(done)
    assert h.timers() == []
    h.clock.advance(DEADLINE)
    assert len(h.port.connects) == 2


def test_path_authenticated_after_the_end_is_discarded(h: Harness) -> None:
    """A path that authenticates after another won is aborted and does not change the result."""
    _, done = h.start([A, B])
    late = h.port.last(A).succeed()
    winner = h.port.last(B).succeed()
    winner.win()
    aborts = late.aborts
    late.win()
    assert late.aborts == aborts + 1
    assert succeeded(done) is winner
    assert winner.aborts == 0


def test_adopted_path_can_win(h: Harness) -> None:
    """A path of an accepted connection, adopted, wins; the connects are cancelled."""
    punch, done = h.start([A, B])
    accepted = FakePath()
    assert punch.adopt(cast(Any, accepted)) is True
    accepted.win()
    assert succeeded(done) is accepted
    assert all(c.cancelled for c in h.port.connects)
    assert accepted.aborts == 0
    assert h.timers() == []


def test_losing_adopted_path_is_aborted(h: Harness) -> None:
    """An adopted path that did not win is aborted when a connected one wins."""
    punch, done = h.start([A])
    accepted = FakePath()
    punch.adopt(cast(Any, accepted))
    winner = h.port.last(A).succeed()
    winner.win()
    assert succeeded(done) is winner
    assert accepted.aborts == 1


def test_failing_adopted_path_does_not_end_the_punch(h: Harness) -> None:
    """An adopted path that fails leaves the punch running; the connects go on."""
    punch, done = h.start([A])
    accepted = FakePath()
    punch.adopt(cast(Any, accepted))
    accepted.authenticated.errback(error.ConnectionLost())
    assert not done.called
    h.port.last(A).fail(error.ConnectionRefusedError())
    h.clock.advance(RETRY)
    assert len(h.port.to(A)) == 2


def test_adopt_after_the_end_is_refused(h: Harness) -> None:
    """adopt() after the punch ended returns False and keeps nothing."""
    punch, done = h.start([A])
    h.port.last(A).succeed().win()
    succeeded(done)
    late = FakePath()
    assert punch.adopt(cast(Any, late)) is False
    late.win()
    assert late.aborts == 0
    assert h.timers() == []


def test_adopt_before_run_is_refused(h: Harness) -> None:
    """adopt() before run() returns False."""
    punch = h.punch([A])
    assert punch.adopt(cast(Any, FakePath())) is False


def test_runs_once(h: Harness) -> None:
    """A second run() is a RuntimeError."""
    punch, _ = h.start([A])
    with pytest.raises(RuntimeError):
        punch.run()


# -- wrong peers ----------------------------------------------------------------------


def test_wrong_peer_stops_that_candidate(h: Harness) -> None:
    """A path failing with PeerAuthenticationFailed stops its candidate only."""
    _, done = h.start([A, B])
    h.port.last(A).succeed().authenticated.errback(PeerAuthenticationFailed("stranger"))
    h.port.last(B).fail(error.ConnectionRefusedError())
    h.clock.advance(DEADLINE / 2)
    assert len(h.port.to(A)) == 1
    assert len(h.port.to(B)) > 1
    assert not done.called


def test_all_wrong_peers_fail_at_once(h: Harness) -> None:
    """When every candidate answered with a wrong peer, run() fails at once with it."""
    _, done = h.start([A, B])
    h.port.last(A).succeed().authenticated.errback(PeerAuthenticationFailed("stranger a"))
    assert not done.called
    h.port.last(B).succeed().authenticated.errback(PeerAuthenticationFailed("stranger b"))
    e = failed(done, PeerAuthenticationFailed)
    assert "192.0.2.1:4000" in str(e)
    assert "198.51.100.7:5000" in str(e)
    assert h.clock.seconds() == 0.0
    assert h.timers() == []


def test_wrong_peer_then_deadline_is_peer_authentication_failed(h: Harness) -> None:
    """With every candidate wrong but an adopted path pending, the deadline reports the peer."""
    punch, done = h.start([A])
    punch.adopt(cast(Any, FakePath()))
    h.port.last(A).succeed().authenticated.errback(PeerAuthenticationFailed("stranger"))
    assert not done.called
    h.clock.advance(DEADLINE)
    failed(done, PeerAuthenticationFailed)
    assert h.timers() == []


def test_all_wrong_peers_fail_once_adopted_paths_failed(h: Harness) -> None:
    """Every candidate wrong, then the last adopted path fails: run() fails at once."""
    punch, done = h.start([A])
    accepted = FakePath()
    punch.adopt(cast(Any, accepted))
    h.port.last(A).succeed().authenticated.errback(PeerAuthenticationFailed("stranger"))
    accepted.authenticated.errback(error.ConnectionLost())
    failed(done, PeerAuthenticationFailed)


# -- the deadline -----------------------------------------------------------------------


def test_deadline_names_every_candidate_and_what_it_saw(h: Harness) -> None:
    """At the deadline run() fails naming each candidate, its last outcome and SYN count."""
    _, done = h.start([A, B, C], timeout=4.0)
    h.port.last(B).fail(error.TimeoutError())
    h.port.last(C).fail(error.NoRouteError())
    while h.clock.seconds() < 4.0:
        if h.port.last(A).pending:
            h.port.last(A).fail(error.ConnectionRefusedError())
        if h.port.last(C).pending:
            h.port.last(C).fail(error.NoRouteError())
        h.clock.advance(TICK)
    e = failed(done, TcpPunchFailed)
    message = str(e)
    assert "within 4 s" in message
    assert "192.0.2.1:4000: refused (RST)" in message
    assert "198.51.100.7:5000: no answer" in message
    assert "[2001:db8::1]:6000: unreachable (ICMP)" in message
    assert syn_count(message, "192.0.2.1:4000") == len(h.port.to(A))
    assert syn_count(message, "198.51.100.7:5000") == len(h.port.to(B)) == 2
    assert syn_count(message, "[2001:db8::1]:6000") == len(h.port.to(C))
    assert len(h.port.to(A)) > 3
    assert h.timers() == []
    assert not any(c.pending for c in h.port.connects)


def test_predicted_candidates_are_punched_after_the_named_ones(h: Harness) -> None:
    """Predicted addresses get a connect too, after the named candidates, repeats dropped."""
    predicted = [("198.51.100.7", 5001), B, ("198.51.100.7", 5002)]
    _, done = h.start([A, B], predicted=predicted)
    assert [c.remote for c in h.port.connects] == [A, B, predicted[0], predicted[2]]
    path = h.port.last(predicted[2]).succeed()
    path.win()
    assert succeeded(done) is path


def test_deadline_sums_up_the_predicted_candidates(h: Harness) -> None:
    """The failure names each named candidate, and the predicted ones in one clause."""
    predicted = [("198.51.100.7", port) for port in range(5001, 5011)]
    _, done = h.start([A], timeout=2.0, predicted=predicted)
    h.port.last(predicted[0]).fail(error.ConnectionRefusedError())
    h.clock.advance(2.0)
    message = str(failed(done, TcpPunchFailed))
    assert "192.0.2.1:4000: no answer after" in message
    assert "10 predicted ports of 198.51.100.7 (5001-5010): 9 no answer, 1 refused (RST)" in message
    assert "198.51.100.7:5002" not in message
    assert "predicted next ports" in message


def test_deadline_with_one_unanswered_syn(h: Harness) -> None:
    """A candidate that never answered is reported as 'no answer after 1 SYN'."""
    _, done = h.start([A], timeout=2.0)
    h.clock.advance(2.0)
    message = str(failed(done, TcpPunchFailed))
    assert "192.0.2.1:4000: no answer after 1 SYN)" in message
    assert h.port.last(A).cancelled


def test_refusal_outweighs_later_timeouts(h: Harness) -> None:
    """A candidate refused once and then unanswered is still reported as refused."""
    _, done = h.start([A], timeout=2.0)
    h.port.last(A).fail(error.ConnectionRefusedError())
    h.clock.advance(RETRY)
    h.port.last(A).fail(error.TimeoutError())
    h.clock.advance(2.0)
    assert "refused (RST) after 3 SYNs" in str(failed(done, TcpPunchFailed))


@pytest.mark.parametrize(
    ("timeout", "deadline", "expected"), [(3.0, 10.0, 3.0), (30.0, 10.0, 10.0)]
)
def test_deadline_is_the_earlier_of_timeout_and_config(
    h: Harness, timeout: float, deadline: float, expected: float
) -> None:
    """The punch ends at min(timeout, config.deadline)."""
    _, done = h.start([A], timeout=timeout, config=TcpPunchConfig(deadline=deadline))
    h.clock.advance(expected - TICK)
    assert not done.called
    h.clock.advance(TICK)
    assert f"within {expected:g} s" in str(failed(done, TcpPunchFailed))


def test_deadline_aborts_pending_paths(h: Harness) -> None:
    """Paths still authenticating at the deadline, connected or adopted, are aborted."""
    punch, done = h.start([A], timeout=2.0)
    connected = h.port.last(A).succeed()
    accepted = FakePath()
    punch.adopt(cast(Any, accepted))
    h.clock.advance(2.0)
    failed(done, TcpPunchFailed)
    assert (connected.aborts, accepted.aborts) == (1, 1)


def test_no_candidates_fails_at_once(h: Harness) -> None:
    """Without remotes run() fails at once with TcpPunchFailed, nothing started."""
    _, done = h.start([])
    failed(done, TcpPunchFailed)
    assert h.port.connects == []
    assert h.timers() == []


def test_failure_is_a_connect_error() -> None:
    """TcpPunchFailed is a ConnectError carrying its text."""
    e = TcpPunchFailed("nothing")
    assert isinstance(e, error.ConnectError)
    assert "nothing" in str(e)


# -- cancellation -------------------------------------------------------------------------


def test_cancel_stops_everything(h: Harness) -> None:
    """Cancelling run() cancels connects and timers and aborts every path."""
    punch, done = h.start([A, B, C])
    connected = h.port.last(A).succeed()
    h.port.last(B).fail(error.ConnectionRefusedError())
    pending = h.port.last(C)
    accepted = FakePath()
    punch.adopt(cast(Any, accepted))
    done.cancel()
    failed(done, CancelledError)
    assert pending.cancelled
    assert (connected.aborts, accepted.aborts) == (1, 1)
    assert h.timers() == []
    h.clock.advance(DEADLINE)
    assert len(h.port.connects) == 3
    assert punch.adopt(cast(Any, FakePath())) is False


def test_path_authenticated_after_cancel_is_discarded(h: Harness) -> None:
    """A path that authenticates after run() was cancelled is aborted again, nothing fires."""
    _, done = h.start([A])
    path = h.port.last(A).succeed()
    done.cancel()
    failed(done, CancelledError)
    path.win()
    assert path.aborts == 2
    assert h.timers() == []


def test_cancel_after_the_end_changes_nothing(h: Harness) -> None:
    """Cancelling a run() that already fired leaves its result and aborts nothing more."""
    _, done = h.start([A])
    winner = h.port.last(A).succeed()
    winner.win()
    done.cancel()
    assert succeeded(done) is winner
    assert winner.aborts == 0


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deadline", "syn_wait", "max_syn_wait", "retry", "max_retry"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_config_refuses_non_positive(name: str, value: float) -> None:
    """A zero, negative or NaN duration is a ValueError naming the field."""
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=rf"TcpPunchConfig\.{name}\b"):
        TcpPunchConfig(**kwargs)


@pytest.mark.parametrize("ttl", [0, -1, 256])
def test_config_refuses_prime_ttl_out_of_range(ttl: int) -> None:
    """prime_ttl outside 1..255 is a ValueError naming the field."""
    with pytest.raises(ValueError, match=r"TcpPunchConfig\.prime_ttl"):
        TcpPunchConfig(prime_ttl=ttl)


@pytest.mark.parametrize("ttl", [None, 1, 255])
def test_config_accepts_prime_ttl_in_range(ttl: int | None) -> None:
    """prime_ttl None, 1 and 255 are accepted."""
    assert TcpPunchConfig(prime_ttl=ttl).prime_ttl == ttl


def test_tcp_punch_config_default() -> None:
    """Without UDP check config the TCP rhythm is the default one."""
    assert tcp_punch_config(None) == TcpPunchConfig()


def test_tcp_punch_config_takes_the_checks_deadline() -> None:
    """The TCP rhythm takes the deadline of the UDP checks, the rest default."""
    config = tcp_punch_config(CheckConfig(deadline=20))
    assert config.deadline == 20
    default = TcpPunchConfig()
    assert (config.syn_wait, config.max_syn_wait, config.retry, config.max_retry) == (
        default.syn_wait,
        default.max_syn_wait,
        default.retry,
        default.max_retry,
    )
    assert config.prime_ttl is None
