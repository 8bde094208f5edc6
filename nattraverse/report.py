"""
What happened while a connection was made (issue 7's diagnostics): every
traversal method the caller raced, when it started, how long it ran, how it
ended and why, and, for a relayed connection, why no direct path won.

A :class:`ConnectionReport` is a frozen value.  The client endpoint builds
one per ``connect()`` and hands it out twice: as the ``report`` attribute of
the transport the protocol gets, and as the ``report`` attribute of the
:class:`~nattraverse.errors.PunchFailed` a failed ``connect()`` raises.
``natcat --json-report`` prints :meth:`ConnectionReport.to_json`.

Times are seconds on the reactor's clock, counted from the moment the
introduction arrived (when every method starts), so that the methods'
figures compare directly; :attr:`ConnectionReport.introduced` says how long
getting the introduction took.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ConnectionReport", "MethodAttempt", "Outcome", "Upgrade"]


class Outcome(enum.Enum):
    """How one method's attempt ended."""

    #: Its path was the one handed to the application.
    WON = "won"
    #: It failed (its error says why; a timeout is a failure too).
    FAILED = "failed"
    #: It was still running when another method won, and was stopped.
    CANCELLED = "cancelled"
    #: It did not apply to this pair of peers, so it was not run.
    SKIPPED = "skipped"
    #: A last resort whose turn did not come: another method won first.
    NOT_STARTED = "not started"
    #: It succeeded, but after another method had won; its path was closed.
    TOO_LATE = "too late"
    #: It succeeded first, but a preferred method (``preferTcp``) succeeded
    #: within its grace period and won instead; its path was closed.
    DISPLACED = "displaced"


@dataclass(frozen=True, slots=True)
class MethodAttempt:
    """
    One method's part in the race.

    :ivar method: Its name (``"udp"``, ``"relay"``...).
    :ivar outcome: How it ended.
    :ivar started: Seconds after the introduction it started at; ``None``
        when it never ran.
    :ivar ended: Seconds after the introduction it ended at (succeeded,
        failed, was cancelled); ``None`` when it never ran.
    :ivar reason: Why it failed, was skipped or cancelled, in words; empty
        for the winner.
    :ivar relay: Whether it is a last resort (a relay), which started after
        the direct methods' head start.
    :ivar relayed: Whether the path it won with goes through the
        rendezvous' UDP relay (the ``udp`` method's relayed leg), which
        may later move to a direct path (:class:`Upgrade`).
    """

    method: str
    outcome: Outcome
    started: float | None = None
    ended: float | None = None
    reason: str = ""
    relay: bool = False
    relayed: bool = False

    @property
    def duration(self) -> float | None:
        """Seconds it ran, when it ran."""
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    def to_json(self) -> dict[str, Any]:
        """This attempt as JSON-ready values (times in milliseconds)."""
        return {
            "method": self.method,
            "outcome": self.outcome.value,
            "started_ms": _ms(self.started),
            "duration_ms": _ms(self.duration),
            "reason": self.reason,
            "relayed": self.relayed,
        }

    def __str__(self) -> str:
        ran = f" after {self.duration * 1000:.0f} ms" if self.duration is not None else ""
        why = f": {self.reason}" if self.reason else ""
        through = " through the UDP relay" if self.relayed else ""
        return f"{self.method} {self.outcome.value}{through}{ran}{why}"


@dataclass(frozen=True, slots=True)
class Upgrade:
    """
    A connection that moved from one path to a better one without the
    application seeing it (a relayed QUIC connection moving to a direct
    path).

    :ivar at: Seconds after the introduction.
    :ivar old: The method that carried it before.
    :ivar new: The method that carries it since.
    :ivar remote: The peer's address on the new path.
    """

    at: float
    old: str
    new: str
    remote: str

    def to_json(self) -> dict[str, Any]:
        """This upgrade as JSON-ready values."""
        return {"at_ms": _ms(self.at), "from": self.old, "to": self.new, "remote": self.remote}


