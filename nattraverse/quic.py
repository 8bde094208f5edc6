"""
The secured path over UDP (DESIGN section 3, step 6): QUIC (RFC 9000) with
TLS 1.3 (RFC 9001) on a punched UDP path, both certificates pinned to peer
ids, and one stream handed to the application as a Twisted transport.

aioquic's sans-I/O :class:`~aioquic.quic.connection.QuicConnection` does
the protocol; :class:`QuicPath` drives it: datagrams in through
:meth:`QuicPath.datagram_received` (the owner of the socket demultiplexes
with :func:`is_quic`), datagrams out through the ``send`` callable, and
every timer (QUIC's loss detection and idle timeout, the keepalive PINGs,
the handshake deadline) in one :class:`~twisted.internet.interfaces.IDelayedCall`
on the injected reactor.

**Pinning, both ways, in the TLS handshake.**  The caller is the QUIC
client, the callee the server; both present their identity's self-signed
certificate, and TLS 1.3's CertificateVerify proves each holds the key.
aioquic has no public switch for client certificates, but implements them
(its server sends a CertificateRequest when ``Context._request_client_certificate``
is set, its client answers it, and its server checks the client's
CertificateVerify): :class:`~nattraverse._quic_stream._PinnedConnection`
sets that switch, and reads the peer's certificate after the handshake.
Chain checks are off on both sides (``verify_mode=CERT_NONE``): as over
TCP (:mod:`nattraverse._tls`), the pin to the peer id is the whole trust
decision: the key of the peer's certificate must hash to the expected
:class:`~nattraverse.identity.PeerId`.  A peer that sends no certificate
fails.  This was chosen over a signed proof on the first stream because it
is standard TLS 1.3 mutual authentication, bound to the handshake by TLS
itself, and costs no extra round trip; the price is two private aioquic
attributes, kept in one class and failing closed.

**Selection.**  As over TCP (:mod:`nattraverse.secure`): the caller
:meth:`~QuicPath.select`\\ s the path by sending :data:`SELECTION_BYTE` on
the first bidirectional stream, which becomes the application's; the
callee's :attr:`~QuicPath.authenticated` fires when that byte follows a
pinned handshake, then it :meth:`~QuicPath.attach`\\ es.  No application
byte moves before both pins held.

**Moving.**  :meth:`QuicPath.move` sends the path's datagrams to another
address (and, with *send*, through another socket), as the connectivity
checks validated it: a connection made through the rendezvous' UDP relay
moves to a direct path (issue 7's upgrade).  aioquic is never told: it
keeps the first address as the peer's, and every datagram is fed to it
under that address, so its migration logic (which would validate the new
path again) stays out of the way; the checks, authenticated with the
session's keys, already proved the new path both ways, and every QUIC
packet is authenticated by QUIC itself.  Datagrams from the former
addresses are still taken (those in flight through the relay), never sent
to.  RTT and congestion estimates adapt to the new path within a few round
trips.

**Liveness.**  The QUIC idle timeout (25 s by default, at most 30 s) with
a PING every ``keepalive`` seconds (8 s by default): a dead path ends with
``connectionLost(`` :class:`QuicPathIdle` ``)``.  ALPN is ``"nattraverse"``.

**Closing.**  The side that closes answers every datagram of the peer with
its CONNECTION_CLOSE again until :data:`CLOSE_LINGER` seconds pass without
one (RFC 9000 section 10.2.1), so a lost close does not leave the peer
waiting for its idle timeout; a peer that still hears nothing, once the
stream has ended both ways, ends with ``ConnectionDone`` all the same.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal, cast

from aioquic._buffer import Buffer, BufferReadError
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header
from cryptography import x509
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IPullProducer,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from nattraverse._quic_stream import (
    QuicStreamTransport,
    _address,
    _PinnedConnection,
    check_pin,
)
from nattraverse.errors import PeerAuthenticationFailed, QuicPathClosed, QuicPathIdle
from nattraverse.identity import Identity, PeerId

if TYPE_CHECKING:
    from nattraverse.report import ConnectionReport
    from nattraverse.secure import PathSecrets

__all__ = [
    "ALPN",
    "SELECTION_BYTE",
    "QuicPath",
    "QuicPathClosed",
    "QuicPathIdle",
    "QuicStreamTransport",
    "is_quic",
]

_log = Logger()

#: The ALPN protocol both sides offer and require.
ALPN: Final = "nattraverse"
#: What the caller sends first on the stream it picks.
SELECTION_BYTE: Final = b"\x01"
#: Seconds without a datagram, while packets await acknowledgement, before a
#: PING probes the path (see ``QuicPath._stall_probe_at``).
STALL_PROBE: Final = 1.0
#: Seconds a closing side keeps answering the peer after its last datagram
#: (see ``_PinnedConnection.receive_datagram``): a few stall probes' worth.
CLOSE_LINGER: Final = 3 * STALL_PROBE
#: The longest idle timeout allowed: a dead path is reported within it.
MAX_IDLE_TIMEOUT: Final = 30.0
#: Seconds added to the time aioquic's timer is handled at (see ``_fire``).
TIMER_SLACK: Final = 1e-6
#: Application error code of abortConnection (RFC 9000 section 20.2).
ABORT_CODE: Final = 0x1
#: The QUIC error a pin failure closes with: the TLS alert bad_certificate (RFC 9001 section 4.8).
_BAD_CERTIFICATE: Final = QuicErrorCode.CRYPTO_ERROR + 42

Role = Literal["caller", "callee"]
Address = tuple[str, int]


def is_quic(datagram: bytes) -> bool:
    """
    Whether *datagram* is QUIC rather than STUN: every QUIC packet has the
    fixed bit (``0x40``) set in its first byte (RFC 9000 section 17), every
    STUN message starts with two zero bits (RFC 8489 section 5).
    """
    return bool(datagram) and bool(datagram[0] & 0x40)


def is_initial(datagram: bytes) -> bool:
    """
    Whether *datagram* starts with a QUIC version 1 Initial packet: a long
    header (``0x80``) of type 0 (bits ``0x30``; RFC 9000 section 17.2.2).
    """
    return bool(datagram) and datagram[0] & 0xB0 == 0x80


def short_header_packet(datagram: bytes) -> bytes | None:
    """
    The 1-RTT packet (short header, RFC 9000 section 17.3) of *datagram*:
    the datagram itself, or the last of its coalesced packets (section
    12.2, as a Handshake flight and the first 1-RTT packet travel);
    ``None`` when it has none or cannot be parsed.
    """
    rest = datagram
    while rest and rest[0] & 0x80:
        try:
            # Long headers carry their lengths: the host's id length does not matter.
            header = pull_quic_header(Buffer(data=rest), host_cid_length=8)
        except (ValueError, BufferReadError):
            return None
        rest = rest[header.packet_length :]
    return rest or None


class QuicPath:
    """
    One QUIC connection on a UDP path, pinned both ways, carrying one stream.

    :param reactor: Runs the timer.
    :param identity: This peer's key and certificate.
    :param role: ``"caller"`` (QUIC client) or ``"callee"`` (QUIC server).
    :param expected: The peer id the rendezvous vouched for.
    :param send: ``send(datagram, address)``: write one datagram on the
        path's socket.
    :param remote: The peer's address; datagrams from elsewhere are dropped
        (until :meth:`move`).
    :param local: This side's address, for ``getHost``.
    :param method: The traversal method, for the transport (``"udp"``).
    :param session: The introduction's session id, for the transport.
    :param secrets: The path's :class:`~nattraverse.secure.PathSecrets`,
        kept as :attr:`secrets` for the endpoints (which read the session
        and method from it); ``None`` outside a ``punch:`` endpoint.
    :param idle_timeout: Seconds without a packet before the path is
        declared dead (at most :data:`MAX_IDLE_TIMEOUT`).
    :param keepalive: Seconds between PINGs once authenticated; ``None``
        for none.
    :param handshake_timeout: Seconds from :meth:`start` to
        :attr:`authenticated`.
    :param write_buffer: Unacknowledged bytes above which a registered
        producer is paused (it resumes below a quarter of that).
    :param max_stream_data: Initial stream receive window, in bytes.
    :param relayed: Whether *remote* is the rendezvous' UDP relay rather
        than the peer itself (see :attr:`relayed`).
    :param initial_rtt: The path's round trip as the connectivity checks
        measured it, in seconds: QUIC's loss timers and pacing start from
        it instead of a guess (aioquic's 100 ms paces the first flights
        ~10 ms a datagram apart).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        identity: Identity,
        role: Role,
        expected: PeerId,
        send: Callable[[bytes, Address], object],
        remote: Address,
        *,
        local: Address = ("0.0.0.0", 0),
        method: str = "udp",
        session: bytes = b"",
        secrets: PathSecrets | None = None,
        idle_timeout: float = 25.0,
        keepalive: float | None = 8.0,
        handshake_timeout: float = 10.0,
        write_buffer: int = 256 * 1024,
        max_stream_data: int = 1024 * 1024,
        initial_rtt: float | None = None,
        relayed: bool = False,
    ) -> None:
        if role not in ("caller", "callee"):
            raise ValueError(f"role is 'caller' or 'callee', not {role!r}")
        if not 0 < idle_timeout <= MAX_IDLE_TIMEOUT:
            raise ValueError(
                f"idle_timeout must be in (0, {MAX_IDLE_TIMEOUT:g}], not {idle_timeout}"
            )
        if keepalive is not None and not 0 < keepalive < idle_timeout:
            raise ValueError(f"keepalive must be in (0, idle_timeout), not {keepalive}")
        if not handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be positive, not {handshake_timeout}")
        self._reactor = reactor
        self.role: Role = role
        self.expected = expected
        self._send = send
        #: Where datagrams go now (see :meth:`move`).
        self.remote = remote
        #: Whether they go through the rendezvous' UDP relay.
        self.relayed = relayed
        #: The address aioquic knows the peer by, whatever :attr:`remote` is.
        self._quic_address = remote
        #: Addresses the path was moved away from: still heard, never sent to.
        self._former: set[Address] = set()
        #: Called with this path, its former and its new address after each :meth:`move`.
        self.on_moved: list[Callable[[QuicPath, Address, Address], object]] = []
        self.local = local
        self.method = method
        self.session = session
        self._secrets = secrets
        #: Called with this path once its connection has ended, whatever the reason.
        self.on_terminated: list[Callable[[QuicPath], object]] = []
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self._handshake_timeout = handshake_timeout
        self._write_high = write_buffer
        self._write_low = write_buffer // 4
        configuration = QuicConfiguration(
            is_client=role == "caller",
            alpn_protocols=[ALPN],
            idle_timeout=idle_timeout,
            verify_mode=ssl.CERT_NONE,
            max_stream_data=max_stream_data,
            max_data=max(max_stream_data, 1024 * 1024) * 2,
        )
        if initial_rtt is not None:
            configuration.initial_rtt = min(max(initial_rtt, 0.001), 1.0)
        configuration.certificate = identity.certificate
        configuration.private_key = identity.private_key
        self._configuration = configuration
        # The server's connection needs the client's first destination id.
        self._connection: _PinnedConnection | None = (
            self._new_connection() if role == "caller" else None
        )
        #: Fires with this path once the peer is proved; see the module docstring.
        self.authenticated: defer.Deferred[QuicPath] = defer.Deferred(self._cancel)
        #: The peer's certificate, once pinned.
        self.peer_certificate: x509.Certificate | None = None
        self.dropped = 0  # datagrams from addresses other than remote
        self._started = False
        self._settled = False
        self._pinned = False
        self._selected = False
        self._stream_id: int | None = None
        self._timer: IDelayedCall | None = None
        self._handshake_deadline: float | None = None
        self._next_ping: float | None = None
        self._ping_uid = 0
        #: When the last datagram arrived, and the last stall probe left.
        self._last_received = 0.0
        self._last_probe = 0.0
        self._refusal: PeerAuthenticationFailed | None = None
        self._local_reason: Failure | None = None
        self._terminated = False
        self._disconnecting = False
        self._lose_requested = False
        self._fin_sent = False
        self._peer_fin = False
        self._peer_fin_told = False
        self._pending: deque[bytes] = deque()
        self._paused = False
        self._app: IProtocol | None = None
        self._transport: QuicStreamTransport | None = None
        self._lost: Failure | None = None
        self._checking = False

    @property
    def secrets(self) -> PathSecrets:
        """
        The path's secrets, as given.

        :raises RuntimeError: when the path was made without them.
        """
        if self._secrets is None:
            raise RuntimeError("this QUIC path was made without secrets=")
        return self._secrets

    @property
    def terminated(self) -> bool:
        """Whether the QUIC connection has ended."""
        return self._terminated

    @property
    def _quic(self) -> _PinnedConnection:
        assert self._connection is not None, "no QUIC packet has come yet"
        return self._connection

    def __repr__(self) -> str:
        return f"<QuicPath {self.role} to {self.expected} at {self.remote}>"

    # -- driving aioquic ----------------------------------------------------------

    def start(self) -> None:
        """Start the handshake deadline; the caller sends its Initial packet."""
        if self._started:
            raise RuntimeError("the path is already started")
        self._started = True
        now = self._reactor.seconds()
        self._handshake_deadline = now + self._handshake_timeout
        self._last_probe = now  # the first stall probe, a second after the Initial
        if self.role == "caller":
            self._quic.connect(self._quic_address, now=now)
        self._flush()

    def datagram_received(self, data: bytes, address: Address) -> None:
        """Feed one QUIC datagram from the path's socket."""
        if self._terminated or not self._started:
            return
        source = (address[0], address[1])
        if source != (self.remote[0], self.remote[1]) and source not in self._former:
            self.dropped += 1
            return
        if self._connection is None:
            try:
                header = pull_quic_header(
                    Buffer(data=data), host_cid_length=self._configuration.connection_id_length
                )
            except (ValueError, BufferReadError):
                self.dropped += 1
                return
            if header.packet_type != QuicPacketType.INITIAL:
                self.dropped += 1
                return
            self._connection = self._new_connection(header.destination_cid)
        self._last_received = self._reactor.seconds()
        self._quic.receive_datagram(data, self._quic_address, now=self._last_received)
        self._flush()

    def move(
        self,
        remote: Address,
        send: Callable[[bytes, Address], object] | None = None,
        *,
        relayed: bool = False,
    ) -> None:
        """
        Send from now on to *remote* (through *send*, when given: another
        socket), an address the connectivity checks validated both ways;
        keep taking datagrams from the former address.  The application
        sees nothing but the transport's new :meth:`~QuicStreamTransport.getPeer`.
        Each function of :attr:`on_moved` is called; the move is logged.

        :raises RuntimeError: when the connection has ended.
        """
        if self._terminated:
            raise RuntimeError("the QUIC connection has ended; it cannot move")
        old = (self.remote[0], self.remote[1])
        new = (remote[0], remote[1])
        if new == old and send is None:
            return
        self._former.add(old)
        self._former.discard(new)
        was_relayed = self.relayed
        self.remote = new
        self.relayed = relayed
        if send is not None:
            self._send = send
        if self._transport is not None:
            self._transport._moved(new)
        _log.info(
            "QUIC path to {peer} moved from {old} ({old_kind}) to {new} ({new_kind})",
            peer=self.expected,
            old=_address(old),
            old_kind="relayed" if was_relayed else "direct",
            new=_address(new),
            new_kind="relayed" if relayed else "direct",
        )
        for moved in list(self.on_moved):
            moved(self, old, new)
        self._flush()  # what waited goes out on the new path at once

    def accepts(self, datagram: bytes) -> bool:
        """
        Whether *datagram* (QUIC) may belong to this connection: an Initial
        packet (aioquic sorts them out), or any other addressed to one of
        its connection ids.  Tells this connection's packets from another's
        that come from the same address (a direct handshake the relayed
        connection replaced, whose peer did not hear it was dropped).
        """
        if self._connection is None or is_initial(datagram):
            return True
        if not datagram[0] & 0x80:
            return self._connection.owns_destination(datagram)
        try:
            header = pull_quic_header(
                Buffer(data=datagram), host_cid_length=self._configuration.connection_id_length
            )
        except (ValueError, BufferReadError):
            return False
        return self._connection.owns_cid(header.destination_cid)

    def _new_connection(self, original_destination: bytes | None = None) -> _PinnedConnection:
        connection = _PinnedConnection(
            configuration=self._configuration,
            original_destination_connection_id=original_destination,
        )
        connection.close_linger = CLOSE_LINGER
        connection.close_linger_limit = self.idle_timeout
        return connection

    def _flush(self, now: float | None = None) -> None:
        """
        Handle aioquic's events, send its datagrams (as of *now*, by default
        the reactor's time), re-arm the timer.
        """
        if self._connection is None:
            self._arm()
            return
        self._handle_events()
        if not self._terminated:
            when = self._reactor.seconds() if now is None else now
            for datagram, _ in self._quic.datagrams_to_send(now=when):
                self._send(datagram, self.remote)
            self._handle_events()  # sending may end a closing period
        self._check_producer()
        self._maybe_finish()
        self._arm()

    def _arm(self) -> None:
        if self._terminated:
            self._cancel_timer()
            return
        connection = self._connection
        deadlines = [
            t
            for t in (
                connection.get_timer() if connection is not None else None,
                self._handshake_deadline,
                None if connection is not None and connection.ending() else self._next_ping,
                self._stall_probe_at(),
            )
            if t is not None
        ]
        if not deadlines:
            self._cancel_timer()
            return
        delay = max(0.0, min(deadlines) - self._reactor.seconds())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._reactor.callLater(delay, self._fire)

    def _stall_probe_at(self) -> float | None:
        """
        When to send a stall probe: :data:`STALL_PROBE` seconds after the
        last datagram arrived (or the last probe left) while packets await
        acknowledgement, the handshake included.

        aioquic's own probe timeout doubles at each loss without limit; at
        half the packets lost a few probes lost in a row left a path silent
        for longer than the idle timeout.  The probe resends what the peer
        has not acknowledged (the handshake's CRYPTO data first, see
        ``_PinnedConnection.probe``) and is ack-eliciting: its ACK resets
        that backoff and lets loss detection resend the rest, so the gap
        between tries stays bounded (as TCP bounds its RTO).  In a simulation
        at 59% loss each way, 11 handshakes of 200 ended in the idle timeout
        while the probe waited for the handshake to end and sent a bare PING.
        """
        if self._terminated or self._connection is None or self._connection.ending():
            return None
        if not self._connection.in_flight():
            return None
        return max(self._last_received, self._last_probe) + STALL_PROBE

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            self._handshake_deadline = None
            self._fail(
                Failure(
                    defer.TimeoutError(
                        f"the QUIC path was not secured within {self._handshake_timeout:g} s"
                    )
                )
            )
            self._close(QuicErrorCode.CONNECTION_REFUSED, "handshake timeout")
            return
        closing = self._connection is not None and self._connection.ending()
        if self._connection is not None and not closing:
            # Whatever this timer makes us send (a probe, a keepalive, paced
            # data) repeats the acknowledgements, so a lost ACK cannot leave
            # the peer backing off for minutes.
            self._connection.repeat_acknowledgements(now)
        stall = self._stall_probe_at()
        if stall is not None and now >= stall:
            self._last_probe = now
            self._quic.probe(now)
        if self._next_ping is not None and now >= self._next_ping and not closing:
            self._ping_uid += 1
            self._quic.send_ping(self._ping_uid)
            assert self.keepalive is not None
            self._next_ping = now + self.keepalive
        timer = self._connection.get_timer() if self._connection is not None else None
        if timer is not None and now >= timer:
            # A microsecond of slack: aioquic declares a packet lost when
            # ``sent + delay <= now``, which rounding can keep false at the
            # very time it armed the timer for, and the timer would fire
            # again at once, forever on an exact (simulated) clock.
            self._quic.handle_timer(now=now + TIMER_SLACK)
        # Sent as of the same instant: an ACK due at *now* goes out even
        # while pacing holds data back (aioquic lets an ACK pass the pacer
        # only once it is overdue), instead of the timer firing again at
        # once, forever on an exact clock.
        self._flush(now + TIMER_SLACK)

    def _close(self, code: int, reason: str) -> None:
        if self._terminated:
            return
        if self._connection is None:
            self._terminate(None)  # nothing received: nothing to tell
            return
        self._quic.close(error_code=code, reason_phrase=reason)
        self._flush()

    # -- events -------------------------------------------------------------------

    def _handle_events(self) -> None:
        while (event := self._quic.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                self._handshake_completed(event)
            elif isinstance(event, events.StreamDataReceived):
                self._stream_data(event)
            elif isinstance(event, events.StreamReset):
                if event.stream_id == self._stream_id:
                    self._local_reason = self._local_reason or Failure(
                        QuicPathClosed(
                            f"the peer reset the stream (code {event.error_code})",
                            event.error_code,
                        )
                    )
                    self._close(QuicErrorCode.NO_ERROR, "stream reset")
            elif isinstance(event, events.ConnectionTerminated):
                self._terminate(event)
                return

    def _handshake_completed(self, event: events.HandshakeCompleted) -> None:
        try:
            certificate = check_pin(
                event.alpn_protocol, ALPN, self._quic.peer_certificate(), self.expected
            )
        except PeerAuthenticationFailed as e:
            self._refusal = e
            self._fail(Failure(e))
            self._close(_BAD_CERTIFICATE, "peer authentication failed")
            return
        self.peer_certificate = certificate
        self._pinned = True
        if self.role == "caller":
            self._succeed()

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        if not self._pinned:
            return
        data = event.data
        if self._stream_id is None:
            if self.role == "caller" or event.stream_id % 4 != 0:
                self._quic.reset_stream(event.stream_id, ABORT_CODE)
                return
            self._stream_id = event.stream_id
        if event.stream_id != self._stream_id:
            return
        if self.role == "callee" and not self._selected:
            if not data and not event.end_stream:
                return
            if data[:1] != SELECTION_BYTE:
                refusal = PeerAuthenticationFailed(
                    f"the caller sent {data[:1]!r} instead of the selection byte", self.expected
                )
                self._fail(Failure(refusal))
                self._close(QuicErrorCode.PROTOCOL_VIOLATION, "no selection byte")
                return
            self._selected = True
            data = data[1:]
            self._succeed()
        if data:
            self._pending.append(data)
        if event.end_stream:
            self._peer_fin = True
        self._deliver()

    def _terminate(self, event: events.ConnectionTerminated | None) -> None:
        if self._terminated:
            return
        self._terminated = True
        self._cancel_timer()
        self._handshake_deadline = self._next_ping = None
        reason = self._reason(event)
        self._fail(reason)
        if self._app is not None:
            self._paused = False
            self._deliver()
            app, self._app = self._app, None
            app.connectionLost(reason)
        elif self._settled:
            self._lost = reason
        for callback in self.on_terminated:
            try:
                callback(self)
            except Exception:
                _log.failure("a termination callback of {path!r} failed", path=self)

    def _reason(self, event: events.ConnectionTerminated | None) -> Failure:
        if self._local_reason is not None:
            return self._local_reason
        if self._refusal is not None:
            return Failure(self._refusal)
        if event is None:
            return Failure(ConnectionDone("the QUIC path was closed"))
        if event.reason_phrase == "Idle timeout" and event.frame_type == 0:
            if self._fin_sent and self._peer_fin and not self._pending:
                # Both directions ended: all that never came is the ACK of
                # our FIN or the peer's CONNECTION_CLOSE, and the last
                # packet of a close can always be lost (a closing peer
                # answers our probes for CLOSE_LINGER seconds, but at 59%
                # loss one close in eight outlasted that in simulation).
                # As a TCP that gives up on its FIN's ACK, this is the end
                # of a closed connection, not a dead path.
                return Failure(
                    ConnectionDone(
                        "the QUIC stream ended both ways; the peer's close did not arrive"
                    )
                )
            return Failure(
                QuicPathIdle(f"nothing arrived on the QUIC path for {self.idle_timeout:g} s")
            )
        if event.error_code == QuicErrorCode.NO_ERROR:
            return Failure(ConnectionDone("the QUIC connection was closed"))
        if not self._settled and event.error_code == _BAD_CERTIFICATE:
            return Failure(
                PeerAuthenticationFailed("the peer refused this side's certificate", self.expected)
            )
        return Failure(
            QuicPathClosed(
                f"the QUIC connection was closed with error {event.error_code:#x}: "
                f"{event.reason_phrase or 'no reason given'}",
                event.error_code,
                event.reason_phrase,
            )
        )

    # -- authenticated ------------------------------------------------------------

    def _succeed(self) -> None:
        if self._settled:
            return
        self._settled = True
        self._handshake_deadline = None
        if self.keepalive is not None:
            self._next_ping = self._reactor.seconds() + self.keepalive
        _log.info(
            "QUIC path to {peer} at {remote} authenticated ({role})",
            peer=self.expected,
            remote=_address(self.remote),
            role=self.role,
        )
        self.authenticated.callback(self)

    def _fail(self, reason: Failure) -> None:
        if self._settled:
            return
        self._settled = True
        self._handshake_deadline = None
        _log.info(
            "QUIC path ({role}) to {peer} failed: {error}",
            role=self.role,
            peer=self.expected,
            error=reason.getErrorMessage(),
        )
        self.authenticated.errback(reason)

    def _cancel(self, deferred: defer.Deferred[QuicPath]) -> None:
        self.abort()

    def abort(self) -> None:
        """
        Close the connection at once.  A pending :attr:`authenticated` fails
        with :class:`~twisted.internet.defer.CancelledError`; an attached
        application sees ``connectionLost`` with
        :class:`~twisted.internet.error.ConnectionAborted`.
        """
        self._fail(Failure(defer.CancelledError("the QUIC path was aborted")))
        self._local_reason = self._local_reason or Failure(ConnectionAborted())
        self._disconnecting = True
        if not self._started:
            self._terminate(None)
            return
        self._close(ABORT_CODE, "aborted")

    # -- the application ------------------------------------------------------------

    def select(
        self,
        factory: IProtocolFactory,
        *,
        started: float | None = None,
        report: ConnectionReport | None = None,
    ) -> IProtocol | None:
        """
        Pick this path (caller only, once :attr:`authenticated` has fired):
        open the stream with :data:`SELECTION_BYTE` and connect
        ``factory.buildProtocol(peer)`` to a :class:`QuicStreamTransport`
        whose ``report`` is *report*.
        """
        self._ready_for("caller", "select")
        self._stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(self._stream_id, SELECTION_BYTE)
        self._selected = True
        app = self._connect_application(factory, started, report)
        self._flush()
        return app

    def attach(
        self, factory: IProtocolFactory, *, started: float | None = None
    ) -> IProtocol | None:
        """
        Hand this path to the application (callee only, once
        :attr:`authenticated` has fired); data that came after the selection
        byte is delivered first.
        """
        self._ready_for("callee", "attach")
        app = self._connect_application(factory, started)
        self._flush()
        return app

    def _ready_for(self, role: Role, what: str) -> None:
        if self.role != role:
            raise RuntimeError(f"only the {role} may {what} a path; this is the {self.role}")
        if not (self._settled and self._pinned) or (role == "callee" and not self._selected):
            raise RuntimeError(f"{what}() needs an authenticated path: wait for .authenticated")
        if self._transport is not None or self._disconnecting or self._terminated:
            raise RuntimeError(f"this path is already taken, aborted or closed; no {what}()")

    def _connect_application(
        self,
        factory: IProtocolFactory,
        started: float | None,
        report: ConnectionReport | None = None,
    ) -> IProtocol | None:
        transport = QuicStreamTransport(
            self,
            method=self.method,
            peer_id=self.expected,
            session=self.session,
            remote=self.remote,
            local=self.local,
            peer_certificate=self.peer_certificate,
        )
        if started is not None:
            transport.connect_ms = (self._reactor.seconds() - started) * 1000.0
        transport.report = report
        self._transport = transport
        app = factory.buildProtocol(transport.getPeer())
        if app is None:
            self._app_lose()
            return None
        self._app = app
        app.makeConnection(transport)
        lost, self._lost = self._lost, None
        if lost is not None:
            self._deliver()
            self._app = None
            app.connectionLost(lost)
        else:
            self._deliver()
        return app

    def _deliver(self) -> None:
        app = self._app
        while app is not None and self._pending and not self._paused and self._app is app:
            app.dataReceived(self._pending.popleft())
        if app is None or self._app is not app or self._paused or self._pending:
            return
        if self._peer_fin and not self._peer_fin_told:
            self._peer_fin_told = True
            if IHalfCloseableProtocol.providedBy(app):
                app.readConnectionLost()
            else:
                self._app_lose()

    def _app_write(self, data: bytes) -> None:
        if self._fin_sent or self._terminated or self._stream_id is None or not data:
            return
        self._quic.send_stream_data(self._stream_id, data)
        self._flush()

    def _app_half_close(self) -> None:
        if self._fin_sent or self._terminated or self._stream_id is None:
            return
        self._fin_sent = True
        self._quic.send_stream_data(self._stream_id, b"", end_stream=True)
        self._flush()

    def _app_lose(self) -> None:
        self._disconnecting = True
        self._lose_requested = True
        if self._stream_id is None:
            self._close(QuicErrorCode.NO_ERROR, "")
            return
        self._app_half_close()
        self._flush()

    def _app_abort(self) -> None:
        self._disconnecting = True
        self._local_reason = self._local_reason or Failure(ConnectionAborted())
        self._close(ABORT_CODE, "aborted")

    def _maybe_finish(self) -> None:
        """Close the connection once both directions of the stream are done."""
        if self._terminated or self._stream_id is None or not self._fin_sent:
            return
        if self._quic.state_name() != "CONNECTED":
            return
        if not self._quic.sent_fin_acknowledged(self._stream_id):
            return
        if self._lose_requested or (self._peer_fin and (self._peer_fin_told or self._app is None)):
            self._close(QuicErrorCode.NO_ERROR, "")

    def _app_pause(self) -> None:
        self._paused = True
        self._quic.hold_window = True

    def _app_resume(self) -> None:
        self._paused = False
        self._quic.hold_window = False
        self._deliver()
        if not self._terminated:
            self._flush()

    def _check_producer(self) -> None:
        transport = self._transport
        if transport is None or transport.producer is None or self._stream_id is None:
            return
        if self._checking:
            return
        self._checking = True
        try:
            self._pace_producer(transport)
        finally:
            self._checking = False

    def _pace_producer(self, transport: QuicStreamTransport) -> None:
        assert transport.producer is not None
        assert self._stream_id is not None
        waiting = self._quic.unacknowledged(self._stream_id)
        producer = transport.producer
        if transport.streaming:
            if not transport.producer_paused and waiting > self._write_high:
                transport.producer_paused = True
                cast(IPushProducer, producer).pauseProducing()
            elif transport.producer_paused and waiting < self._write_low:
                transport.producer_paused = False
                cast(IPushProducer, producer).resumeProducing()
        elif waiting < self._write_low and not self._fin_sent and not self._terminated:
            cast(IPullProducer, producer).resumeProducing()
