"""
Happy-Eyeballs style races (DESIGN section 3, step 5; RFC 8305's idea
applied to traversal methods): start every contender, the first success
wins, the others are cancelled.

:class:`Race` is used twice: by the client endpoint, to race the traversal
methods (the relay, a *last resort*, starts after a short stagger unless
every other method has already failed), and by the direct method, to race
the callee's addresses.  It owns its timers and never leaves one behind.

The helpers at the end open and discard :class:`~nattraverse.secure.SecurePath`\\ s
for the built-in methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from nattraverse.interfaces import Path
    from nattraverse.secure import SecurePath

__all__ = [
    "Attempt",
    "Contender",
    "Race",
    "discard_path",
    "is_cancellation",
    "open_tcp_path",
    "tcp_endpoint",
]

_log = Logger()

T = TypeVar("T")


@dataclass(frozen=True)
class Contender(Generic[T]):
    """
    One entry of a race.

    :ivar name: Names it in the failures.
    :ivar start: Starts it; the Deferred must be cancellable.  ``None``: it
        does not run, and *skipped* is its failure.
    :ivar last_resort: Start it only after the race's stagger, or as soon as
        every other contender has failed.
    :ivar skipped: Why it does not run, when *start* is ``None``.
    """

    name: str
    start: Callable[[], Deferred[T]] | None
    last_resort: bool = False
    skipped: BaseException | None = None


@dataclass(frozen=True)
class Attempt:
    """
    How one contender fared (:attr:`Race.attempts`).

    :ivar name: The contender's name.
    :ivar outcome: ``"won"``, ``"failed"``, ``"cancelled"`` (running when
        the race ended), ``"skipped"`` (it did not run), ``"not started"``
        (a last resort whose turn did not come), ``"too late"`` (succeeded
        after the race ended) or ``"displaced"`` (held, then beaten by a
        preferred contender within its grace).
    :ivar started: When it started (reactor time), or ``None``.
    :ivar ended: When it ended, or ``None``.
    :ivar error: What ended it (why it was skipped, or not started at the
        timeout), or ``None``.
    :ivar last_resort: Whether it was a last resort.
    """

    name: str
    outcome: str
    started: float | None = None
    ended: float | None = None
    error: BaseException | None = None
    last_resort: bool = False


class Race(Generic[T]):
    """
    Race *contenders*: the first to succeed wins, every other running one is
    cancelled, and one that succeeds too late is handed to *discard*.

    :param reactor: Runs the stagger and the timeout.
    :param stagger: Seconds between the start of the race and the start of
        the last-resort contenders (0: all start at once).
    :param timeout: Seconds the whole race may take; ``None``: no limit
        (the caller cancels it).  A contender still running at the timeout
        fails with :class:`~twisted.internet.defer.TimeoutError`, and so
        does one that had not started.
    :param timeout_text: How messages name the timeout (default: its
        seconds).
    :param on_lost: Makes the exception the race fails with from the
        failures of all contenders, in the contenders' order.
    :param discard: Called with a value that won too late.
    :param preferred: Names of contenders preferred to the others: when
        another wins while one of them still runs, its value is held for
        up to *grace* seconds, and a preferred contender that succeeds in
        that time wins instead (the held value is discarded).
    :param grace: Seconds a preferred contender has to beat an earlier
        winner; 0: no preference.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        contenders: Sequence[Contender[T]],
        *,
        on_lost: Callable[[dict[str, BaseException]], BaseException],
        discard: Callable[[T], None],
        stagger: float = 0.0,
        timeout: float | None = None,
        timeout_text: str | None = None,
        preferred: frozenset[str] = frozenset(),
        grace: float = 0.0,
    ) -> None:
        names = [c.name for c in contenders]
        if len(set(names)) != len(names):
            raise ValueError(f"contenders must have distinct names: {names}")
        self._reactor = reactor
        self._contenders = list(contenders)
        self._on_lost = on_lost
        self._discard = discard
        self._stagger = stagger
        self._timeout = timeout
        self._timeout_text = timeout_text or (f"{timeout:g} s" if timeout is not None else "")
        self._failures: dict[str, BaseException] = {
            c.name: c.skipped or ValueError("not run") for c in contenders if c.start is None
        }
        self._running: dict[str, Deferred[T]] = {}
        self._waiting: list[Contender[T]] = []  # last resorts not started yet
        self._stagger_call: IDelayedCall | None = None
        self._timer: IDelayedCall | None = None
        self._result: Deferred[tuple[str, T]] | None = None
        self._done = False
        self._preferred = preferred
        self._grace = grace
        #: A winner held while a preferred contender has its grace period.
        self._held: tuple[str, T] | None = None
        self._grace_call: IDelayedCall | None = None
        self._started_at: dict[str, float] = {}
        self._ended: dict[str, tuple[str, float]] = {}  # name -> (outcome, when)

    def run(self) -> Deferred[tuple[str, T]]:
        """
        Start the race (once).

        :returns: A Deferred of the winner's name and value.  It fails with
            ``on_lost(failures)`` when every contender failed or at the
            timeout.  Cancelling it cancels every contender and timer.
        """
        if self._result is not None:
            raise RuntimeError("a race runs once")
        result: Deferred[tuple[str, T]] = Deferred(self._cancel)
        self._result = result
        if self._timeout is not None:
            self._timer = self._reactor.callLater(self._timeout, self._expire)
        runnable = [c for c in self._contenders if c.start is not None]
        self._waiting = [c for c in runnable if c.last_resort]
        firsts = [c for c in runnable if not c.last_resort]
        if self._waiting and firsts and self._stagger > 0:
            self._stagger_call = self._reactor.callLater(self._stagger, self._start_waiting)
        for contender in firsts:
            if self._done:
                break
            self._start(contender)
        if not self._done and self._waiting and self._stagger_call is None:
            self._start_waiting()
        self._check_lost()
        return result

    @property
    def running(self) -> tuple[str, ...]:
        """The names of the contenders running now."""
        return tuple(self._running)

    @property
    def attempts(self) -> tuple[Attempt, ...]:
        """
        How every contender fared so far, in the contenders' order (one
        still running is ``"running"``, one still waiting ``"waiting"``).
        """
        found = []
        for contender in self._contenders:
            name = contender.name
            started = self._started_at.get(name)
            if name in self._ended:
                outcome, ended = self._ended[name]
            elif name in self._running:
                outcome, ended = "running", None
            elif contender.start is None:
                outcome, ended = "skipped", None
            elif started is None and name in self._failures:
                outcome, ended = "failed", None  # start() itself raised, or the timeout
            else:
                outcome, ended = "waiting", None
            error = self._failures.get(name)
            found.append(Attempt(name, outcome, started, ended, error, contender.last_resort))
        return tuple(found)

    def _end(self, name: str, outcome: str) -> None:
        self._ended.setdefault(name, (outcome, self._reactor.seconds()))

    # -- contenders -------------------------------------------------------------

    def _start(self, contender: Contender[T]) -> None:
        assert contender.start is not None
        self._started_at[contender.name] = self._reactor.seconds()
        try:
            attempt = contender.start()
        except Exception as e:
            _log.failure("starting {name} failed", name=contender.name)
            self._failures[contender.name] = e
            self._end(contender.name, "failed")
            return
        self._running[contender.name] = attempt
        attempt.addCallbacks(
            self._won,
            self._lost,
            callbackArgs=(contender.name, attempt),
            errbackArgs=(contender.name, attempt),
        )

    def _start_waiting(self) -> None:
        self._stagger_call = None
        waiting, self._waiting = self._waiting, []
        for contender in waiting:
            if self._done:
                return
            self._start(contender)
        self._check_lost()

    def _forget(self, name: str, attempt: Deferred[T]) -> None:
        if self._running.get(name) is attempt:
            del self._running[name]

    def _won(self, value: T, name: str, attempt: Deferred[T]) -> None:
        self._forget(name, attempt)
        if self._done:
            # Marked cancelled as the race ended, but its path got through.
            self._ended[name] = ("too late", self._reactor.seconds())
            self._discard(value)
            return
        if self._held is not None:
            # A preferred contender beat the held winner within its grace.
            if name not in self._preferred:
                self._end(name, "too late")
                self._discard(value)
                return
            held_name, held_value = self._held
            self._held = None
            self._ended[held_name] = ("displaced", self._ended[held_name][1])
            self._discard(held_value)
        elif self._grace > 0 and name not in self._preferred and self._preferred_running():
            self._held = (name, value)
            self._end(name, "won")  # unless a preferred contender displaces it
            self._grace_call = self._reactor.callLater(self._grace, self._release_held)
            return
        self._end(name, "won")
        self._finish()
        assert self._result is not None
        self._result.callback((name, value))

    def _preferred_running(self) -> bool:
        return any(name in self._preferred for name in self._running) or any(
            c.name in self._preferred for c in self._waiting
        )

    def _release_held(self) -> None:
        """The grace period is over (or no preferred contender runs): the held winner wins."""
        self._grace_call = None
        held, self._held = self._held, None
        if held is None or self._done:
            return
        self._finish()
        assert self._result is not None
        self._result.callback(held)

    def _lost(self, failure: Failure, name: str, attempt: Deferred[T]) -> None:
        self._forget(name, attempt)
        if self._done:
            return  # cancelled by the race itself: nothing to report
        error = failure.value
        self._failures[name] = error if error is not None else Exception(failure.getErrorMessage())
        self._end(name, "failed")
        if self._held is not None:
            if not self._preferred_running():
                if self._grace_call is not None and self._grace_call.active():
                    self._grace_call.cancel()
                self._release_held()
            return
        if self._stagger_call is not None and not self._running:
            # Every other contender failed: no reason to wait for the stagger.
            self._stagger_call.cancel()
            self._start_waiting()
            return
        self._check_lost()

    def _check_lost(self) -> None:
        if self._done or self._running or self._waiting or self._stagger_call is not None:
            return
        self._finish()
        assert self._result is not None
        self._result.errback(self._on_lost(self._ordered()))

    def _ordered(self) -> dict[str, BaseException]:
        return {
            c.name: self._failures[c.name] for c in self._contenders if c.name in self._failures
        }

    # -- the end ----------------------------------------------------------------

    def _finish(self) -> None:
        """Mark the race over; stop the timers; cancel the contenders still running."""
        self._done = True
        for call in (self._stagger_call, self._timer, self._grace_call):
            if call is not None and call.active():
                call.cancel()
        self._stagger_call = self._timer = self._grace_call = None
        held, self._held = self._held, None
        if held is not None:
            self._ended[held[0]] = ("cancelled", self._ended[held[0]][1])
            self._discard(held[1])
        for contender in self._waiting:
            self._end(contender.name, "not started")
        self._waiting = []
        running, self._running = self._running, {}
        for name in running:
            self._end(name, "cancelled")
        for attempt in running.values():
            attempt.cancel()

    def _expire(self) -> None:
        self._timer = None
        if self._held is not None:
            self._release_held()  # a winner is there: the timeout ends only the wait
            return
        text = self._timeout_text
        for name in self._running:
            self._failures[name] = TimeoutError(f"timed out: not done within the {text} timeout")
            self._end(name, "failed")
        for contender in self._waiting:
            self._failures[contender.name] = TimeoutError(
                f"not started: the {text} timeout came first"
            )
        self._finish()
        assert self._result is not None
        self._result.errback(self._on_lost(self._ordered()))

    def _cancel(self, result: Deferred[tuple[str, T]]) -> None:
        if not self._done:
            self._finish()


