"""
TCP hole punching (DESIGN section 3, step 5; Ford, Srisuresh, Kegel,
"Peer-to-Peer Communication Across Network Address Translators", section 4):
both peers, at the introduction, connect from the port their rendezvous
session comes from to each of the other's TCP candidates, while accepting on
that port too.

Whatever happens to the SYNs, each side ends with at most one connection per
4-tuple (:mod:`~nattraverse.punch.tcpport`): from ``connect()`` when the SYNs
crossed (a simultaneous open) or the peer's listener answered, from
``accept()`` when the peer's SYN reached this side first.  Every connection
carries a :class:`~nattraverse.secure.SecurePath`, and the first one that
authenticates wins; the others are closed.

A SYN that meets a NAT which has not opened yet is dropped (then this side's
``connect()`` waits) or answered with a RST (``ECONNREFUSED``).  Neither ends
the attempt: :class:`TcpPunch` restarts a ``connect()`` that stays
unanswered for :attr:`TcpPunchConfig.syn_wait` (a fresh SYN at once, sooner
than the kernel's one-second retransmission) and retries a refused one after
a short pause, until its deadline.

Low-TTL priming (STUNT #2, NATBlaster, without raw sockets): a SYN that
meets a NAT which drops it leaves this side's NAT open, but a RST (from a
NAT that rejects unsolicited SYNs) makes a Linux NAT forget the entry of
the SYN it answers.  So, with :attr:`TcpPunchConfig.prime_ttl` set, each
refused SYN is followed at once by a priming SYN with that TTL, enough to
open this side's NAT again and too little to pass the peer's, which
therefore neither delivers it nor answers with a RST; the peer's SYN then
finds this side's NAT open, and the next full SYN follows after the pause.
Linux ends a priming ``connect()`` when the ICMP Time Exceeded returns;
the NAT's mapping stays.  The first SYN to a candidate is a full one:
priming it would cost a round trip to the router where it dies, for
nothing when the peer's NAT drops (the common case).

One ISN per candidate (:attr:`TcpPunchConfig.one_isn`,
:mod:`~nattraverse.punch.isn`): every SYN to a candidate, priming or full,
first or restarted, carries the same sequence number.  A Linux NAT that
has recorded one of them (this side's own, or the peer's NAT when a
priming SYN died there) then takes each later one as a retransmission,
where a fresh ISN would be outside the recorded window and dropped as
``INVALID``; that is what makes NATs that answer unsolicited SYNs with a
RST punchable.
"""

from __future__ import annotations

import errno
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from nattraverse.errors import PeerAuthenticationFailed
from nattraverse.punch.isn import IsnPinningUnavailable, can_pin_isn
from nattraverse.punch.synfilter import MAX_IGNORED

if TYPE_CHECKING:
    from nattraverse.punch.checks import CheckConfig
    from nattraverse.punch.hops import HopCount
    from nattraverse.punch.tcpport import SharedTcpPort
    from nattraverse.secure import SecurePath

__all__ = ["TcpPunch", "TcpPunchConfig", "TcpPunchFailed", "TcpPunchingPort", "tcp_punch_config"]

_log = Logger()

Address = tuple[str, int]


class TcpPunchFailed(error.ConnectError):
    """No TCP path was made before the deadline; the message says what each candidate did."""

    def __init__(self, text: str) -> None:
        error.ConnectError.__init__(self, string=text)


@dataclass(frozen=True)
class TcpPunchConfig:
    """
    The rhythm of TCP hole punching.

    :ivar deadline: Seconds the punching may take.
    :ivar syn_wait: Seconds the first ``connect()`` to a candidate may wait
        for an answer before it is restarted with a fresh SYN (a SYN the
        peer's NAT dropped is never answered, and the kernel would
        retransmit it only after a second).  Each restart doubles it, up to
        *max_syn_wait*, so that a path slower than that still connects.
    :ivar max_syn_wait: The longest a ``connect()`` waits.
    :ivar retry: Seconds before connecting again after a refusal (a RST) or
        an ICMP error; doubles on each, up to *max_retry*.
    :ivar max_retry: The longest pause between two SYNs to one candidate.
    :ivar prime_ttl: The TTL of priming SYNs (low-TTL priming), one after
        each RST; ``None``: no priming.  :class:`TcpPunchingPort` sets it
        from the measured hop count (:mod:`~nattraverse.punch.hops`) when
        *priming* is on.
    :ivar priming: Whether :class:`TcpPunchingPort` measures the hop count
        and primes.
    :ivar one_isn: Whether every SYN to a candidate carries one sequence
        number, chosen at random per candidate (see the module docstring;
        needs ``CAP_NET_ADMIN``).  ``None``: :class:`TcpPunchingPort` turns
        it on when this process can (:func:`~nattraverse.punch.isn.can_pin_isn`).
    """

    deadline: float = 10.0
    syn_wait: float = 0.25
    max_syn_wait: float = 3.0
    retry: float = 0.05
    max_retry: float = 1.0
    prime_ttl: int | None = None
    priming: bool = True
    one_isn: bool | None = None

    def __post_init__(self) -> None:
        for name in ("deadline", "syn_wait", "max_syn_wait", "retry", "max_retry"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"TcpPunchConfig.{name} must be a positive number, not {value!r}")
        if self.prime_ttl is not None and not 1 <= self.prime_ttl <= 255:
            raise ValueError(f"TcpPunchConfig.prime_ttl must be 1 to 255, not {self.prime_ttl!r}")


