"""
The application's side of a QUIC path: one bidirectional stream as an
ordinary Twisted transport (:class:`QuicStreamTransport`), and the narrow
subclass of aioquic's connection the path drives (:class:`_PinnedConnection`).

Everything that reaches into aioquic's private attributes is in
:class:`_PinnedConnection`, so an aioquic upgrade that moves them breaks
one place, and fails closed (no peer certificate: no authentication).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, cast

from aioquic import tls
from aioquic.quic.connection import NetworkAddress, QuicConnection, QuicConnectionState
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography import x509
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IConsumer,
    IProducer,
    IPullProducer,
    IPushProducer,
    ITCPTransport,
    ITransport,
)
from zope.interface import implementer

from nattraverse.errors import PeerAuthenticationFailed
from nattraverse.identity import PeerId

if TYPE_CHECKING:
    from nattraverse.quic import QuicPath
    from nattraverse.report import ConnectionReport

__all__ = ["QuicStreamTransport", "check_pin"]


class _Sized(Protocol):
    def __len__(self) -> int: ...


class _PinnedConnection(QuicConnection):
    """
    aioquic's :class:`~aioquic.quic.connection.QuicConnection` with the
    three things the path needs that aioquic has no public switch for:

    - the server asks for the client's certificate (TLS 1.3
      CertificateRequest; aioquic's ``Context._request_client_certificate``,
      which aioquic's client answers and whose CertificateVerify signature
      aioquic's server checks);
    - the peer's certificate, once the handshake is done;
    - the receive window of a stream stays where it is while the
      application has paused the transport, so the peer's flow control
      blocks it (aioquic otherwise doubles the window on receipt, not on
      consumption);

    and the amount of a stream's data not yet acknowledged by the peer, a
    way to repeat the acknowledgements not yet known to have arrived
    (:meth:`repeat_acknowledgements`), and a closing state that answers the
    peer until it has heard the close (:meth:`receive_datagram`), and
    whether a packet is addressed to it (:meth:`owns_destination`).
    """

    hold_window: bool = False
    #: Seconds the closing state lasts after the last datagram from the peer.
    close_linger: float = 0.0
    #: Seconds the closing state lasts at most, from the close.
    close_linger_limit: float = 0.0
    #: Seconds between two repetitions of the closing packets, at least.
    close_repeat_gap: float = 0.1
    _closing_datagrams: list[tuple[bytes, NetworkAddress]] | None = None
    _closing_since = 0.0
    _close_repeat_due = False
    _close_repeated_at: float | None = None

    def owns_destination(self, datagram: bytes) -> bool:
        """
        Whether *datagram*, a short-header packet, is addressed to one of
        this connection's own connection ids (RFC 9000 section 5.2).
        """
        end = 1 + self._configuration.connection_id_length
        return self.owns_cid(datagram[1:end])

    def owns_cid(self, cid: bytes) -> bool:
        """Whether *cid* is one of this connection's own connection ids."""
        return any(issued.cid == cid for issued in self._host_cids)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        if self.hold_window:
            return
        super()._write_stream_limits(builder, space, stream)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """
        aioquic's datagrams; in the closing state, the closing datagrams
        again when a datagram from the peer asked for them.
        """
        if self._closing():
            if self._close_repeat_due and self._closing_datagrams:
                self._close_repeat_due = False
                self._close_repeated_at = now
                return list(self._closing_datagrams)
            return []
        datagrams = super().datagrams_to_send(now)
        if self._closing() and self._closing_datagrams is None:
            self._closing_datagrams = datagrams  # this call sent CONNECTION_CLOSE
        return datagrams

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """
        Handle a datagram; in the closing state, answer it with the closing
        datagrams and stay closing :attr:`close_linger` seconds more.

        aioquic sends CONNECTION_CLOSE once, then drops every packet for
        three probe timeouts (tenths of a second) and forgets the
        connection.  At 59% of the datagrams lost that one packet was lost
        as often: the peer, its FIN not yet acknowledged, kept probing a
        connection that was gone, and reported the idle timeout 25 s later
        (the lossy lab test's failure).  RFC 9000 section 10.2.1 has the
        closing endpoint answer every packet with a CONNECTION_CLOSE, and
        lets it send the very same packet again; the peer stops sending
        once it has one, so the closing state ends :attr:`close_linger`
        seconds after the last datagram (by :attr:`close_linger_limit` at
        the latest).  The answers are spaced :attr:`close_repeat_gap` apart
        at least, so a flood of datagrams is not answered in kind.
        """
        if not (self._closing() and self._closing_datagrams):
            super().receive_datagram(data, addr, now)
            return
        last = self._close_repeated_at
        if last is None or now - last >= self.close_repeat_gap:
            self._close_repeat_due = True
        if self._close_at is not None:
            self._close_at = max(
                self._close_at,
                min(now + self.close_linger, self._closing_since + self.close_linger_limit),
            )

    def ending(self) -> bool:
        """Whether the connection is closing or draining: it sends nothing new."""
        return self._state in (QuicConnectionState.CLOSING, QuicConnectionState.DRAINING)

    def _closing(self) -> bool:
        """Whether this side closed the connection and waits out the closing state."""
        return self._state == QuicConnectionState.CLOSING

    def _close_begin(self, is_initiator: bool, now: float) -> None:
        """Closing lasts :attr:`close_linger` seconds at least (see :meth:`receive_datagram`)."""
        super()._close_begin(is_initiator, now)
        if is_initiator and self._close_at is not None:
            self._closing_since = now
            self._close_at = max(self._close_at, now + self.close_linger)

    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented, or ``None``."""
        tls = getattr(self, "tls", None)
        certificate = getattr(tls, "_peer_certificate", None)
        return certificate if isinstance(certificate, x509.Certificate) else None

    def state_name(self) -> str:
        """The connection's state: ``"FIRSTFLIGHT"``, ``"CONNECTED"``, ``"CLOSING"``..."""
        state = getattr(self, "_state", None)
        return str(getattr(state, "name", state))

    def _stream(self, stream_id: int) -> QuicStream | None:
        streams: dict[int, QuicStream] = getattr(self, "_streams", {})
        return streams.get(stream_id)

    def unacknowledged(self, stream_id: int) -> int:
        """Bytes written to the stream that the peer has not acknowledged yet."""
        stream = self._stream(stream_id)
        if stream is None:
            return 0
        buffer: _Sized = getattr(stream.sender, "_buffer", b"")
        return len(buffer)

    def repeat_acknowledgements(self, now: float) -> None:
        """
        Have the next 1-RTT packet carry an ACK frame with every range the
        peer has not yet confirmed receiving, even when nothing new arrived.

        aioquic acknowledges only newly received packets, once: when that
        one ACK is lost while the peer's congestion window is full, the peer
        learns of it only from its own probes, whose timeout doubles at each
        loss; at a third of the packets lost it stalled for minutes (see
        ``test_lost_acknowledgement_is_repeated``).  Repeating them on what
        our timers send (probes, keepalives, paced data), as every TCP
        segment carries the cumulative ACK, ends that (RFC 9000 section 13.2.3 sends older ranges
        again for this very reason).
        """
        spaces: dict[tls.Epoch, QuicPacketSpace] = getattr(self, "_spaces", {})
        space = spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and len(space.ack_queue) and space.ack_at is None:
            space.ack_at = now

    def in_flight(self) -> bool:
        """Whether packets this side sent wait for the peer's acknowledgement."""
        recovery = getattr(self, "_loss", None)
        return bool(getattr(recovery, "bytes_in_flight", 0))

    def probe(self, now: float) -> None:
        """
        Probe as a probe timeout does, at once: send again the CRYPTO data
        the peer has not acknowledged (or, once the handshake is confirmed,
        the oldest unacknowledged packet) and a probe that may exceed the
        congestion window (RFC 9002 sections 6.2.4 and 7), which a full
        window of lost packets would otherwise keep shut.

        The CRYPTO data matters most: a client's handshake is complete when
        the server's flight arrives, the server's only when the client's
        Finished does, and until then the server can read none of the
        client's 1-RTT packets, so a bare PING cannot help.
        """
        recovery = getattr(self, "_loss", None)
        reschedule = getattr(recovery, "reschedule_data", None)
        if reschedule is not None:
            reschedule(now=now)
            return
        send_probe = getattr(self, "_send_probe", None)
        if send_probe is not None:
            send_probe()
        else:  # an aioquic without either: a PING that waits for the window
            self.send_ping(0)

    def sent_fin_acknowledged(self, stream_id: int) -> bool:
        """
        Whether the peer has acknowledged everything, FIN included, on a
        stream this side has sent FIN on (aioquic forgets a stream once both
        directions are done: that counts as acknowledged).
        """
        stream = self._stream(stream_id)
        return stream is None or bool(stream.sender.is_finished)


