"""
The STUN client: Twisted adapters around the pure transaction machinery of
:mod:`nattraverse.stun.transaction` (RFC 8489 sections 6 and 9).

- :class:`StunClient` runs transactions over UDP on a socket the caller owns
  and shares with other traffic.  It writes through a ``send(data, addr)``
  function and is handed datagrams through :meth:`StunClient.datagram_received`;
  :class:`~nattraverse.stun.demux.StunDemultiplexer` wires both to a UDP
  port.  Requests are retransmitted on the RFC 8489 section 6.2.1 schedule.
- Over a stream, :mod:`nattraverse.stun.tcp_client` does the same with
  one send per transaction (RFC 8489 section 6.2.2).

Every request returns a cancellable Deferred that fires with a
:class:`~nattraverse.stun.transaction.StunResponse`, or fails with
:class:`~nattraverse.errors.StunTimeout`, the
:class:`~nattraverse.errors.StunErrorResponse` subclass of the server's
error code, or :class:`~nattraverse.errors.StunTransactionCancelled`.
Nothing a peer sends raises into the reactor: malformed, unmatched and
unauthenticated responses are counted in :class:`ClientStats` and dropped.
"""

from __future__ import annotations

import ipaddress
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from nattraverse._types import Endpoint
from nattraverse.errors import (
    StunDecodeError,
    StunIntegrityError,
    StunTimeout,
    StunTransactionCancelled,
)
from nattraverse.stun.attributes import Attribute
from nattraverse.stun.constants import (
    TRANSACTION_ID_LENGTH,
    MessageClass,
    Method,
    split_message_type,
)
from nattraverse.stun.message import Message, decode, is_stun
from nattraverse.stun.transaction import (
    Policy,
    Retransmission,
    RetransmissionPolicy,
    StunRequest,
    StunResponse,
    TransactionState,
)

__all__ = [
    "ClientStats",
    "SendFunction",
    "StunClient",
    "StunResponse",
]

_log = Logger()

#: Writes one datagram to a transport address on the caller's socket.
SendFunction = Callable[[bytes, Endpoint], object]

#: RFC 8489 section 6.2: at most ten outstanding transactions per server.
DEFAULT_MAX_OUTSTANDING = 10

RESPONSE_CLASSES = (MessageClass.SUCCESS, MessageClass.ERROR)


@dataclass(slots=True)
class ClientStats:
    """
    What a client has sent and dropped.

    :ivar requests: Transactions started (sent at least once).
    :ivar transmissions: Requests written, retransmissions included.
    :ivar responses: Responses that ended a transaction, errors included.
    :ivar timeouts: Transactions that failed without a response.
    :ivar malformed: STUN responses that did not decode.
    :ivar unmatched: Responses for no pending transaction (wrong
        transaction id or method, or a late duplicate), and over TCP
        requests and indications from the server.
    :ivar wrong_source: Responses from another address than the request
        went to (see *match_source*).
    :ivar integrity_failed: Responses whose MESSAGE-INTEGRITY(-SHA256)
        was missing or wrong.
    """

    requests: int = 0
    transmissions: int = 0
    responses: int = 0
    timeouts: int = 0
    malformed: int = 0
    unmatched: int = 0
    wrong_source: int = 0
    integrity_failed: int = 0


def match_key(address: tuple[Any, ...]) -> Endpoint:
    """
    *address* (a Twisted address tuple or an :class:`Endpoint`) in the form
    responses are matched by: canonical IP text, IPv4-mapped IPv6 addresses
    as IPv4, port as an int, flow info and scope dropped.
    """
    host, port = address[0], int(address[1])
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return Endpoint(str(host), port)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return Endpoint(str(ip.ipv4_mapped), port)
    return Endpoint(str(ip), port)


def _server_endpoint(server: tuple[str, int]) -> Endpoint:
    """
    Check that *server* is an IP address and a port.

    :raises ValueError: saying what is wrong.
    """
    host, port = server[0], server[1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"STUN server {host!r} is not an IP address; resolve host names before asking"
        ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"STUN server port {port!r} is not a port number from 1 to 65535")
    return Endpoint(str(ip), port)


class _Transaction:
    """One request in flight, or waiting for a free slot."""

    __slots__ = ("call", "data", "deferred", "key", "machine", "match_source", "request", "server")

    def __init__(
        self,
        request: StunRequest,
        data: bytes,
        server: Endpoint,
        match_source: bool,
        cancel: Callable[[_Transaction], None],
    ) -> None:
        self.request = request
        self.data = data
        self.server = server
        self.key = match_key(server)
        self.match_source = match_source
        self.deferred: Deferred[StunResponse] = Deferred(lambda _: cancel(self))
        #: ``None`` while the transaction waits for a free slot.
        self.machine: Retransmission | None = None
        self.call: IDelayedCall | None = None


