"""
The rendezvous' UDP relay (TURN-like): two introduced peers each latch
their punching UDP socket onto a fresh UDP port of the rendezvous host, and
the relay forwards every other datagram between the two latched sources
(see ``docs/protocol.rst``, "UDP relay").

:class:`UdpRelayHub` allocates a relay per session (:meth:`UdpRelayHub.allocate`,
for the ``UdpRelay`` command): one fresh port and one token per side.  A
side latches with a STUN Binding request (RFC 8489) from its punching
socket to that port, whose USERNAME and MESSAGE-INTEGRITY key are
:func:`~nattraverse.rendezvous.commands.udp_credentials` of its token,
FINGERPRINT included; the relay answers with XOR-MAPPED-ADDRESS (the source
it latched), MESSAGE-INTEGRITY and FINGERPRINT.  Once both sides latched,
every other datagram from a latched source goes, unchanged, to the other
side's latched source: one datagram in, at most one out, never larger.

The caps are those of :class:`~nattraverse.rendezvous.relay.RelayLimits`
(relays at once, bytes per second per direction, lifetime from the
allocation, the time both sides have to latch) plus an idle timeout.
Nothing is kept per source before a latch authenticates.

The decisions are sans-I/O: the hub is handed a :data:`SocketOpener`
(:func:`udp_sockets` binds real ones) and a clock.  The TCP relay ignores
the peers' rendezvous connections once it is allocated, and so does this
one: a relay ends on its own timers, or when the hub closes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import (
    LimitExceeded,
    RelayRefused,
    RendezvousUnavailable,
    StunDecodeError,
    StunIntegrityError,
)
from nattraverse.identity import PeerId
from nattraverse.rendezvous.commands import UDP_TOKEN_SIZE, udp_credentials
from nattraverse.rendezvous.relay import RelayLimits
from nattraverse.rendezvous.splice import TokenBucket
from nattraverse.stun.attributes import Fingerprint, Username, XorMappedAddress
from nattraverse.stun.constants import (
    HEADER_LENGTH,
    MAGIC_COOKIE_BYTES,
    MessageClass,
    Method,
    message_type,
)
from nattraverse.stun.message import Message, decode, encode

__all__ = [
    "UDP_IDLE_TIMEOUT",
    "RelaySocket",
    "SocketOpener",
    "UdpAllocation",
    "UdpRelayHub",
    "UdpRelayStats",
    "udp_sockets",
]

_log = Logger()

#: Seconds a running UDP relay may go without forwarding a datagram.
UDP_IDLE_TIMEOUT = 30.0

#: Largest datagram a relay port reads whole (UDP's own limit).
MAX_DATAGRAM = 65535

CALLER, CALLEE = 0, 1
_ROLES = ("caller", "callee")
_BINDING_REQUEST = message_type(Method.BINDING, MessageClass.REQUEST).to_bytes(2, "big")


class RelaySocket(Protocol):
    """One relay's UDP socket, as the hub sees it."""

    @property
    def port(self) -> int:
        """The local port number."""

    def send(self, data: bytes, destination: Endpoint) -> None:
        """Send one datagram (errors are the socket's to swallow)."""

    def close(self) -> defer.Deferred[None] | None:
        """Stop listening; a Deferred that fires once closed, if it takes time."""


#: Opens a fresh socket whose every datagram is handed to the callback
#: with its source.  May raise :class:`OSError` or
#: :class:`~twisted.internet.error.CannotListenError`.
SocketOpener = Callable[[Callable[[bytes, Endpoint], None]], RelaySocket]


@dataclass(frozen=True)
class UdpAllocation:
    """
    A UDP relay just allocated.

    :ivar port: Its UDP port on the rendezvous host.
    :ivar caller_token: The caller's latch token
        (:data:`~nattraverse.rendezvous.commands.UDP_TOKEN_SIZE` bytes).
    :ivar callee_token: The callee's.
    :ivar lifetime: Seconds it lives from now.
    """

    port: int
    caller_token: bytes
    callee_token: bytes
    lifetime: float

    def __repr__(self) -> str:
        return f"UdpAllocation(port={self.port}, lifetime={self.lifetime})"