# -- paths ------------------------------------------------------------------------


def discard_path(path: Path) -> None:
    """
    Abort *path*, whose :attr:`~nattraverse.secure.SecurePath.authenticated`
    nobody waits for any more (its failure is swallowed, not logged as
    unhandled).
    """
    path.authenticated.addErrback(lambda failure: None)
    path.abort()


def tcp_endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A TCP client endpoint to the IP address *host* (v4 or v6)."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


def open_tcp_path(
    reactor: Any, host: str, port: int, path: SecurePath, timeout: float
) -> Deferred[SecurePath]:
    """
    Connect to *host*:*port* with *path* as the protocol, giving up after
    *timeout* seconds, and wait for it to authenticate.

    :returns: A cancellable Deferred of *path*; on failure or cancellation
        the connection (or the attempt to make it) is closed.
    """
    from twisted.internet.endpoints import connectProtocol

    async def run() -> SecurePath:
        try:
            await connectProtocol(tcp_endpoint(reactor, host, port, timeout), path)
            return await path.authenticated
        except BaseException:
            discard_path(path)
            raise

    return Deferred.fromCoroutine(run())


def is_cancellation(failure: Failure) -> bool:
    """Whether *failure* is a cancellation (not worth a warning)."""
    return failure.check(CancelledError) is not None
