"""
STUN over a stream (RFC 8489 section 6.2.2): :class:`StunTcpClientProtocol`
runs transactions over one connection, and :func:`tcp_binding` connects,
asks once and closes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import (
    StunDecodeError,
    StunIntegrityError,
)
from nattraverse.stun.attributes import Attribute
from nattraverse.stun.client import RESPONSE_CLASSES, ClientStats, TransactionTable, match_key
from nattraverse.stun.constants import (
    HEADER_LENGTH,
    MAGIC_COOKIE_BYTES,
    Method,
)
from nattraverse.stun.message import decode, frame_length
from nattraverse.stun.transaction import (
    ReliablePolicy,
    StunResponse,
)

__all__ = ["MAX_TCP_MESSAGE", "StunTcpClientProtocol", "tcp_binding"]

_log = Logger()

#: Largest STUN message a :class:`StunTcpClientProtocol` accepts.
MAX_TCP_MESSAGE = 8192


class StunTcpClientProtocol(Protocol):
    """
    STUN transactions over one stream connection (RFC 8489 section 6.2.2).

    Messages are framed by their length field.  Each request is sent once
    and fails with :class:`~nattraverse.errors.StunTimeout` after *ti*
    seconds without a response.  Over a reliable transport a response that
    fails its integrity check, or that does not decode, ends its
    transaction (RFC 8489 section 9.1.4); bytes that are not STUN framing,
    or a message longer than *max_message*, close the connection, since the
    stream cannot be resynchronised.  When the connection is lost, pending
    requests fail with the reason (``ConnectionDone``, ``ConnectionLost``).

    :raises ValueError: when *ti* is not a positive number of seconds.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        ti: float = 39.5,
        random_bytes: Callable[[int], bytes] = os.urandom,
        max_message: int = MAX_TCP_MESSAGE,
    ) -> None:
        self.stats = ClientStats()
        self.max_message = max_message
        self._transactions = TransactionTable(
            reactor, ReliablePolicy(ti), random_bytes, self._write, self.stats, None
        )
        self._buffer = bytearray()
        self._closed = False

    @property
    def pending(self) -> int:
        """How many transactions wait for a response."""
        return len(self._transactions.by_id)

    def _peer(self) -> Endpoint:
        peer = self.transport.getPeer() if self.transport is not None else None
        host, port = getattr(peer, "host", "?"), getattr(peer, "port", 0)
        return match_key((host, port))

    def _write(self, data: bytes, server: Endpoint) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def request(
        self,
        attributes: Iterable[Attribute] = (),
        *,
        method: int = Method.BINDING,
        integrity_key: bytes | None = None,
        integrity_sha256_key: bytes | None = None,
        fingerprint: bool = False,
    ) -> Deferred[StunResponse]:
        """
        Send a request over the connection; see :meth:`StunClient.request`.
        It fails with ``ConnectionClosed`` when the connection is closed,
        and with :class:`~nattraverse.errors.StunIntegrityError` when the
        response fails the integrity check.
        """
        if self._closed:
            return fail(ConnectionClosed("the STUN TCP connection is closed"))
        if self.transport is None:
            return fail(RuntimeError("the STUN TCP connection is not made yet"))
        return self._transactions.start(
            self._peer(),
            attributes,
            method,
            integrity_key,
            integrity_sha256_key,
            fingerprint,
            False,
        )

    def binding(
        self,
        attributes: Iterable[Attribute] = (),
        *,
        integrity_key: bytes | None = None,
        integrity_sha256_key: bytes | None = None,
        fingerprint: bool = False,
    ) -> Deferred[StunResponse]:
        """A Binding request over the connection; see :meth:`request`."""
        return self.request(
            attributes,
            method=Method.BINDING,
            integrity_key=integrity_key,
            integrity_sha256_key=integrity_sha256_key,
            fingerprint=fingerprint,
        )

    def dataReceived(self, data: bytes) -> None:
        """Reassemble framed messages and handle each whole one."""
        if self._closed:
            return
        buffer = self._buffer
        buffer += data
        while len(buffer) >= HEADER_LENGTH and not self._closed:
            if buffer[0] >= 0x40 or buffer[4:8] != MAGIC_COOKIE_BYTES:
                self._desynchronised("the stream does not carry STUN messages")
                return
            size = frame_length(bytes(buffer[:4]))
            if size > self.max_message:
                self._desynchronised(
                    f"a {size}-byte message is larger than the {self.max_message} accepted"
                )
                return
            if len(buffer) < size:
                return
            frame = bytes(buffer[:size])
            del buffer[:size]
            try:
                self._frame_received(frame)
            except Exception:
                _log.failure(
                    "STUN TCP client failed on a message from {peer}", peer=str(self._peer())
                )

    def _frame_received(self, frame: bytes) -> None:
        stats = self.stats
        transactions = self._transactions
        try:
            message = decode(frame)
        except StunDecodeError as e:
            stats.malformed += 1
            _log.debug(
                "malformed STUN message from {peer}: {error}", peer=str(self._peer()), error=e
            )
            if e.transaction_id is not None and e.message_class in RESPONSE_CLASSES:
                broken = transactions.pending(e.transaction_id)
                if broken is not None and broken.request.method == e.method:
                    transactions.fail(broken, e)
            return
        transaction = transactions.pending(message.transaction_id)
        if transaction is None or not transaction.request.matches(message):
            stats.unmatched += 1
            _log.debug(
                "ignored STUN {message_class} {transaction_id} from {peer}",
                message_class=message.message_class.name.lower(),
                transaction_id=message.transaction_id.hex(),
                peer=str(self._peer()),
            )
            return
        try:
            transaction.request.verify(message)
        except StunIntegrityError as e:
            stats.integrity_failed += 1
            transactions.fail(transaction, e)
            return
        transactions.answer(transaction, message, self._peer())

    def _desynchronised(self, reason: str) -> None:
        self.stats.malformed += 1
        _log.warn(
            "closing STUN TCP connection to {peer}: {reason}", peer=str(self._peer()), reason=reason
        )
        self._closed = True
        self._buffer.clear()
        error = StunDecodeError("stream", reason)
        self._transactions.stop(lambda _: error)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fail every pending request with the reason."""
        self._closed = True
        self._buffer.clear()
        error = reason.value if isinstance(reason.value, Exception) else ConnectionClosed()
        self._transactions.stop(lambda _: error)


def tcp_binding(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    attributes: Iterable[Attribute] = (),
    *,
    integrity_key: bytes | None = None,
    integrity_sha256_key: bytes | None = None,
    fingerprint: bool = False,
    ti: float = 39.5,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> Deferred[StunResponse]:
    """
    Connect to a STUN server over a stream, send one Binding request, close
    (RFC 8489 section 6.2.2).

    :param endpoint: Where the server is, e.g. a ``TCP4ClientEndpoint``
        (its own timeout bounds the connection attempt).
    :param ti: Seconds to wait for the response once connected.
    :returns: A Deferred firing with the response; it fails like
        :meth:`StunTcpClientProtocol.request`, or with the endpoint's
        connection error.  Cancelling it cancels the connection attempt or
        the request, and closes the connection.
    """
    try:
        ReliablePolicy(ti)
    except ValueError as e:
        return fail(e)
    pending_attributes = tuple(attributes)

    async def run() -> StunResponse:
        factory = Factory.forProtocol(
            lambda: StunTcpClientProtocol(reactor, ti=ti, random_bytes=random_bytes)
        )
        protocol = cast(StunTcpClientProtocol, await endpoint.connect(factory))
        try:
            return await protocol.binding(
                pending_attributes,
                integrity_key=integrity_key,
                integrity_sha256_key=integrity_sha256_key,
                fingerprint=fingerprint,
            )
        finally:
            if protocol.transport is not None:
                protocol.transport.loseConnection()

    return Deferred.fromCoroutine(run())