@dataclass(slots=True)
class UdpRelayStats:
    """
    Counters of a :class:`UdpRelayHub`, over all its relays, ended or not.

    :ivar allocated: Relays allocated.
    :ivar started: Relays both sides latched onto.
    :ivar ended: Relays ended (their ports closed).
    :ivar latches: Authentic latch requests answered (retransmissions and
        rebindings included).
    :ivar rebindings: Latches that moved a side to a new source.
    :ivar latch_failures: Latch requests naming a side whose integrity or
        FINGERPRINT failed (dropped, not answered).
    :ivar datagrams: Datagrams forwarded, both directions.
    :ivar bytes: Bytes forwarded, both directions.
    :ivar dropped_unlatched: Datagrams from sources no side latched.
    :ivar dropped_early: Datagrams from a latched side before the other
        side latched.
    :ivar dropped_rate: Datagrams over the rate cap.
    :ivar dropped_conflict: Latches for one side from the source the other
        side latched.
    """

    allocated: int = 0
    started: int = 0
    ended: int = 0
    latches: int = 0
    rebindings: int = 0
    latch_failures: int = 0
    datagrams: int = 0
    bytes: int = 0
    dropped_unlatched: int = 0
    dropped_early: int = 0
    dropped_rate: int = 0
    dropped_conflict: int = 0