def tcp_punch_config(checks: CheckConfig | None) -> TcpPunchConfig:
    """
    The TCP punching rhythm that goes with the UDP checks' *checks*: the
    same deadline (the ``punchTimeout`` of ``punch:``), the default rest.
    """
    return TcpPunchConfig() if checks is None else TcpPunchConfig(deadline=checks.deadline)


class _OnePath(Factory):
    """Builds the one path of a connect() (or of an accepted connection)."""

    noisy = False

    def __init__(self, make: Callable[[], SecurePath]) -> None:
        self._make = make
        self.path: SecurePath | None = None

    def buildProtocol(self, addr: IAddress | None) -> SecurePath:
        self.path = self._make()
        return self.path


@dataclass
class _Candidate:
    """One remote address and what punching it has done so far."""

    remote: Address
    isn: int | None = None
    predicted: bool = False
    syns: int = 0
    primes: int = 0
    prime_next: bool = False
    prime_ok: bool = True
    wait: float = 0.0
    pause: float = 0.0
    last: BaseException | None = None
    given_up: bool = False
    connecting: Deferred[Any] | None = None
    timer: IDelayedCall | None = None
    paths: list[SecurePath] = field(default_factory=list)

    def label(self) -> str:
        host, port = self.remote
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(e: BaseException | None) -> str:
    if e is None:
        return "no answer"
    if isinstance(e, error.ConnectionRefusedError):
        return "refused (RST)"
    if isinstance(e, error.TimeoutError):
        return "no answer"
    if isinstance(e, error.NoRouteError):
        return "unreachable (ICMP)"
    return str(e) or type(e).__name__


def _summary(predicted: Sequence[_Candidate]) -> str:
    """The predicted candidates' part of the failure, in one clause."""
    outcomes: dict[str, int] = {}
    for c in predicted:
        outcome = _describe(c.last)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    ports = [c.remote[1] for c in predicted]
    host = predicted[0].remote[0]
    return (
        f"{len(predicted)} predicted ports of {host} ({min(ports)}-{max(ports)}): "
        + ", ".join(
            f"{count} {outcome}"
            for outcome, count in sorted(outcomes.items(), key=lambda item: -item[1])
        )
        + f" after {max(c.syns for c in predicted)} SYNs at most"
    )