class TransactionTable:
    """
    The transactions of one client: ids, timers, the per-server limit and
    the end of each transaction.  Shared by the UDP and the TCP client.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        policy: Policy,
        random_bytes: Callable[[int], bytes],
        write: Callable[[bytes, Endpoint], object],
        stats: ClientStats,
        max_outstanding: int | None,
    ) -> None:
        self.reactor = reactor
        self.policy = policy
        self.random_bytes = random_bytes
        self.write = write
        self.stats = stats
        self.max_outstanding = max_outstanding
        self.by_id: dict[bytes, _Transaction] = {}
        self.outstanding: dict[Endpoint, int] = {}
        self.queued: dict[Endpoint, deque[_Transaction]] = {}
        self.stopped = False

    def new_transaction_id(self) -> bytes:
        """A fresh 96-bit id, unlike any pending one (RFC 8489 section 6)."""
        for _ in range(8):
            transaction_id = self.random_bytes(TRANSACTION_ID_LENGTH)
            if len(transaction_id) != TRANSACTION_ID_LENGTH:
                raise ValueError(
                    f"random_bytes({TRANSACTION_ID_LENGTH}) returned {len(transaction_id)} bytes"
                )
            if transaction_id not in self.by_id:
                return transaction_id
        raise ValueError("random_bytes keeps returning the ids of pending transactions")

    def start(
        self,
        server: Endpoint,
        attributes: Iterable[Attribute],
        method: int,
        integrity_key: bytes | None,
        integrity_sha256_key: bytes | None,
        fingerprint: bool,
        match_source: bool,
    ) -> Deferred[StunResponse]:
        """Build, register and (when a slot is free) send a request."""
        try:
            if self.stopped:
                raise StunTransactionCancelled("the STUN client is stopped; it sends no requests")
            request = StunRequest.build(
                self.new_transaction_id(),
                attributes,
                method=method,
                integrity_key=integrity_key,
                integrity_sha256_key=integrity_sha256_key,
                fingerprint=fingerprint,
            )
            data = request.encode()
        except Exception as e:
            return fail(e)
        transaction = _Transaction(request, data, server, match_source, self.cancel)
        self.by_id[request.transaction_id] = transaction
        limit = self.max_outstanding
        if limit is None or self.outstanding.get(transaction.key, 0) < limit:
            self._run(transaction)
        else:
            self.queued.setdefault(transaction.key, deque()).append(transaction)
        return transaction.deferred

    def _run(self, transaction: _Transaction) -> None:
        key = transaction.key
        self.outstanding[key] = self.outstanding.get(key, 0) + 1
        transaction.machine = Retransmission(self.policy, self.reactor.seconds())
        self.stats.requests += 1
        self._tick(transaction)

    def _tick(self, transaction: _Transaction) -> None:
        transaction.call = None
        machine = transaction.machine
        assert machine is not None
        now = self.reactor.seconds()
        step = machine.poll(now)
        if step.timed_out:
            self.stats.timeouts += 1
            elapsed = machine.elapsed(now)
            _log.debug(
                "STUN transaction {transaction_id} to {server} timed out after {elapsed}s",
                transaction_id=transaction.request.transaction_id.hex(),
                server=str(transaction.server),
                elapsed=elapsed,
            )
            self._end(transaction)
            transaction.deferred.errback(
                StunTimeout(transaction.request.transaction_id, transaction.server, elapsed)
            )
            return
        if step.send:
            try:
                self.write(transaction.data, transaction.server)
            except Exception as e:
                _log.warn(
                    "STUN request {transaction_id} to {server} could not be sent: {error}",
                    transaction_id=transaction.request.transaction_id.hex(),
                    server=str(transaction.server),
                    error=e,
                )
                machine.cancel()
                self._end(transaction)
                transaction.deferred.errback(e)
                return
            self.stats.transmissions += 1
        if step.next_at is not None:
            transaction.call = self.reactor.callLater(
                max(0.0, step.next_at - now), self._tick, transaction
            )

    def _end(self, transaction: _Transaction) -> None:
        """Forget a transaction, cancel its timer, free its slot."""
        self.by_id.pop(transaction.request.transaction_id, None)
        call, transaction.call = transaction.call, None
        if call is not None and call.active():
            call.cancel()
        key = transaction.key
        if transaction.machine is None:
            queue = self.queued.get(key)
            if queue is not None and transaction in queue:
                queue.remove(transaction)
                if not queue:
                    del self.queued[key]
            return
        remaining = self.outstanding.get(key, 1) - 1
        if remaining > 0:
            self.outstanding[key] = remaining
        else:
            self.outstanding.pop(key, None)
        if not self.stopped:
            self._dequeue(key)

    def _dequeue(self, key: Endpoint) -> None:
        queue = self.queued.get(key)
        limit = self.max_outstanding
        while queue and (limit is None or self.outstanding.get(key, 0) < limit):
            transaction = queue.popleft()
            if not queue:
                self.queued.pop(key, None)
            self._run(transaction)

    def cancel(self, transaction: _Transaction) -> None:
        """The Deferred was cancelled: stop sending, release the timer."""
        if transaction.request.transaction_id not in self.by_id:
            return
        machine = transaction.machine
        if machine is not None and machine.state is TransactionState.WAITING:
            machine.cancel()
        self._end(transaction)

    def pending(self, transaction_id: bytes) -> _Transaction | None:
        """The transaction that was sent with this id, if it is still on."""
        transaction = self.by_id.get(transaction_id)
        if transaction is None or transaction.machine is None:
            return None
        return transaction

    def answer(self, transaction: _Transaction, message: Message, source: Endpoint) -> None:
        """End the transaction with a matching, verified response."""
        machine = transaction.machine
        assert machine is not None
        outcome = transaction.request.outcome(
            message, source, machine.elapsed(self.reactor.seconds()), machine.transmissions
        )
        machine.answer()
        self.stats.responses += 1
        self._end(transaction)
        if isinstance(outcome, StunResponse):
            transaction.deferred.callback(outcome)
        else:
            transaction.deferred.errback(outcome)

    def fail(self, transaction: _Transaction, error: BaseException) -> None:
        """End the transaction with *error*."""
        machine = transaction.machine
        if machine is not None and machine.state is TransactionState.WAITING:
            machine.cancel()
        self._end(transaction)
        transaction.deferred.errback(error)

    def stop(self, error: Callable[[_Transaction], BaseException]) -> None:
        """Fail every pending transaction with ``error(transaction)``; send
        no more."""
        self.stopped = True
        transactions = list(self.by_id.values())
        self.queued.clear()
        for transaction in transactions:
            machine = transaction.machine
            if machine is not None and machine.state is TransactionState.WAITING:
                machine.cancel()
            self._end(transaction)
        for transaction in transactions:
            transaction.deferred.errback(error(transaction))


class StunClient:
    """
    STUN transactions over UDP, on a socket the caller owns (RFC 8489
    section 6.2.1).

    The client writes requests with *send* and reads the datagrams it is
    handed through :meth:`datagram_received`; it never opens a socket, so
    the same port can punch holes and carry QUIC.  At most
    *max_outstanding* transactions per server are in flight (RFC 8489
    section 6.2); further requests wait for a free slot.

    :param reactor: The clock for retransmissions and timeouts.
    :param send: Writes a datagram; an exception it raises fails the
        transaction whose request it was writing.
    :param rto: Initial retransmission timeout, seconds.
    :param rc: Transmissions per request, the first included.
    :param rm: Initial RTOs to wait after the last transmission.
    :param random_bytes: Source of transaction ids.
    :param max_outstanding: Transactions in flight per server address.
    :raises ValueError: naming a parameter that is out of range.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        send: SendFunction,
        *,
        rto: float = 0.5,
        rc: int = 7,
        rm: int = 16,
        random_bytes: Callable[[int], bytes] = os.urandom,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
    ) -> None:
        if isinstance(max_outstanding, bool) or max_outstanding < 1:
            raise ValueError(f"max_outstanding must be at least 1, not {max_outstanding!r}")
        self.policy = RetransmissionPolicy(rto, rc, rm)
        self.stats = ClientStats()
        self._transactions = TransactionTable(
            reactor, self.policy, random_bytes, send, self.stats, max_outstanding
        )

    @property
    def pending(self) -> int:
        """How many transactions are in flight or waiting for a slot."""
        return len(self._transactions.by_id)

    def request(
        self,
        server: tuple[str, int],
        attributes: Iterable[Attribute] = (),
        *,
        method: int = Method.BINDING,
        integrity_key: bytes | None = None,
        integrity_sha256_key: bytes | None = None,
        fingerprint: bool = False,
        match_source: bool = True,
    ) -> Deferred[StunResponse]:
        """
        Send a request to *server* and wait for its response.

        :param server: An IP address (not a host name) and port.
        :param attributes: Attributes of the request, in order.
        :param method: The STUN method.
        :param integrity_key: Append MESSAGE-INTEGRITY with this key
            (:mod:`~nattraverse.stun.credentials`); responses must then
            carry a valid one, others are dropped (RFC 8489 section 9.1.4).
        :param integrity_sha256_key: The same for MESSAGE-INTEGRITY-SHA256.
        :param fingerprint: Append FINGERPRINT.
        :param match_source: Accept responses only from *server*.  Turn it
            off for RFC 5780 CHANGE-REQUEST tests, whose answers come from
            the server's other address; :attr:`StunResponse.source` says
            which.
        :returns: A Deferred that fires with the success response, or fails
            with :class:`~nattraverse.errors.StunTimeout`, the
            :class:`~nattraverse.errors.StunErrorResponse` of the error
            code, :class:`~nattraverse.errors.StunDecodeError` (a response
            the client must not accept), whatever *send* raised,
            :class:`~nattraverse.errors.StunTransactionCancelled` when the
            client is stopped, or ``ValueError`` for a bad argument.
            Cancelling it stops the retransmissions.
        """
        try:
            endpoint = _server_endpoint(server)
        except (ValueError, TypeError, IndexError) as e:
            return fail(e)
        return self._transactions.start(
            endpoint,
            attributes,
            method,
            integrity_key,
            integrity_sha256_key,
            fingerprint,
            match_source,
        )

    def binding(
        self,
        server: tuple[str, int],
        attributes: Iterable[Attribute] = (),
        *,
        integrity_key: bytes | None = None,
        integrity_sha256_key: bytes | None = None,
        fingerprint: bool = False,
        match_source: bool = True,
    ) -> Deferred[StunResponse]:
        """
        A Binding request (RFC 8489 section 3): the response's
        :attr:`~StunResponse.mapped_address` is this socket's address as
        the server saw it.  See :meth:`request`.
        """
        return self.request(
            server,
            attributes,
            method=Method.BINDING,
            integrity_key=integrity_key,
            integrity_sha256_key=integrity_sha256_key,
            fingerprint=fingerprint,
            match_source=match_source,
        )

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        """
        Offer a datagram from the shared socket.

        :returns: ``True`` when the datagram was a STUN response (success
            or error class) and the client took it, whether it ended a
            transaction or was counted and dropped (malformed, unknown
            transaction, wrong source, failed integrity): a STUN response
            never belongs to the application.  ``False`` for anything
            else, STUN requests and indications included (a peer's
            connectivity checks are for the socket's owner to answer).
            Never raises.
        """
        if not is_stun(data):
            return False
        _, message_class = split_message_type(data[0] << 8 | data[1])
        if message_class not in RESPONSE_CLASSES:
            return False
        try:
            self._response_received(data, addr)
        except Exception:
            _log.failure("STUN client failed on a response from {source}", source=addr)
        return True

    def _response_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        stats = self.stats
        source = match_key(addr)
        try:
            message = decode(data)
        except StunDecodeError as e:
            stats.malformed += 1
            _log.debug(
                "dropped malformed STUN response from {source}: {error}",
                source=str(source),
                error=e,
            )
            return
        transactions = self._transactions
        transaction = transactions.pending(message.transaction_id)
        if transaction is None or not transaction.request.matches(message):
            stats.unmatched += 1
            _log.debug(
                "dropped STUN response from {source} for no pending transaction ({transaction_id})",
                source=str(source),
                transaction_id=message.transaction_id.hex(),
            )
            return
        if transaction.match_source and source != transaction.key:
            stats.wrong_source += 1
            _log.debug(
                "dropped STUN response for {transaction_id} from {source}; the request went "
                "to {server}",
                transaction_id=message.transaction_id.hex(),
                source=str(source),
                server=str(transaction.server),
            )
            return
        try:
            transaction.request.verify(message)
        except StunIntegrityError as e:
            stats.integrity_failed += 1
            _log.debug(
                "dropped STUN response for {transaction_id} from {source}: {error}",
                transaction_id=message.transaction_id.hex(),
                source=str(source),
                error=e,
            )
            return
        transactions.answer(transaction, message, source)

    def stop(self) -> None:
        """
        Fail every pending transaction with
        :class:`~nattraverse.errors.StunTransactionCancelled` and cancel
        every timer.  The client sends nothing afterwards: later requests
        fail at once.
        """
        self._transactions.stop(
            lambda t: StunTransactionCancelled(
                f"the STUN client was stopped while transaction "
                f"{t.request.transaction_id.hex()} to {t.server} was pending"
            )
        )