@dataclass(frozen=True, slots=True)
class ConnectionReport:
    """
    The race of one ``connect()``.

    :ivar peer: The peer as asked for (a name or a peer id).
    :ivar peer_id: The peer id the rendezvous vouched for; empty when no
        introduction came.
    :ivar method: The method that won; ``None`` when none did.
    :ivar introduced: Seconds from ``connect()`` to the introduction.
    :ivar connected: Seconds from the introduction to the winner's
        authenticated path; ``None`` when none won.
    :ivar attempts: Every method, in the endpoint's order.
    :ivar upgrades: Moves to a better path after the connection was made.
    :ivar nats: How both sides' NATs map, in words, when the rendezvous
        observed both punching sockets at its two ports
        (:func:`~nattraverse.punch.mapping.describe_pair`); ``None``
        otherwise.
    """

    peer: str
    peer_id: str
    method: str | None
    introduced: float
    connected: float | None
    attempts: tuple[MethodAttempt, ...]
    upgrades: tuple[Upgrade, ...] = field(default=())
    nats: str | None = None

    @property
    def relayed(self) -> bool:
        """
        Whether the connection goes through a relay: a relay (a last-resort
        method) won, or the winner's path went through the rendezvous' UDP
        relay and has not moved to a direct path since.
        """
        won = self._winner
        if won is None:
            return False
        return won.relay or (won.relayed and not self.upgrades)

    @property
    def _winner(self) -> MethodAttempt | None:
        return next((a for a in self.attempts if a.outcome is Outcome.WON), None)

    def attempt(self, method: str) -> MethodAttempt:
        """
        The attempt of *method*.

        :raises KeyError: when *method* was not in the race.
        """
        for found in self.attempts:
            if found.method == method:
                return found
        raise KeyError(f"{method!r} was not in the race: {[a.method for a in self.attempts]}")

    @property
    def why_relayed(self) -> str | None:
        """
        Why the connection is relayed, in words; ``None`` when it is not.

        Either every direct method failed or did not apply (each says why),
        or the relay was simply first: then the direct methods still running
        at that moment are named, with how long they had had.
        """
        if not self.relayed:
            return None
        text = self._why_relayed()
        return text if self.nats is None else f"{text}; {self.nats}"

    def _why_relayed(self) -> str:
        winner = self._winner
        leg = winner if winner is not None and winner.relayed else None
        direct = [a for a in self.attempts if not a.relay and a is not leg]
        if not direct and leg is None:
            return "only relay methods were enabled"
        running = [a for a in direct if a.outcome in (Outcome.CANCELLED, Outcome.TOO_LATE)]
        if leg is not None:
            running.insert(0, leg)  # its direct pairs go on, to upgrade
        failed = "; ".join(str(a) for a in direct if a not in running)
        if not running:
            return f"no direct method worked: {failed}"
        won_at = self.connected if self.connected is not None else 0.0
        still = ", ".join(
            f"{a.method} (running for {(won_at - (a.started or 0.0)) * 1000:.0f} ms)"
            for a in running
        )
        relay = "the rendezvous' UDP relay" if leg is not None else "the relay"
        text = f"{relay} connected first, {won_at * 1000:.0f} ms after the introduction, while "
        text += f"{still} had not yet reached the peer"
        if leg is not None:
            text += f" ({leg.method} goes on checking, to move the connection to a direct path)"
        return f"{text}; {failed}" if failed else text

    def with_upgrade(self, upgrade: Upgrade) -> ConnectionReport:
        """This report, with *upgrade* added."""
        return replace(self, upgrades=(*self.upgrades, upgrade))

    def to_json(self) -> dict[str, Any]:
        """This report as JSON-ready values (times in milliseconds)."""
        return {
            "peer": self.peer,
            "peer_id": self.peer_id,
            "method": self.method,
            "introduced_ms": _ms(self.introduced),
            "connected_ms": _ms(self.connected),
            "relayed": self.relayed,
            "why_relayed": self.why_relayed,
            "nats": self.nats,
            "attempts": [a.to_json() for a in self.attempts],
            "upgrades": [u.to_json() for u in self.upgrades],
        }

    def describe(self) -> str:
        """Several lines a person can read: the winner, then every attempt."""
        if self.method is None:
            head = f"no path to {self.peer}"
        else:
            head = f"{self.peer} via {self.method}"
            winner = self._winner
            if winner is not None and winner.relayed:
                head += " through the rendezvous' UDP relay"
            if self.connected is not None:
                head += f" in {self.connected * 1000:.0f} ms after the introduction"
        lines = [f"{head} (introduction took {self.introduced * 1000:.0f} ms)"]
        lines.extend(f"  {attempt}" for attempt in self.attempts)
        if self.why_relayed is not None:
            lines.append(f"  relayed because {self.why_relayed}")
        elif self.nats is not None:
            lines.append(f"  {self.nats}")
        lines.extend(
            f"  moved from {u.old} to {u.new} ({u.remote}) at {u.at * 1000:.0f} ms"
            for u in self.upgrades
        )
        return "\n".join(lines)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)
