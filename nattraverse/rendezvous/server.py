"""
The rendezvous server (``docs/protocol.rst``): AMP sessions where peers
authenticate, register names, look each other up, are introduced, ask for
connection reversal and for relays.

- :class:`RendezvousServerProtocol` serves one connection: the responders
  check every value (:mod:`nattraverse.rendezvous.commands`) and keep the
  soft state in a :class:`~nattraverse.rendezvous.registry.Registry`.
- :class:`RendezvousFactory` holds what connections share: the registry,
  the limits, the relay hub, the access key, the counters.
- :class:`RendezvousService` listens on endpoint descriptions
  (``tcp:8478``, ``ssl:8479:privateKey=...``) and sweeps expired state.

Nothing one peer sends can hurt another's service: a malformed box or an
oversized one closes that one connection; a refused request is answered
with the AMP error of its :mod:`nattraverse.errors` class; an unexpected
exception in a responder is logged and closes only the connection that
caused it.  Connections that do not authenticate within the handshake
timeout are closed, and the number of connections at once is capped.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    IPushProducer,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse.errors import (
    InvalidRequest,
    NatTraverseError,
    NotAuthenticated,
    PeerNotFound,
    RelayRefused,
    ReversalRefused,
)
from nattraverse.identity import PeerId, verify
from nattraverse.rendezvous import commands
from nattraverse.rendezvous.commands import (
    CHALLENGE_SIZE,
    PROTOCOL_VERSION,
    SECRET_SIZE,
    SESSION_ID_SIZE,
    TOKEN_SIZE,
    Authenticate,
    Connect,
    DialBack,
    Hello,
    Introduce,
    Lookup,
    Refresh,
    Register,
    Relay,
    RelayJoin,
    RelayOffer,
    Reverse,
    check_bytes,
    check_candidates,
    check_host,
    check_methods,
    check_name,
    check_port,
    encode_candidates,
    is_peer_id,
)
from nattraverse.rendezvous.registry import PeerRecord, Registration, Registry

if TYPE_CHECKING:
    from nattraverse.rendezvous.relay import RelayHub

__all__ = [
    "MAX_BOX_KEYS",
    "MAX_BOX_SIZE",
    "MAX_REVERSALS",
    "MAX_UNANSWERED",
    "RendezvousFactory",
    "RendezvousLimits",
    "RendezvousServerProtocol",
    "RendezvousService",
    "RendezvousStats",
]

_log = Logger()

#: Most bytes of keys and values in one AMP box; a bigger box closes the
#: connection.  One value at AMP's own maximum (65535 bytes) still fits, so
#: an oversized field gets an ``INVALID_REQUEST`` naming it.
MAX_BOX_SIZE = 65535 + 4096
#: Most keys in one AMP box (the largest command has 10).
MAX_BOX_KEYS = 32
#: Largest DER public key accepted by ``Authenticate`` (P-256 SPKI: 91 bytes).
MAX_PUBLIC_KEY = 1024
#: Requests of the server (``Introduce``...) a peer may leave unanswered
#: before its connection is closed: a peer that does not read is cut off
#: instead of filling the server's memory.
MAX_UNANSWERED = 64
#: ``Reverse`` requests one introduction serves.
MAX_REVERSALS = 4

# Every error class the schema carries, with its AMP code.
_CODES: dict[type[Exception], bytes] = {}
for _command in (Hello, Authenticate, Register, Refresh, Lookup, Connect, Reverse, Relay):
    _CODES.update(_command.errors)
_CODES.update(RelayJoin.errors)
_INVALID = _CODES[InvalidRequest]


@dataclass(frozen=True)
class RendezvousLimits:
    """
    The rendezvous' caps and timers (``twistd natrendezvous --help`` sets
    them).

    :ivar registration_ttl: Seconds a registration lives after ``Register``
        or ``Refresh``.  Default: 60.
    :ivar max_registrations: Registrations at once.  Default: 100000.
    :ivar max_registrations_per_ip: Registrations at once from one address.
        Default: 64.
    :ivar introduction_ttl: Seconds an introduction (a session id usable by
        ``Reverse`` and ``Relay``) lives.  Default: 60.
    :ivar max_introductions: Introductions at once.  Default: 10000.
    :ivar handshake_timeout: Seconds a connection has to authenticate.
        Default: 10.
    :ivar max_connections: Connections at once; more are closed at once.
        Default: 20000.
    """

    registration_ttl: float = 60.0
    max_registrations: int = 100_000
    max_registrations_per_ip: int = 64
    introduction_ttl: float = 60.0
    max_introductions: int = 10_000
    handshake_timeout: float = 10.0
    max_connections: int = 20_000

    def __post_init__(self) -> None:
        for name in ("registration_ttl", "introduction_ttl", "handshake_timeout"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds above 0, not {value!r}")
        for name in (
            "max_registrations",
            "max_registrations_per_ip",
            "max_introductions",
            "max_connections",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")


@dataclass(slots=True)
class RendezvousStats:
    """
    Counters of a rendezvous server since it started.
    """

    connections_refused: int = 0
    handshake_timeouts: int = 0
    authentications: int = 0
    registrations: int = 0
    introductions: int = 0
    reversals: int = 0
    relays: int = 0
    relay_joins: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    internal_errors: int = 0


class _InternalError(Exception):
    """A responder failed unexpectedly (already logged)."""


def _canonical(host: str) -> str:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


_R = TypeVar("_R")


def _responder(
    command: type[amp.Command], *, authenticated: bool = True
) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """
    Make a method the responder of *command*: refuse it before
    ``Authenticate`` (when *authenticated*), count and log refusals, and
    log unexpected exceptions (the connection is then closed).
    """
    name = command.commandName.decode("ascii")

    def decorate(method: Callable[..., _R]) -> Callable[..., _R]:
        @functools.wraps(method)
        def respond(self: RendezvousServerProtocol, **arguments: Any) -> _R:
            try:
                if authenticated and self.peer_id is None:
                    raise NotAuthenticated(
                        f"{name} before Authenticate: send Hello, then Authenticate, first"
                    )
                return method(self, **arguments)
            except NatTraverseError as e:
                self.server.refused(self, name, e)
                raise
            except Exception:
                self.server.stats.internal_errors += 1
                _log.failure(
                    "rendezvous {command} from {source} failed", command=name, source=self.source
                )
                raise _InternalError(name) from None

        command.responder(respond)
        return respond

    return decorate


@implementer(IHalfCloseableProtocol)
class RendezvousServerProtocol(amp.AMP):
    """
    One connection to the rendezvous.

    :ivar server: What all connections share.
    :ivar peer_id: The peer id this connection proved, once authenticated.
    :ivar observed_host: The address the connection comes from.
    :ivar observed_port: The port it comes from.
    """

    _ampInitialized = True

    def __init__(self, server: RendezvousFactory) -> None:
        # Tens of thousands of these sit idle, so they must stay small.
        # Not AMP.__init__: it also builds the file-descriptor passing
        # machinery of UNIX sockets (a dict, two counters, three callables:
        # about half a KiB), which TCP and TLS connections never use.
        # Every attribute a connection ever sets is set here, in one order:
        # CPython then keeps them all in the class's shared-key storage,
        # whereas an attribute first set later, once many instances exist,
        # turns that instance's attributes into a full dict (several
        # hundred bytes more; see benchmarks/rendezvous_scale).
        self._outstandingRequests: dict[bytes, defer.Deferred[Any]] = {}
        self.server = server
        self.transport = None
        self.boxSender = self
        self.peer_id: PeerId | None = None
        self.observed_host = ""
        self.observed_port = 0
        self._challenge: bytes | None = None
        self._greeted = False
        self._timer: IDelayedCall | None = None
        self._unanswered = 0
        self._dropped = False
        self._counter = 0
        self._unprocessed = b""
        self._compatibilityOffset = 0
        self.state = "init"
        self.MAX_LENGTH = self._MAX_KEY_LENGTH
        self._currentBox: amp.AmpBox | None = None
        self._currentKey: bytes | None = None
        self._box_bytes = 0
        self._box_keys = 0

    @property
    def locator(self) -> RendezvousServerProtocol:
        """AMP's responder locator: this protocol."""
        return self

    @property
    def boxReceiver(self) -> RendezvousServerProtocol:
        """AMP's box receiver: this protocol."""
        return self

    def fileDescriptorReceived(self, descriptor: int) -> None:
        # Only UNIX sockets pass descriptors; nothing here expects one.
        os.close(descriptor)
        self._drop("a file descriptor was passed")

    def __repr__(self) -> str:
        return f"<RendezvousServerProtocol {self.source} {self.peer_id}>"

    @property
    def source(self) -> str:
        """Where the connection comes from, as text."""
        if ":" in self.observed_host:
            return f"[{self.observed_host}]:{self.observed_port}"
        return f"{self.observed_host}:{self.observed_port}"

    @property
    def alive(self) -> bool:
        """Whether the server can still send commands on this connection."""
        return (
            self.transport is not None
            and not self._dropped
            and self.innerProtocol is None
            and not self._locked
        )

    # -- connection --------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        # AMP.makeConnection logs every connection and keeps two address
        # objects: not worth it for tens of thousands of idle peers.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        server = self.server
        address = self.transport.getPeer()  # type: ignore[union-attr]
        if not isinstance(address, IPv4Address | IPv6Address):
            _log.warn("rendezvous connection from {address} refused: not IP", address=address)
            self._drop("not an IP connection")
            return
        # Interned: peers behind one NAT share one string.
        self.observed_host = sys.intern(_canonical(address.host))
        self.observed_port = address.port
        server.connections.add(self)
        self._timer = server.reactor.callLater(
            server.limits.handshake_timeout, self._handshake_expired
        )
        transport: Any = self.transport
        with contextlib.suppress(AttributeError, NotImplementedError, OSError):
            # Introductions are small and urgent: do not let Nagle hold them
            # back until the peer acknowledges our previous answer.
            transport.setTcpNoDelay(True)
        if _pushes(transport):
            # Stop reading while our answers wait in the send buffer: a peer
            # that sends requests and never reads the answers then stalls
            # instead of filling our memory with them.
            transport.registerProducer(transport, True)
        _settle_transport(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self._dropped = True
        self.server.disconnected(self)
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    def readConnectionLost(self) -> None:
        inner = self.innerProtocol
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()
        elif self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        inner = self.innerProtocol
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _handshake_expired(self) -> None:
        self._timer = None
        self.server.stats.handshake_timeouts += 1
        self._drop(f"not authenticated within {self.server.limits.handshake_timeout}s")

    def _drop(self, why: str) -> None:
        if self._dropped:
            return
        self._dropped = True
        self._cancel_timer()
        _log.info("closing rendezvous connection from {source}: {why}", source=self.source, why=why)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- framing -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        AMP's framing (16-bit length prefixes), as in
        :class:`~twisted.protocols.basic.IntNStringReceiver` but without
        its look into ``self.__dict__`` after every string, which turns the
        compact attribute storage of each connection into a full dict (a
        few hundred bytes per idle peer).
        """
        inner = self.innerProtocol
        if inner is not None:
            inner.dataReceived(data)
            return
        buffer = self._unprocessed + data
        self._unprocessed = buffer
        offset = 0
        size = len(buffer)
        while size - offset >= 2 and not self._dropped and not self.paused:
            start = offset + 2
            length = int.from_bytes(buffer[offset:start], "big")
            if length > self.MAX_LENGTH:
                self._compatibilityOffset = offset
                self.lengthLimitExceeded(length)  # type: ignore[no-untyped-call]
                return
            end = start + length
            if size < end:
                break
            offset = end
            # ``recvd`` (what AMP hands a protocol it switches to) is what
            # follows this string.
            self._compatibilityOffset = end
            self.stringReceived(buffer[start:end])  # type: ignore[no-untyped-call]
            if self.innerProtocol is not None:
                return
        self._unprocessed = buffer[offset:]
        self._compatibilityOffset = 0

    def proto_init(self, string: bytes) -> str:
        self._box_bytes = 0
        self._box_keys = 0
        return super().proto_init(string)  # type: ignore[no-untyped-call,no-any-return]

    def proto_key(self, string: bytes) -> str:
        self._box_keys += 1
        if self._box_keys > MAX_BOX_KEYS:
            return self._oversized(f"an AMP box of more than {MAX_BOX_KEYS} keys")
        return super().proto_key(string)  # type: ignore[no-untyped-call,no-any-return]

    def proto_value(self, string: bytes) -> str:
        self._box_bytes += len(self._currentKey or b"") + len(string)
        if self._box_bytes > MAX_BOX_SIZE:
            return self._oversized(f"an AMP box of more than {MAX_BOX_SIZE} bytes")
        return super().proto_value(string)  # type: ignore[no-untyped-call,no-any-return]

    def proto_closed(self, string: bytes) -> str:
        """Ignore whatever follows a box that closed the connection."""
        return "closed"

    def _oversized(self, what: str) -> str:
        self._currentBox = None
        self._currentKey = None
        self.server.stats.malformed += 1
        self._drop(what)
        return "closed"

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        if self._dropped:
            return
        try:
            super().ampBoxReceived(box)  # type: ignore[no-untyped-call]
        except Exception as e:
            self.server.stats.malformed += 1
            self._drop(f"a malformed AMP box ({type(e).__name__})")

    def dispatchCommand(self, box: amp.AmpBox) -> defer.Deferred[Any]:
        command = box[amp.COMMAND]
        dispatched = super().dispatchCommand(box)  # type: ignore[no-untyped-call]
        return dispatched.addErrback(self._translate, command)  # type: ignore[no-any-return]

    def _translate(self, failure: Failure, command: bytes) -> Failure:
        if failure.check(amp.RemoteAmpError):
            return failure
        if failure.check(amp.BadLocalReturn):
            self.server.stats.internal_errors += 1
            _log.failure("rendezvous answer to {source} not encodable", failure, source=self.source)
            failure = Failure(_InternalError(command))
        if failure.check(_InternalError):
            return Failure(
                amp.RemoteAmpError(
                    amp.UNKNOWN_ERROR_CODE, "internal error of the rendezvous", True, failure
                )
            )
        error = failure.value
        code = _CODES.get(type(error)) if isinstance(error, Exception) else None
        if code is not None:
            return Failure(amp.RemoteAmpError(code, str(error), False, failure))
        # The box did not fit the command's schema: a missing argument, a
        # number that is not one, text that is not UTF-8...
        self.server.stats.malformed += 1
        shown = command[:40].decode("ascii", "replace")
        return Failure(
            amp.RemoteAmpError(
                _INVALID,
                f"malformed {shown} request: {type(error).__name__}: {str(error)[:200]}",
                False,
                failure,
            )
        )

    # -- sending to the peer -----------------------------------------------

    def send(self, command: type[amp.Command], **arguments: Any) -> bool:
        """
        Send *command* to this peer, without waiting for its answer (an
        error answer is logged).

        :returns: Whether it was sent.
        """
        if not self.alive:
            return False
        if self._unanswered >= MAX_UNANSWERED:
            self._drop(f"{MAX_UNANSWERED} requests of the rendezvous left unanswered")
            return False
        try:
            answer = self.callRemote(command, **arguments)  # type: ignore[no-untyped-call]
        except Exception as e:
            _log.debug(
                "{command} to {source} not sent: {error}",
                command=command.commandName,
                source=self.source,
                error=e,
            )
            return False
        self._unanswered += 1
        answer.addBoth(self._answered, command.commandName)
        return True

    def _answered(self, result: object, command: bytes) -> None:
        self._unanswered -= 1
        if isinstance(result, Failure):
            _log.debug(
                "{source} answered {command} with {error}",
                source=self.source,
                command=command.decode("ascii"),
                error=result.getErrorMessage(),
            )

    # -- responders --------------------------------------------------------

    @_responder(Hello, authenticated=False)
    def hello(self, version: int) -> dict[str, Any]:
        """``Hello``: a fresh challenge and the observed address."""
        if self._greeted:
            raise InvalidRequest("Hello was already sent on this connection")
        if version < 1:
            raise InvalidRequest(f"version: {version} is not a protocol version (1 or more)")
        server = self.server
        self._greeted = True
        self._challenge = check_bytes(server.random(CHALLENGE_SIZE), CHALLENGE_SIZE, "challenge")
        return {
            "version": PROTOCOL_VERSION,
            "challenge": self._challenge,
            "observed_host": self.observed_host,
            "observed_port": self.observed_port,
            "stun_port": server.stun_port,
            "relay": server.relay_hub is not None,
        }

    @_responder(Authenticate, authenticated=False)
    def authenticate(
        self, public_key: bytes, signature: bytes, access_proof: bytes | None = None
    ) -> dict[str, Any]:
        """``Authenticate``: bind the connection to a proven peer id."""
        if self.peer_id is not None:
            raise InvalidRequest("this connection is already authenticated")
        challenge = self._challenge
        if challenge is None:
            if not self._greeted:
                raise NotAuthenticated("send Hello first: Authenticate signs its challenge")
            raise NotAuthenticated(
                "this connection's challenge was spent by a failed Authenticate; "
                "open a new connection"
            )
        self._challenge = None
        access_key = self.server.access_key
        if access_key is not None:
            if access_proof is None:
                raise NotAuthenticated(
                    "this rendezvous needs an access key: give the client the key its "
                    "operator set (--access-key-file or NATRENDEZVOUS_ACCESS_KEY)"
                )
            expected = commands.access_proof(access_key, challenge)
            if not hmac.compare_digest(access_proof, expected):
                raise NotAuthenticated(
                    "the access proof does not match this rendezvous' access key; "
                    "check the client's access key"
                )
        if len(public_key) > MAX_PUBLIC_KEY:
            raise InvalidRequest(
                f"public_key: {len(public_key)} bytes, at most {MAX_PUBLIC_KEY} are accepted"
            )
        peer_id = verify(public_key, challenge, signature)
        self.peer_id = peer_id
        self._cancel_timer()
        self.server.stats.authentications += 1
        _log.debug("{source} authenticated as {peer}", source=self.source, peer=str(peer_id))
        return {"peer_id": str(peer_id)}

    @_responder(Register)
    def register(
        self, name: str, listen_port: int, private: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """``Register``: bind a name to this connection's peer id."""
        assert self.peer_id is not None
        checked = check_name(name)
        record = PeerRecord(
            self.observed_host,
            self.observed_port,
            check_port(listen_port, "listen_port"),
            tuple(check_candidates(private)),
        )
        server = self.server
        registry = server.registry
        registry.register(
            checked, self.peer_id, self.observed_host, record, server.now(), contact=self
        )
        server.stats.registrations += 1
        _log.info(
            "registered {name} for {peer} at {source} ({registrations} registrations)",
            name=checked,
            peer=str(self.peer_id),
            source=self.source,
            registrations=len(registry),
        )
        return {"ttl": registry.ttl}

    @_responder(Refresh)
    def refresh(self) -> dict[str, Any]:
        """``Refresh``: renew this connection's registration."""
        assert self.peer_id is not None
        registry = self.server.registry
        registry.refresh(self.peer_id, self.server.now(), contact=self)
        return {"ttl": registry.ttl}

    @_responder(Lookup)
    def lookup(self, peer: str) -> dict[str, Any]:
        """``Lookup``: what the server knows of a connected registered peer."""
        registration, _ = self._find(peer)
        return _peer_fields(registration)

    @_responder(Connect)
    def connect(
        self, peer: str, listen_port: int, private: list[dict[str, Any]], methods: list[str]
    ) -> dict[str, Any]:
        """``Connect``: introduce this peer and the callee to each other."""
        caller = self.peer_id
        assert caller is not None
        port = check_port(listen_port, "listen_port")
        candidates = check_candidates(private)
        wanted = check_methods(methods)
        registration, callee = self._find(peer)
        server = self.server
        session = check_bytes(server.random(SESSION_ID_SIZE), SESSION_ID_SIZE, "session")
        secret = check_bytes(server.random(SECRET_SIZE), SECRET_SIZE, "secret")
        server.registry.introduce(
            session,
            caller,
            registration.peer_id,
            self.observed_host,
            self.observed_port,
            server.now(),
            caller_contact=self,
            callee_contact=callee,
        )
        # The callee first: it must know the session before the caller's
        # first connection reaches it.
        sent = callee.send(
            Introduce,
            session=session,
            secret=secret,
            peer_id=str(caller),
            name="",
            observed_host=self.observed_host,
            observed_port=self.observed_port,
            listen_port=port,
            private=encode_candidates(candidates),
            methods=wanted,
        )
        if not sent:
            server.registry.forget_introduction(session)
            raise PeerNotFound(f"{peer!r} is registered but not connected to the rendezvous now")
        server.stats.introductions += 1
        _log.info(
            "introduced {caller} at {source} to {callee} ({name}), session {session}",
            caller=str(caller),
            source=self.source,
            callee=str(registration.peer_id),
            name=registration.name,
            session=session.hex(),
        )
        return {
            "session": session,
            "secret": secret,
            **_peer_fields(registration),
            "relay": server.relay_hub is not None,
        }

    @_responder(Reverse)
    def reverse(self, session: bytes, port: int, host: str | None = None) -> dict[str, Any]:
        """``Reverse``: have the callee dial this caller's observed address."""
        checked = check_bytes(session, SESSION_ID_SIZE, "session")
        checked_port = check_port(port, "port", allow_zero=False)
        introduction = self.server.registry.introduction(checked, self.server.now())
        if introduction is None or introduction.caller != self.peer_id:
            raise ReversalRefused(
                f"session {checked.hex()} is not an introduction this peer asked for "
                "(unknown, expired, or another peer's); send Connect first"
            )
        observed = introduction.caller_host
        if host is not None and _canonical_or_none(host) != observed:
            raise ReversalRefused(
                f"asked to be dialed at {host[:64]!r}, but the rendezvous observes this peer "
                f"at {observed}; the callee dials only the observed address"
            )
        if introduction.reversals >= MAX_REVERSALS:
            raise ReversalRefused(
                f"session {checked.hex()} already asked for {MAX_REVERSALS} reversals"
            )
        callee = introduction.callee_contact
        if not isinstance(callee, RendezvousServerProtocol) or not callee.send(
            DialBack, session=checked, host=observed, port=checked_port
        ):
            raise ReversalRefused("the callee is no longer connected to the rendezvous")
        introduction.reversals += 1
        self.server.stats.reversals += 1
        _log.info(
            "reversal for session {session}: {callee} dials {host}:{port}",
            session=checked.hex(),
            callee=str(introduction.callee),
            host=observed,
            port=checked_port,
        )
        return {}

    @_responder(Relay)
    def relay(self, session: bytes) -> dict[str, Any]:
        """``Relay``: allocate a relay between the two peers of a session."""
        checked = check_bytes(session, SESSION_ID_SIZE, "session")
        server = self.server
        hub = server.relay_hub
        if hub is None:
            raise RelayRefused("the relay is off on this rendezvous")
        introduction = server.registry.introduction(checked, server.now())
        if introduction is None or self.peer_id not in (introduction.caller, introduction.callee):
            raise RelayRefused(
                f"session {checked.hex()} is not an introduction of this peer "
                "(unknown, expired, or between other peers); send Connect first"
            )
        is_caller = self.peer_id == introduction.caller
        other = introduction.callee_contact if is_caller else introduction.caller_contact
        if not isinstance(other, RendezvousServerProtocol) or not other.alive:
            raise RelayRefused("the other peer of this session is no longer connected")
        caller_token, callee_token = hub.allocate(checked, introduction.caller, introduction.callee)
        mine, theirs = (caller_token, callee_token) if is_caller else (callee_token, caller_token)
        lifetime = float(hub.lifetime)
        if not other.send(RelayOffer, session=checked, token=theirs, lifetime=lifetime):
            raise RelayRefused("the other peer of this session is no longer connected")
        server.stats.relays += 1
        _log.info(
            "relay allocated for session {session}: {caller} <-> {callee}",
            session=checked.hex(),
            caller=str(introduction.caller),
            callee=str(introduction.callee),
        )
        return {"token": mine, "lifetime": lifetime}

    @_responder(RelayJoin)
    def relay_join(self, token: bytes) -> Any:
        """``RelayJoin``: switch this connection to a relay leg."""
        assert self.peer_id is not None
        checked = check_bytes(token, TOKEN_SIZE, "token")
        server = self.server
        hub = server.relay_hub
        if hub is None:
            raise RelayRefused("the relay is off on this rendezvous")
        registration = server.registry.registration(self.peer_id, server.now())
        if registration is not None and registration.contact is self:
            raise InvalidRequest(
                "RelayJoin needs a fresh connection; this one holds a registration"
            )
        leg = hub.join(checked, self.peer_id)
        transport: Any = self.transport
        if _pushes(transport):
            # The relay takes the transport over, flow control included.
            transport.unregisterProducer()
            transport.resumeProducing()
        server.stats.relay_joins += 1
        # ProtocolSwitchCommand responders return the protocol to switch to.
        return leg

    def _find(self, peer: str) -> tuple[Registration, RendezvousServerProtocol]:
        target: str | PeerId = PeerId.parse(peer) if is_peer_id(peer) else check_name(peer)
        registration = self.server.registry.find_connected(target, self.server.now())
        contact = registration.contact
        if not isinstance(contact, RendezvousServerProtocol) or not contact.alive:
            raise PeerNotFound(f"{peer!r} is registered but not connected to the rendezvous now")
        return registration, contact


def _settle_transport(transport: Any) -> None:
    """
    Give a fresh TCP transport the write-buffer attributes its first write
    would give it, with the same (empty) values.  Set early, while few
    transports exist, they join CPython's shared-key storage of the class;
    set on the first write of a connection among thousands, they would turn
    that transport's attributes into a full dict (about 0.8 KiB).
    """
    if (
        isinstance(transport, FileDescriptor)
        and transport.dataBuffer == b""
        and transport.offset == 0
        and not transport._tempDataLen
    ):
        transport.dataBuffer = b""
        transport.offset = 0


def _pushes(transport: object) -> bool:
    """Whether *transport* can pause its own reading (TCP and TLS can)."""
    return bool(IPushProducer.providedBy(transport))


def _canonical_or_none(host: str) -> str | None:
    try:
        return _canonical(check_host(host, "host"))
    except (InvalidRequest, ValueError):
        return None


def _peer_fields(registration: Registration) -> dict[str, Any]:
    record = registration.record
    return {
        "peer_id": str(registration.peer_id),
        "name": registration.name,
        "observed_host": record.observed_host,
        "observed_port": record.observed_port,
        "listen_port": record.listen_port,
        "private": encode_candidates(record.private),
    }


class RendezvousFactory(ServerFactory):
    """
    What the connections of one rendezvous share.

    :param reactor: For time and timers.
    :param limits: Caps and timers.
    :param relay_hub: The relay, or ``None`` when it is off.
    :param access_key: When given, clients must prove they know it.
    :param stun_port: The STUN port of this host, told in ``Hello`` (0:
        none).
    :param random: Source of challenges, session ids and secrets.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        limits: RendezvousLimits | None = None,
        *,
        relay_hub: RelayHub | None = None,
        access_key: bytes | None = None,
        stun_port: int = 0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.reactor = reactor
        self.limits = limits = limits if limits is not None else RendezvousLimits()
        self.relay_hub = relay_hub
        if access_key is not None and not access_key:
            raise ValueError("the access key is empty")
        self.access_key = access_key
        self.stun_port = check_port(stun_port, "stun_port")
        self.random = random
        self.registry = Registry(
            ttl=limits.registration_ttl,
            max_registrations=limits.max_registrations,
            max_per_ip=limits.max_registrations_per_ip,
            introduction_ttl=limits.introduction_ttl,
            max_introductions=limits.max_introductions,
        )
        self.connections: set[RendezvousServerProtocol] = set()
        self.stats = RendezvousStats()
        self._emptied: list[defer.Deferred[None]] = []

    def now(self) -> float:
        """The reactor's time."""
        return float(self.reactor.seconds())

    def buildProtocol(self, addr: IAddress) -> RendezvousServerProtocol | None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.stats.connections_refused += 1
            _log.debug(
                "rendezvous connection from {address} refused: {limit} connections already",
                address=addr,
                limit=self.limits.max_connections,
            )
            return None
        return RendezvousServerProtocol(self)

    def disconnected(self, protocol: RendezvousServerProtocol) -> None:
        """*protocol*'s connection is lost."""
        self.connections.discard(protocol)
        if protocol.peer_id is not None and self.registry.detach(protocol.peer_id, protocol):
            _log.info(
                "{peer} disconnected; its registration is kept until it expires",
                peer=str(protocol.peer_id),
            )
        if not self.connections:
            waiting, self._emptied = self._emptied, []
            for waiter in waiting:
                waiter.callback(None)

    def refused(self, protocol: RendezvousServerProtocol, command: str, error: Exception) -> None:
        """Count and log a refused request."""
        kind = type(error).__name__
        self.stats.refusals[kind] = self.stats.refusals.get(kind, 0) + 1
        _log.info(
            "refused {command} from {source} ({peer}): {kind}: {reason}",
            command=command,
            source=protocol.source,
            peer=str(protocol.peer_id) if protocol.peer_id is not None else "-",
            kind=kind,
            reason=str(error),
        )

    def sweep(self) -> None:
        """Drop expired registrations and introductions."""
        registrations, introductions = self.registry.expire(self.now())
        if registrations or introductions:
            _log.debug(
                "expired {registrations} registrations and {introductions} introductions",
                registrations=registrations,
                introductions=introductions,
            )

    def close_connections(self) -> defer.Deferred[None]:
        """
        Abort every connection.

        :returns: A Deferred that fires once all are gone.
        """
        if not self.connections:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._emptied.append(waiter)
        for protocol in list(self.connections):
            protocol._drop("the rendezvous is stopping")
        return waiter


class RendezvousService(Service):
    """
    The rendezvous on one or more listening endpoints.

    :param reactor: The reactor: listening, time and timers.
    :param endpoints: Where to listen: endpoint descriptions
        (``"tcp:8478"``, ``"ssl:8479:privateKey=key.pem"``) or
        :class:`IStreamServerEndpoint` providers.
    :param limits: Caps and timers.
    :param relay_hub: The relay (closed when the service stops), or
        ``None`` to turn it off.
    :param access_key: When given, clients must prove they know it.
    :param stun_port: The STUN port of this host, told to clients.
    :param random: Source of challenges, session ids and secrets.

    :ivar factory: The :class:`RendezvousFactory` the endpoints serve.
    :ivar ports: The listening ports, once listening (the real port numbers
        for endpoints asking for port 0).
    """

    def __init__(
        self,
        reactor: Any,
        endpoints: Sequence[str | IStreamServerEndpoint],
        limits: RendezvousLimits | None = None,
        *,
        relay_hub: RelayHub | None = None,
        access_key: bytes | None = None,
        stun_port: int = 0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not endpoints:
            raise ValueError("the rendezvous needs at least one endpoint to listen on")
        self.reactor = reactor
        self.endpoints: list[IStreamServerEndpoint] = [
            serverFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
            for endpoint in endpoints
        ]
        self.factory = RendezvousFactory(
            reactor,
            limits,
            relay_hub=relay_hub,
            access_key=access_key,
            stun_port=stun_port,
            random=random,
        )
        self.ports: list[IListeningPort] = []
        self._sweeper: LoopingCall | None = None
        self._failures: list[Failure] | None = None

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps of expired state."""
        limits = self.factory.limits
        return max(1.0, min(limits.registration_ttl, limits.introduction_ttl) / 4)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._failures = []
        for endpoint in self.endpoints:
            listening = endpoint.listen(self.factory)
            listening.addCallbacks(self._listening, self._listen_failed, errbackArgs=(endpoint,))
        failures, self._failures = self._failures, None
        if failures:
            self.running = False
            self._stop()
            failures[0].raiseException()
        sweeper = self._sweeper = LoopingCall(self.factory.sweep)
        sweeper.clock = self.reactor
        sweeper.start(self.sweep_interval, now=False).addErrback(
            lambda failure: _log.failure("the rendezvous sweeper failed", failure)
        )
        _log.info(
            "rendezvous on {ports} (relay: {relay}, access key: {access})",
            ports=", ".join(str(port.getHost()) for port in self.ports) or "(pending)",
            relay=self.factory.relay_hub is not None,
            access=self.factory.access_key is not None,
        )

    def _listening(self, port: IListeningPort) -> None:
        if self.running:
            self.ports.append(port)
        else:
            port.stopListening()

    def _listen_failed(self, failure: Failure, endpoint: IStreamServerEndpoint) -> None:
        if self._failures is not None:
            self._failures.append(failure)
        else:
            _log.failure("the rendezvous cannot listen on {endpoint}", failure, endpoint=endpoint)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self._stop()

    def _stop(self) -> defer.Deferred[None]:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        ports, self.ports = self.ports, []
        waits: list[defer.Deferred[Any]] = [defer.maybeDeferred(p.stopListening) for p in ports]
        waits.append(self.factory.close_connections())
        if self.factory.relay_hub is not None:
            self.factory.relay_hub.close()
        return defer.gatherResults(waits).addCallback(lambda _: None)
