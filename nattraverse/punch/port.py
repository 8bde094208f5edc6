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
  source address (when addressed to that path's connection ids: another
  connection's packets may come from the same address, see below).  A QUIC
  packet from an address no path owns starts the callee's path only when an
  *authenticated* check came from that address in one of the callee's
  sessions, or when it comes from the session's relayed leg; anything else
  is counted and dropped.

With a relayed leg (:mod:`~nattraverse.punch.relayleg`), a session may end
with a QUIC path through the rendezvous' UDP relay, then move it to a direct
pair validated later (:mod:`~nattraverse.punch.session`, "Relay first, then
upgrade"): :meth:`PunchingPort.carry` routes the path to its new address,
on this port or on a child port.

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

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionAborted
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.identity import Identity
from nattraverse.punch.birthday import BirthdayConfig, BirthdayPlan
from nattraverse.punch.candidates import Candidate
from nattraverse.punch.checks import CheckConfig
from nattraverse.punch.relayleg import Opener, RelayLeg
from nattraverse.punch.session import PunchSession
from nattraverse.quic import QuicPath, is_quic
from nattraverse.secure import PathSecrets
from nattraverse.stun.attributes import Username
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.message import decode, is_stun

__all__ = ["PortStats", "PunchingPort"]

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
        self._sessions: dict[bytes, PunchSession] = {}
        self._by_ufrag: dict[str, PunchSession] = {}
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
            session.stop(Failure(ConnectionAborted("the punching port was closed")))
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

    def close_when_idle(self, keep: frozenset[bytes] = frozenset()) -> None:
        """
        Stop the sessions still checking, and close the socket once the
        last QUIC path on it has ended (at once when there is none).

        :param keep: Introductions (session ids) whose sessions go on: a
            child port's session looking for the direct pair a relayed
            connection of this port moves to.
        """
        self._close_when_idle = True
        for session in list(self._sessions.values()):
            # The upgrading ones go on with their path.
            if not session.finished and session.secrets.session not in keep:
                session.finish(Failure(ConnectionAborted("the punching port is closing")))
        upgrading = frozenset(
            session.secrets.session
            for session in self._sessions.values()
            if session.upgrading is not None and not session.ended
        )
        for child in list(self._children):
            child.close_when_idle(keep=upgrading)
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
        relay: RelayLeg | None = None,
    ) -> Deferred[QuicPath]:
        """
        The caller's side of a punch: checks (controlling), then QUIC (as
        the client) on the first pair validated in both directions; with
        *birthday*, birthday-paradox probing too (see the module docstring);
        with *relay*, the relayed leg after its delay, and QUIC through it
        (the path moves to a direct pair validated later).

        :returns: A cancellable Deferred of the authenticated path, not yet
            selected; it fails with
            :class:`~nattraverse.errors.PunchChecksFailed`, the QUIC path's
            failure, or ``TimeoutError`` after *timeout* seconds.
        """
        return self.run_session(
            secrets,
            controlling=True,
            local=local,
            remote=remote,
            timeout=timeout,
            birthday=birthday,
            relay=relay,
        )

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
        side's birthday socket that was reached, or through the relayed leg
        once :meth:`relay_offered`).

        :returns: As :meth:`call`, the path firing once the caller selected it.
        """
        return self.run_session(
            secrets,
            controlling=False,
            local=local,
            remote=remote,
            timeout=timeout,
            birthday=birthday,
        )

    def run_session(
        self,
        secrets: PathSecrets,
        *,
        controlling: bool,
        local: Sequence[Candidate],
        remote: Sequence[Candidate],
        timeout: float,
        birthday: BirthdayPlan | None = None,
        relay: RelayLeg | None = None,
        carrying: QuicPath | None = None,
    ) -> Deferred[QuicPath]:
        """
        :meth:`call` (*controlling*) or :meth:`answer`; for *carrying*, see
        :class:`~nattraverse.punch.session.PunchSession`.
        """
        if self._listening is None or self.closed:
            raise RuntimeError("the punching port is not listening")
        if secrets.session in self._sessions:
            raise RuntimeError(f"session {secrets.session.hex()} is already punching on this port")
        session = PunchSession(
            self,
            secrets,
            controlling=controlling,
            local=local,
            remote=remote,
            timeout=timeout,
            birthday=birthday,
            relay=relay,
            carrying=carrying,
        )
        self._sessions[secrets.session] = session
        self._by_ufrag[session.credentials.local_ufrag] = session
        return session.start()

    def session_of(self, session_id: bytes) -> PunchSession | None:
        """The session of the introduction *session_id* on this port, if any."""
        return self._sessions.get(session_id)

    def relay_offered(self, session_id: bytes, opener: Opener) -> bool:
        """
        Callee: the caller of *session_id* asked for the rendezvous' UDP
        relay; *opener* latches this port's socket to it.

        :returns: Whether a session of this port took it (not when the
            session is unknown, over, or already latched).
        """
        session = self._sessions.get(session_id)
        return session is not None and session.relay_offered(opener)

    def forget(self, session: PunchSession) -> None:
        """A session ended: route nothing more to it."""
        if self._sessions.get(session.secrets.session) is session:
            del self._sessions[session.secrets.session]
        if self._by_ufrag.get(session.credentials.local_ufrag) is session:
            del self._by_ufrag[session.credentials.local_ufrag]
        self._maybe_close()

    def open_path(
        self, session: PunchSession, remote: Endpoint, *, relayed: bool = False
    ) -> QuicPath:
        """
        A QUIC path of *session* to *remote* (the rendezvous' UDP relay when
        *relayed*), routed from now on.
        """
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
            relayed=relayed,
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

    def carry(self, path: QuicPath, remote: Endpoint) -> None:
        """
        Send *path*'s datagrams to *remote* through this port's socket from
        now on, and route *remote*'s to it (:meth:`~nattraverse.quic.QuicPath.move`):
        a relayed connection moving to a validated direct pair.
        """
        self._paths[remote] = path
        if self._path_ended not in path.on_terminated:
            path.on_terminated.append(self._path_ended)
        path.move((remote.host, remote.port), self._send)

    def unroute(self, path: QuicPath) -> None:
        """Route no more datagrams to *path* (aborted: its address goes to another)."""
        for address in [a for a, p in self._paths.items() if p is path]:
            del self._paths[address]

    def _path_ended(self, path: QuicPath) -> None:
        self.unroute(path)
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

    def _session_of_request(self, data: bytes) -> PunchSession | None:
        try:
            username = decode(data).get(Username)
        except Exception:
            return None
        if username is None:
            return None
        return self._by_ufrag.get(username.value.partition(":")[0])

    def _route_quic(self, data: bytes, source: Endpoint) -> None:
        path = self._paths.get(source)
        if path is not None and len(self._paths) > 1 and not path.accepts(data):
            path = None  # another connection's packet from the same address
        if path is None:
            for session in reversed(list(self._sessions.values())):
                path = session.quic_from(source, data)
                if path is not None:
                    break
            else:
                self.stats.quic_unknown += 1
                return
        path.datagram_received(data, (source.host, source.port))
