"""
STUN messages: decoding, encoding and integrity (RFC 8489 sections 5, 6, 14).

Decoding checks everything before trusting it: the two zero bits, the magic
cookie, the length field against the datagram, every attribute's bounds and
value, the position and value of FINGERPRINT.  Every failure is a
:class:`~nattraverse.errors.StunDecodeError` that says where.  Attributes
keep their order and duplicates; attributes after MESSAGE-INTEGRITY are
ignored except MESSAGE-INTEGRITY-SHA256 and FINGERPRINT (RFC 8489 section
14.5), and attributes after MESSAGE-INTEGRITY-SHA256 except FINGERPRINT.

RFC 3489 messages, which have no magic cookie and a 16-byte transaction id,
are decoded only when the caller asks for them with ``classic=True``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from nattraverse.errors import FingerprintMismatch, StunDecodeError, StunIntegrityError
from nattraverse.stun.attributes import (
    DEFAULT_ATTRIBUTES,
    Attribute,
    AttributeTable,
    AttributeValueError,
    MessageIntegrity,
    MessageIntegritySha256,
    UnknownAttribute,
    attribute_name,
)
from nattraverse.stun.constants import (
    CLASSIC_TRANSACTION_ID_LENGTH,
    FINGERPRINT_XOR,
    HEADER_LENGTH,
    MAGIC_COOKIE_BYTES,
    TRANSACTION_ID_LENGTH,
    AttributeType,
    MessageClass,
    is_comprehension_required,
    message_type,
    split_message_type,
)

A = TypeVar("A", bound=Attribute)

#: What the decoding functions accept: a datagram as the reactor hands it
#: over, or a stream buffer.
BytesLike = bytes | bytearray | memoryview

_HEADER = struct.Struct("!HH")
_ATTRIBUTE_HEADER = struct.Struct("!HH")
_MI = AttributeType.MESSAGE_INTEGRITY
_MI256 = AttributeType.MESSAGE_INTEGRITY_SHA256
_FP = AttributeType.FINGERPRINT


def is_stun(data: BytesLike) -> bool:
    """
    Whether *data* looks like an RFC 5389/8489 STUN message: first two bits
    zero, magic cookie, length field matching the datagram.  Cheap enough to
    demultiplex every datagram of a shared socket (RFC 7983).
    """
    return (
        len(data) >= HEADER_LENGTH
        and data[0] < 0x40
        and data[4:8] == MAGIC_COOKIE_BYTES
        and len(data) - HEADER_LENGTH == (data[2] << 8 | data[3])
        and not data[3] & 3
    )


def frame_length(header: BytesLike) -> int:
    """
    The length of the whole message whose first 4 or more bytes are
    *header*, for framing STUN over a stream (RFC 8489 section 6.2.2).
    """
    return HEADER_LENGTH + (header[2] << 8 | header[3])


def new_transaction_id(random_bytes: Callable[[int], bytes]) -> bytes:
    """A 96-bit transaction id from the given source of random bytes."""
    return random_bytes(TRANSACTION_ID_LENGTH)


@dataclass(frozen=True, slots=True)
class Message:
    """
    A STUN message.

    :ivar method: The method (:class:`~nattraverse.stun.constants.Method`).
    :ivar message_class: Request, indication, success or error.
    :ivar transaction_id: 12 bytes, or 16 for an RFC 3489 message.
    :ivar attributes: In wire order, duplicates kept.
    :ivar raw: The bytes the message was decoded from (empty when built).
    :ivar offsets: For a decoded message, the offset in :attr:`raw` of each
        attribute's header.
    :ivar unknown_required: Comprehension-required attribute types that the
        table in use does not know (RFC 8489 section 6.3.1: a request with
        any gets 420 Unknown Attribute).
    """

    method: int
    message_class: MessageClass
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    raw: bytes = field(default=b"", repr=False, compare=False)
    offsets: tuple[int, ...] = field(default=(), repr=False, compare=False)
    unknown_required: tuple[int, ...] = ()

    @property
    def classic(self) -> bool:
        """Whether this is an RFC 3489 message without magic cookie."""
        return len(self.transaction_id) == CLASSIC_TRANSACTION_ID_LENGTH

    def get(self, kind: type[A]) -> A | None:
        """The first attribute of this class, or ``None``."""
        for attribute in self.attributes:
            if type(attribute) is kind:
                return attribute
        return None

    def get_all(self, kind: type[A]) -> list[A]:
        """Every attribute of this class, in order."""
        return [a for a in self.attributes if type(a) is kind]

    def encode(
        self,
        *,
        integrity_key: bytes | None = None,
        integrity_sha256_key: bytes | None = None,
        sha256_length: int = 32,
        fingerprint: bool = False,
        padding: bytes = b"\x00",
    ) -> bytes:
        """
        Encode the message, appending MESSAGE-INTEGRITY (when
        *integrity_key* is given), MESSAGE-INTEGRITY-SHA256 (when
        *integrity_sha256_key* is given, truncated to *sha256_length*
        bytes) and FINGERPRINT (when *fingerprint* is true), in that order.

        :param padding: The byte that pads attribute values to a multiple of
            four; its value does not matter to receivers.
        """
        return encode(
            self.method,
            self.message_class,
            self.transaction_id,
            self.attributes,
            integrity_key=integrity_key,
            integrity_sha256_key=integrity_sha256_key,
            sha256_length=sha256_length,
            fingerprint=fingerprint,
            padding=padding,
        )

    def check_integrity(self, key: bytes) -> None:
        """
        Verify MESSAGE-INTEGRITY (HMAC-SHA1) of a decoded message, in
        constant time.

        :raises StunIntegrityError: when it is missing or wrong.
        """
        self._check_mac(MessageIntegrity, key, hashlib.sha1)

    def check_integrity_sha256(self, key: bytes) -> None:
        """
        Verify MESSAGE-INTEGRITY-SHA256 of a decoded message, in constant
        time.

        :raises StunIntegrityError: when it is missing or wrong.
        """
        self._check_mac(MessageIntegritySha256, key, hashlib.sha256)

    def _check_mac(
        self,
        kind: type[MessageIntegrity] | type[MessageIntegritySha256],
        key: bytes,
        digest: Callable[[], hashlib._Hash],
    ) -> None:
        for attribute, offset in zip(self.attributes, self.offsets, strict=False):
            if type(attribute) is kind:
                mac = attribute.mac
                expected = _mac(self.raw[:offset], offset + 4 + len(mac), key, digest)
                if not hmac.compare_digest(expected[: len(mac)], mac):
                    raise StunIntegrityError(
                        f"{kind.NAME} at offset {offset} does not match: wrong key, "
                        "or the message was altered"
                    )
                return
        raise StunIntegrityError(f"message carries no {kind.NAME}")


def _mac(
    text: bytes,
    end: int,
    key: bytes,
    digest: Callable[[], hashlib._Hash],
) -> bytes:
    """
    HMAC over *text* (a message prefix that ends where the integrity
    attribute starts), with the length field set as if the message ended at
    *end*, the end of the integrity attribute (RFC 8489 section 14.5).
    """
    header = text[:2] + struct.pack("!H", end - HEADER_LENGTH) + text[4:HEADER_LENGTH]
    mac = hmac.new(key, header, digest)
    mac.update(text[HEADER_LENGTH:])
    return mac.digest()


def _fingerprint(text: bytes) -> int:
    return (zlib.crc32(text) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _attribute(type_code: int, value: bytes, padding: bytes) -> bytes:
    return _ATTRIBUTE_HEADER.pack(type_code, len(value)) + value + padding * (-len(value) % 4)


def encode(
    method: int,
    message_class: int,
    transaction_id: bytes,
    attributes: Iterable[Attribute] = (),
    *,
    integrity_key: bytes | None = None,
    integrity_sha256_key: bytes | None = None,
    sha256_length: int = 32,
    fingerprint: bool = False,
    padding: bytes = b"\x00",
) -> bytes:
    """
    Encode a message; see :meth:`Message.encode`.

    :raises ValueError: when the transaction id has the wrong size, an
        attribute value cannot be encoded, or the message would exceed the
        16-bit length field.
    """
    if len(transaction_id) == TRANSACTION_ID_LENGTH:
        tail = MAGIC_COOKIE_BYTES + transaction_id
    elif len(transaction_id) == CLASSIC_TRANSACTION_ID_LENGTH:
        tail = transaction_id
    else:
        raise ValueError(
            f"transaction id is {len(transaction_id)} bytes; STUN needs 12 (or 16 for RFC 3489)"
        )
    if len(padding) != 1:
        raise ValueError("padding must be a single byte")
    if sha256_length not in (16, 20, 24, 28, 32):
        raise ValueError("sha256_length must be 16, 20, 24, 28 or 32")
    body = bytearray()
    for attribute in attributes:
        if isinstance(attribute, UnknownAttribute):
            type_code, name = attribute.type, attribute.name
        else:
            type_code, name = attribute.TYPE, attribute.NAME
        try:
            value = attribute.encode_value(transaction_id)
            if len(value) > 0xFFFF:
                raise ValueError(f"{name} value is longer than 65535 bytes")
            body += _attribute(type_code, value, padding)
        except struct.error as e:
            # A number out of range for its field (a port, a priority, a
            # type code): the documented ValueError, not struct's own error.
            raise ValueError(f"{name} cannot be encoded: {e}") from None
    head = struct.pack("!H", message_type(method, message_class))
    if integrity_key is not None:
        mac = _mac(
            head + b"\0\0" + tail + body,
            HEADER_LENGTH + len(body) + 24,
            integrity_key,
            hashlib.sha1,
        )
        body += _attribute(_MI, mac, padding)
    if integrity_sha256_key is not None:
        end = HEADER_LENGTH + len(body) + 4 + sha256_length
        mac = _mac(head + b"\0\0" + tail + body, end, integrity_sha256_key, hashlib.sha256)
        body += _attribute(_MI256, mac[:sha256_length], padding)
    if fingerprint:
        length = len(body) + 8
        if length > 0xFFFF:
            raise ValueError("message is longer than 65535 bytes")
        crc = _fingerprint(head + struct.pack("!H", length) + tail + body)
        body += _attribute(_FP, struct.pack("!I", crc), padding)
    if len(body) > 0xFFFF:
        raise ValueError("message is longer than 65535 bytes")
    return head + struct.pack("!H", len(body)) + tail + bytes(body)


def decode(
    data: BytesLike,
    *,
    table: AttributeTable = DEFAULT_ATTRIBUTES,
    classic: bool = False,
) -> Message:
    """
    Decode and check one STUN message.

    :param table: The attribute types to decode; others are kept as
        :class:`~nattraverse.stun.attributes.UnknownAttribute`.
    :param classic: Accept RFC 3489 messages (no magic cookie; the 16 bytes
        after the length are the transaction id).
    :raises StunDecodeError: naming the place that is wrong.  When the
        header was readable it carries the transaction id, method and class.
    """
    data = bytes(data)
    size = len(data)
    if size < HEADER_LENGTH:
        raise StunDecodeError(
            "header", f"datagram is {size} bytes, shorter than the 20-byte header"
        )
    raw_type, length = _HEADER.unpack_from(data)
    if raw_type & 0xC000:
        raise StunDecodeError("header", "the first two bits are not zero")
    if data[4:8] == MAGIC_COOKIE_BYTES:
        transaction_id = data[8:HEADER_LENGTH]
    elif classic:
        transaction_id = data[4:HEADER_LENGTH]
    else:
        raise StunDecodeError("header", f"magic cookie is 0x{data[4:8].hex()}, not 0x2112a442")
    if length % 4:
        raise StunDecodeError("header", f"length {length} is not a multiple of 4")
    if HEADER_LENGTH + length != size:
        raise StunDecodeError(
            "header", f"length field says {length} bytes follow the header, but {size - 20} do"
        )
    method, message_class = split_message_type(raw_type)

    def error(where: str, reason: str, kind: type[StunDecodeError] = StunDecodeError) -> Exception:
        return kind(
            where, reason, transaction_id=transaction_id, method=method, message_class=message_class
        )

    attributes: list[Attribute] = []
    offsets: list[int] = []
    unknown: list[int] = []
    after_integrity = after_sha256 = after_fingerprint = False
    offset = HEADER_LENGTH
    while offset < size:
        if size - offset < 4:
            raise error(f"attribute header at offset {offset}", "truncated")
        type_code, value_length = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        name = attribute_name(type_code, table)
        start = offset + 4
        end = start + value_length
        if end > size:
            raise error(
                f"attribute {name} at offset {offset}",
                f"value of {value_length} bytes runs past the end of the message",
            )
        padded_end = end + (-value_length % 4)
        if padded_end > size:
            raise error(f"attribute {name} at offset {offset}", "padding runs past the end")
        if after_fingerprint:
            raise error(
                f"attribute {name} at offset {offset}",
                "follows FINGERPRINT, which must be the last attribute",
                FingerprintMismatch,
            )
        ignored = (after_integrity and type_code not in (_MI256, _FP)) or (
            after_sha256 and type_code != _FP
        )
        if not ignored:
            kind = table.get(type_code)
            attribute: Attribute
            if kind is None:
                if is_comprehension_required(type_code):
                    unknown.append(type_code)
                attribute = UnknownAttribute(type_code, data[start:end])
            else:
                try:
                    attribute = kind.decode_value(data[start:end], transaction_id)
                except AttributeValueError as e:
                    raise error(f"attribute {name} at offset {offset}", str(e)) from None
            if type_code == _MI:
                after_integrity = True
            elif type_code == _MI256:
                after_sha256 = True
            elif type_code == _FP:
                after_fingerprint = True
                # Compare the raw value, so that the check holds whatever
                # class (if any) the table in use maps FINGERPRINT to.
                if data[start:end] != struct.pack("!I", _fingerprint(data[:offset])):
                    raise error(
                        f"attribute FINGERPRINT at offset {offset}",
                        "CRC-32 does not match the message",
                        FingerprintMismatch,
                    )
            attributes.append(attribute)
            offsets.append(offset)
        offset = padded_end
    return Message(
        method,
        MessageClass(message_class),
        transaction_id,
        tuple(attributes),
        data,
        tuple(offsets),
        tuple(unknown),
    )
