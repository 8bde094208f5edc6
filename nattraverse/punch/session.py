"""
One introduction's punching on a :class:`~nattraverse.punch.port.PunchingPort`:
its connectivity checks, its birthday-paradox probing, its relayed leg and
the QUIC path it ends with (see the port's module docstring).

**Relay first, then upgrade.**  With a relayed leg
(:mod:`~nattraverse.punch.relayleg`), QUIC may authenticate through the
rendezvous' UDP relay before any direct pair: the session then hands that
path out at once and keeps checking (and probing).  When a direct pair is
validated later (the caller's checks select it; the callee hears the
caller's QUIC from an address its checks authenticated), the session moves
the connection there (:meth:`~nattraverse.quic.QuicPath.move`), even to a
birthday socket that was reached (a child port), and stops.  No new QUIC
handshake: the application keeps its stream.  If a direct handshake is
already under way when the relayed path wins, it is dropped and the
connection moves to its pair.  The caller may so move before the callee has
the end of the handshake (or the selection) through the relay: the callee
follows when the relayed connection's own packets (a 1-RTT packet to one of
its connection ids) come from an address its checks authenticated, and
drops its direct handshake too.  The checks' budget and the session's
timeout bound the wait; after that the connection stays relayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import PunchChecksFailed
from nattraverse.punch.agent import IceAgent
from nattraverse.punch.birthday import (
    BirthdayPlan,
    BirthdayRole,
    HardSockets,
    PortSpray,
    random_ports,
)
from nattraverse.punch.candidates import Candidate, CandidateKind, CandidatePair
from nattraverse.punch.checks import CheckMachine, IceCredentials
from nattraverse.punch.relayleg import Opener, RelayLeg, RelayLegRun
from nattraverse.quic import QuicPath, is_initial, short_header_packet
from nattraverse.secure import PathSecrets

if TYPE_CHECKING:
    from nattraverse.punch.port import PunchingPort

__all__ = ["PunchSession"]

_log = Logger()


def _ignore(_: object) -> None:
    return None


class PunchSession:
    """
    One introduction's checks and QUIC path on a port.

    :param carrying: A child port's session (birthday probing) started while
        the parent's connection is relayed: it moves that path instead of
        opening a new one.
    """

    def __init__(
        self,
        port: PunchingPort,
        secrets: PathSecrets,
        *,
        controlling: bool,
        local: Sequence[Candidate],
        remote: Sequence[Candidate],
        timeout: float,
        birthday: BirthdayPlan | None = None,
        relay: RelayLeg | None = None,
        carrying: QuicPath | None = None,
    ) -> None:
        self.port = port
        self.secrets = secrets
        self.controlling = controlling
        self.local = list(local)
        self.birthday = birthday
        self.credentials = IceCredentials.from_secret(secrets.secret, controlling=controlling)
        machine = CheckMachine(
            controlling=controlling,
            credentials=self.credentials,
            local=local,
            remote=remote,
            config=port.config,
            random_bytes=port.random_bytes,
        )
        self.agent = IceAgent(port.reactor, port.demux.send, machine)
        self.result: Deferred[QuicPath] = Deferred(self._cancelled)
        #: The direct QUIC path being secured.
        self.path: QuicPath | None = None
        #: The QUIC path being secured through the relay.
        self.relay_path: QuicPath | None = None
        #: The connection to move to a direct pair once one is validated.
        self.upgrading: QuicPath | None = carrying
        self.checks_failure: Failure | None = None
        #: The caller's direct QUIC failure, reported if the relay fails too.
        self._direct_failure: Failure | None = None
        #: Whether the result was given (the session may go on upgrading).
        self.finished = False
        #: Whether everything stopped.
        self.ended = False
        self.timeout = timeout
        self._relay_plan = relay
        self.relay = RelayLegRun(
            port.reactor, secrets.session.hex(), self._relay_latched, self._relay_failed
        )
        self._timer: IDelayedCall | None = None
        self._deadline = 0.0
        self._birthday_timer: IDelayedCall | None = None
        #: The hard side's sockets, while they wait to be reached.
        self.hard: HardSockets | None = None
        #: The hard side's socket that was reached, as a port of its own.
        self.child: PunchingPort | None = None
        self._birthday_over = False
        self._child_won = False
        self._started = 0.0

    def __repr__(self) -> str:
        role = "caller" if self.controlling else "callee"
        return f"<punch session {self.secrets.session.hex()} ({role})>"

    @property
    def _label(self) -> str:
        return self.secrets.session.hex()

    def start(self) -> Deferred[QuicPath]:
        reactor = self.port.reactor
        self._started = reactor.seconds()
        self._deadline = self._started + self.timeout
        self._timer = reactor.callLater(self.timeout, self._timed_out)
        if self.birthday is not None:
            self._birthday_timer = reactor.callLater(self.port.birthday.delay, self._birthday_due)
        else:
            self._birthday_over = True
        if self._relay_plan is not None:
            self.relay.schedule(self._relay_plan)
        chosen = self.agent.start()
        if self.controlling:
            chosen.addCallbacks(self._selected, self._checks_failed)
        else:
            chosen.addCallbacks(_ignore, self._checks_failed)
        return self.result

    # -- the checks -------------------------------------------------------------

    def _selected(self, pair: CandidatePair) -> None:
        """Caller: the checks chose *pair*: start QUIC on it, or move there."""
        if self.ended:
            return
        if self.upgrading is not None:
            self._carry(pair.remote.address)
            return
        if self.finished or self.path is not None:
            return
        _log.info(
            "UDP punch {session}: pair {pair} validated both ways; securing it",
            session=self._label,
            pair=str(pair),
        )
        self.start_path(pair.remote.address)

    def _checks_failed(self, failure: Failure) -> None:
        if self.ended or failure.check(CancelledError):
            return
        self.checks_failure = failure
        self._maybe_fail()

    def _maybe_fail(self) -> None:
        """Fail (or stop upgrading) once nothing is left that could succeed."""
        if self.ended:
            return
        over = self.checks_failure is not None and self._birthday_over
        if self.finished:
            if over and self.child is None:
                self._stop_upgrading("no direct pair was validated")
            return
        if self.path is not None or self.relay_path is not None or self.relay.active:
            return
        if self._direct_failure is not None:
            self.finish(self._direct_failure)
        elif over:
            assert self.checks_failure is not None
            self.finish(self._with_birthday(self.checks_failure))

    def quic_from(self, source: Endpoint, datagram: bytes) -> QuicPath | None:
        """
        Callee: the path a QUIC datagram from *source*, which no path owns
        yet, goes to: the caller's connection through the relay, the
        caller's direct connection from an address that passed a check, or
        the relayed connection moving there; ``None`` when none.
        """
        if self.controlling or self.ended:
            return None
        heard = self.agent.machine.heard_from(source)
        if self.upgrading is not None:
            if heard and self.upgrading.accepts(datagram):
                return self._carry(source)
            return None
        if self.finished:
            return None
        if source == self.relay.address and self.relay_path is None:
            return self._start_relay_path(source)
        relayed, packet = self.relay_path, short_header_packet(datagram)
        if relayed is not None and heard and packet is not None and relayed.accepts(packet):
            return self._follow(relayed, source)
        if self.path is None and heard and is_initial(datagram):
            # Only a client's Initial starts a connection: a lone Handshake or
            # 1-RTT packet (of a connection that went elsewhere) never could.
            return self.start_path(source)
        return None

    # -- the relayed leg ------------------------------------------------------------

    def relay_offered(self, opener: Opener) -> bool:
        """Callee: the caller asked for the relay: latch to it."""
        if self.controlling or self.finished:
            return False
        return self.relay.open(opener)

    def _relay_latched(self, address: Endpoint) -> None:
        if self.finished or not self.controlling:
            return  # the callee waits for the caller's QUIC through it
        self._start_relay_path(address)

    def _relay_failed(self) -> None:
        self._maybe_fail()

    def _start_relay_path(self, relay: Endpoint) -> QuicPath:
        path = self.port.open_path(self, relay, relayed=True)
        self.relay_path = path
        path.authenticated.addBoth(self._relay_path_done, path)
        path.start()
        return path

    def _follow(self, path: QuicPath, remote: Endpoint) -> QuicPath:
        """
        Callee: the caller moved the relayed connection *path*, still being
        secured here, to the validated *remote* (its direct handshake gave
        way): move it there too and drop the direct handshake under way.
        """
        _log.info(
            "UDP punch {session}: the caller moved the relayed connection to {remote}; "
            "following it there",
            session=self._label,
            remote=str(remote),
        )
        self._drop_direct()
        self.port.carry(path, remote)
        return path

    def _drop_direct(self) -> QuicPath | None:
        """Abort the direct handshake under way, if any (it gave way); return it."""
        direct, self.path = self.path, None
        if direct is not None:
            direct.authenticated.addErrback(_ignore)
            direct.abort()
            self.port.unroute(direct)
        return direct

    def _relay_path_done(self, result: QuicPath | Failure, path: QuicPath) -> None:
        if self.relay_path is path:
            self.relay_path = None
        if self.finished:
            if not isinstance(result, Failure):
                result.abort()
            return
        if isinstance(result, Failure):
            _log.info(
                "UDP punch {session}: QUIC through the relay failed: {error}",
                session=self._label,
                error=result.getErrorMessage(),
            )
            self._maybe_fail()
            return
        if not path.relayed:  # it followed the caller to a direct pair already
            _log.info(
                "UDP punch {session}: connected through the rendezvous' UDP relay, "
                "moved to {remote}",
                session=self._label,
                remote=str(path.remote),
            )
            self.finish(path)
            return
        _log.info(
            "UDP punch {session}: connected through the rendezvous' UDP relay; "
            "still looking for a direct pair",
            session=self._label,
        )
        self.upgrading = path
        self.finished = True
        path.on_terminated.append(self._relayed_path_ended)
        self.result.callback(path)
        # A direct handshake under way gives way (the caller moves to its pair).
        for session in [self, *self._child_sessions()]:
            if not self.ended:
                session._take_over(path)
        self._maybe_fail()  # the checks may have failed already: nothing to upgrade to

    def _take_over(self, path: QuicPath) -> None:
        """
        Carry *path* from now on: drop a direct handshake under way; the
        caller moves *path* to that handshake's pair at once (validated).
        """
        if self.ended:
            return
        self.upgrading = path
        direct = self._drop_direct()
        if direct is not None and self.controlling:
            self._carry(Endpoint(direct.remote[0], direct.remote[1]))

    def _child_sessions(self) -> list[PunchSession]:
        if self.child is None:
            return []
        found = self.child.session_of(self.secrets.session)
        return [] if found is None else [found]

    def _carry(self, remote: Endpoint) -> QuicPath | None:
        """Move the relayed connection to the validated *remote*; stop."""
        path = self.upgrading
        if path is None or path.terminated:
            self._stop_upgrading("the relayed connection has ended")
            return None
        _log.info(
            "UDP punch {session}: direct pair to {remote} validated; "
            "moving the relayed connection there",
            session=self._label,
            remote=str(remote),
        )
        self.port.carry(path, remote)
        if self.finished:
            self._cleanup(keep_path=True)
        else:
            self.finish(path)  # a child session: the parent learns of it
        return path

    def _relayed_path_ended(self, path: QuicPath) -> None:
        if self.upgrading is path:
            self._stop_upgrading("the relayed connection ended")

    def _stop_upgrading(self, why: str) -> None:
        if self.ended:
            return
        if self.upgrading is not None and not self.upgrading.terminated:
            _log.info(
                "UDP punch {session}: the connection stays relayed: {why}",
                session=self._label,
                why=why,
            )
        self._cleanup(keep_path=True)

    # -- birthday-paradox probing -------------------------------------------------

    def _birthday_due(self) -> None:
        """The delay is over: probe, unless the peer got through already."""
        self._birthday_timer = None
        plan, port = self.birthday, self.port
        if self.ended or plan is None:
            return
        machine = self.agent.machine
        if machine.heard_anything or machine.done:
            _log.info(
                "UDP punch {session}: no birthday probing, the checks reached the peer",
                session=self._label,
            )
            self._end_birthday()
            return
        config = port.birthday
        _log.info(
            "UDP punch {session}: birthday probing ({plan})",
            session=self._label,
            plan=plan.describe(),
        )
        now = port.reactor.seconds()
        if plan.role is BirthdayRole.EASY:
            low, high = config.ports
            ports = random_ports(port.random_bytes, config.probes, low, high)
            self.agent.spray(PortSpray(plan.target.host, ports, config.rate, now))
            self._end_birthday()  # the machine's spray: its end is the machine's
            return
        self.hard = HardSockets(
            port.reactor,
            self.credentials,
            controlling=self.controlling,
            target=plan.target,
            config=config,
            interface=port.interface,
            # The easy side probes until its checks' deadline, at most.
            until=min(self._deadline, self._started + port.config.deadline + 1.0),
            random_bytes=port.random_bytes,
            on_won=self._birthday_won,
            on_over=self._end_birthday,
        )
        self.hard.start()

    def _birthday_won(self, demux: Any, listening: Any, data: bytes, source: Endpoint) -> None:
        """Hard side: a socket was reached: run this session on it too."""
        if self.ended:
            listening.stopListening()
            return
        child = self.port.adopt(demux, listening)
        self.child = child
        base = next((c for c in self.local if c.kind is CandidateKind.HOST), None)
        host = base.address.host if base is not None else child.address.host
        assert self.birthday is not None
        local = [Candidate.host((host, child.address.port))]
        remote = [Candidate.server_reflexive(self.birthday.target)]
        remaining = max(self._deadline - self.port.reactor.seconds(), 0.001)
        result = child.run_session(
            self.secrets,
            controlling=self.controlling,
            local=local,
            remote=remote,
            timeout=remaining,
            carrying=self.upgrading,
        )
        result.addBoth(self._child_done, child)
        child.demux.datagramReceived(data, (source.host, source.port))

    def _child_done(self, result: QuicPath | Failure, child: PunchingPort) -> None:
        if not isinstance(result, Failure) and result is self.upgrading and not self.ended:
            # The relayed connection moved to the child's socket.
            child.close_when_idle()
            self._child_won = True
            self._cleanup(keep_path=True)
            return None
        if self.finished or self.child is not child:
            if not isinstance(result, Failure) and result is not self.upgrading:
                result.abort()
            if self.child is child and not self.ended:
                self.child = None
                child.close()
                self._maybe_fail()
            return None
        if not isinstance(result, Failure):
            child.close_when_idle()
            self._child_won = True
            self.finish(result)
            # Only now: a relayed path aborted before the session finished
            # would report its failure, which could end the session first.
            self._drop_paths()
            return None
        _log.info(
            "UDP punch {session}: the birthday socket's session failed: {error}",
            session=self._label,
            error=result.getErrorMessage(),
        )
        self.child = None
        child.close()
        self._end_birthday()
        return None

    def _end_birthday(self) -> None:
        """Birthday probing is over (or not needed): fail if the checks did."""
        self._birthday_over = True
        self._maybe_fail()

    def _with_birthday(self, failure: Failure) -> Failure:
        """*failure*, saying what the hard side's sockets did (and the relayed leg)."""
        error = failure.value
        if not isinstance(error, PunchChecksFailed):
            return failure
        seen = error.seen
        if self.hard is not None:
            seen += f"; birthday probing: {self.hard.describe()}"
        if self.relay.error is not None:
            seen += f"; relayed leg: {self.relay.error}"
        if seen == error.seen:
            return failure
        return Failure(PunchChecksFailed(error.reason, seen, error.stats))

    def _stop_birthday(self, keep_child: bool) -> None:
        if self._birthday_timer is not None and self._birthday_timer.active():
            self._birthday_timer.cancel()
        self._birthday_timer = None
        if self.hard is not None:
            self.hard.stop()
        if self.child is not None and not keep_child:
            child, self.child = self.child, None
            child.close()

    # -- the path ---------------------------------------------------------------

    def start_path(self, remote: Endpoint) -> QuicPath:
        path = self.port.open_path(self, remote)
        self.path = path
        path.authenticated.addBoth(self._path_done, path)
        path.start()
        return path

    def _path_done(self, result: QuicPath | Failure, path: QuicPath) -> None:
        if self.finished:
            return  # already reported, or cancelled
        if not isinstance(result, Failure):
            self._drop_paths(keep=result)
            self.finish(result)
            return
        if self.path is not path:
            # Aborted on purpose: it gave way to the relayed connection
            # (_take_over, _follow) or to a winner (_drop_paths), which
            # cleared self.path first; its end is no failure of the session.
            return
        self.path = None
        if self.controlling or self.checks_failure is not None or self.agent.stopped:
            self._direct_failure = result
            self._maybe_fail()
        else:
            _log.info(
                "UDP punch {session}: QUIC from {remote} failed ({error}); waiting for another",
                session=self._label,
                remote=str(path.remote),
                error=result.getErrorMessage(),
            )

    def _drop_paths(self, keep: QuicPath | None = None) -> None:
        """Abort the paths being secured, but *keep*."""
        for name in ("path", "relay_path"):
            path = getattr(self, name)
            if path is not None and path is not keep:
                setattr(self, name, None)
                path.authenticated.addErrback(_ignore)
                path.abort()

    # -- ending -----------------------------------------------------------------

    def _timed_out(self) -> None:
        self._timer = None
        if self.finished:
            self._stop_upgrading(f"no direct pair within {self.timeout:g} s")
            return
        seen = self.agent.machine.describe()
        if self.hard is not None:
            seen += f"; birthday probing: {self.hard.describe()}"
        self.finish(
            Failure(TimeoutError(f"UDP hole punching timed out after {self.timeout:g} s; {seen}"))
        )

    def _cleanup(self, keep_path: bool) -> None:
        self.finished = True
        self.ended = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.agent.stop()
        self.relay.stop()
        self._stop_birthday(keep_child=self._child_won)
        self.port.forget(self)
        if not keep_path:
            self._drop_paths()

    def stop(self, reason: Failure) -> None:
        """The port is closing: stop, failing the result with *reason* if not given yet."""
        if not self.finished:
            self.finish(reason)
        else:
            self._cleanup(keep_path=True)

    def finish(self, result: QuicPath | Failure) -> None:
        if self.finished:
            return
        self._cleanup(keep_path=not isinstance(result, Failure))
        if isinstance(result, Failure):
            self.result.errback(result)
        else:
            self.result.callback(result)

    def _cancelled(self, result: Deferred[QuicPath]) -> None:
        if not self.finished:
            self._cleanup(keep_path=False)
