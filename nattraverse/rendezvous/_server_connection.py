"""
The life of one rendezvous server connection, for
:mod:`nattraverse.rendezvous.server`: :class:`ServerConnection` takes a
connection in (observed address, handshake timeout, flow control), closes
it, turns what its responders raise into AMP errors, and sends the server's
own requests to the peer; :func:`responder` makes a method the responder of
a command.  The responders themselves are in
:mod:`nattraverse.rendezvous._server_protocol`.

What a connection needs of the factory the connections share is
:class:`ServerState`; this module imports nothing from the modules that
build on it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse._thin_stream import mark_thin_stream
from nattraverse.errors import InvalidRequest, NatTraverseError, NotAuthenticated
from nattraverse.identity import PeerId
from nattraverse.rendezvous._lean_amp import LeanAMP, pushes, settle_transport
from nattraverse.rendezvous.commands import (
    Authenticate,
    Connect,
    Hello,
    Lookup,
    Refresh,
    Register,
    Relay,
    RelayJoin,
    Reverse,
    UdpRelay,
)
from nattraverse.rendezvous.registry import Registry

if TYPE_CHECKING:
    from nattraverse.rendezvous.relay import RelayHub
    from nattraverse.rendezvous.udpbind import UdpBindings
    from nattraverse.rendezvous.udprelay import UdpRelayHub

__all__ = [
    "MAX_UNANSWERED",
    "HandshakeLimits",
    "RendezvousStats",
    "ServerConnection",
    "ServerState",
    "canonical",
    "responder",
]

# The namespace of the module these connections were split from: operators'
# log filters keep working.
_log = Logger(namespace="nattraverse.rendezvous.server")

#: Requests of the server (``Introduce``...) a peer may leave unanswered
#: before its connection is closed: a peer that does not read is cut off
#: instead of filling the server's memory.
MAX_UNANSWERED = 64

# Every error class the schema carries, with its AMP code.
_CODES: dict[type[Exception], bytes] = {}
for _command in (Hello, Authenticate, Register, Refresh, Lookup, Connect, Reverse, Relay, UdpRelay):
    _CODES.update(_command.errors)
_CODES.update(RelayJoin.errors)
_INVALID = _CODES[InvalidRequest]


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
    udp_relays: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    internal_errors: int = 0


class HandshakeLimits(Protocol):
    """What a connection reads of the server's limits."""

    @property
    def handshake_timeout(self) -> float:
        """Seconds a connection has to authenticate."""


class ServerState(Protocol):
    """
    What a connection needs of the factory all connections share
    (:class:`~nattraverse.rendezvous.server.RendezvousFactory`).  The
    connections it is handed are the factory's own protocols, which this
    module cannot name: they are typed ``Any``.
    """

    @property
    def reactor(self) -> Any:
        """For time and timers."""

    @property
    def limits(self) -> HandshakeLimits:
        """Caps and timers."""

    @property
    def relay_hub(self) -> RelayHub | None:
        """The relay, or ``None`` when it is off."""

    @property
    def udp_relay_hub(self) -> UdpRelayHub | None:
        """The UDP relay, or ``None`` when it is off."""

    @property
    def access_key(self) -> bytes | None:
        """The key clients must prove they know, if any."""

    @property
    def stun_port(self) -> int:
        """The STUN port told in ``Hello`` (0: none)."""

    @property
    def stun_second_port(self) -> int:
        """The STUN service's second port told in ``Hello`` (0: none)."""

    @property
    def random(self) -> Callable[[int], bytes]:
        """Source of challenges, session ids and secrets."""

    @property
    def registry(self) -> Registry:
        """Registrations and introductions."""

    @property
    def udp_bindings(self) -> UdpBindings:
        """The UDP binding tokens, shared with the STUN service."""

    @property
    def connections(self) -> set[Any]:
        """The open connections."""

    @property
    def stats(self) -> RendezvousStats:
        """The counters."""

    def now(self) -> float:
        """The reactor's time."""

    def disconnected(self, protocol: Any) -> None:
        """*protocol*'s connection is lost."""

    def refused(self, protocol: Any, command: str, error: Exception) -> None:
        """Count and log a refused request."""


class _InternalError(Exception):
    """A responder failed unexpectedly (already logged)."""


def canonical(host: str) -> str:
    """*host*, an IP address, in text; an IPv4-mapped IPv6 address as IPv4."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


_R = TypeVar("_R")


def responder(
    command: type[amp.Command], *, authenticated: bool = True
) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """
    Make a method of a :class:`ServerConnection` subclass the responder of
    *command*: refuse it before ``Authenticate`` (when *authenticated*),
    count and log refusals, and log unexpected exceptions (the connection
    is then closed).
    """
    name = command.commandName.decode("ascii")

    def decorate(method: Callable[..., _R]) -> Callable[..., _R]:
        @functools.wraps(method)
        def respond(self: ServerConnection, **arguments: Any) -> _R:
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
class ServerConnection(LeanAMP):
    """
    One connection to the rendezvous, without its responders.

    :ivar server: What all connections share.
    :ivar peer_id: The peer id this connection proved, once authenticated.
    :ivar observed_host: The address the connection comes from.
    :ivar observed_port: The port it comes from.
    """

    def __init__(self, server: ServerState) -> None:
        # Tens of thousands of these sit idle, so they must stay small:
        # every attribute a connection ever sets is set here, in one order
        # (see nattraverse.rendezvous._lean_amp).
        super().__init__()
        self.server = server
        self.peer_id: PeerId | None = None
        self.observed_host = ""
        self.observed_port = 0
        self._timer: IDelayedCall | None = None
        self._unanswered = 0

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

    def connectionMade(self) -> None:
        server = self.server
        address = self.transport.getPeer()  # type: ignore[union-attr]
        if not isinstance(address, IPv4Address | IPv6Address):
            _log.warn("rendezvous connection from {address} refused: not IP", address=address)
            self._drop("not an IP connection")
            return
        # Interned: peers behind one NAT share one string.
        self.observed_host = sys.intern(canonical(address.host))
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
        # ... nor TCP's exponential backoff hold a lost one back for long.
        mark_thin_stream(transport)
        if pushes(transport):
            # Stop reading while our answers wait in the send buffer: a peer
            # that sends requests and never reads the answers then stalls
            # instead of filling our memory with them.
            transport.registerProducer(transport, True)
        settle_transport(transport)

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

    def _malformed(self, why: str) -> None:
        self.server.stats.malformed += 1
        self._drop(why)

    # -- answers -----------------------------------------------------------

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
