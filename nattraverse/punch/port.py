"""
The punching port: the one UDP socket a peer punches with, shared by
everything that travels on it.

- STUN Binding requests and responses to and from the rendezvous' STUN
  service (the authenticated binding and its keepalives) go to the
  :class:`~nattraverse.stun.demux.StunDemultiplexer`'s STUN client;
- connectivity checks go to the check machine of their session: requests
  by the USERNAME's ufrag (derived from the session secret, so unique per
  introduction), responses by transaction id;
- QUIC packets go to the :class:`~nattraverse.quic.QuicPath` of their
  source address.  A QUIC packet from an address no path owns starts the
  callee's path only when an *authenticated* check came from that address
  in one of the callee's sessions; anything else is counted and dropped.
  A path is never moved to another address.

The caller side of a session (:meth:`PunchingPort.call`) runs the checks
and starts its QUIC client on the first pair validated in both directions,
while the nomination goes on; the callee side (:meth:`PunchingPort.answer`)
runs its checks and accepts the caller's QUIC connection.  Both fire with
a :class:`~nattraverse.quic.QuicPath` whose peer proved its identity.

Birthday-paradox probing (:mod:`~nattraverse.punch.birthday`), when the
session's plan asks for it and nothing authenticated came from the peer
after :attr:`~nattraverse.punch.birthday.BirthdayConfig.delay`: the easy
side sprays probes from this socket (its check machine's spray); the hard
side opens its many sockets, and the one the peer reaches becomes a *child*
port of this one, carrying a session with the same credentials and its
QUIC path (the caller's client, or the callee accepting the caller's), and
closing when that path ends; the others close at once.  Whichever path
authenticates first ends the session.

A listening peer keeps one port for all its introductions; a caller opens
one per ``connect()``.  Closing the port while QUIC paths carry connections
would kill them: :meth:`PunchingPort.close_when_idle` waits for them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import PunchChecksFailed
from nattraverse.identity import Identity
from nattraverse.punch.agent import IceAgent
from nattraverse.punch.birthday import (
    BirthdayConfig,
    BirthdayPlan,
    BirthdayRole,
    HardSockets,
    PortSpray,
    random_ports,
)
from nattraverse.punch.candidates import Candidate, CandidateKind, CandidatePair
from nattraverse.punch.checks import CheckConfig, CheckMachine, IceCredentials
from nattraverse.quic import QuicPath, is_quic
from nattraverse.secure import PathSecrets
from nattraverse.stun.attributes import Username
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.message import decode, is_stun

__all__ = ["PortStats", "PunchingPort"]

_log = Logger()

#: The STUN class bits (RFC 8489 section 5): both zero in a request.
_CLASS_BITS = 0x0110


@dataclass(slots=True)
class PortStats:
    """
    What the port dropped and did.

    :ivar quic_unknown: QUIC datagrams from an address no path owns and no
        session authenticated: dropped.
    :ivar checks_unknown: STUN requests whose USERNAME names no session:
        dropped.
    :ivar paths: QUIC paths started.
    """

    quic_unknown: int = 0
    checks_unknown: int = 0
    paths: int = 0


class _Session:
    """One introduction's checks and QUIC path on the port."""

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
        self.path: QuicPath | None = None
        self.checks_failure: Failure | None = None
        self.finished = False
        self.timeout = timeout
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

    def start(self) -> Deferred[QuicPath]:
        reactor = self.port.reactor
        self._started = reactor.seconds()
        self._deadline = self._started + self.timeout
        self._timer = reactor.callLater(self.timeout, self._timed_out)
        if self.birthday is not None:
            self._birthday_timer = reactor.callLater(self.port.birthday.delay, self._birthday_due)
        else:
            self._birthday_over = True
        chosen = self.agent.start()
        if self.controlling:
            chosen.addCallbacks(self._selected, self._checks_failed)
        else:
            chosen.addCallbacks(lambda pair: None, self._checks_failed)
        return self.result

    # -- the checks -------------------------------------------------------------

    def _selected(self, pair: CandidatePair) -> None:
        """Caller: the checks chose *pair*: start QUIC on it."""
        if self.finished or self.path is not None:
            return
        _log.info(
            "UDP punch {session}: pair {pair} validated both ways; securing it",
            session=self.secrets.session.hex(),
            pair=str(pair),
        )
        self.start_path(pair.remote.address)

    def _checks_failed(self, failure: Failure) -> None:
        if self.finished or failure.check(CancelledError):
            return
        self.checks_failure = failure
        if self.path is None and self._birthday_over:
            self.finish(self._with_birthday(failure))

    def heard_from(self, source: Endpoint) -> bool:
        """Callee: whether *source* may start this session's QUIC path."""
        return (
            not self.finished
            and not self.controlling
            and self.path is None
            and self.agent.machine.heard_from(source)
        )

    # -- birthday-paradox probing -------------------------------------------------

    def _birthday_due(self) -> None:
        """The delay is over: probe, unless the peer got through already."""
        self._birthday_timer = None
        plan, port = self.birthday, self.port
        if self.finished or plan is None:
            return
        machine = self.agent.machine
        if machine.heard_anything or machine.done:
            _log.info(
                "UDP punch {session}: no birthday probing, the checks reached the peer",
                session=self.secrets.session.hex(),
            )
            self._end_birthday()
            return
        config = port.birthday
        _log.info(
            "UDP punch {session}: birthday probing ({plan})",
            session=self.secrets.session.hex(),
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
        if self.finished:
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
        start = child.call if self.controlling else child.answer
        result = start(self.secrets, local=local, remote=remote, timeout=remaining)
        result.addBoth(self._child_done, child)
        child.demux.datagramReceived(data, (source.host, source.port))

    def _child_done(self, result: QuicPath | Failure, child: PunchingPort) -> None:
        if self.finished or self.child is not child:
            if not isinstance(result, Failure):
                result.abort()
            return None
        if not isinstance(result, Failure):
            child.close_when_idle()
            if self.path is not None:
                path, self.path = self.path, None
                path.authenticated.addErrback(lambda _: None)
                path.abort()
            self._child_won = True
            self.finish(result)
            return None
        _log.info(
            "UDP punch {session}: the birthday socket's session failed: {error}",
            session=self.secrets.session.hex(),
            error=result.getErrorMessage(),
        )
        self.child = None
        child.close()
        self._end_birthday()
        return None

    def _end_birthday(self) -> None:
        """Birthday probing is over (or not needed): fail if the checks did."""
        self._birthday_over = True
        if not self.finished and self.checks_failure is not None and self.path is None:
            self.finish(self._with_birthday(self.checks_failure))

    def _with_birthday(self, failure: Failure) -> Failure:
        """*failure*, saying what the hard side's sockets did."""
        error = failure.value
        if self.hard is None or not isinstance(error, PunchChecksFailed):
            return failure
        seen = f"{error.seen}; birthday probing: {self.hard.describe()}"
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
            self.finish(result)
            return
        if self.path is path:
            self.path = None
        if self.controlling or self.checks_failure is not None or self.agent.stopped:
            self.finish(result)
        else:
            _log.info(
                "UDP punch {session}: QUIC from {remote} failed ({error}); waiting for another",
                session=self.secrets.session.hex(),
                remote=str(path.remote),
                error=result.getErrorMessage(),
            )

    # -- ending -----------------------------------------------------------------

    def _timed_out(self) -> None:
        self._timer = None
        seen = self.agent.machine.describe()
        if self.hard is not None:
            seen += f"; birthday probing: {self.hard.describe()}"
        self.finish(
            Failure(TimeoutError(f"UDP hole punching timed out after {self.timeout:g} s; {seen}"))
        )

    def _cleanup(self, keep_path: bool) -> None:
        self.finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.agent.stop()
        self._stop_birthday(keep_child=self._child_won)
        self.port.forget(self)
        if not keep_path and self.path is not None:
            path, self.path = self.path, None
            path.authenticated.addErrback(lambda _: None)
            path.abort()

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


class PunchingPort:
    """
    A UDP port for hole punching and the QUIC paths it carries.

    :param reactor: Provides ``IReactorUDP`` and ``IReactorTime``.
    :param identity: This peer's key; its QUIC paths present it.
    :param port: The UDP port to bind (0: any).
    :param interface: The address to bind.
    :param config: Check pacing and budget.
    :param random_bytes: Randomness of the checks and the STUN client.
    :param quic: Extra keyword arguments for every
        :class:`~nattraverse.quic.QuicPath` (``idle_timeout``,
        ``keepalive``, ...).
    :param birthday: Birthday-paradox probing's sizes, rates and budget.
    """

    def __init__(
        self,
        reactor: Any,
        identity: Identity,
        *,
        port: int = 0,
        interface: str = "0.0.0.0",
        config: CheckConfig | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        quic: dict[str, Any] | None = None,
        birthday: BirthdayConfig | None = None,
    ) -> None:
        self.reactor = reactor
        self.birthday = BirthdayConfig() if birthday is None else birthday
        self.identity = identity
        self.config = CheckConfig() if config is None else config
        self.random_bytes = random_bytes
        self.stats = PortStats()
        self.demux = StunDemultiplexer(reactor, random_bytes=random_bytes)
        self.demux.intercept = self._route
        self._port_number = port
        self._interface = interface
        self._quic_options = dict(quic or {})
        self._listening: Any = None
        self._sessions: dict[bytes, _Session] = {}
        self._by_ufrag: dict[str, _Session] = {}
        self._paths: dict[Endpoint, QuicPath] = {}
        self._closing: Deferred[None] | None = None
        self._close_when_idle = False
        #: Ports adopted from birthday probing's sockets, and what to call when we close.
        self._children: list[PunchingPort] = []
        self._on_closed: Callable[[], None] | None = None

    def __repr__(self) -> str:
        where = self.address if self._listening is not None else "not listening"
        return f"<PunchingPort {where}>"

    # -- the socket -------------------------------------------------------------

    def start(self) -> Endpoint:
        """
        Bind the UDP socket.

        :returns: Its address.
        :raises twisted.internet.error.CannotListenError: when the port
            cannot be bound.
        """
        if self._listening is not None or self._closing is not None:
            raise RuntimeError("the punching port was already started")
        self._listening = self.reactor.listenUDP(
            self._port_number, self.demux, interface=self._interface, maxPacketSize=65535
        )
        return self.address

    @property
    def address(self) -> Endpoint:
        """The address the socket is bound to."""
        if self._listening is None:
            raise RuntimeError("the punching port is not started")
        host = self._listening.getHost()
        return Endpoint(host.host, host.port)

    @property
    def interface(self) -> str:
        """The address the socket is bound to (or will be)."""
        return self._interface

    def adopt(self, demux: StunDemultiplexer, listening: Any) -> PunchingPort:
        """
        A child port on a socket that is already listening with *demux* (a
        birthday socket that was reached), configured as this one; it
        counts in :attr:`paths`, closes with this port, and this port
        closing when idle waits for it.
        """
        child = PunchingPort(
            self.reactor,
            self.identity,
            interface=self._interface,
            config=self.config,
            random_bytes=self.random_bytes,
            quic=self._quic_options,
            birthday=self.birthday,
        )
        child.demux = demux
        demux.intercept = child._route
        child._listening = listening
        child._on_closed = self._child_closed
        self._children.append(child)
        return child

    def _child_closed(self) -> None:
        self._children = [c for c in self._children if c._listening is not None]
        self._maybe_close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (or will, when idle)."""
        return self._closing is not None or self._close_when_idle

    @property
    def sessions(self) -> int:
        """Sessions checking or securing a path now."""
        return len(self._sessions)

    @property
    def paths(self) -> int:
        """QUIC paths alive on the port (and on its child ports)."""
        return len(self._paths) + sum(child.paths for child in self._children)

    def close(self) -> Deferred[None]:
        """
        Stop every session, abort every QUIC path, close the socket.
        Idempotent.
        """
        if self._closing is not None:
            return self._closing
        for session in list(self._sessions.values()):
            session.finish(Failure(ConnectionAborted("the punching port was closed")))
        for path in list(self._paths.values()):
            path.authenticated.addErrback(lambda _: None)
            path.abort()
        self._paths.clear()
        children, self._children = self._children, []
        for child in children:
            child._on_closed = None
            child.close()
        listening, self._listening = self._listening, None
        self.demux.intercept = None
        closing: Deferred[None] = (
            succeed(None)
            if listening is None
            else maybeDeferred(listening.stopListening).addCallback(lambda _: None)
        )
        self._closing = closing
        if self._on_closed is not None:
            self._on_closed()
        return closing

    def close_when_idle(self) -> None:
        """
        Stop the sessions still checking, and close the socket once the
        last QUIC path on it has ended (at once when there is none).
        """
        self._close_when_idle = True
        for session in list(self._sessions.values()):
            if session.path is None or not session.path.terminated:
                session.finish(Failure(ConnectionAborted("the punching port is closing")))
        for child in list(self._children):
            child.close_when_idle()
        self._maybe_close()

    def _maybe_close(self) -> None:
        idle = not self._paths and not self._sessions and not self._children
        if self._close_when_idle and idle and self._closing is None:
            self.close()

    # -- sessions ---------------------------------------------------------------

    def call(
        self,
        secrets: PathSecrets,
        *,
        local: Sequence[Candidate],
        remote: Sequence[Candidate],
        timeout: float,
        birthday: BirthdayPlan | None = None,
    ) -> Deferred[QuicPath]:
        """
        The caller's side of a punch: checks (controlling), then QUIC (as
        the client) on the first pair validated in both directions; with
        *birthday*, birthday-paradox probing too (see the module docstring).

        :returns: A cancellable Deferred of the authenticated path, not yet
            selected; it fails with
            :class:`~nattraverse.errors.PunchChecksFailed`, the QUIC path's
            failure, or ``TimeoutError`` after *timeout* seconds.
        """
        return self._start(secrets, True, local, remote, timeout, birthday)

    def answer(
        self,
        secrets: PathSecrets,
        *,
        local: Sequence[Candidate],
        remote: Sequence[Candidate],
        timeout: float,
        birthday: BirthdayPlan | None = None,
    ) -> Deferred[QuicPath]:
        """
        The callee's side: checks (controlled), and the caller's QUIC
        connection from an address that passed a check (or on the hard
        side's birthday socket that was reached).

        :returns: As :meth:`call`, the path firing once the caller selected it.
        """
        return self._start(secrets, False, local, remote, timeout, birthday)

    def _start(
        self,
        secrets: PathSecrets,
        controlling: bool,
        local: Sequence[Candidate],
        remote: Sequence[Candidate],
        timeout: float,
        birthday: BirthdayPlan | None,
    ) -> Deferred[QuicPath]:
        if self._listening is None or self.closed:
            raise RuntimeError("the punching port is not listening")
        if secrets.session in self._sessions:
            raise RuntimeError(f"session {secrets.session.hex()} is already punching on this port")
        session = _Session(
            self,
            secrets,
            controlling=controlling,
            local=local,
            remote=remote,
            timeout=timeout,
            birthday=birthday,
        )
        self._sessions[secrets.session] = session
        self._by_ufrag[session.credentials.local_ufrag] = session
        return session.start()

    def forget(self, session: _Session) -> None:
        """A session ended: route nothing more to it."""
        if self._sessions.get(session.secrets.session) is session:
            del self._sessions[session.secrets.session]
        if self._by_ufrag.get(session.credentials.local_ufrag) is session:
            del self._by_ufrag[session.credentials.local_ufrag]
        self._maybe_close()

    def open_path(self, session: _Session, remote: Endpoint) -> QuicPath:
        """A QUIC path of *session* to *remote*, routed from now on."""
        old = self._paths.get(remote)
        if old is not None and not old.terminated:
            raise RuntimeError(f"a QUIC path to {remote} is already open on this port")
        # The handshake may take what is left of the session: on a lossy
        # path its flights need many retransmissions.
        options: dict[str, Any] = {"handshake_timeout": session.timeout}
        rtt = session.agent.machine.rtt_to(remote)
        if rtt is not None:
            options["initial_rtt"] = rtt
        options.update(self._quic_options)
        path = QuicPath(
            self.reactor,
            self.identity,
            "caller" if session.controlling else "callee",
            session.secrets.expected,
            self._send,
            (remote.host, remote.port),
            local=(self.address.host, self.address.port),
            method=session.secrets.method,
            session=session.secrets.session,
            secrets=session.secrets,
            **options,
        )
        path.on_terminated.append(self._path_ended)
        self._paths[remote] = path
        self.stats.paths += 1
        return path

    def _send(self, data: bytes, address: tuple[str, int]) -> None:
        """Write a QUIC datagram; a socket already closed drops it."""
        if self._listening is None:
            return
        self.demux.send(data, Endpoint(address[0], address[1]))

    def _path_ended(self, path: QuicPath) -> None:
        remote = Endpoint(path.remote[0], path.remote[1])
        if self._paths.get(remote) is path:
            del self._paths[remote]
        self._maybe_close()

    # -- routing ----------------------------------------------------------------

    def _route(self, data: bytes, source: Endpoint) -> bool:
        """The demultiplexer's interceptor: see the module docstring."""
        if is_quic(data):
            self._route_quic(data, source)
            return True
        if not is_stun(data):
            return False
        if int.from_bytes(data[0:2], "big") & _CLASS_BITS == 0:
            session = self._session_of_request(data)
            if session is None:
                self.stats.checks_unknown += 1
                return True
            return session.agent.datagram_received(data, source)
        transaction = data[8:20]
        for session in self._sessions.values():
            if session.agent.machine.expects(transaction):
                return session.agent.datagram_received(data, source)
        return False  # the STUN client's (the rendezvous binding), or nobody's

    def _session_of_request(self, data: bytes) -> _Session | None:
        try:
            username = decode(data).get(Username)
        except Exception:
            return None
        if username is None:
            return None
        return self._by_ufrag.get(username.value.partition(":")[0])

    def _route_quic(self, data: bytes, source: Endpoint) -> None:
        path = self._paths.get(source)
        if path is None:
            session = next(
                (s for s in reversed(self._sessions.values()) if s.heard_from(source)), None
            )
            if session is None:
                self.stats.quic_unknown += 1
                return
            path = session.start_path(source)
        path.datagram_received(data, (source.host, source.port))