class UdpRelayHub:
    """
    The UDP relays of one rendezvous server.

    :param reactor: For time and timers.
    :param limits: The caps, shared with the TCP relay's settings (but
        counted on their own: *max_relays* UDP relays at once).
    :param open_socket: Opens each relay's fresh UDP port.
    :param idle_timeout: Seconds a running relay may go without forwarding
        a datagram before it closes.
    :param random: Source of the tokens.
    :raises ValueError: when *idle_timeout* is not above 0.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        limits: RelayLimits,
        open_socket: SocketOpener,
        *,
        idle_timeout: float = UDP_IDLE_TIMEOUT,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not 0 < idle_timeout < float("inf"):
            raise ValueError(
                f"idle_timeout must be a number of seconds above 0, not {idle_timeout}"
            )
        self._reactor = reactor
        self._limits = limits
        self._open_socket = open_socket
        self.idle_timeout = float(idle_timeout)
        self._random = random
        self._relays: dict[bytes, _UdpRelay] = {}
        self._closing: list[defer.Deferred[None]] = []
        self.stats = UdpRelayStats()

    @property
    def limits(self) -> RelayLimits:
        """The caps this hub enforces."""
        return self._limits

    @property
    def lifetime(self) -> float:
        """Seconds a relay lives from its allocation."""
        return float(self._limits.lifetime)

    @property
    def pending(self) -> int:
        """Relays allocated that both sides have not latched onto yet."""
        return sum(1 for relay in self._relays.values() if not relay.started)

    @property
    def active(self) -> int:
        """Relays both sides latched onto."""
        return sum(1 for relay in self._relays.values() if relay.started)

    def __len__(self) -> int:
        """Relays at once (pending and active)."""
        return len(self._relays)

    def allocate(self, session: bytes, caller: PeerId, callee: PeerId) -> UdpAllocation:
        """
        Allocate a UDP relay for *session* between *caller* and *callee*:
        open a fresh port and draw one token per side.

        :raises RelayRefused: when *session* already has a UDP relay.
        :raises LimitExceeded: when *max_relays* UDP relays are live.
        :raises RendezvousUnavailable: when no UDP port can be opened.
        """
        if session in self._relays:
            raise RelayRefused("this session already has a UDP relay; use the port it was given")
        if len(self._relays) >= self._limits.max_relays:
            raise LimitExceeded(
                f"the UDP relay is full ({self._limits.max_relays} relays at once); try again later"
            )
        tokens = (self._fresh_token(), self._fresh_token())
        for _ in range(8):
            if udp_credentials(tokens[0])[0] != udp_credentials(tokens[1])[0]:
                break
            tokens = (tokens[0], self._fresh_token())
        else:
            raise RuntimeError("the random source keeps repeating itself")
        relay = _UdpRelay(self, session, (caller, callee), tokens)
        try:
            relay.socket = self._open_socket(relay.received)
        except (OSError, CannotListenError) as e:
            _log.warn(
                "no UDP port for the relay of session {session}: {error}",
                session=session.hex(),
                error=str(e),
            )
            raise RendezvousUnavailable(
                "the rendezvous cannot open a UDP port for a relay now; try again later"
            ) from None
        reactor = self._reactor
        relay.allocated_at = reactor.seconds()
        relay.join_call = reactor.callLater(self._limits.join_timeout, relay.join_expired)
        relay.life_call = reactor.callLater(self._limits.lifetime, relay.lifetime_over)
        self._relays[session] = relay
        self.stats.allocated += 1
        port = relay.socket.port
        _log.info(
            "UDP relay {session} allocated on port {port} for {caller} and {callee}",
            session=session.hex(),
            port=port,
            caller=str(caller),
            callee=str(callee),
        )
        return UdpAllocation(port, tokens[CALLER], tokens[CALLEE], self.lifetime)

    def _fresh_token(self) -> bytes:
        token = self._random(UDP_TOKEN_SIZE)
        if len(token) != UDP_TOKEN_SIZE:
            raise ValueError(f"random source gave {len(token)} bytes, not {UDP_TOKEN_SIZE}")
        return bytes(token)

    def release(self, session: bytes, why: str) -> bool:
        """
        End the UDP relay of *session* now (its offer could not be sent...).

        :returns: Whether there was one.
        """
        relay = self._relays.get(session)
        if relay is None:
            return False
        relay.end(why)
        return True

    def close(self) -> defer.Deferred[None]:
        """
        End every relay, running or waiting: close their ports, cancel
        their timers.

        :returns: A Deferred that fires once every port is closed.
        """
        for relay in list(self._relays.values()):
            relay.end("the relay is shutting down")
        closing, self._closing = self._closing, []
        return defer.gatherResults(closing).addCallback(lambda _: None)

    def _ended(self, relay: _UdpRelay, closing: defer.Deferred[None] | None) -> None:
        if self._relays.get(relay.session) is relay:
            del self._relays[relay.session]
        self.stats.ended += 1
        if closing is not None and not closing.called:
            self._closing.append(closing)
            closing.addBoth(self._closed, closing)

    def _closed(self, result: object, closing: defer.Deferred[None]) -> None:
        with contextlib.suppress(ValueError):
            self._closing.remove(closing)
        if isinstance(result, Failure):
            _log.failure("a UDP relay port failed to close", result)


class _UdpRelay:
    """
    One UDP relay: its port, its two sides' credentials and latched
    sources, its rate buckets, its counters and its timers.
    """

    def __init__(
        self,
        hub: UdpRelayHub,
        session: bytes,
        peers: tuple[PeerId, PeerId],
        tokens: tuple[bytes, bytes],
    ) -> None:
        self.hub = hub
        self.session = session
        self.peers = peers
        credentials = [udp_credentials(token) for token in tokens]
        self.usernames = {username: side for side, (username, _) in enumerate(credentials)}
        self.keys = [key for _, key in credentials]
        self.socket: RelaySocket | None = None
        self.latched: list[Endpoint | None] = [None, None]
        now = hub._reactor.seconds()
        self.buckets = [TokenBucket.for_rate(hub._limits.rate, now) for _ in (CALLER, CALLEE)]
        self.datagrams = [0, 0]
        self.bytes = [0, 0]
        self.dropped = 0
        self.allocated_at = now
        self.last_forward = now
        self.started = False
        self.ended = False
        self.join_call: IDelayedCall | None = None
        self.life_call: IDelayedCall | None = None
        self.idle_call: IDelayedCall | None = None

    # -- datagrams ---------------------------------------------------------

    def received(self, data: bytes, source: Endpoint) -> None:
        """One datagram from *source* reached the relay's port."""
        if self.ended:
            return
        stats = self.hub.stats
        latch = self._latch_request(data)
        if latch is not None:
            side, message = latch
            if message is not None:
                self._latch(side, source, data, message)
                return
            stats.latch_failures += 1
            self.dropped += 1
            return
        if source == self.latched[CALLER]:
            side = CALLER
        elif source == self.latched[CALLEE]:
            side = CALLEE
        else:
            stats.dropped_unlatched += 1
            self.dropped += 1
            return
        destination = self.latched[1 - side]
        if destination is None:
            stats.dropped_early += 1
            self.dropped += 1
            return
        now = self.hub._reactor.seconds()
        bucket = self.buckets[side]
        if bucket is not None:
            if bucket.allowance(now) < len(data):
                stats.dropped_rate += 1
                self.dropped += 1
                return
            bucket.take(len(data), now)
        self.datagrams[side] += 1
        self.bytes[side] += len(data)
        stats.datagrams += 1
        stats.bytes += len(data)
        self.last_forward = now
        assert self.socket is not None
        self.socket.send(data, destination)

    def _latch_request(self, data: bytes) -> tuple[int, Message | None] | None:
        """
        ``None`` when *data* is not a latch request of this relay (it is
        then forwarded or dropped like any datagram); else its side and the
        decoded request when it is authentic, ``None`` in its place when
        its integrity or FINGERPRINT fails.
        """
        if (
            len(data) < HEADER_LENGTH
            or data[:2] != _BINDING_REQUEST
            or data[4:8] != MAGIC_COOKIE_BYTES
        ):
            return None
        try:
            message = decode(data)
        except StunDecodeError:
            # A FINGERPRINT that fails: not STUN, or not ours.
            return None
        username = message.get(Username)
        side = self.usernames.get(username.value) if username is not None else None
        if side is None:
            return None
        if message.get(Fingerprint) is None:
            return side, None
        try:
            message.check_integrity(self.keys[side])
        except StunIntegrityError:
            return side, None
        return side, message

    def _latch(self, side: int, source: Endpoint, data: bytes, message: Message) -> None:
        stats = self.hub.stats
        other = self.latched[1 - side]
        if source == other:
            stats.dropped_conflict += 1
            self.dropped += 1
            return
        previous = self.latched[side]
        reply = encode(
            Method.BINDING,
            MessageClass.SUCCESS,
            message.transaction_id,
            [XorMappedAddress(source)],
            integrity_key=self.keys[side],
            fingerprint=True,
        )
        if len(reply) > len(data):  # never amplify (cannot happen: USERNAME is longer)
            self.dropped += 1
            return
        stats.latches += 1
        if previous != source:
            self.latched[side] = source
            if previous is not None:
                stats.rebindings += 1
            _log.info(
                "UDP relay {session}: the {role} latched from {source}{moved}",
                session=self.session.hex(),
                role=_ROLES[side],
                source=str(source),
                moved=f" (was {previous})" if previous is not None else "",
            )
        assert self.socket is not None
        self.socket.send(reply, source)
        if not self.started and all(self.latched):
            self._start()

    # -- life cycle ---------------------------------------------------------

    def _start(self) -> None:
        self.started = True
        hub = self.hub
        _cancel(self.join_call)
        self.join_call = None
        hub.stats.started += 1
        self.last_forward = hub._reactor.seconds()
        self.idle_call = hub._reactor.callLater(hub.idle_timeout, self._idle_check)
        _log.info(
            "UDP relay {session} started: {caller} at {caller_source} <-> {callee} at "
            "{callee_source}",
            session=self.session.hex(),
            caller=str(self.peers[CALLER]),
            callee=str(self.peers[CALLEE]),
            caller_source=str(self.latched[CALLER]),
            callee_source=str(self.latched[CALLEE]),
        )

    def join_expired(self) -> None:
        self.join_call = None
        latched = sum(1 for source in self.latched if source is not None)
        self.end(f"{latched} of 2 sides latched within {self.hub._limits.join_timeout}s")

    def lifetime_over(self) -> None:
        self.life_call = None
        self.end(f"its lifetime of {self.hub._limits.lifetime}s is over")

    def _idle_check(self) -> None:
        self.idle_call = None
        reactor = self.hub._reactor
        remaining = self.last_forward + self.hub.idle_timeout - reactor.seconds()
        if remaining > 0:
            self.idle_call = reactor.callLater(remaining, self._idle_check)
            return
        self.end(f"no datagram forwarded for {self.hub.idle_timeout}s")

    def end(self, why: str) -> None:
        """Close the port, cancel every timer, log what the relay did."""
        if self.ended:
            return
        self.ended = True
        for call in (self.join_call, self.life_call, self.idle_call):
            _cancel(call)
        self.join_call = self.life_call = self.idle_call = None
        socket, self.socket = self.socket, None
        closing = socket.close() if socket is not None else None
        _log.info(
            "UDP relay {session} ended ({why}) after {duration:.3f}s: caller at {caller_source}, "
            "callee at {callee_source}; {caller_to_callee} bytes in {caller_datagrams} datagrams "
            "caller to callee, {callee_to_caller} bytes in {callee_datagrams} datagrams callee "
            "to caller, {dropped} dropped",
            session=self.session.hex(),
            why=why,
            duration=self.hub._reactor.seconds() - self.allocated_at,
            caller_source=str(self.latched[CALLER]) if self.latched[CALLER] else "-",
            callee_source=str(self.latched[CALLEE]) if self.latched[CALLEE] else "-",
            caller_to_callee=self.bytes[CALLER],
            callee_to_caller=self.bytes[CALLEE],
            caller_datagrams=self.datagrams[CALLER],
            callee_datagrams=self.datagrams[CALLEE],
            dropped=self.dropped,
        )
        self.hub._ended(self, closing)


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