class TcpPunch:
    """
    One TCP punching attempt from *port* to *remotes*: keeps connecting to
    each (see the module docstring) and adopts the paths of connections the
    port accepted (:meth:`adopt`); the first path to authenticate wins.

    :param make_path: Makes the :class:`~nattraverse.secure.SecurePath` of a
        new connection, whichever way it was made.
    :param timeout: Seconds left for the whole connection; the punching
        stops at the earlier of it and the config's deadline.
    :param predicted: More remote addresses, the peer's predicted next
        mappings (:func:`~nattraverse.punch.mapping.predicted_tcp_ports`),
        punched like *remotes* and summed up in the failure.
    """

    def __init__(
        self,
        reactor: Any,
        port: SharedTcpPort,
        remotes: Sequence[Address],
        make_path: Callable[[], SecurePath],
        *,
        timeout: float,
        config: TcpPunchConfig | None = None,
        predicted: Sequence[Address] = (),
    ) -> None:
        self._reactor = reactor
        self._port = port
        self.make_path = make_path
        self._config = config or TcpPunchConfig()
        self._seconds = min(timeout, self._config.deadline)
        unique: dict[Address, bool] = {}
        for (host, number), guessed in [(r, False) for r in remotes] + [
            (p, True) for p in predicted
        ]:
            unique.setdefault((host, number), guessed)
        self._candidates = [
            _Candidate(
                remote,
                isn=secrets.randbits(32) if self._config.one_isn else None,
                predicted=guessed,
            )
            for remote, guessed in unique.items()
        ]
        self._adopted: list[SecurePath] = []
        self._result: Deferred[SecurePath] | None = None
        self._deadline: IDelayedCall | None = None
        self._done = False

    def run(self) -> Deferred[SecurePath]:
        """
        Start (once).

        :returns: A Deferred of the first authenticated path.  It fails with
            :class:`TcpPunchFailed` at the deadline (or at once without
            candidates), or with
            :class:`~nattraverse.errors.PeerAuthenticationFailed` when a
            candidate answered with another peer's key and none with the
            expected one.  Cancelling it stops everything and closes every
            connection.
        """
        if self._result is not None:
            raise RuntimeError("a TcpPunch runs once")
        self._result = Deferred(lambda _: self._finish())
        if not self._candidates:
            self._fail_now("the peer has no TCP candidates")
            return self._result
        self._deadline = self._reactor.callLater(self._seconds, self._expired)
        for candidate in self._candidates:
            self._connect(candidate)
        return self._result

    def adopt(self, path: SecurePath) -> bool:
        """
        Race *path*, the path of a connection the shared port accepted.

        :returns: ``False`` (and *path* is not kept) when the attempt is over.
        """
        if self._done or self._result is None:
            return False
        self._adopted.append(path)
        path.authenticated.addCallbacks(self._won, self._adopted_failed, errbackArgs=(path,))
        return True

    # -- connecting ---------------------------------------------------------------

    def _connect(self, candidate: _Candidate) -> None:
        candidate.timer = None
        if self._done or candidate.given_up:
            return
        config = self._config
        priming = candidate.prime_next
        candidate.prime_next = False
        ttl = config.prime_ttl if priming else None
        if priming:
            _log.debug("priming SYN to {remote} with TTL {ttl}", remote=candidate.label(), ttl=ttl)
        candidate.syns += 1
        candidate.primes += priming
        if candidate.wait == 0.0:
            candidate.wait = config.syn_wait
        factory = _OnePath(self.make_path)
        connecting = self._port.connect(
            candidate.remote, factory, timeout=candidate.wait, ttl=ttl, isn=candidate.isn
        )
        candidate.connecting = connecting
        connecting.addCallbacks(
            self._connected,
            self._not_connected,
            callbackArgs=(candidate, factory),
            errbackArgs=(candidate, priming),
        )

    def _connected(self, protocol: object, candidate: _Candidate, factory: _OnePath) -> None:
        candidate.connecting = None
        path = factory.path
        assert path is not None
        assert path is protocol
        if self._done:
            self._discard(path)
            return
        candidate.paths.append(path)
        candidate.pause = 0.0
        path.authenticated.addCallbacks(self._won, self._path_failed, errbackArgs=(candidate, path))

    def _not_connected(self, failure: Failure, candidate: _Candidate, priming: bool) -> None:
        candidate.connecting = None
        if self._done or failure.check(CancelledError):
            return
        e = failure.value
        if isinstance(e, IsnPinningUnavailable):
            # The capability went away (it was there when the punch began):
            # go on with the kernel's ISNs.
            _log.info("TCP punching uses the kernel's ISNs from now on: {error}", error=str(e))
            candidate.isn = None
            candidate.syns -= 1
            candidate.primes -= priming
            candidate.prime_next = priming
            self._connect(candidate)
            return
        if priming:
            # The priming SYN died past this side's NATs (the ICMP Time
            # Exceeded ends its connect), or went unanswered: the NATs are
            # open.  A RST means the TTL reached a host or a NAT that
            # rejects: priming is no use towards this candidate.
            if isinstance(e, error.ConnectionRefusedError):
                candidate.prime_ok = False
                candidate.last = e
            self._again(candidate, candidate.pause)
            return
        if isinstance(e, error.TimeoutError):
            # Unanswered: the SYN (or its answer) was dropped; a fresh one now.
            if not isinstance(candidate.last, error.ConnectionRefusedError | error.NoRouteError):
                candidate.last = e
            candidate.wait = min(candidate.wait * 2, self._config.max_syn_wait)
            self._connect(candidate)
            return
        if isinstance(e, error.ConnectError) and e.osError == errno.EADDRNOTAVAIL:
            # The 4-tuple is in use: the port accepted this candidate's SYN,
            # and that connection's path is racing already.
            self._again(candidate, self._config.max_retry)
            return
        candidate.last = e if e is not None else Exception(failure.getErrorMessage())
        pause = self._backoff(candidate)
        if candidate.prime_ok and self._config.prime_ttl is not None:
            # The peer's NAT answered with a RST, which closed this side's
            # NAT on the way back: prime it at once (the peer's SYN
            # may be on its way), the next full SYN after the pause.
            candidate.prime_next = True
            self._connect(candidate)
            return
        self._again(candidate, pause)

    def _backoff(self, candidate: _Candidate) -> float:
        config = self._config
        candidate.pause = min(max(candidate.pause * 2, config.retry), config.max_retry)
        return candidate.pause

    def _again(self, candidate: _Candidate, pause: float) -> None:
        if self._done:
            return
        if pause <= 0:
            self._connect(candidate)
        else:
            candidate.timer = self._reactor.callLater(pause, self._connect, candidate)

    def _path_failed(self, failure: Failure, candidate: _Candidate, path: SecurePath) -> None:
        if path in candidate.paths:
            candidate.paths.remove(path)
        if self._done or failure.check(CancelledError):
            return
        e = failure.value
        candidate.last = e if e is not None else Exception(failure.getErrorMessage())
        if isinstance(e, PeerAuthenticationFailed):
            # Another host (or another peer) at that address: no point in more SYNs.
            candidate.given_up = True
            self._check_lost()
            return
        self._again(candidate, self._backoff(candidate))

    def _adopted_failed(self, failure: Failure, path: SecurePath) -> None:
        if path in self._adopted:
            self._adopted.remove(path)
        if not self._done and not failure.check(CancelledError):
            _log.debug(
                "an accepted TCP connection failed: {error}", error=failure.getErrorMessage()
            )
            self._check_lost()

    # -- the end --------------------------------------------------------------------

    def _won(self, path: SecurePath) -> None:
        if self._done:
            self._discard(path)
            return
        for candidate in self._candidates:
            if path in candidate.paths:
                candidate.paths.remove(path)
        if path in self._adopted:
            self._adopted.remove(path)
        self._finish()
        assert self._result is not None
        self._result.callback(path)

    def _check_lost(self) -> None:
        if all(c.given_up for c in self._candidates) and not self._adopted:
            self._finish()
            assert self._result is not None
            self._result.errback(self._failure())

    def _expired(self) -> None:
        self._deadline = None
        if self._done:
            return
        self._finish()
        assert self._result is not None
        self._result.errback(self._failure())

    def _failure(self) -> BaseException:
        named = [c for c in self._candidates if not c.predicted]
        predicted = [c for c in self._candidates if c.predicted]
        detail = "; ".join(
            [
                f"{c.label()}: {_describe(c.last)} after {c.syns} SYN{'s' if c.syns != 1 else ''}"
                for c in named
            ]
            + ([_summary(predicted)] if predicted else [])
        )
        wrong = [c for c in self._candidates if isinstance(c.last, PeerAuthenticationFailed)]
        if wrong and all(c.given_up for c in self._candidates):
            return PeerAuthenticationFailed(f"no TCP candidate reached the peer ({detail})")
        return TcpPunchFailed(
            f"TCP hole punching failed: no connection within {self._seconds:g} s ({detail}); "
            "the NATs on the way let no SYN through: one maps each destination to a new "
            "port (symmetric) where the other filters by port, or both do"
            + (
                "; none of the peer's predicted next ports (its NAT allocates sequentially) "
                "was the one its SYN came from"
                if predicted
                else ""
            )
        )

    def _fail_now(self, text: str) -> None:
        self._done = True
        assert self._result is not None
        self._result.errback(TcpPunchFailed(text))

    def _finish(self) -> None:
        """Stop every timer and connect; close every path that did not win."""
        if self._done:
            return
        self._done = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        for candidate in self._candidates:
            if candidate.timer is not None and candidate.timer.active():
                candidate.timer.cancel()
            candidate.timer = None
            if candidate.connecting is not None:
                candidate.connecting.cancel()
            paths, candidate.paths = candidate.paths, []
            for path in paths:
                self._discard(path)
        adopted, self._adopted = self._adopted, []
        for path in adopted:
            self._discard(path)

    @staticmethod
    def _discard(path: SecurePath) -> None:
        from nattraverse._race import discard_path

        discard_path(path)