def check_pin(
    alpn: str | None, wanted_alpn: str, certificate: x509.Certificate | None, expected: PeerId
) -> x509.Certificate:
    """
    The pin, once the handshake is done: the agreed ALPN, and a peer
    certificate whose key hashes to *expected*.

    :returns: the certificate.
    :raises PeerAuthenticationFailed: when either does not hold.
    """
    if alpn != wanted_alpn:
        raise PeerAuthenticationFailed(
            f"the peer negotiated ALPN {alpn!r}, not {wanted_alpn!r}", expected
        )
    if certificate is None:
        raise PeerAuthenticationFailed("the peer presented no certificate", expected)
    try:
        pinned = expected.matches(certificate)
    except Exception:  # a key cryptography cannot load: not the peer
        pinned = False
    if not pinned:
        try:
            who = f"the certificate presented is for {PeerId.of(certificate)}"
        except Exception:
            who = "the certificate presented has a key that cannot be read"
        raise PeerAuthenticationFailed(who, expected)
    return certificate


def _address(address: tuple[str, int]) -> IPv4Address | IPv6Address:
    host, port = address[0], address[1]
    if ":" in host:
        return IPv6Address("UDP", host, port)
    return IPv4Address("UDP", host, port)


@implementer(ITransport, ITCPTransport, IPushProducer, IConsumer)
class QuicStreamTransport:
    """
    The transport an application gets from a
    :class:`~nattraverse.quic.QuicPath`: one QUIC stream.

    - ``write``/``writeSequence`` queue data on the stream (QUIC
      retransmits it; it is never lost while the connection lives).
    - ``loseConnection`` sends everything written, then FIN; once the peer
      has acknowledged it all and sent its own FIN, the connection closes
      and both applications see ``connectionLost`` with
      :class:`~twisted.internet.error.ConnectionDone`.
    - ``loseWriteConnection`` sends FIN only (half-close): the peer's
      :class:`~twisted.internet.interfaces.IHalfCloseableProtocol` gets
      ``readConnectionLost``; a peer protocol that is not half-closeable is
      closed as a TCP one would be.
    - ``abortConnection`` closes the QUIC connection at once.
    - As a consumer it pauses a registered producer while more than the
      path's ``write_buffer`` bytes are unacknowledged; as a producer,
      ``pauseProducing`` stops delivering data and holds the stream's
      receive window, so QUIC flow control stops the peer.

    :ivar method: ``"udp"``.
    :ivar peer_id: The peer's id, proved by its certificate.
    :ivar session: The introduction's session id (``b""`` when none).
    :ivar remote: ``"ip:port"`` of the peer's end of the UDP path (the
        rendezvous' UDP relay while :attr:`relayed`; it changes when the
        path moves, see :meth:`~nattraverse.quic.QuicPath.move`).
    :ivar connect_ms: Milliseconds from the start of the attempt to the
        authenticated path, when measured; else ``None``.
    :ivar report: On the caller's side, the
        :class:`~nattraverse.report.ConnectionReport` of the race that chose
        this path; else ``None``.
    :ivar peer_certificate: The peer's certificate (``cryptography``).
    """

    def __init__(
        self,
        path: QuicPath,
        *,
        method: str,
        peer_id: PeerId,
        session: bytes,
        remote: tuple[str, int],
        local: tuple[str, int],
        peer_certificate: x509.Certificate | None,
    ) -> None:
        self._path = path
        self.method = method
        self.peer_id = peer_id
        self.session = session
        self._peer = _address(remote)
        self._host = _address(local)
        host = f"[{remote[0]}]" if ":" in remote[0] else remote[0]
        self.remote = f"{host}:{remote[1]}"
        self.connect_ms: float | None = None
        self.report: ConnectionReport | None = None
        self.peer_certificate = peer_certificate
        self.producer: IProducer | None = None
        self.streaming = False
        self.producer_paused = False

    def __repr__(self) -> str:
        return f"<QuicStreamTransport {self.method} to {self.peer_id} at {self.remote}>"

    @property
    def disconnecting(self) -> bool:
        """Whether ``loseConnection`` or ``abortConnection`` was called."""
        return self._path._disconnecting

    @property
    def connected(self) -> bool:
        """Whether the connection is still up."""
        return not self._path._terminated

    def logPrefix(self) -> str:
        """How the log names this connection."""
        return f"QuicStreamTransport,{self.method},{self.remote}"

    # ITransport, IConsumer
    def write(self, data: bytes) -> None:
        """Queue *data* on the stream."""
        self._path._app_write(bytes(data))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Queue the concatenation of *data* on the stream."""
        self._path._app_write(b"".join(data))

    def loseConnection(self) -> None:
        """Send what was written, then FIN; close when both directions are done."""
        self._path._app_lose()

    def loseWriteConnection(self) -> None:
        """Send what was written, then FIN; keep reading."""
        self._path._app_half_close()

    def abortConnection(self) -> None:
        """Close the QUIC connection at once, dropping what is not delivered."""
        self._path._app_abort()

    def _moved(self, remote: tuple[str, int]) -> None:
        """The path moved to *remote* (:meth:`~nattraverse.quic.QuicPath.move`)."""
        self._peer = _address(remote)
        host = f"[{remote[0]}]" if ":" in remote[0] else remote[0]
        self.remote = f"{host}:{remote[1]}"

    @property
    def relayed(self) -> bool:
        """Whether the stream goes through the rendezvous' UDP relay now."""
        return self._path.relayed

    def getPeer(self) -> IPv4Address | IPv6Address:
        """The peer's UDP address."""
        return self._peer

    def getHost(self) -> IPv4Address | IPv6Address:
        """This side's UDP address, as the path was given it."""
        return self._host

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Register a producer, paused while too much is unacknowledged."""
        if self.producer is not None:
            raise RuntimeError(f"a producer is already registered: {self.producer!r}")
        self.producer = producer
        self.streaming = streaming
        self.producer_paused = False
        self._path._check_producer()
        if not streaming and not self.producer_paused:
            cast(IPullProducer, producer).resumeProducing()

    def unregisterProducer(self) -> None:
        """Forget the producer."""
        self.producer = None
        self.producer_paused = False

    # ITCPTransport, for applications written against TCP
    def getTcpNoDelay(self) -> bool:
        """QUIC has no Nagle: always ``True``."""
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nothing to set on QUIC."""

    def getTcpKeepAlive(self) -> bool:
        """The path sends QUIC PINGs: ``True`` when it has a keepalive interval."""
        return self._path.keepalive is not None

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """The keepalive interval is fixed when the path is made."""

    # IPushProducer
    def pauseProducing(self) -> None:
        """Stop delivering data; hold the receive window."""
        self._path._app_pause()

    def resumeProducing(self) -> None:
        """Deliver data again; open the receive window."""
        self._path._app_resume()

    def stopProducing(self) -> None:
        """Close the connection, as a TCP transport does."""
        self._path._app_lose()