# -- real sockets -------------------------------------------------------------


class _RelayDatagramProtocol(DatagramProtocol):
    """Hands each datagram of a relay port to its relay."""

    noisy = False

    def __init__(self, receive: Callable[[bytes, Endpoint], None]) -> None:
        self._receive = receive

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._receive(datagram, Endpoint(addr[0], addr[1]))


class _ListeningSocket:
    """A :class:`RelaySocket` on a Twisted UDP port."""

    def __init__(self, listening: Any, protocol: _RelayDatagramProtocol) -> None:
        self._listening = listening
        self._protocol = protocol
        self._port = int(listening.getHost().port)

    @property
    def port(self) -> int:
        return self._port

    def send(self, data: bytes, destination: Endpoint) -> None:
        transport = self._protocol.transport
        if transport is None:
            return
        try:
            transport.write(data, (destination.host, destination.port))
        except (OSError, MessageLengthError) as e:
            # UDP: a datagram the kernel refuses is a datagram lost.
            _log.debug(
                "UDP relay datagram to {destination} not sent: {error}",
                destination=str(destination),
                error=str(e),
            )

    def close(self) -> defer.Deferred[None] | None:
        result = self._listening.stopListening()
        return result if isinstance(result, defer.Deferred) else None


def udp_sockets(reactor: Any, interface: str) -> SocketOpener:
    """
    The :data:`SocketOpener` of real relay ports: each a fresh UDP port of
    *interface* (the STUN service's primary address), any free number.
    """

    def open_socket(receive: Callable[[bytes, Endpoint], None]) -> RelaySocket:
        protocol = _RelayDatagramProtocol(receive)
        listening = reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM)
        return _ListeningSocket(listening, protocol)

    return open_socket
