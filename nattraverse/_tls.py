"""
TLS 1.3 contexts for the secured path (``docs/protocol.rst``, "The secured
path", step 2): each side presents its identity's self-signed certificate
and accepts the other's only when its public key hashes to the peer id the
rendezvous vouched for.

Nobody here checks a certificate chain, a signature by a CA, a name or a
validity period: the pin to the peer id is the whole trust decision, made
twice, in OpenSSL's verify callback during the handshake and again on the
finished connection (:meth:`PinnedTLS.check`).

:class:`PunchTransport`, the transport the application gets, lives here too
(it is re-exported by :mod:`nattraverse.secure`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, cast

from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProducer,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
    ITransport,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from nattraverse.errors import PeerAuthenticationFailed
from nattraverse.identity import Identity, PeerId

if TYPE_CHECKING:
    from nattraverse.report import ConnectionReport

__all__ = ["TLS_VERSION_NAME", "PinnedTLS", "PunchTransport", "address_text", "call_if_present"]

#: What :meth:`OpenSSL.SSL.Connection.get_protocol_version_name` says of the only version used.
TLS_VERSION_NAME: Final = "TLSv1.3"


def _describe(certificate: X509) -> str:
    try:
        return f"the certificate presented is for {PeerId.of(certificate.to_cryptography())}"
    except Exception:  # a key type cryptography cannot load, a damaged certificate
        return "the certificate presented has a key that cannot be read"


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class PinnedTLS:
    """
    Makes the OpenSSL connection of one path: TLS 1.3 only, mutual
    (``VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT``), this peer's certificate
    and key, the peer's certificate pinned to *expected*.

    One instance serves one connection: when the pin does not hold,
    :attr:`mismatch` says why, for the path to report instead of OpenSSL's
    generic "certificate verify failed".

    :param identity: This peer's key and certificate.
    :param expected: The peer id the rendezvous vouched for.
    """

    def __init__(self, identity: Identity, expected: PeerId) -> None:
        self.expected = expected
        #: Set when the peer's certificate is not *expected*'s.
        self.mismatch: PeerAuthenticationFailed | None = None
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_max_proto_version(SSL.TLS1_3_VERSION)
        context.use_certificate(identity.certificate)
        context.use_privatekey(identity.private_key)
        context.check_privatekey()
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        # Each path is a one-off between two peers: nothing to resume later.
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_options(SSL.OP_NO_TICKET)
        self._context = context

    def _verify(
        self, connection: SSL.Connection, certificate: X509, error: int, depth: int, ok: int
    ) -> bool:
        """
        OpenSSL's verify callback.  The leaf (depth 0) passes exactly when
        its key is the expected peer's; whatever else the peer sent with it
        is ignored, as are OpenSSL's own verdicts (a self-signed certificate
        is what peers present).
        """
        if depth != 0:
            return True
        try:
            if self.expected.matches(certificate.to_cryptography()):
                return True
        except Exception:  # never let an exception escape into OpenSSL
            pass
        if self.mismatch is None:
            self.mismatch = PeerAuthenticationFailed(_describe(certificate), self.expected)
        return False

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """The connection of the TLS client (the caller)."""
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """The connection of the TLS server (the callee)."""
        connection = SSL.Connection(self._context, None)
        connection.set_accept_state()
        return connection

    def check(self, connection: SSL.Connection) -> None:
        """
        The second look, once the handshake has finished: TLS 1.3, and a
        peer certificate whose key is the expected peer's.

        :raises PeerAuthenticationFailed: when either does not hold.
        """
        version = connection.get_protocol_version_name()
        if version != TLS_VERSION_NAME:
            raise PeerAuthenticationFailed(
                f"the path negotiated {version}, not {TLS_VERSION_NAME}", self.expected
            )
        certificate = connection.get_peer_certificate()
        if certificate is None:
            raise PeerAuthenticationFailed("the peer presented no certificate", self.expected)
        try:
            pinned = self.expected.matches(certificate.to_cryptography())
        except Exception:
            pinned = False
        if not pinned:
            raise PeerAuthenticationFailed(_describe(certificate), self.expected)


def address_text(address: IAddress) -> str:
    """``"ip:port"`` (``"[ip]:port"`` for IPv6) of an address, or its ``str()``."""
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    return str(address)


def call_if_present(target: object, name: str, *args: object) -> object:
    """Call *target*'s method *name* when it has one (transports differ)."""
    method = getattr(target, name, None)
    return method(*args) if method is not None else None


