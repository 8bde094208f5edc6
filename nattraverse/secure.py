"""
The secured path (``docs/protocol.rst``, "The secured path"; DESIGN section
3, step 6): every TCP traversal method ends in one raw connection between
two peers, and nothing reaches the application before the peer has proved,
on that connection, that it is the peer the rendezvous vouched for.

1. **Preamble.**  The side that opened the TCP connection (for a relay: the
   caller) sends :data:`PREAMBLE_SIZE` bytes (:func:`encode_preamble`); the
   other side checks them before any TLS, so a stray connection costs no
   handshake.
2. **TLS 1.3, mutual**, each certificate pinned to a peer id
   (:mod:`nattraverse._tls`).  The caller is the TLS client whichever side
   opened the connection.
3. **Selection.**  The caller sends :data:`SELECTION_BYTE` on the one path
   it picks; the callee hands a path to its application only then.

:class:`SecurePath` does all three on any stream transport: it wraps
:class:`~twisted.protocols.tls.TLSMemoryBIOProtocol` around the transport
itself, never through ``startTLS``, so the raw transport may be a TCP
connection, an AMP connection switched to the relay, or even a TLS
connection to the rendezvous.  The application then gets a
:class:`PunchTransport`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse._tls import PinnedTLS, PunchTransport, call_if_present
from nattraverse.errors import PeerAuthenticationFailed
from nattraverse.identity import Identity, PeerId

if TYPE_CHECKING:
    from nattraverse.report import ConnectionReport

__all__ = [
    "PREAMBLE_MAGIC",
    "PREAMBLE_SIZE",
    "SELECTION_BYTE",
    "SESSION_SIZE",
    "TAG_SIZE",
    "PathSecrets",
    "PunchTransport",
    "Role",
    "SecurePath",
    "encode_preamble",
    "parse_preamble",
    "path_tag",
]

_log = Logger()

#: The first bytes of every preamble: "nattraverse path, version 1".
PREAMBLE_MAGIC: Final = b"NTP1"
#: Size of a session id, as the rendezvous hands it out.
SESSION_SIZE: Final = 16
#: Size of the preamble's tag: HMAC-SHA256 cut to its first 16 bytes.
TAG_SIZE: Final = 16
#: Size of the whole preamble: magic, session id, tag.
PREAMBLE_SIZE: Final = len(PREAMBLE_MAGIC) + SESSION_SIZE + TAG_SIZE
#: What the caller sends, as its first application data, on the path it picks.
SELECTION_BYTE: Final = b"\x01"
#: Prepended to the session id under the HMAC (domain separation).
_TAG_CONTEXT: Final = b"nattraverse path v1"

#: "caller": called ``connect()``, TLS client; "callee": TLS server.
Role = Literal["caller", "callee"]


def path_tag(secret: bytes, session: bytes) -> bytes:
    """
    The preamble's proof that its sender was introduced:
    ``HMAC-SHA256(secret, b"nattraverse path v1" + session)[:16]``.
    """
    return hmac.new(secret, _TAG_CONTEXT + session, hashlib.sha256).digest()[:TAG_SIZE]


def encode_preamble(session: bytes, secret: bytes) -> bytes:
    """
    The :data:`PREAMBLE_SIZE` bytes the opener of a connection sends first.

    :raises ValueError: when *session* is not :data:`SESSION_SIZE` bytes.
    """
    if len(session) != SESSION_SIZE:
        raise ValueError(f"a session id is {SESSION_SIZE} bytes, not {len(session)}")
    return PREAMBLE_MAGIC + session + path_tag(secret, session)


def parse_preamble(data: bytes) -> tuple[bytes, bytes]:
    """
    Split a preamble into its session id and tag; checking the tag is the
    caller's job (it needs the session's secret).

    :raises PeerAuthenticationFailed: when *data* is not a preamble.
    """
    if len(data) != PREAMBLE_SIZE:
        raise PeerAuthenticationFailed(f"a path preamble is {PREAMBLE_SIZE} bytes, not {len(data)}")
    if data[: len(PREAMBLE_MAGIC)] != PREAMBLE_MAGIC:
        raise PeerAuthenticationFailed(
            f"the connection did not start with {PREAMBLE_MAGIC!r} but with "
            f"{bytes(data[: len(PREAMBLE_MAGIC)])!r}: not a nattraverse path"
        )
    start = len(PREAMBLE_MAGIC)
    return bytes(data[start : start + SESSION_SIZE]), bytes(data[start + SESSION_SIZE :])


@dataclass(frozen=True)
class PathSecrets:
    """
    What an introduction gives a path: the session id and secret the
    rendezvous made, the peer id it vouched for, and the method that
    carries the path (``"direct"``, ``"reversal"``, ``"relay"``, ...).
    """

    session: bytes
    secret: bytes
    expected: PeerId
    method: str

    def __post_init__(self) -> None:
        if len(self.session) != SESSION_SIZE:
            raise ValueError(f"a session id is {SESSION_SIZE} bytes, not {len(self.session)}")
        if not self.secret:
            raise ValueError("a session secret cannot be empty")

    def __repr__(self) -> str:  # never show the secret
        return (
            f"PathSecrets(session={self.session.hex()}, expected={self.expected}, "
            f"method={self.method!r})"
        )


@implementer(IHandshakeListener)
class _Cleartext(Protocol):
    """The protocol inside the TLS layer: it hands everything to its path."""

    def __init__(self, path: SecurePath) -> None:
        self._path = path

    def handshakeCompleted(self) -> None:
        self._path._tls_handshake_done()

    def dataReceived(self, data: bytes) -> None:
        self._path._tls_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._path._tls_lost(reason)


class SecurePath(Protocol):
    """
    Secures one raw stream connection and hands it to an application.

    Attach it to the raw connection as its protocol (or as the protocol an
    AMP connection switches to).  Exactly one of *secrets* and *resolve*:

    - *secrets* and ``send_preamble=True``: this side opened the connection;
      it writes the preamble first.
    - *secrets* and ``send_preamble=False``: the other side opens (the callee
      of a relay); the preamble read must be for these secrets.
    - *resolve*: this side accepted a connection; ``resolve(session, tag)``
      returns the secrets of a pending introduction (it checks the tag with
      :func:`hmac.compare_digest` against :func:`path_tag`), or ``None``,
      and the connection is closed quietly.  The tag is checked here again.

    :attr:`authenticated` fires with the path when the peer is proved: for
    the caller, after the handshake and the pin check; for the callee, when
    the selection byte follows them.  Then the caller :meth:`select`\\ s the
    path or :meth:`abort`\\ s it, and the callee :meth:`attach`\\ es it.
    Until then nothing is read from the connection.

    :param reactor: Runs the timeout.
    :param identity: This peer's key and certificate.
    :param role: ``"caller"`` (TLS client) or ``"callee"`` (TLS server).
    :param timeout: Seconds from ``connectionMade`` to :attr:`authenticated`;
        the timer starts with the connection, so a path whose connection never
        comes leaves nothing behind.
    :ivar role: ``"caller"`` or ``"callee"``.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        identity: Identity,
        role: Role,
        *,
        secrets: PathSecrets | None = None,
        resolve: Callable[[bytes, bytes], PathSecrets | None] | None = None,
        send_preamble: bool = False,
        timeout: float = 10.0,
    ) -> None:
        if role not in ("caller", "callee"):
            raise ValueError(f"role is 'caller' or 'callee', not {role!r}")
        if (secrets is None) == (resolve is None):
            raise TypeError("give SecurePath exactly one of secrets= and resolve=")
        if send_preamble and secrets is None:
            raise TypeError("send_preamble=True needs secrets=")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self._reactor = reactor
        self._identity = identity
        self.role: Role = role
        self._secrets = secrets
        self._resolve = resolve
        self._send_preamble = send_preamble
        self._timeout = timeout
        #: Fires with this path once the peer is proved; see the class docstring.
        self.authenticated: defer.Deferred[SecurePath] = defer.Deferred(self._cancel)
        self._settled = False  # authenticated has fired
        self._succeeded = False
        self._timer: IDelayedCall | None = None
        self._inbox = b""  # preamble bytes read so far
        self._pins: PinnedTLS | None = None
        self._tls: TLSMemoryBIOProtocol | None = None
        self._handshaken = False
        self._selected = False  # the selection byte went out (caller) or came in (callee)
        self._refusal: PeerAuthenticationFailed | None = None
        self._paused_by_us = False
        self._pending: deque[bytes] = deque()  # cleartext not yet given to the application
        self._lost: Failure | None = None  # the TLS connection ended before the application came
        self._app: IProtocol | None = None
        self._app_paused = False
        self._app_transport: PunchTransport | None = None
        self._aborted = False
        #: The peer's certificate, once the handshake and the pin check passed.
        self.peer_certificate: X509 | None = None

    def __repr__(self) -> str:
        who = self._secrets.expected if self._secrets is not None else "?"
        return f"<SecurePath {self.role} to {who}>"

    @property
    def secrets(self) -> PathSecrets:
        """
        This path's secrets: as given, or as *resolve* returned them.

        :raises RuntimeError: before *resolve* has been asked.
        """
        if self._secrets is None:
            raise RuntimeError("the path's secrets are known once its preamble is read")
        return self._secrets

    # -- the raw connection -----------------------------------------------------

    def connectionMade(self) -> None:
        """Start the clock; send the preamble when this side opened."""
        if self._aborted:
            self._drop(abort=True)
            return
        self._timer = self._reactor.callLater(self._timeout, self._timed_out)
        if self._send_preamble:
            secrets = self.secrets
            self._raw.write(encode_preamble(secrets.session, secrets.secret))
            self._start_tls()

    def dataReceived(self, data: bytes) -> None:
        """Read the preamble, then feed TLS."""
        if self._tls is None:
            if self._settled:
                return
            self._inbox += data
            if len(self._inbox) < PREAMBLE_SIZE:
                return
            preamble, data = self._inbox[:PREAMBLE_SIZE], self._inbox[PREAMBLE_SIZE:]
            self._inbox = b""
            try:
                self._secrets = self._check_preamble(preamble)
            except Exception:
                self._fail(Failure())
                self._drop(abort=True)
                return
            self._start_tls()
            if not data:
                return
        assert self._tls is not None
        self._tls.dataReceived(data)
        self._settle_after_input()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Pass the loss through TLS to the application, or fail :attr:`authenticated`."""
        if self._tls is not None:
            self._tls.connectionLost(reason)
        else:
            self._fail(reason)

    @property
    def _raw(self) -> ITransport:
        assert self.transport is not None, "the path has no connection yet"
        return self.transport

    def _check_preamble(self, preamble: bytes) -> PathSecrets:
        session, tag = parse_preamble(preamble)
        if self._resolve is not None:
            secrets = self._resolve(session, tag)
            if secrets is None:
                raise PeerAuthenticationFailed(
                    f"no pending introduction has session {session.hex()} and that tag"
                )
        else:
            secrets = self.secrets
        if not hmac.compare_digest(secrets.session, session):
            raise PeerAuthenticationFailed(
                f"the preamble is for session {session.hex()}, not {secrets.session.hex()}",
                secrets.expected,
            )
        if not hmac.compare_digest(path_tag(secrets.secret, session), tag):
            raise PeerAuthenticationFailed(
                f"the preamble's tag for session {session.hex()} is wrong: the opener does "
                "not know the session secret",
                secrets.expected,
            )
        return secrets

    def _start_tls(self) -> None:
        self._pins = PinnedTLS(self._identity, self.secrets.expected)
        factory = TLSMemoryBIOFactory(
            self._pins, self.role == "caller", Factory.forProtocol(Protocol), self._reactor
        )
        self._tls = TLSMemoryBIOProtocol(factory, _Cleartext(self))
        self._tls.makeConnection(self._raw)

    def _drop(self, *, abort: bool) -> None:
        """Close the raw connection: at once, or after what is written is sent."""
        if self.transport is None:
            return
        abort_connection = getattr(self.transport, "abortConnection", None)
        if abort and abort_connection is not None:
            abort_connection()
        else:
            self.transport.loseConnection()

    # -- the TLS layer ----------------------------------------------------------

    def _tls_handshake_done(self) -> None:
        assert self._pins is not None
        assert self._tls is not None
        handle = self._tls.getHandle()
        try:
            self._pins.check(handle)
        except PeerAuthenticationFailed as e:
            self._refusal = e
        else:
            self._handshaken = True
            self.peer_certificate = handle.get_peer_certificate()

    def _tls_data(self, data: bytes) -> None:
        if self._app is not None:
            if self._app_paused or self._pending:
                self._pending.append(data)
            else:
                self._app.dataReceived(data)
            return
        if self._settled and not self._succeeded:
            return
        if self.role == "callee" and not self._selected:
            if data[:1] != SELECTION_BYTE:
                self._refusal = PeerAuthenticationFailed(
                    f"the caller sent {data[:1]!r} instead of the selection byte "
                    f"{SELECTION_BYTE!r}",
                    self.secrets.expected,
                )
                return
            self._selected = True
            data = data[1:]
        if data:
            self._pending.append(data)

    def _tls_lost(self, reason: Failure) -> None:
        if self._app is not None:
            app, self._app = self._app, None
            self._deliver_pending(app)
            app.connectionLost(reason)
            return
        if self._settled:
            if self._succeeded:
                self._lost = reason
            return
        self._fail(self._explain(reason))

    def _explain(self, reason: Failure) -> Failure:
        """What a loss before authentication means."""
        if self._pins is not None and self._pins.mismatch is not None:
            return Failure(self._pins.mismatch)
        if self._refusal is not None:
            return Failure(self._refusal)
        if isinstance(reason.value, SSL.Error):
            expected = self._secrets.expected if self._secrets is not None else None
            return Failure(
                PeerAuthenticationFailed(f"the TLS handshake failed: {reason.value}", expected)
            )
        return reason

    def _settle_after_input(self) -> None:
        """Decide, once TLS has digested some input and its callbacks returned."""
        if self._settled:
            return
        refusal = self._pins.mismatch if self._pins is not None else None
        refusal = refusal or self._refusal
        if refusal is not None:
            self._fail(Failure(refusal))
            self._drop(abort=False)  # let the TLS alert go out
        elif self._handshaken and (self.role == "caller" or self._selected):
            self._succeed()

    # -- authenticated ----------------------------------------------------------

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _succeed(self) -> None:
        self._settled = self._succeeded = True
        self._stop_timer()
        pause = getattr(self._raw, "pauseProducing", None)
        if pause is not None:  # read nothing more until the application is there
            pause()
            self._paused_by_us = True
        _log.info(
            "path {session} to {peer} via {method} authenticated ({role})",
            session=self.secrets.session.hex(),
            peer=self.secrets.expected,
            method=self.secrets.method,
            role=self.role,
        )
        self.authenticated.callback(self)

    def _fail(self, reason: Failure) -> None:
        if self._settled:
            return
        self._settled = True
        self._stop_timer()
        # Before the preamble is accepted a failure is any stray connection: debug only.
        emit = _log.info if self._tls is not None else _log.debug
        emit(
            "path ({role}, {method}) to {peer} failed: {error}",
            role=self.role,
            method=self._secrets.method if self._secrets is not None else "?",
            peer=self._secrets.expected if self._secrets is not None else "?",
            error=reason.getErrorMessage(),
        )
        self.authenticated.errback(reason)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(
            Failure(
                defer.TimeoutError(
                    f"the path was not secured within {self._timeout:g} seconds",
                )
            )
        )
        self._drop(abort=True)

    def _cancel(self, deferred: defer.Deferred[SecurePath]) -> None:
        self.abort()

    def abort(self) -> None:
        """
        Drop the connection at once.  A pending :attr:`authenticated` fails
        with :class:`~twisted.internet.defer.CancelledError`; an attached
        application sees ``connectionLost``.
        """
        self._aborted = True
        self._fail(Failure(defer.CancelledError("the path was aborted")))
        self._drop(abort=True)

    # -- the application --------------------------------------------------------

    def select(
        self,
        factory: IProtocolFactory,
        *,
        started: float | None = None,
        report: ConnectionReport | None = None,
    ) -> IProtocol | None:
        """
        Pick this path (caller only, once :attr:`authenticated` has fired):
        send the selection byte and connect ``factory.buildProtocol(peer)``
        to a :class:`PunchTransport`.  When that returns ``None`` the path
        is closed and ``None`` returned.

        :param started: When (reactor time) the connection attempt began;
            the transport's ``connect_ms`` is counted from it.
        :param report: The race's report, the transport's ``report``.
        """
        self._ready_for("caller", "select")
        self._selected = True
        assert self._tls is not None
        self._tls.write(SELECTION_BYTE)
        return self._connect_application(factory, started, report)

    def attach(
        self, factory: IProtocolFactory, *, started: float | None = None
    ) -> IProtocol | None:
        """
        Hand this path to the application (callee only, once
        :attr:`authenticated` has fired): like :meth:`select`, without
        sending anything.  Data that came after the selection byte is
        delivered first, in order.

        :param started: As for :meth:`select` (for a callee: when the
            introduction arrived).
        """
        self._ready_for("callee", "attach")
        return self._connect_application(factory, started)

    def _ready_for(self, role: Role, what: str) -> None:
        if self.role != role:
            raise RuntimeError(f"only the {role} may {what} a path; this is the {self.role}")
        if not self._succeeded:
            raise RuntimeError(f"{what}() needs an authenticated path: wait for .authenticated")
        if self._app_transport is not None or self._aborted:
            raise RuntimeError(f"this path is already taken or aborted; cannot {what}() it")

    def _connect_application(
        self,
        factory: IProtocolFactory,
        started: float | None,
        report: ConnectionReport | None = None,
    ) -> IProtocol | None:
        tls = self._tls
        assert tls is not None
        if self._paused_by_us:
            self._paused_by_us = False
            call_if_present(self._raw, "resumeProducing")
        app = factory.buildProtocol(tls.getPeer())
        transport = PunchTransport(
            tls,
            method=self.secrets.method,
            peer_id=self.secrets.expected,
            session=self.secrets.session,
            peer_certificate=self.peer_certificate,
            pause=self._pause_application,
            resume=self._resume_application,
        )
        if started is not None:
            transport.connect_ms = (self._reactor.seconds() - started) * 1000.0
        transport.report = report
        self._app_transport = transport
        if app is None:
            tls.loseConnection()
            return None
        lost, self._lost = self._lost, None
        self._app = app
        app.makeConnection(transport)
        if lost is not None:
            self._tls_lost(lost)
        else:
            self._deliver_pending(app)
        return app

    def _deliver_pending(self, app: IProtocol) -> None:
        while self._pending and not (self._app_paused and self._app is app):
            app.dataReceived(self._pending.popleft())

    def _pause_application(self) -> None:
        self._app_paused = True
        call_if_present(self._raw, "pauseProducing")

    def _resume_application(self) -> None:
        self._app_paused = False
        if self._app is not None:
            self._deliver_pending(self._app)
        if not self._app_paused:
            call_if_present(self._raw, "resumeProducing")
