"""
The listening side of the ``punch:`` endpoints: register a name, keep the
introductions the rendezvous sends for a while, let each enabled method
open its paths for them, accept direct paths on a TCP port, and hand every
path the caller selects to the application.

:class:`PunchListener` is what :meth:`PunchServerEndpoint.listen
<nattraverse.endpoints.PunchServerEndpoint.listen>` runs; its
:class:`IListeningPort <twisted.internet.interfaces.IListeningPort>` stops
it all.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse._race import discard_path
from nattraverse.errors import RendezvousUnavailable
from nattraverse.identity import Identity, PeerId
from nattraverse.interfaces import CalleeContext, ITraversalMethod, Path, path_secrets
from nattraverse.rendezvous.client import Introduction, IRendezvousHandler, describe_endpoint
from nattraverse.rendezvous.commands import MAX_CANDIDATES
from nattraverse.rendezvous.registration import Registration
from nattraverse.secure import (
    PREAMBLE_MAGIC,
    PREAMBLE_SIZE,
    SESSION_SIZE,
    PathSecrets,
    SecurePath,
    path_tag,
)

__all__ = ["PunchAddress", "PunchListener", "local_ipv4_addresses"]

_log = Logger()

#: Seconds an introduction is kept for the paths of its caller.
PENDING_TTL = 60.0
#: Most introductions kept at once; the oldest goes first.
MAX_PENDING = 256
#: Most connections to the direct port being secured at once.
MAX_UNSECURED = 64
#: Seconds a direct connection is held for the introduction its preamble names.
HOLD_TIME = 5.0

_SIOCGIFADDR = 0x8915


def local_ipv4_addresses() -> list[str]:
    """
    This host's non-loopback, non-link-local IPv4 interface addresses, as
    the kernel tells them (Linux ``SIOCGIFADDR``); an empty list where that
    is not available.  Nothing is sent anywhere.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return []
    try:
        names = socket.if_nameindex()
    except OSError:
        return []
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in names:
            request = struct.pack("256s", name.encode("utf-8", "replace")[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on it
            address = ipaddress.IPv4Address(answer[20:24])
            if address.is_loopback or address.is_link_local or address.is_unspecified:
                continue
            if str(address) not in found:
                found.append(str(address))
    return found


def _announced(interface: str) -> list[str]:
    """The private addresses to announce for a port listening on *interface*."""
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return []
    if address.is_unspecified:
        return local_ipv4_addresses() if address.version == 4 else []
    if address.version != 4 or address.is_loopback or address.is_link_local:
        return []
    return [str(address)]


@implementer(IAddress)
@dataclass(frozen=True)
class PunchAddress:
    """
    The address of a listening ``punch:`` endpoint.

    :ivar name: The name registered.
    :ivar peer_id: The peer id the name is bound to (callers may pin it).
    :ivar host: The address the direct port listens on, ``None`` without one.
    :ivar port: The direct port, 0 without one.
    """

    name: str
    peer_id: PeerId
    host: str | None = None
    port: int = 0

    def __str__(self) -> str:
        return f"punch:{self.name} ({self.peer_id})"


@dataclass
class _Pending:
    """An introduction kept for its caller's paths."""

    introduction: Introduction
    timer: IDelayedCall
    since: float
    attempts: set[Deferred[Path]] = field(default_factory=set)


class _Held(Protocol):
    """
    A connection to the direct port, in front of its callee path: held,
    not read, until the introduction its preamble names is known.  The
    rendezvous sends ``Introduce`` before it answers the caller, but this
    peer may still read the caller's connection first (two sockets, no
    order between them); without the hold such a path would be refused.
    """

    def __init__(self, listener: PunchListener, path: SecurePath, hold: float) -> None:
        self._listener = listener
        self.path = path
        self._hold = hold
        self._inbox = b""
        self._released = False
        self._paused = False
        self._timer: IDelayedCall | None = None

    @property
    def session(self) -> bytes:
        """The session the preamble names (once it is read)."""
        start = len(PREAMBLE_MAGIC)
        return self._inbox[start : start + SESSION_SIZE]

    def connectionMade(self) -> None:
        self._timer = self._listener._reactor.callLater(self._hold, self._expired)

    def _expired(self) -> None:
        """The hold is over: a path without a whole preamble yet is dropped."""
        self._timer = None
        if len(self._inbox) < PREAMBLE_SIZE:
            self.abort()
        else:
            self.release()

    def dataReceived(self, data: bytes) -> None:
        if self._released:
            self.path.dataReceived(data)
            return
        self._inbox += data
        if len(self._inbox) < PREAMBLE_SIZE:
            return
        if (
            not self._inbox.startswith(PREAMBLE_MAGIC)
            or self.session in self._listener._pending
            or not self._listener._hold(self)
        ):
            self.release()
            return
        pause = getattr(self.transport, "pauseProducing", None)
        if pause is not None and not self._paused:
            self._paused = True
            pause()

    def release(self) -> None:
        """Hand the connection, and what it sent, to the path."""
        if self._released or self.transport is None:
            return
        self._released = True
        self._stop_timer()
        self._listener._unhold(self)
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.path.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        inbox, self._inbox = self._inbox, b""
        if inbox:
            self.path.dataReceived(inbox)

    def abort(self) -> None:
        """Drop the connection at once."""
        if self._released:
            discard_path(self.path)
        elif self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        self._listener._unhold(self)
        if self._released:
            self.path.connectionLost(reason)
        else:
            discard_path(self.path)


class _DirectFactory(Factory):
    """
    The factory of the direct port and of the TCP punching port: a held
    callee path per connection, labelled with *method*.
    """

    noisy = False

    def __init__(self, listener: PunchListener, method: str) -> None:
        self._listener = listener
        self._method = method

    def buildProtocol(self, addr: IAddress | None) -> _Held | None:
        return self._listener._accept(addr, self._method)


@implementer(IRendezvousHandler)
class PunchListener:
    """
    One ``listen()`` of a :class:`~nattraverse.endpoints.PunchServerEndpoint`
    (see there for the parameters).
    """

    def __init__(
        self,
        reactor: Any,
        rendezvous: IStreamClientEndpoint,
        name: str,
        identity: Identity,
        factory: IProtocolFactory,
        *,
        port: int,
        interface: str,
        methods: Sequence[ITraversalMethod],
        access_key: bytes | None,
        timeout: float,
        private: Sequence[str] | None,
        checks: Any = None,
        birthday: Any = None,
    ) -> None:
        self._reactor = reactor
        self._rendezvous = rendezvous
        self._name = name
        self._identity = identity
        self._factory = factory
        self._port_number = port
        self._interface = interface
        self._methods = tuple(methods)
        self._access_key = access_key
        self._timeout = timeout
        self._private = private
        self._checks = checks
        self._birthday = birthday
        self._udp: Any = None
        self._udp_hosts: list[str] = []
        self._context = CalleeContext(
            reactor=reactor,
            identity=identity,
            name=name,
            rendezvous=rendezvous,
            access_key=access_key,
            timeout=timeout,
            udp=None,
            udp_candidates=self._udp_candidates,
        )
        #: The method that labels the paths accepted on the direct port.
        self._direct_method = next((m.name for m in self._methods if m.callee_listens), None)
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._accepted: dict[SecurePath, _Held] = {}
        self._held: dict[bytes, list[_Held]] = {}
        self._tcp: Any = None
        self._punching: Any = None
        self._registration: Registration | None = None
        self._stopping: Deferred[None] | None = None

    def __repr__(self) -> str:
        return f"<PunchListener {self._name!r} at {describe_endpoint(self._rendezvous)}>"

    # -- starting and stopping ------------------------------------------------

    def start(self) -> Deferred[IListeningPort]:
        """Listen and register; see ``PunchServerEndpoint.listen``."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> IListeningPort:
        try:
            listen_port = 0
            if self._direct_method is not None:
                self._tcp = self._reactor.listenTCP(
                    self._port_number,
                    _DirectFactory(self, self._direct_method),
                    interface=self._interface,
                )
                listen_port = self._tcp.getHost().port
            addresses = _announced(self._interface) if self._private is None else self._private
            private = [(host, listen_port) for host in addresses] if listen_port else []
            rendezvous = self._rendezvous
            tcp_private: list[tuple[str, int]] = []
            punching = next(
                (m.name for m in self._methods if getattr(m, "uses_tcp_port", False)), None
            )
            if punching is not None:
                rendezvous, tcp_private = self._open_tcp(punching, addresses)
            udp_private: list[tuple[str, int]] = []
            if any(getattr(method, "uses_udp", False) for method in self._methods):
                udp_private = self._open_udp(addresses)
            self._registration = Registration(
                self._reactor,
                rendezvous,
                self._identity,
                self._name,
                listen_port=listen_port,
                private=private[:MAX_CANDIDATES],
                udp=None if self._udp is None else self._udp.demux,
                udp_private=udp_private[:MAX_CANDIDATES],
                tcp_private=tcp_private[:MAX_CANDIDATES],
                handler=self,
                access_key=self._access_key,
                # Each connection, handshake and request may take the whole
                # timeout: over a lossy link TCP's backoff alone can hold one
                # up for many seconds, and giving up drops what is in flight
                # (an Introduce).
                timeout=self._timeout,
            )
            self._registration.startService()
            await self._registration.when_registered().addTimeout(
                self._timeout, self._reactor, onTimeoutCancel=self._not_registered
            )
        except BaseException:
            self.stop()
            raise
        session = self._registration.session
        if self._punching is not None and session is not None and session.transport is not None:
            self._punching.count_hops(session.transport.getPeer())
        _log.info(
            "listening as {name} ({peer_id}), direct port {port}, methods {methods}",
            name=self._name,
            peer_id=str(self._identity.peer_id),
            port=listen_port,
            methods=",".join(m.name for m in self._methods),
        )
        return _PunchPort(self)

    def _open_tcp(
        self, method: str, addresses: Sequence[str]
    ) -> tuple[IStreamClientEndpoint, list[tuple[str, int]]]:
        """
        Open the TCP punching port on the interface of the direct port: the
        registration connects from it, and it accepts paths for *method*.

        :returns: The rendezvous endpoint that connects from it and the host
            candidates to announce; the endpoint as given and none when the
            rendezvous endpoint cannot connect from a chosen port.
        """
        from dataclasses import replace

        from nattraverse.punch.tcppunch import TcpPunchingPort, tcp_punch_config
        from nattraverse.punch.tcpsource import NotFromPort, from_shared_port

        port = TcpPunchingPort(
            self._reactor,
            interface=self._interface,
            config=tcp_punch_config(self._checks),
            accept=_DirectFactory(self, method),
        )
        try:
            rendezvous = from_shared_port(self._rendezvous, port.shared)
        except NotFromPort as e:
            port.close()
            _log.warn("{name}: no TCP hole punching: {reason}", name=self._name, reason=str(e))
            return self._rendezvous, []
        number = port.start()
        self._punching = port
        self._context = replace(self._context, tcp=port)
        return rendezvous, [(host, number) for host in addresses]

    def _open_udp(self, addresses: Sequence[str]) -> list[tuple[str, int]]:
        """
        Open the punching port on the interface of the direct port; the
        registration binds it at the rendezvous and keeps it alive.

        :returns: The host candidates to announce.
        """
        from dataclasses import replace

        from nattraverse.punch.port import PunchingPort

        self._udp = PunchingPort(
            self._reactor,
            self._identity,
            interface=self._interface,
            config=self._checks,
            birthday=self._birthday,
        )
        port = self._udp.start().port
        self._udp_hosts = list(addresses)
        self._context = replace(self._context, udp=self._udp)
        return [(host, port) for host in self._udp_hosts]

    def _udp_candidates(self) -> list[Any]:
        """This side's UDP candidates now (the observed address may change)."""
        from nattraverse.punch.candidates import gather

        if self._udp is None or self._udp.closed:
            return []
        registration = self._registration
        if registration is None:
            return gather(self._udp.address.port, self._udp_hosts, None)
        return gather(
            self._udp.address.port,
            self._udp_hosts,
            registration.udp_observed,
            registration.udp_second_observed,
        )

    def _not_registered(self, result: object, seconds: float) -> object:
        if isinstance(result, Failure) and result.check(CancelledError):
            return Failure(
                RendezvousUnavailable(
                    f"could not register {self._name!r} at the rendezvous at "
                    f"{describe_endpoint(self._rendezvous)} within {seconds:g} s; check the "
                    "rendezvous endpoint and that twistd natrendezvous runs there"
                )
            )
        return result

    def stop(self) -> Deferred[None]:
        """
        Unregister, close the direct port, forget the introductions and drop
        every path not yet handed to the application.  Idempotent.
        """
        if self._stopping is not None:
            return self._stopping
        waits: list[Deferred[Any]] = []
        if self._registration is not None:
            waits.append(self._registration.stopService())
        if self._tcp is not None:
            waits.append(maybeDeferred(self._tcp.stopListening))
        if self._punching is not None:
            waits.append(self._punching.close())
        if self._udp is not None:
            # Kept while QUIC paths on it carry connections, as TCP
            # connections outlive their listening port.
            self._udp.close_when_idle()
        pending, self._pending = self._pending, OrderedDict()
        for entry in pending.values():
            self._drop(entry)
        accepted, self._accepted = self._accepted, {}
        self._held = {}
        for held in accepted.values():
            held.abort()
        stopping: Deferred[None] = gatherResults(waits).addCallback(lambda _: None)
        self._stopping = stopping
        return stopping

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping is not None

    def address(self) -> PunchAddress:
        """The address ``getHost()`` gives."""
        host = self._tcp.getHost() if self._tcp is not None else None
        return PunchAddress(
            name=self._name,
            peer_id=self._identity.peer_id,
            host=getattr(host, "host", None),
            port=getattr(host, "port", 0),
        )

    # -- introductions ----------------------------------------------------------

    def _drop(self, entry: _Pending) -> None:
        if entry.timer.active():
            entry.timer.cancel()
        attempts, entry.attempts = entry.attempts, set()
        for attempt in attempts:
            attempt.cancel()

    def _expire(self, session: bytes) -> None:
        entry = self._pending.pop(session, None)
        if entry is not None:
            self._drop(entry)

    def _forget(self, session: bytes) -> None:
        entry = self._pending.pop(session, None)
        if entry is not None:
            self._drop(entry)

    def _lookup(self, session: bytes, what: str) -> _Pending | None:
        entry = self._pending.get(session)
        if entry is None:
            _log.warn(
                "ignoring {what} for session {session}: no such introduction (expired?)",
                what=what,
                session=session.hex(),
            )
        return entry

    def introduced(self, introduction: Introduction) -> None:
        """``Introduce``: keep it for its caller's paths; let the methods start."""
        if self.stopped:
            return
        session = introduction.session
        self._forget(session)
        while len(self._pending) >= MAX_PENDING:
            _, oldest = self._pending.popitem(last=False)
            self._drop(oldest)
        timer = self._reactor.callLater(PENDING_TTL, self._expire, session)
        entry = self._pending[session] = _Pending(introduction, timer, self._reactor.seconds())
        self._release(session)
        for method in self._methods:
            self._run(entry, method, "introduced", method.introduced, self._context, introduction)

    def dial_back(self, session: bytes, host: str, port: int) -> None:
        """``DialBack``: the methods dial the caller."""
        entry = self._lookup(session, "a dial-back request")
        if entry is None or self.stopped:
            return
        for method in self._methods:
            self._run(
                entry, method, "dial_back", method.dial_back,
                self._context, entry.introduction, host, port,
            )  # fmt: skip

    def relay_offer(self, session: bytes, token: bytes, lifetime: float) -> None:
        """``RelayOffer``: the methods join the relay."""
        entry = self._lookup(session, "a relay offer")
        if entry is None or self.stopped:
            return
        for method in self._methods:
            self._run(
                entry, method, "relay_offer", method.relay_offer,
                self._context, entry.introduction, token, lifetime,
            )  # fmt: skip

    def udp_relay_offer(self, session: bytes, port: int, token: bytes, lifetime: float) -> None:
        """
        ``UdpRelayOffer``: latch the punching port to the rendezvous' UDP
        relay for the caller's relayed leg of *session*
        (:func:`nattraverse.methods.udp.relay_offered`).
        """
        from nattraverse.methods.udp import relay_offered

        entry = self._lookup(session, "a UDP relay offer")
        rendezvous = self._registration.session if self._registration is not None else None
        if entry is None or self.stopped or rendezvous is None:
            return
        if not relay_offered(self._context, rendezvous, session, port, token):
            _log.info(
                "ignoring the UDP relay offer for session {session}: no punching session "
                "takes it (over, or not punching UDP)",
                session=session.hex(),
            )

    def _run(
        self, entry: _Pending, method: ITraversalMethod, hook: str, call: Any, *args: Any
    ) -> None:
        """Call one method's hook and adopt the path it opens, if any."""
        try:
            attempt: Deferred[Path] | None = call(*args)
        except Exception:
            _log.failure("{method}.{hook}() failed", method=method.name, hook=hook)
            return
        if attempt is None:
            return
        entry.attempts.add(attempt)
        peer = str(entry.introduction.peer.peer_id)

        def done(result: Path | Failure) -> None:
            entry.attempts.discard(attempt)
            if isinstance(result, Failure):
                if not result.check(CancelledError):
                    _log.info(
                        "{method} path to {peer} failed: {error}",
                        method=method.name,
                        peer=peer,
                        error=result.getErrorMessage(),
                    )
                return
            self._deliver(result)

        attempt.addBoth(done)

    # -- the direct port --------------------------------------------------------

    def _resolve(self, session: bytes, tag: bytes, method: str) -> PathSecrets | None:
        entry = self._pending.get(session)
        if entry is None:
            return None
        introduction = entry.introduction
        if not hmac.compare_digest(tag, path_tag(introduction.secret, session)):
            return None
        return path_secrets(introduction, method)

    def _accept(self, addr: IAddress | None, method: str) -> _Held | None:
        if self.stopped or len(self._accepted) >= MAX_UNSECURED:
            return None
        path = SecurePath(
            self._reactor,
            self._identity,
            "callee",
            resolve=partial(self._resolve, method=method),
            timeout=self._timeout,
        )
        held = self._accepted[path] = _Held(self, path, min(HOLD_TIME, self._timeout))

        def done(result: SecurePath | Failure) -> None:
            self._accepted.pop(path, None)
            if isinstance(result, Failure):
                if not result.check(CancelledError):
                    _log.debug(
                        "direct connection from {addr} dropped: {error}",
                        addr=addr,
                        error=result.getErrorMessage(),
                    )
                return
            self._deliver(result)

        path.authenticated.addBoth(done)
        return held

    def _hold(self, held: _Held) -> bool:
        """Hold *held* until its session is introduced; ``False``: not now."""
        if self.stopped:
            return False
        self._held.setdefault(held.session, []).append(held)
        return True

    def _unhold(self, held: _Held) -> None:
        waiting = self._held.get(held.session)
        if waiting is not None and held in waiting:
            waiting.remove(held)
            if not waiting:
                del self._held[held.session]

    def _release(self, session: bytes) -> None:
        for held in self._held.pop(session, []):
            held.release()

    # -- the application --------------------------------------------------------

    def _deliver(self, path: Path) -> None:
        """The caller selected *path*: hand it to the application."""
        if self.stopped:
            discard_path(path)
            return
        # The session is settled: its other paths and attempts can go.
        entry = self._pending.get(path.secrets.session)
        self._forget(path.secrets.session)
        try:
            protocol = path.attach(self._factory, started=entry.since if entry else None)
        except Exception:
            _log.failure(
                "attaching the application to a {method} path failed", method=path.secrets.method
            )
            discard_path(path)
            return
        if protocol is None:
            _log.info("the protocol factory refused a {method} path", method=path.secrets.method)


@implementer(IListeningPort)
class _PunchPort:
    """What ``listen()`` gives: stops the listener, tells its address."""

    def __init__(self, listener: PunchListener) -> None:
        self._listener = listener

    def __repr__(self) -> str:
        return f"<PunchPort {self._listener.address()}>"

    def startListening(self) -> None:
        """Already listening."""

    def stopListening(self) -> Deferred[None]:
        """Unregister, close the direct port, drop the paths not yet selected."""
        return self._listener.stop()

    def getHost(self) -> PunchAddress:
        """The name, peer id and direct port."""
        return self._listener.address()
