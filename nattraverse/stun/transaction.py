"""
STUN transactions without I/O: when to send, when to give up, and what a
response means (RFC 8489 sections 6.2, 6.3 and 9).

Nothing here touches a socket or a clock.  A
:class:`Retransmission` is told the time (``now``) and answers whether to
send the request and when to ask again; a :class:`StunRequest` encodes
itself and judges a decoded response.  The Twisted adapters in
:mod:`nattraverse.stun.client` feed them datagrams and ``reactor.seconds()``
and write what they say.

With the defaults of RFC 8489 section 6.2.1 (RTO 500 ms, Rc 7, Rm 16), a
request over UDP is sent at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 seconds
and the transaction fails at 39.5 seconds.  Over a reliable transport
(TCP, TLS) it is sent once and fails after Ti, 39.5 seconds by default
(RFC 8489 section 6.2.2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum, auto

from nattraverse._types import Endpoint
from nattraverse.errors import StunDecodeError, StunError, StunIntegrityError, error_for_code
from nattraverse.stun.attributes import (
    AlternateServer,
    Attribute,
    ChangedAddress,
    ErrorCode,
    MappedAddress,
    MessageIntegrity,
    MessageIntegritySha256,
    OtherAddress,
    ResponseOrigin,
    Software,
    SourceAddress,
    XorMappedAddress,
    attribute_name,
)
from nattraverse.stun.constants import TRANSACTION_ID_LENGTH, MessageClass, Method
from nattraverse.stun.message import Message, encode

#: The largest number of transmissions :class:`RetransmissionPolicy` accepts.
MAX_RC = 32


def _check_duration(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds greater than 0, not {value!r}")


def _check_count(name: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if not 1 <= value <= maximum:
        raise ValueError(f"{name} must be between 1 and {maximum}, not {value}")


@dataclass(frozen=True, slots=True)
class RetransmissionPolicy:
    """
    Retransmission over an unreliable transport (RFC 8489 section 6.2.1).

    The request is sent at time 0, then again after RTO, after a further
    2 RTO, 4 RTO, and so on, *rc* times in all; after the last one the
    client waits *rm* times the initial RTO for a response before it gives
    up.

    :ivar rto: The initial retransmission timeout in seconds.  RFC 8489
        asks for at least 0.5 s on the open Internet; smaller values are
        accepted for known networks and for ICE pacing.
    :ivar rc: How many times the request is sent, the first included.
    :ivar rm: How many initial RTOs to wait after the last transmission.
    :raises ValueError: naming the parameter when one is not a positive
        finite number (*rto*) or an integer from 1 to :data:`MAX_RC` /
        65535 (*rc*, *rm*).
    """

    rto: float = 0.5
    rc: int = 7
    rm: int = 16

    def __post_init__(self) -> None:
        _check_duration("rto", self.rto)
        _check_count("rc", self.rc, MAX_RC)
        _check_count("rm", self.rm, 0xFFFF)

    @property
    def send_offsets(self) -> tuple[float, ...]:
        """When the request is sent, in seconds after the first
        transmission: ``0, RTO, 3 RTO, 7 RTO, ...``."""
        return tuple(self.rto * ((1 << k) - 1) for k in range(self.rc))

    @property
    def timeout(self) -> float:
        """Seconds from the first transmission until the transaction fails:
        39.5 with the defaults."""
        return self.rto * ((1 << (self.rc - 1)) - 1) + self.rm * self.rto


@dataclass(frozen=True, slots=True)
class ReliablePolicy:
    """
    A transaction over a reliable transport (RFC 8489 section 6.2.2): the
    request is sent once and the transaction fails when no response came
    within *ti* seconds.

    :raises ValueError: when *ti* is not a positive finite number.
    """

    ti: float = 39.5

    def __post_init__(self) -> None:
        _check_duration("ti", self.ti)

    @property
    def send_offsets(self) -> tuple[float, ...]:
        """The request is sent once, at 0."""
        return (0.0,)

    @property
    def timeout(self) -> float:
        """Ti."""
        return float(self.ti)


Policy = RetransmissionPolicy | ReliablePolicy


class TransactionState(Enum):
    """Where a :class:`Retransmission` is."""

    #: Sending and waiting for a response.
    WAITING = auto()
    #: A response ended the transaction.
    ANSWERED = auto()
    #: No response came in time.
    TIMED_OUT = auto()
    #: The caller gave up.
    CANCELLED = auto()


@dataclass(frozen=True, slots=True)
class Step:
    """
    What :meth:`Retransmission.poll` asks the caller to do.

    :ivar send: Send (again) the request now.
    :ivar timed_out: The transaction has just failed: stop, report a
        timeout.
    :ivar next_at: When to poll again (absolute, on the caller's clock), or
        ``None`` when the transaction is over.
    """

    send: bool
    timed_out: bool
    next_at: float | None


class Retransmission:
    """
    The clock of one transaction: a small state machine with no reactor.

    It starts in :attr:`TransactionState.WAITING` at *now*.  Call
    :meth:`poll` with the current time, first at once, then whenever the
    returned :attr:`Step.next_at` comes.  A poll that comes late (the
    process was busy, a test clock jumped) sends once for all the
    transmissions that were due and never sends after the deadline:
    the schedule stays anchored to the first transmission, so a late
    timer does not postpone the failure.
    """

    def __init__(self, policy: Policy, now: float) -> None:
        self.policy = policy
        self.started_at = now
        self.state = TransactionState.WAITING
        #: Transmissions the machine has asked for so far.
        self.transmissions = 0
        self._offsets = policy.send_offsets
        self._deadline = now + policy.timeout
        self._next = 0

    @property
    def deadline(self) -> float:
        """When the transaction fails without a response."""
        return self._deadline

    @property
    def next_at(self) -> float | None:
        """When the next transmission or the failure is due, or ``None``
        once the transaction is over."""
        if self.state is not TransactionState.WAITING:
            return None
        if self._next < len(self._offsets):
            return self.started_at + self._offsets[self._next]
        return self._deadline

    def poll(self, now: float) -> Step:
        """
        Advance to *now*.

        :returns: Whether to send now, whether the transaction has just
            timed out, and when to poll next.
        """
        if self.state is not TransactionState.WAITING:
            return Step(send=False, timed_out=False, next_at=None)
        if now >= self._deadline:
            self.state = TransactionState.TIMED_OUT
            return Step(send=False, timed_out=True, next_at=None)
        send = False
        while (
            self._next < len(self._offsets) and now >= self.started_at + self._offsets[self._next]
        ):
            self._next += 1
            send = True
        if send:
            self.transmissions += 1
        return Step(send=send, timed_out=False, next_at=self.next_at)

    def answer(self) -> None:
        """
        A response ended the transaction.

        :raises ValueError: when the transaction was already over.
        """
        self._end(TransactionState.ANSWERED)

    def cancel(self) -> None:
        """
        The caller ended the transaction.

        :raises ValueError: when the transaction was already over.
        """
        self._end(TransactionState.CANCELLED)

    def elapsed(self, now: float) -> float:
        """Seconds since the first transmission."""
        return now - self.started_at

    def _end(self, state: TransactionState) -> None:
        if self.state is not TransactionState.WAITING:
            raise ValueError(
                f"transaction is already {self.state.name.lower()}; it cannot become "
                f"{state.name.lower()}"
            )
        self.state = state


# -- requests and responses -------------------------------------------------


@dataclass(frozen=True, slots=True)
class StunResponse:
    """
    A success response that answered a request.

    :ivar message: The decoded response.
    :ivar source: The transport address the response came from.
    :ivar elapsed: Seconds from the first transmission to the response.
    :ivar transmissions: How many times the request had been sent; the
        round-trip time is only trustworthy when this is 1 (Karn's
        algorithm, RFC 8489 section 6.2.1).
    """

    message: Message
    source: Endpoint
    elapsed: float = 0.0
    transmissions: int = 1

    @property
    def transaction_id(self) -> bytes:
        """The 96-bit transaction id the response matched."""
        return self.message.transaction_id

    @property
    def mapped_address(self) -> Endpoint | None:
        """
        The server-reflexive address: XOR-MAPPED-ADDRESS (RFC 8489 section
        14.2), or MAPPED-ADDRESS (section 14.1) from servers that only send
        that.
        """
        xor = self.message.get(XorMappedAddress)
        if xor is not None:
            return xor.address
        plain = self.message.get(MappedAddress)
        return plain.address if plain is not None else None

    @property
    def response_origin(self) -> Endpoint | None:
        """RESPONSE-ORIGIN (RFC 5780 section 7.3), or the RFC 3489
        SOURCE-ADDRESS."""
        origin = self.message.get(ResponseOrigin)
        if origin is not None:
            return origin.address
        source = self.message.get(SourceAddress)
        return source.address if source is not None else None

    @property
    def other_address(self) -> Endpoint | None:
        """OTHER-ADDRESS (RFC 5780 section 7.4), or the RFC 3489
        CHANGED-ADDRESS."""
        other = self.message.get(OtherAddress)
        if other is not None:
            return other.address
        changed = self.message.get(ChangedAddress)
        return changed.address if changed is not None else None

    @property
    def alternate_server(self) -> Endpoint | None:
        """ALTERNATE-SERVER (RFC 8489 section 14.15), if any."""
        alternate = self.message.get(AlternateServer)
        return alternate.address if alternate is not None else None

    @property
    def software(self) -> str | None:
        """SOFTWARE (RFC 8489 section 14.14), if any."""
        software = self.message.get(Software)
        return software.value if software is not None else None


@dataclass(frozen=True, slots=True)
class StunRequest:
    """
    A request: what goes on the wire, and how a response to it is judged.

    :ivar transaction_id: 12 bytes.
    :ivar method: The STUN method, Binding by default.
    :ivar attributes: Attributes before the integrity attributes.
    :ivar integrity_key: When given, MESSAGE-INTEGRITY is appended and
        responses must carry a valid one (RFC 8489 section 9.1.4).
    :ivar integrity_sha256_key: The same for MESSAGE-INTEGRITY-SHA256.
    :ivar fingerprint: Append FINGERPRINT (RFC 8489 section 14.7).
    """

    transaction_id: bytes
    method: int = Method.BINDING
    attributes: tuple[Attribute, ...] = ()
    integrity_key: bytes | None = field(default=None, repr=False)
    integrity_sha256_key: bytes | None = field(default=None, repr=False)
    fingerprint: bool = False

    def __post_init__(self) -> None:
        if len(self.transaction_id) != TRANSACTION_ID_LENGTH:
            raise ValueError(
                f"transaction id is {len(self.transaction_id)} bytes; a request needs "
                f"{TRANSACTION_ID_LENGTH}"
            )

    @classmethod
    def build(
        cls,
        transaction_id: bytes,
        attributes: Iterable[Attribute] = (),
        *,
        method: int = Method.BINDING,
        integrity_key: bytes | None = None,
        integrity_sha256_key: bytes | None = None,
        fingerprint: bool = False,
    ) -> StunRequest:
        """Build a request from any iterable of attributes."""
        return cls(
            transaction_id,
            method,
            tuple(attributes),
            integrity_key,
            integrity_sha256_key,
            fingerprint,
        )

    def encode(self) -> bytes:
        """
        The request on the wire.

        :raises ValueError: when an attribute cannot be encoded.
        """
        return encode(
            self.method,
            MessageClass.REQUEST,
            self.transaction_id,
            self.attributes,
            integrity_key=self.integrity_key,
            integrity_sha256_key=self.integrity_sha256_key,
            fingerprint=self.fingerprint,
        )

    def matches(self, message: Message) -> bool:
        """Whether *message* is a response (success or error) to this
        request's method and transaction id."""
        return (
            message.transaction_id == self.transaction_id
            and message.method == self.method
            and message.message_class in (MessageClass.SUCCESS, MessageClass.ERROR)
        )

    def verify(self, message: Message) -> None:
        """
        Check the integrity attributes the request used on the response
        (RFC 8489 section 9.1.4): a response that fails must be discarded
        over UDP and must end the transaction over TCP.

        :raises StunIntegrityError: when an attribute is missing or wrong.
        """
        sha1_key, sha256_key = self.integrity_key, self.integrity_sha256_key
        if sha1_key is not None and sha256_key is not None:
            # The request carried both: the response may carry either.
            if message.get(MessageIntegritySha256) is not None:
                message.check_integrity_sha256(sha256_key)
            elif message.get(MessageIntegrity) is not None:
                message.check_integrity(sha1_key)
            else:
                raise StunIntegrityError(
                    "message carries neither MESSAGE-INTEGRITY nor MESSAGE-INTEGRITY-SHA256"
                )
        elif sha256_key is not None:
            message.check_integrity_sha256(sha256_key)
        elif sha1_key is not None:
            message.check_integrity(sha1_key)

    def outcome(
        self, message: Message, source: Endpoint, elapsed: float = 0.0, transmissions: int = 1
    ) -> StunResponse | StunError:
        """
        What a matching, verified response means (RFC 8489 sections 6.3.3
        and 6.3.4).

        :returns: A :class:`StunResponse` for a success response; for an
            error response the exception of its code
            (:func:`~nattraverse.errors.error_for_code`, carrying the
            error response as a :class:`StunResponse`); a
            :class:`~nattraverse.errors.StunDecodeError` when the response
            holds comprehension-required attributes this codec does not
            know, or an error response has no ERROR-CODE: the transaction
            has then failed.
        """
        response = StunResponse(message, source, elapsed, transmissions)
        if message.unknown_required:
            names = ", ".join(attribute_name(t) for t in message.unknown_required)
            return StunDecodeError(
                "attributes",
                f"response carries unknown comprehension-required attributes {names}",
                transaction_id=message.transaction_id,
                method=message.method,
                message_class=message.message_class,
            )
        if message.message_class is MessageClass.ERROR:
            error = message.get(ErrorCode)
            if error is None:
                return StunDecodeError(
                    "attributes",
                    "error response carries no ERROR-CODE",
                    transaction_id=message.transaction_id,
                    method=message.method,
                    message_class=message.message_class,
                )
            return error_for_code(error.code, error.reason, response)
        return response