@implementer(ITransport, ITCPTransport, ISSLTransport, IPushProducer, IConsumer)
class PunchTransport:
    """
    The transport an application gets from a
    :class:`~nattraverse.secure.SecurePath`: the TLS
    transport, with its producer/consumer flow control, plus how the path
    was made and who is at the other end.

    ``loseConnection`` sends everything written before it, then closes;
    what is written after it is dropped, as TLS transports do.  TLS as
    Twisted runs it has no half-close: ``loseWriteConnection`` closes both
    directions, after what is written is sent.

    :ivar method: The traversal method that carried the path.
    :ivar peer_id: The peer's id, proved by its certificate.
    :ivar session: The introduction's session id.
    :ivar remote: ``"ip:port"`` of the raw connection's far end (for a relay,
        the relay's address).
    :ivar connect_ms: Milliseconds from the start of the connection attempt
        (the callee: from the introduction) to the authenticated path, when
        the endpoint measured it; else ``None``.
    :ivar report: On the caller's side, the
        :class:`~nattraverse.report.ConnectionReport` of the race that chose
        this path; else ``None``.
    """

    def __init__(
        self,
        tls: TLSMemoryBIOProtocol,
        *,
        method: str,
        peer_id: PeerId,
        session: bytes,
        peer_certificate: X509 | None,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        raw = tls.transport
        assert raw is not None, "the TLS layer is connected before the application"
        self._tls = tls
        self._raw: ITransport = raw
        self._pause = pause
        self._resume = resume
        self._peer_certificate = peer_certificate
        self.method = method
        self.peer_id = peer_id
        self.session = session
        self.remote = address_text(self._raw.getPeer())
        self.connect_ms: float | None = None
        self.report: ConnectionReport | None = None

    def __repr__(self) -> str:
        return f"<PunchTransport {self.method} to {self.peer_id} at {self.remote}>"

    @property
    def disconnecting(self) -> bool:
        """Whether ``loseConnection`` or ``abortConnection`` was called."""
        return bool(self._tls.disconnecting)

    @property
    def connected(self) -> bool:
        """Whether the connection is still up."""
        return bool(self._tls.connected)

    def logPrefix(self) -> str:
        """How the log names this connection."""
        return f"PunchTransport,{self.method},{self.remote}"

    # ITransport, IConsumer
    def write(self, data: bytes) -> None:
        """Encrypt and send *data*."""
        self._tls.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Encrypt and send the concatenation of *data*."""
        self._tls.writeSequence(data)

    def loseConnection(self) -> None:
        """Close after sending what was written (and a TLS close_notify)."""
        self._tls.loseConnection()

    def getPeer(self) -> IPv4Address | IPv6Address:
        """The raw connection's far end (a TCP address, but over a test transport)."""
        return cast(IPv4Address | IPv6Address, self._tls.getPeer())

    def getHost(self) -> IPv4Address | IPv6Address:
        """The raw connection's near end (a TCP address, but over a test transport)."""
        return cast(IPv4Address | IPv6Address, self._tls.getHost())

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Register a producer; it is paused when the TLS/TCP buffers are full."""
        self._tls.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        """Unregister the producer."""
        self._tls.unregisterProducer()

    # ITCPTransport
    def loseWriteConnection(self) -> None:
        """Close both directions after sending what was written: TLS here has no half-close."""
        self._tls.loseConnection()

    def abortConnection(self) -> None:
        """Close at once, dropping what is not sent yet."""
        self._tls.abortConnection()

    def getTcpNoDelay(self) -> bool:
        """``TCP_NODELAY`` of the raw connection (``False`` when it has none)."""
        return bool(call_if_present(self._raw, "getTcpNoDelay"))

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Set ``TCP_NODELAY`` on the raw connection, when it has the option."""
        call_if_present(self._raw, "setTcpNoDelay", enabled)

    def getTcpKeepAlive(self) -> bool:
        """``SO_KEEPALIVE`` of the raw connection (``False`` when it has none)."""
        return bool(call_if_present(self._raw, "getTcpKeepAlive"))

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """Set ``SO_KEEPALIVE`` on the raw connection, when it has the option."""
        call_if_present(self._raw, "setTcpKeepAlive", enabled)

    # ISSLTransport
    def getPeerCertificate(self) -> X509 | None:
        """The peer's certificate, whose key is :attr:`peer_id`'s."""
        return self._peer_certificate

    # IPushProducer
    def pauseProducing(self) -> None:
        """Stop delivering data, and stop reading from the connection."""
        self._pause()

    def resumeProducing(self) -> None:
        """Deliver data again, and read from the connection again."""
        self._resume()

    def stopProducing(self) -> None:
        """Close the connection, as a TCP transport does."""
        self._tls.loseConnection()
