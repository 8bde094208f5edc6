"""
The STUN Binding responder: a pure function of request, source and
receiving socket, with no sockets, clock or per-source state.

It implements the server side of RFC 8489 (section 6.3), RFC 5780 section
6.1 (behaviour discovery, when the server owns a second address) and the
answers RFC 3489 clients expect (MAPPED-ADDRESS, SOURCE-ADDRESS,
CHANGED-ADDRESS).  The Twisted adapters in :mod:`nattraverse.stun.server`
feed it datagrams and send what it returns.

With a table of UDP binding tokens (``bindings``, a
:class:`~nattraverse.rendezvous.udpbind.UdpBindings`), a Binding request
over UDP whose USERNAME names a live token must carry a MESSAGE-INTEGRITY
keyed by it: then its source address is reported to the token's owner and
the answer carries MESSAGE-INTEGRITY and FINGERPRINT; otherwise it gets a
401 and nothing is reported.  Any other USERNAME gets the ordinary answer.

Amplification: with RFC 5780 off and no SOFTWARE configured, a response to
an unauthenticated IPv4 request is at most 1.6 times the request (a 20-byte
Binding request gets a 32-byte answer); error responses shorten their reason
phrase to stay within that budget.  An IPv6 XOR-MAPPED-ADDRESS alone makes
a 44-byte answer, so IPv6 answers are the minimal ones, not within 1.6x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from nattraverse._types import Endpoint
from nattraverse.errors import FingerprintMismatch, StunDecodeError, StunIntegrityError
from nattraverse.stun.attributes import (
    Attribute,
    ChangedAddress,
    ChangeRequest,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    UnknownAttributes,
    Username,
    XorMappedAddress,
)
from nattraverse.stun.constants import (
    HEADER_LENGTH,
    MessageClass,
    Method,
)
from nattraverse.stun.message import Message, decode, encode

#: Largest answer, relative to the request, for unauthenticated requests
#: (RFC 5780 off, no SOFTWARE).
AMPLIFICATION_FACTOR = 1.6

#: Largest UDP payload over IPv4 (65535 - 20 - 8); answers never exceed it.
MAX_UDP_PAYLOAD = 65507


class SocketKey(NamedTuple):
    """
    Which of the server's sockets: address 0 (primary) or 1 (alternate),
    port 0 (primary) or 1 (alternate).  A server without a second address
    has only ``SocketKey(0, 0)``.
    """

    address: int
    port: int


PRIMARY = SocketKey(0, 0)


@dataclass(frozen=True, slots=True)
class ServerAddresses:
    """
    The two addresses and two ports of an RFC 5780 server.

    :ivar primary: Primary address and port (``Da:Dp`` for requests to it).
    :ivar alternate: Alternate address and port (``Ca:Cp``).
    """

    primary: Endpoint
    alternate: Endpoint

    def endpoint(self, key: SocketKey) -> Endpoint:
        """The transport address of the socket *key*."""
        host = (self.primary.host, self.alternate.host)[key.address]
        port = (self.primary.port, self.alternate.port)[key.port]
        return Endpoint(host, port)


class Reply(NamedTuple):
    """
    What to send: *payload* from the socket *via* to *destination*.
    """

    payload: bytes
    via: SocketKey
    destination: Endpoint


@dataclass(slots=True)
class ServerStats:
    """
    Counters of a STUN server, for logs and tests.

    :ivar bindings: Authenticated UDP binding requests answered (their
        source reported to the token's owner).
    :ivar integrity_failed: Requests naming a live binding token whose
        MESSAGE-INTEGRITY was missing or wrong (refused with 401).
    """

    requests: int = 0
    responses: int = 0
    error_responses: int = 0
    dropped_not_stun: int = 0
    dropped_malformed: int = 0
    dropped_not_request: int = 0
    dropped_over_budget: int = 0
    errors_by_code: dict[int, int] = field(default_factory=dict)
    bindings: int = 0
    integrity_failed: int = 0


class Bindings(Protocol):
    """
    What the responder needs of a table of UDP binding tokens
    (:class:`~nattraverse.rendezvous.udpbind.UdpBindings`).
    """

    def lookup(self, username: str) -> bytes | None:
        """The MESSAGE-INTEGRITY key of the live token *username* names, or ``None``."""

    def observed(self, username: str, source: Endpoint, *, second: bool = False) -> bool:
        """
        An authenticated request with *username* came from *source*, to a
        second port of the server when *second* is true.
        """


class _Refuse(Exception):
    def __init__(self, code: int, reason: str, extra: tuple[Attribute, ...] = ()) -> None:
        self.code = code
        self.reason = reason
        self.extra = extra


class BindingResponder:
    """
    Answers STUN Binding requests.

    :param addresses: The server's two addresses for RFC 5780; ``None`` for
        a single-address server, which answers CHANGE-REQUEST,
        RESPONSE-PORT and PADDING with 420 (RFC 5780 section 6.1).
    :param software: Text of a SOFTWARE attribute to add to every answer,
        or ``None`` (the default: smaller answers).
    :param stats: Counters to update.
    :param bindings: The UDP binding tokens of the rendezvous, or ``None``
        (no request is authenticated; every USERNAME is ignored).
    """

    def __init__(
        self,
        addresses: ServerAddresses | None = None,
        *,
        software: str | None = None,
        stats: ServerStats | None = None,
        bindings: Bindings | None = None,
    ) -> None:
        self.addresses = addresses
        self.software = None if software is None else Software(software)
        self.stats = ServerStats() if stats is None else stats
        self.bindings = bindings

    @property
    def fast_path_allowed(self) -> bool:
        """
        Whether a plain 20-byte Binding request gets exactly the minimal
        answer (XOR-MAPPED-ADDRESS alone), so that an adapter may build it
        without this class, as :class:`~nattraverse.stun.fastpath.FastStunPort`
        does.
        """
        return self.addresses is None and self.software is None

    def respond(
        self, data: bytes, source: Endpoint, local: SocketKey = PRIMARY, *, stream: bool = False
    ) -> Reply | None:
        """
        The answer to one datagram (or one framed message over TCP when
        *stream* is true), or ``None`` when it must be dropped silently:
        not STUN, not a request, or too malformed to answer.
        """
        stats = self.stats
        try:
            message = decode(data, classic=True)
        except FingerprintMismatch:
            # RFC 8489 section 7.3: a message whose FINGERPRINT fails is
            # discarded silently; it may not even be STUN.
            stats.dropped_malformed += 1
            return None
        except StunDecodeError as e:
            if (
                e.message_class == MessageClass.REQUEST
                and e.transaction_id is not None
                and e.method is not None
                and not _looks_foreign(data)
            ):
                stats.requests += 1
                return self._error(
                    e.method, e.transaction_id, 400, f"malformed {e.where}", data, source, local
                )
            if _looks_foreign(data):
                stats.dropped_not_stun += 1
            else:
                stats.dropped_malformed += 1
            return None
        if message.message_class != MessageClass.REQUEST:
            stats.dropped_not_request += 1
            return None
        stats.requests += 1
        try:
            binding = None if stream else self._binding(message)
            if binding is None:
                return self._answer(message, data, source, local, stream)
            username, key = binding
            reply = self._answer(message, data, source, local, stream, key)
            assert self.bindings is not None
            if self.bindings.observed(username, source, second=local.port == 1):
                stats.bindings += 1
            return reply
        except _Refuse as refusal:
            return self._error(
                message.method,
                message.transaction_id,
                refusal.code,
                refusal.reason,
                data,
                source,
                local,
                refusal.extra,
                fingerprint=message.get(Fingerprint) is not None and not message.classic,
            )

    def _binding(self, message: Message) -> tuple[str, bytes] | None:
        """
        The USERNAME and key of a UDP binding request whose USERNAME names a
        live token and whose integrity holds; ``None`` for any other
        request.

        :raises _Refuse: 401 when the USERNAME names a live token but the
            integrity does not hold.
        """
        bindings = self.bindings
        if bindings is None or message.method != Method.BINDING or message.classic:
            return None
        username = message.get(Username)
        if username is None:
            return None
        key = bindings.lookup(username.value)
        if key is None:
            return None
        try:
            message.check_integrity(key)
        except StunIntegrityError:
            self.stats.integrity_failed += 1
            raise _Refuse(401, "Unauthenticated") from None
        return username.value, key

    def _answer(
        self,
        message: Message,
        data: bytes,
        source: Endpoint,
        local: SocketKey,
        stream: bool,
        integrity_key: bytes | None = None,
    ) -> Reply:
        if message.method != Method.BINDING:
            raise _Refuse(400, "unsupported method")
        if message.unknown_required:
            raise _Refuse(420, "unknown attribute", (UnknownAttributes(message.unknown_required),))
        change = message.get(ChangeRequest)
        response_port = message.get(ResponsePort)
        padding = message.get(Padding)
        addresses = self.addresses
        if addresses is None:
            unsupported = [a.TYPE for a in (change, response_port, padding) if a is not None]
            if unsupported:
                raise _Refuse(
                    420, "no second address here", (UnknownAttributes(tuple(unsupported)),)
                )
        elif stream and (change is not None and (change.change_ip or change.change_port)):
            raise _Refuse(400, "CHANGE-REQUEST needs UDP")
        elif stream and response_port is not None:
            raise _Refuse(400, "RESPONSE-PORT needs UDP")
        elif padding is not None and response_port is not None:
            raise _Refuse(400, "PADDING with RESPONSE-PORT")

        via = local
        if change is not None:
            via = SocketKey(
                local.address ^ int(change.change_ip), local.port ^ int(change.change_port)
            )
        destination = source
        if response_port is not None:
            destination = Endpoint(source.host, response_port.port)

        attributes: list[Attribute] = []
        if message.classic:
            attributes.append(MappedAddress(source))
            if addresses is not None:
                attributes.append(SourceAddress(addresses.endpoint(via)))
                attributes.append(ChangedAddress(addresses.endpoint(_other(local))))
        else:
            attributes.append(XorMappedAddress(source))
            if addresses is not None:
                attributes.append(MappedAddress(source))
                attributes.append(ResponseOrigin(addresses.endpoint(via)))
                attributes.append(OtherAddress(addresses.endpoint(_other(local))))
        if self.software is not None:
            attributes.append(self.software)
        fingerprint = integrity_key is not None or (
            message.get(Fingerprint) is not None and not message.classic
        )
        if padding is not None and not message.classic:
            # RFC 5780 section 6.1 suggests padding to the MTU; we echo the
            # request's padding length, so that PADDING never amplifies, cut
            # so that the answer still fits in one datagram.
            used = HEADER_LENGTH + sum(
                4 + _padded(len(a.encode_value(message.transaction_id))) for a in attributes
            )
            room = MAX_UDP_PAYLOAD - used - 4 - 8 * fingerprint - 24 * (integrity_key is not None)
            length = min(len(padding.value), room - room % 4)
            attributes.append(Padding(b"\x00" * length))
        payload = encode(
            message.method,
            MessageClass.SUCCESS,
            message.transaction_id,
            attributes,
            integrity_key=integrity_key,
            fingerprint=fingerprint,
        )
        self.stats.responses += 1
        return Reply(payload, via, destination)

    def _error(
        self,
        method: int,
        transaction_id: bytes,
        code: int,
        reason: str,
        data: bytes,
        source: Endpoint,
        local: SocketKey,
        extra: tuple[Attribute, ...] = (),
        *,
        fingerprint: bool = False,
    ) -> Reply | None:
        stats = self.stats
        budget = int(len(data) * AMPLIFICATION_FACTOR)
        # Header, ERROR-CODE header and fixed part, the extra attributes,
        # FINGERPRINT when the request had one (RFC 8489 section 7.3).
        fixed = (
            HEADER_LENGTH
            + 8
            + sum(4 + _padded(len(a.encode_value(transaction_id))) for a in extra)
            + 8 * fingerprint
        )
        room = budget - fixed
        if room < 0:
            stats.dropped_over_budget += 1
            return None
        text = reason.encode()[: room - room % 4].decode("utf-8", "ignore")
        attributes: tuple[Attribute, ...] = (ErrorCode(code, text), *extra)
        payload = encode(
            method, MessageClass.ERROR, transaction_id, attributes, fingerprint=fingerprint
        )
        stats.error_responses += 1
        stats.errors_by_code[code] = stats.errors_by_code.get(code, 0) + 1
        return Reply(payload, local, source)


def _other(key: SocketKey) -> SocketKey:
    return SocketKey(key.address ^ 1, key.port ^ 1)


def _padded(length: int) -> int:
    return length + (-length % 4)


def _looks_foreign(data: bytes) -> bool:
    """
    Whether *data* is clearly not meant as STUN: the first two bits are
    set, or it is too short to hold a header.  Such datagrams are counted
    as "not STUN" and never answered.
    """
    return len(data) < HEADER_LENGTH or data[0] >= 0x40