class _Accepting(Factory):
    """The caller's listening factory: an accepted connection joins the running punch."""

    noisy = False

    def __init__(self, owner: TcpPunchingPort) -> None:
        self._owner = owner

    def buildProtocol(self, addr: IAddress | None) -> SecurePath | None:
        punch = self._owner.running
        if punch is None:
            return None
        path = punch.make_path()
        return path if punch.adopt(path) else None


class TcpPunchingPort:
    """
    A peer's TCP punching port: a :class:`~nattraverse.punch.tcpport.SharedTcpPort`
    that listens from the start, whose address the rendezvous session
    connects from (:func:`~nattraverse.punch.tcpsource.from_shared_port`),
    and that runs :class:`TcpPunch`\\ es.

    :param accept: The factory of accepted connections.  ``None`` (a caller's
        port, one ``connect()``): each joins the punch running then, and is
        refused when none is.  A listener gives its own, which finds the
        introduction of a connection from its preamble.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        interface: str = "0.0.0.0",
        config: TcpPunchConfig | None = None,
        accept: Factory | None = None,
    ) -> None:
        from nattraverse.punch.tcpport import SharedTcpPort

        self._reactor = reactor
        self.shared = SharedTcpPort(reactor, interface)
        self.config = config or TcpPunchConfig()
        if self.config.one_isn is None:
            self.config = replace(self.config, one_isn=can_pin_isn(self.shared.family))
            if not self.config.one_isn:
                _log.debug(
                    "TCP punching uses the kernel's ISNs (choosing them needs CAP_NET_ADMIN): "
                    "NATs that answer unsolicited SYNs with a RST may not let it through"
                )
        self._accept = accept
        self.running: TcpPunch | None = None
        self.closed = False
        self._hops: HopCount | None = None
        self._punching: dict[TcpPunch, list[Address]] = {}

    def start(self) -> int:
        """
        Bind and listen.

        :returns: The port number.
        :raises CannotListenError: when the system refuses.
        """
        self.shared.listen(self._accept if self._accept is not None else _Accepting(self))
        return self.shared.port

    def count_hops(self, rendezvous: object) -> None:
        """
        Start counting this host's NATs (:class:`~nattraverse.punch.hops.HopCount`)
        towards *rendezvous*, the address of the rendezvous session's peer,
        unless priming is off or its TTL fixed; once.
        """
        config = self.config
        if not config.priming or config.prime_ttl is not None or self._hops is not None:
            return
        host, number = getattr(rendezvous, "host", None), getattr(rendezvous, "port", None)
        if not isinstance(host, str) or not isinstance(number, int):
            return
        from nattraverse.punch.hops import HopCount

        try:
            self._hops = HopCount((host, number))
        except (OSError, ValueError) as e:
            _log.info("no hop count towards {host}: {error}", host=host, error=str(e))

    def punch_config(self) -> TcpPunchConfig:
        """The config of the next punch: priming at the measured TTL, if any."""
        from nattraverse.punch.hops import priming_ttl

        if self._hops is None or self.config.prime_ttl is not None:
            return self.config
        answers = self._hops.answers()
        ttl = priming_ttl(answers, may_reach_peer=bool(self.config.one_isn))
        _log.debug(
            "Time Exceeded from {routers}: priming TTL {ttl}",
            routers=", ".join(f"{a} (TTL {t})" for t, a in sorted(answers.items())) or "none",
            ttl=ttl,
        )
        return self.config if ttl is None else replace(self.config, prime_ttl=ttl)

    def punch(
        self,
        remotes: Sequence[Address],
        make_path: Callable[[], SecurePath],
        *,
        timeout: float,
        predicted: Sequence[Address] = (),
    ) -> Deferred[SecurePath]:
        """
        Run a :class:`TcpPunch` to *remotes* and *predicted* (see there); the
        predicted addresses are cut to what the listener's SYN filter holds
        besides *remotes* (:data:`~nattraverse.punch.synfilter.MAX_IGNORED`).
        """
        predicted = list(predicted)[: max(0, MAX_IGNORED - len(remotes))]
        punch = TcpPunch(
            self._reactor,
            self.shared,
            remotes,
            make_path,
            timeout=timeout,
            config=self.punch_config(),
            predicted=predicted,
        )
        self.running = punch
        # Our listener ignores the candidates' SYNs while we connect to them:
        # each such 4-tuple is the simultaneous open's (see synfilter).
        self._punching[punch] = [*remotes, *predicted]
        self._filter()

        def over(result: object) -> object:
            if self.running is punch:
                self.running = None
            self._punching.pop(punch, None)
            self._filter()
            return result

        return punch.run().addBoth(over)

    def _filter(self) -> None:
        if self.closed:
            return
        addresses = list(dict.fromkeys(a for remotes in self._punching.values() for a in remotes))
        try:
            self.shared.ignore_syns_from(addresses[:MAX_IGNORED])
        except (OSError, ValueError) as e:
            _log.info("the TCP punching port accepts every SYN: {error}", error=str(e))

    def close(self) -> Deferred[None]:
        """Stop listening and connecting; connections already made stay open."""
        self.closed = True
        if self._hops is not None:
            self._hops.close()
        return self.shared.close()
