"""
Birthday-paradox probing: a direct UDP path between a peer whose NAT maps
per destination at random ports (the *hard* side) and one whose NAT maps
independently of the destination but filters by address and port (the
*easy* side, a port-restricted cone), which plain punching and port
prediction cannot connect.

The hard side opens many extra sockets (:attr:`BirthdayConfig.sockets`)
and sends one authenticated check from each to the easy side's
server-reflexive address: each opens a mapping at a random port of the hard
NAT, which lets the easy side's address in.  The easy side's NAT drops
those checks (it never sent to those ports), but the easy side sends
single authenticated checks (probes) from its punching port to random
ports of the hard side's public address, without repetition, at a bounded
rate and within a budget.  With ``n`` open mappings among the ``N`` ports
of the range, ``k`` probes find one with probability
``1 - (1 - n / N) ** k``: about 98 % for ``n = 256`` and ``k = 1000``.
A probe that reaches one of them is answered by its socket, which opens
the easy NAT towards that port: from then on the two sides check and
secure the pair as any other (the hard side's QUIC runs on that socket;
the others close at once).

Only authenticated packets count: the hard sockets and the probes carry
the session's checks (:mod:`~nattraverse.punch.checks`), keyed by the
session secret.

Both sides decide from the two NAT mappings the rendezvous observed
(:func:`birthday_plan`), so no message is added: the hard side if its NAT
is random and the peer's independent, the easy side the other way round;
never when both map per destination (the relay carries those pairs).
Filtering is not observed, and plain checks connect a cone easy side
within a round trip, so both sides wait :attr:`BirthdayConfig.delay` and
probe only when nothing authenticated came from the peer by then.

This module holds the pure parts (:func:`birthday_plan`,
:class:`Pacer`, :class:`PortSpray`) and the hard side's sockets
(:class:`HardSockets`); :class:`~nattraverse.punch.port.PunchingPort`
drives them.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from nattraverse._types import Endpoint
from nattraverse.punch.checks import (
    IceCredentials,
    authentic_answer,
    authentic_request,
    encode_check,
)
from nattraverse.punch.mapping import MappingKind, NatMapping
from nattraverse.stun.demux import StunDemultiplexer

__all__ = [
    "BirthdayConfig",
    "BirthdayPlan",
    "BirthdayRole",
    "HardSockets",
    "Pacer",
    "PortSpray",
    "birthday_plan",
    "random_ports",
    "success_probability",
]

_log = Logger()

#: Seconds between two wake-ups of a pacer, at least (a batch is sent each).
TICK = 0.01


@dataclass(frozen=True, slots=True)
class BirthdayConfig:
    """
    Birthday-paradox probing's sizes, rates and budget.

    :ivar sockets: Extra sockets the hard side opens (each one check).
    :ivar socket_rate: Sockets the hard side opens per second.
    :ivar probes: Probes the easy side sends at most (its budget).
    :ivar rate: Probes the easy side sends per second.
    :ivar delay: Seconds after the checks start before probing, when
        nothing authenticated came from the peer by then.
    :ivar ports: The lowest and highest port probed.
    """

    sockets: int = 256
    socket_rate: float = 2000.0
    probes: int = 1500
    rate: float = 200.0
    delay: float = 0.5
    ports: tuple[int, int] = (1024, 65535)

    def __post_init__(self) -> None:
        if self.sockets < 1 or self.probes < 1:
            raise ValueError("sockets and probes must be at least 1")
        if not (self.socket_rate > 0 and self.rate > 0 and self.delay >= 0):
            raise ValueError("the rates must be positive and the delay not negative")
        low, high = self.ports
        if not 1 <= low <= high <= 65535 or high - low + 1 < self.probes:
            raise ValueError(f"ports {self.ports!r} cannot hold {self.probes} probes")


def success_probability(sockets: int, probes: int, ports: int = 64512) -> float:
    """
    The chance that *probes* distinct random ports out of *ports* hit one
    of *sockets* open mappings (a hypergeometric miss; about
    ``1 - (1 - sockets / ports) ** probes``).
    """
    miss = 1.0
    for i in range(min(probes, ports - sockets + 1)):
        miss *= (ports - sockets - i) / (ports - i)
    return 1.0 - miss if probes <= ports - sockets else 1.0


class BirthdayRole(enum.Enum):
    """Which side of birthday-paradox probing this peer takes."""

    #: Behind the random symmetric NAT: opens many sockets.
    HARD = "hard"
    #: Behind the NAT that maps independently: probes random ports.
    EASY = "easy"


@dataclass(frozen=True, slots=True)
class BirthdayPlan:
    """
    This side's part in birthday-paradox probing.

    :ivar role: Hard or easy.
    :ivar target: HARD: the easy side's server-reflexive address, which the
        sockets check.  EASY: the hard side's last observed address, whose
        host the probes go to.
    """

    role: BirthdayRole
    target: Endpoint

    def describe(self) -> str:
        """In words."""
        if self.role is BirthdayRole.HARD:
            return f"many sockets checking {self.target}"
        return f"probing random ports of {self.target.host}"


def birthday_plan(ours: NatMapping, theirs: NatMapping) -> BirthdayPlan | None:
    """
    This side's plan, or ``None`` when birthday probing cannot help: it
    needs one side behind a NAT that allocates random ports per
    destination and the other behind one that maps independently (known
    from two observations on each side).
    """
    if theirs.last is None:
        return None
    kinds = (ours.kind, theirs.kind)
    if kinds == (MappingKind.RANDOM, MappingKind.INDEPENDENT):
        return BirthdayPlan(BirthdayRole.HARD, theirs.last)
    if kinds == (MappingKind.INDEPENDENT, MappingKind.RANDOM):
        return BirthdayPlan(BirthdayRole.EASY, theirs.last)
    return None


def random_ports(
    random_bytes: Callable[[int], bytes], count: int, low: int, high: int
) -> list[int]:
    """*count* distinct ports of *low*-*high* in random order, drawn from *random_bytes*."""
    chooser = random.Random(int.from_bytes(random_bytes(16), "big"))
    return chooser.sample(range(low, high + 1), count)


class Pacer:
    """
    *total* events at *rate* per second from *start*, in batches at least
    :data:`TICK` apart.  Pure.
    """

    def __init__(self, total: int, rate: float, start: float) -> None:
        self.total = total
        self.rate = rate
        self.start = start
        self.done = 0
        self._last = start - TICK

    def take(self, now: float) -> int:
        """How many events are due by *now* (and counted as done)."""
        due = min(self.total, math.floor((now - self.start) * self.rate + 1e-9) + 1)
        count = max(0, due - self.done)
        if count:
            self.done += count
            self._last = now
        return count

    def next_time(self) -> float | None:
        """When the next event is due, ``None`` when all are done."""
        if self.done >= self.total:
            return None
        return max(self.start + self.done / self.rate, self._last + TICK)


class PortSpray:
    """
    The easy side's probes (a :class:`~nattraverse.punch.checks.ProbeSchedule`):
    *ports* of *host*, in order, paced by a :class:`Pacer`.
    """

    def __init__(self, host: str, ports: list[int], rate: float, start: float) -> None:
        self.host = host
        self.ports = ports
        self.rate = rate
        self._pacer = Pacer(len(ports), rate, start)

    def take(self, now: float) -> list[Endpoint]:
        """The probes due by *now*."""
        first = self._pacer.done
        count = self._pacer.take(now)
        return [Endpoint(self.host, port) for port in self.ports[first : first + count]]

    def next_time(self) -> float | None:
        """When the next probe is due."""
        return self._pacer.next_time()

    def describe(self) -> str:
        """What is probed."""
        return f"of {len(self.ports)} to random ports of {self.host} at {self.rate:g}/s"


#: Called with the socket that won: its demultiplexer, its listening port,
#: the authenticated datagram and where it came from.
WonCallback = Callable[[StunDemultiplexer, Any, bytes, Endpoint], None]


class HardSockets:
    """
    The hard side's sockets: each sends one check to *target*; the first
    to receive an authenticated check from the peer (or an answer to its
    own) wins and is handed to *on_won*; the others close at once.  All
    close at *until* (reactor time) when none won, and *on_over* is called.

    :param reactor: ``IReactorUDP`` and ``IReactorTime``.
    :param credentials: The session's credentials.
    :param controlling: Whether this side is the caller.
    :param target: The easy side's server-reflexive address.
    :param config: How many sockets, how fast.
    :param interface: The address to bind them to.
    :param until: When to give up (reactor time).
    :param random_bytes: Transaction ids and the tie-breaker.
    :param on_won: See :data:`WonCallback`.
    :param on_over: Called (once, without a winner) at *until*.
    """

    def __init__(
        self,
        reactor: Any,
        credentials: IceCredentials,
        *,
        controlling: bool,
        target: Endpoint,
        config: BirthdayConfig,
        interface: str,
        until: float,
        random_bytes: Callable[[int], bytes],
        on_won: WonCallback,
        on_over: Callable[[], None],
    ) -> None:
        self._reactor = reactor
        self._credentials = credentials
        self._controlling = controlling
        self.target = target
        self._config = config
        self._interface = interface
        self._until = until
        self._random = random_bytes
        self._tie_breaker = int.from_bytes(random_bytes(8), "big")
        self._on_won = on_won
        self._on_over = on_over
        self._sockets: dict[int, tuple[StunDemultiplexer, Any, bytes]] = {}
        self._pacer: Pacer | None = None
        self._timer: IDelayedCall | None = None
        self.stopped = False
        #: Sockets opened, checks that could not be sent, sockets that could not be opened.
        self.opened = 0
        self.send_failures = 0
        self.open_failure: str | None = None
        self.won: Endpoint | None = None

    @property
    def open(self) -> int:
        """Sockets open now (a winner no longer counts: it was handed over)."""
        return len(self._sockets)

    def describe(self) -> str:
        """What the sockets did, in words."""
        text = f"{self.opened} of {self._config.sockets} sockets sent a check to {self.target}"
        if self.open_failure is not None:
            text += f" (no more could be opened: {self.open_failure})"
        if self.won is not None:
            return text + f"; the one at port {self.won.port} was reached"
        return text + "; none was reached"

    def start(self) -> None:
        """Open the sockets, paced; each sends its check at once."""
        if self._pacer is not None:
            raise RuntimeError("the sockets were already started")
        self._pacer = Pacer(self._config.sockets, self._config.socket_rate, self._reactor.seconds())
        self._tick()

    def stop(self) -> None:
        """Close every socket still open and cancel the timer.  Idempotent."""
        self.stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        sockets, self._sockets = self._sockets, {}
        for demux, listening, _ in sockets.values():
            demux.intercept = None
            listening.stopListening()

    def _tick(self) -> None:
        self._timer = None
        if self.stopped or self._pacer is None:
            return
        now = self._reactor.seconds()
        if now >= self._until:
            self.stop()
            self._on_over()
            return
        for _ in range(self._pacer.take(now)):
            if self.open_failure is not None or not self._open_one():
                break
        due = self._pacer.next_time() if self.open_failure is None else None
        when = self._until if due is None else min(due, self._until)
        self._timer = self._reactor.callLater(max(0.0, when - now), self._tick)

    def _open_one(self) -> bool:
        index = self.opened
        demux = StunDemultiplexer(self._reactor, random_bytes=self._random)
        demux.intercept = partial(self._datagram, index)
        try:
            listening = self._reactor.listenUDP(0, demux, interface=self._interface)
        except CannotListenError as e:
            self.open_failure = str(e.socketError)
            _log.warn(
                "birthday probing: could only open {count} sockets: {error}",
                count=self.opened,
                error=self.open_failure,
            )
            return False
        self.opened += 1
        txid = self._random(12)
        self._sockets[index] = (demux, listening, txid)
        check = encode_check(
            self._credentials, txid, controlling=self._controlling, tie_breaker=self._tie_breaker
        )
        try:
            demux.send(check, self.target)
        except OSError:
            self.send_failures += 1
        return True

    def _datagram(self, index: int, data: bytes, source: Endpoint) -> bool:
        """Every datagram of socket *index*: taken; a winner if authenticated."""
        entry = self._sockets.get(index)
        if entry is None or self.stopped:
            return True
        demux, listening, txid = entry
        if not (
            authentic_request(data, self._credentials, controlling=self._controlling)
            or authentic_answer(data, self._credentials, txid)
        ):
            return True
        del self._sockets[index]
        host = listening.getHost()
        self.won = Endpoint(host.host, host.port)
        self.stop()
        _log.info(
            "birthday probing: socket {index} (port {port}) reached from {source}",
            index=index,
            port=host.port,
            source=str(source),
        )
        self._on_won(demux, listening, data, source)
        return True
