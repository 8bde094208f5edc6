"""
STUN message framing, encoding and decoding (RFC 8489 sections 5, 6 and 14).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattraverse._types import Endpoint
from nattraverse.errors import FingerprintMismatch, StunDecodeError, StunIntegrityError
from nattraverse.stun.attributes import (
    DEFAULT_ATTRIBUTES,
    AlternateDomain,
    AlternateServer,
    Attribute,
    ChangedAddress,
    ChangeRequest,
    ErrorCode,
    Fingerprint,
    IceControlled,
    IceControlling,
    MappedAddress,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    OtherAddress,
    Padding,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Priority,
    Realm,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    UnknownAttribute,
    UnknownAttributes,
    UseCandidate,
    Userhash,
    Username,
    XorMappedAddress,
)
from nattraverse.stun.constants import (
    MAGIC_COOKIE_BYTES,
    MessageClass,
    Method,
    message_type,
    split_message_type,
)
from nattraverse.stun.message import (
    Message,
    decode,
    encode,
    frame_length,
    is_stun,
    new_transaction_id,
)
from tests.unit.stun import vectors

TRANSACTION_ID = bytes.fromhex("000102030405060708090a0b")
#: An RFC 3489 transaction id: 16 bytes, the first four not the cookie.
CLASSIC_TRANSACTION_ID = bytes.fromhex("a1a2a3a4a5a6a7a8a9aaabacadaeafb0")
#: The message type of the hand-built messages: method 0x123, indication.
METHOD = 0x123
MESSAGE_TYPE = 0x0453
KEY = b"sesame"


def _tlv(type_code: int, value: bytes) -> bytes:
    """One attribute: header, value, zero padding."""
    return struct.pack("!HH", type_code, len(value)) + value + b"\0" * (-len(value) % 4)


def _message(
    *attributes: bytes,
    type_field: int = MESSAGE_TYPE,
    length: int | None = None,
    cookie: bytes = MAGIC_COOKIE_BYTES,
    transaction_id: bytes = TRANSACTION_ID,
) -> bytes:
    """A message built by hand, the length field right unless *length* is given."""
    body = b"".join(attributes)
    size = len(body) if length is None else length
    return struct.pack("!HH", type_field, size) + cookie + transaction_id + body


def _with_fingerprint(data: bytes) -> bytes:
    """*data* with a correct FINGERPRINT appended (RFC 8489 section 14.7)."""
    longer = data[:2] + struct.pack("!H", len(data) - 20 + 8) + data[4:]
    crc = (zlib.crc32(longer) ^ 0x5354554E) & 0xFFFFFFFF
    return longer + _tlv(0x8028, struct.pack("!I", crc))


def _decode_error(data: bytes, *, classic: bool = False) -> StunDecodeError:
    """The error that decoding *data* raises."""
    with pytest.raises(StunDecodeError) as caught:
        decode(data, classic=classic)
    return caught.value


# -- message type (RFC 8489 section 5) ---------------------------------------


def test_binding_success_type() -> None:
    """A Binding success response has message type 0x0101."""
    assert message_type(Method.BINDING, MessageClass.SUCCESS) == 0x0101


@pytest.mark.parametrize(
    ("method", "message_class", "value"),
    [
        (0x001, MessageClass.REQUEST, 0x0001),
        (0x001, MessageClass.INDICATION, 0x0011),
        (0x001, MessageClass.ERROR, 0x0111),
        (METHOD, MessageClass.INDICATION, MESSAGE_TYPE),
        (0x003, MessageClass.SUCCESS, 0x0103),  # TURN Allocate success
        (0xFFF, MessageClass.REQUEST, 0x3EEF),
        (0xFFF, MessageClass.ERROR, 0x3FFF),
    ],
)
def test_message_type_values(method: int, message_class: MessageClass, value: int) -> None:
    """Method and class bits interleave as in RFC 8489 figure 3."""
    assert message_type(method, message_class) == value


@pytest.mark.parametrize("message_class", list(MessageClass))
def test_message_type_round_trip(message_class: MessageClass) -> None:
    """Every 12-bit method and class survive message_type and split_message_type."""
    for method in range(0x1000):
        value = message_type(method, message_class)
        assert value < 0x4000
        assert split_message_type(value) == (method, message_class)


def test_message_type_distinct() -> None:
    """No two (method, class) pairs share a message type."""
    values = {message_type(m, c) for m in range(0x1000) for c in MessageClass}
    assert len(values) == 0x4000


def test_new_transaction_id() -> None:
    """A new transaction id is 12 bytes from the given source."""
    assert new_transaction_id(lambda n: bytes(range(n))) == bytes(range(12))


# -- header errors -------------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    """A malformed datagram and the error decoding it must raise."""

    name: str
    data: bytes
    where: str
    reason: str
    kind: type[StunDecodeError] = StunDecodeError


HEADER_ERRORS = [
    Malformed("empty", b"", "header", "datagram is 0 bytes, shorter than the 20-byte header"),
    Malformed(
        "19 bytes",
        _message()[:19],
        "header",
        "datagram is 19 bytes, shorter than the 20-byte header",
    ),
    Malformed(
        "wrong cookie",
        _message(cookie=b"\x21\x12\xa4\x43"),
        "header",
        "magic cookie is 0x2112a443, not 0x2112a442",
    ),
    Malformed(
        "RTP-like first byte",
        _message(type_field=0x8001),
        "header",
        "the first two bits are not zero",
    ),
    Malformed(
        "second bit set", _message(type_field=0x4001), "header", "the first two bits are not zero"
    ),
    Malformed(
        "length not a multiple of 4",
        _message(b"\0\0", length=2),
        "header",
        "length 2 is not a multiple of 4",
    ),
    Malformed(
        "datagram ends inside an attribute header",
        _message(_tlv(0x8022, b"abcd"), b"\x80\x22"),
        "header",
        "length 10 is not a multiple of 4",
    ),
    Malformed(
        "length field too long",
        _message(_tlv(0x8022, b"abcd"), length=12),
        "header",
        "length field says 12 bytes follow the header, but 8 do",
    ),
    Malformed(
        "length field too short",
        _message(_tlv(0x8022, b"abcd"), length=4),
        "header",
        "length field says 4 bytes follow the header, but 8 do",
    ),
]


@pytest.mark.parametrize("case", HEADER_ERRORS, ids=[c.name for c in HEADER_ERRORS])
def test_header_error(case: Malformed) -> None:
    """A bad header raises StunDecodeError naming the header and the fault."""
    error = _decode_error(case.data)
    assert (type(error), error.where, error.reason) == (case.kind, case.where, case.reason)
    assert str(error) == f"{case.where}: {case.reason}"


@pytest.mark.parametrize("case", HEADER_ERRORS, ids=[c.name for c in HEADER_ERRORS])
def test_header_error_carries_no_header_fields(case: Malformed) -> None:
    """A message rejected at the header carries no transaction id, method or class."""
    error = _decode_error(case.data)
    assert (error.transaction_id, error.method, error.message_class) == (None, None, None)


@pytest.mark.parametrize("case", HEADER_ERRORS, ids=[c.name for c in HEADER_ERRORS])
def test_header_error_is_not_stun(case: Malformed) -> None:
    """is_stun agrees with the decoder: a bad header is not STUN."""
    assert not is_stun(case.data)


# -- errors past the header ----------------------------------------------------

BODY_ERRORS = [
    Malformed(
        "value runs past the end",
        _message(struct.pack("!HH", 0x8022, 100) + b"abcd"),
        "attribute SOFTWARE at offset 20",
        "value of 100 bytes runs past the end of the message",
    ),
    Malformed(
        "second attribute runs past the end",
        _message(_tlv(0x0024, b"\0\0\0\1"), struct.pack("!HH", 0x0020, 8) + b"\0\1\0\0"),
        "attribute XOR-MAPPED-ADDRESS at offset 28",
        "value of 8 bytes runs past the end of the message",
    ),
    Malformed(
        "unknown attribute runs past the end",
        _message(struct.pack("!HH", 0x7777, 0xFFFF)),
        "attribute 0x7777 at offset 20",
        "value of 65535 bytes runs past the end of the message",
    ),
    Malformed(
        "bad fingerprint",
        _message(_tlv(0x8028, b"\0\0\0\0")),
        "attribute FINGERPRINT at offset 20",
        "CRC-32 does not match the message",
        FingerprintMismatch,
    ),
    Malformed(
        "fingerprint of another message",
        _message(_tlv(0x8022, b"x"), vectors.REQUEST[-8:]),
        "attribute FINGERPRINT at offset 28",
        "CRC-32 does not match the message",
        FingerprintMismatch,
    ),
]


@pytest.mark.parametrize("case", BODY_ERRORS, ids=[c.name for c in BODY_ERRORS])
def test_body_error(case: Malformed) -> None:
    """A bad attribute raises an error naming it and its offset."""
    error = _decode_error(case.data)
    assert (type(error), error.where, error.reason) == (case.kind, case.where, case.reason)


@pytest.mark.parametrize("case", BODY_ERRORS, ids=[c.name for c in BODY_ERRORS])
def test_body_error_carries_header_fields(case: Malformed) -> None:
    """Past the header, the error carries the transaction id, method and class."""
    error = _decode_error(case.data)
    assert (error.transaction_id, error.method, error.message_class) == (
        TRANSACTION_ID,
        METHOD,
        MessageClass.INDICATION,
    )


def test_fingerprint_not_last() -> None:
    """An attribute after a correct FINGERPRINT raises FingerprintMismatch naming it."""
    software = _tlv(0x8022, b"late")
    # The CRC covers a length field that already counts the late attribute.
    head = _message(b"\0" * 8, software)[:20]
    crc = (zlib.crc32(head) ^ 0x5354554E) & 0xFFFFFFFF
    data = _message(_tlv(0x8028, struct.pack("!I", crc)), software)
    error = _decode_error(data)
    assert (type(error), error.where, error.reason) == (
        FingerprintMismatch,
        "attribute SOFTWARE at offset 28",
        "follows FINGERPRINT, which must be the last attribute",
    )


def test_fingerprint_made_stale_by_appending() -> None:
    """Appending after FINGERPRINT changes the length it covers, so its CRC fails."""
    data = _with_fingerprint(_message(_tlv(0x8022, b"x")))
    data = data[:2] + struct.pack("!H", len(data) - 20 + 8) + data[4:] + _tlv(0x0024, bytes(4))
    error = _decode_error(data)
    assert isinstance(error, FingerprintMismatch)
    assert error.where == "attribute FINGERPRINT at offset 28"


def test_good_fingerprint() -> None:
    """A correct FINGERPRINT decodes, as the last attribute."""
    message = decode(_with_fingerprint(_message(_tlv(0x8022, b"x"))))
    assert [type(a) for a in message.attributes] == [Software, Fingerprint]


# -- attribute order, duplicates, unknown attributes ----------------------------


def test_attributes_after_integrity_ignored() -> None:
    """Attributes after MESSAGE-INTEGRITY are dropped, unknown ones included."""
    data = _message(
        _tlv(0x0006, b"user"),
        _tlv(0x0008, bytes(20)),
        _tlv(0x8022, b"late"),
        _tlv(0x0024, bytes(4)),
        _tlv(0x7F00, b"unknown"),
    )
    message = decode(data)
    assert message.attributes == (Username("user"), MessageIntegrity(bytes(20)))
    assert message.offsets == (20, 28)
    assert message.unknown_required == ()


def test_sha256_and_fingerprint_kept_after_integrity() -> None:
    """MESSAGE-INTEGRITY-SHA256 and FINGERPRINT after MESSAGE-INTEGRITY are kept."""
    data = _with_fingerprint(
        _message(
            _tlv(0x0008, bytes(20)),
            _tlv(0x8022, b"ignored"),
            _tlv(0x001C, bytes(16)),
        )
    )
    message = decode(data)
    assert [type(a) for a in message.attributes] == [
        MessageIntegrity,
        MessageIntegritySha256,
        Fingerprint,
    ]


def test_only_fingerprint_kept_after_sha256() -> None:
    """After MESSAGE-INTEGRITY-SHA256 only FINGERPRINT is kept."""
    data = _with_fingerprint(
        _message(
            _tlv(0x001C, bytes(32)),
            _tlv(0x0008, bytes(20)),
            _tlv(0x001C, bytes(16)),
            _tlv(0x8022, b"ignored"),
        )
    )
    message = decode(data)
    assert [type(a) for a in message.attributes] == [MessageIntegritySha256, Fingerprint]
    assert message.offsets == (20, len(data) - 8)


def test_second_integrity_ignored() -> None:
    """A second MESSAGE-INTEGRITY is ignored: the first one counts."""
    message = decode(_message(_tlv(0x0008, bytes(20)), _tlv(0x0008, b"\1" * 20)))
    assert message.attributes == (MessageIntegrity(bytes(20)),)


def test_ignored_attributes_not_validated() -> None:
    """A malformed attribute after MESSAGE-INTEGRITY is ignored, not an error."""
    message = decode(_message(_tlv(0x0008, bytes(20)), _tlv(0x0020, b"\0\3\0\0\0")))
    assert message.attributes == (MessageIntegrity(bytes(20)),)


def test_integrity_checks_with_ignored_attributes_after() -> None:
    """MESSAGE-INTEGRITY still verifies when ignored attributes follow it."""
    data = Message(Method.BINDING, MessageClass.REQUEST, TRANSACTION_ID, (Username("u"),)).encode(
        integrity_key=KEY
    )
    extra = _tlv(0x8022, b"appended")
    data = data[:2] + struct.pack("!H", len(data) - 20 + len(extra)) + data[4:] + extra
    message = decode(data)
    message.check_integrity(KEY)
    assert message.get(Software) is None


def test_duplicates_kept_in_order() -> None:
    """Repeated attributes are all kept, in wire order."""
    data = _message(_tlv(0x8022, b"one"), _tlv(0x0006, b"u"), _tlv(0x8022, b"two"))
    message = decode(data)
    assert message.attributes == (Software("one"), Username("u"), Software("two"))


def test_get_returns_first() -> None:
    """Message.get returns the first attribute of the class."""
    message = decode(_message(_tlv(0x8022, b"one"), _tlv(0x8022, b"two")))
    assert message.get(Software) == Software("one")


def test_get_missing() -> None:
    """Message.get returns None when no attribute has the class."""
    assert decode(_message(_tlv(0x8022, b"one"))).get(Username) is None


def test_get_all_in_order() -> None:
    """Message.get_all returns every attribute of the class, in order."""
    message = decode(_message(_tlv(0x8022, b"one"), _tlv(0x0006, b"u"), _tlv(0x8022, b"two")))
    assert message.get_all(Software) == [Software("one"), Software("two")]


def test_unknown_required_collected() -> None:
    """Unknown comprehension-required types (below 0x8000) are listed, in order."""
    data = _message(_tlv(0x7FFF, b"a"), _tlv(0x8000, b"b"), _tlv(0x0000, b""), _tlv(0xFFFF, b""))
    assert decode(data).unknown_required == (0x7FFF, 0x0000)


def test_unknown_optional_not_collected() -> None:
    """Unknown comprehension-optional types (0x8000 and up) are not listed."""
    assert decode(_message(_tlv(0x8000, b"b"), _tlv(0xC0DE, b"c"))).unknown_required == ()


def test_unknown_attributes_kept_raw() -> None:
    """Unknown attributes are kept with their type and raw value, in order."""
    data = _message(_tlv(0x7FFF, b"abcde"), _tlv(0x8022, b"s"), _tlv(0xC0DE, b""))
    assert decode(data).attributes == (
        UnknownAttribute(0x7FFF, b"abcde"),
        Software("s"),
        UnknownAttribute(0xC0DE, b""),
    )


def test_custom_table() -> None:
    """With an empty table every attribute is unknown and kept raw."""
    message = decode(vectors.REQUEST, table={})
    assert all(isinstance(a, UnknownAttribute) for a in message.attributes)
    assert message.unknown_required == (0x0024, 0x0006, 0x0008)


def test_custom_table_still_checks_fingerprint() -> None:
    """FINGERPRINT is checked even when the table does not know it."""
    damaged = vectors.REQUEST[:-1] + bytes([vectors.REQUEST[-1] ^ 1])
    with pytest.raises(FingerprintMismatch):
        decode(damaged, table={})


def test_offsets_and_raw() -> None:
    """A decoded message keeps its bytes and each attribute's offset."""
    data = _message(_tlv(0x8022, b"hello"), _tlv(0x0024, bytes(4)))
    message = decode(data)
    assert (message.raw, message.offsets) == (data, (20, 32))


def test_padding_value_ignored() -> None:
    """Padding bytes may have any value."""
    data = _message(struct.pack("!HH", 0x8022, 1) + b"x\xff\xfe\xfd")
    assert decode(data).attributes == (Software("x"),)


def test_decode_accepts_bytearray() -> None:
    """decode takes a bytearray."""
    assert decode(bytearray(vectors.RESPONSE_IPV4)) == decode(vectors.RESPONSE_IPV4)


def test_decode_accepts_memoryview() -> None:
    """decode takes a memoryview, and keeps its own copy of the bytes."""
    buffer = bytearray(vectors.RESPONSE_IPV4)
    message = decode(memoryview(buffer))
    buffer[:] = bytes(len(buffer))
    assert message.raw == vectors.RESPONSE_IPV4
    message.check_integrity(vectors.RESPONSE_PASSWORD.encode())


# -- is_stun and frame_length ----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [vectors.REQUEST, vectors.RESPONSE_IPV4, vectors.RESPONSE_IPV6, vectors.REQUEST_LONG_TERM],
    ids=["request", "ipv4", "ipv6", "long-term"],
)
def test_is_stun_vectors(data: bytes) -> None:
    """Every RFC 5769 sample is STUN."""
    assert is_stun(data)


def test_is_stun_header_only() -> None:
    """A bare 20-byte header with length 0 is STUN."""
    assert is_stun(_message())


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x00" + vectors.REQUEST[2:],  # RTP version 2 (RFC 7983)
        vectors.REQUEST[:4] + b"\0" * 4 + vectors.REQUEST[8:],  # cookie zeroed
        vectors.REQUEST[:-4],  # length field says more than there is
        vectors.REQUEST + b"\0\0\0\0",  # trailing bytes
        vectors.REQUEST[:19],  # short
        b"",
    ],
    ids=["rtp", "wrong-cookie", "truncated", "trailing", "short", "empty"],
)
def test_is_stun_false(data: bytes) -> None:
    """RTP, a wrong cookie, a length mismatch or a short datagram are not STUN."""
    assert not is_stun(data)


def test_is_stun_classic() -> None:
    """An RFC 3489 message, without the cookie, is not STUN for demultiplexing."""
    assert not is_stun(
        _message(cookie=CLASSIC_TRANSACTION_ID[:4], transaction_id=CLASSIC_TRANSACTION_ID[4:])
    )


@pytest.mark.parametrize(
    ("header", "length"),
    [
        (vectors.REQUEST[:4], len(vectors.REQUEST)),
        (b"\x00\x01\x00\x00", 20),
        (b"\x00\x01\xff\xfc", 20 + 0xFFFC),
    ],
)
def test_frame_length(header: bytes, length: int) -> None:
    """frame_length reads the whole message size from the first four bytes."""
    assert frame_length(header) == length


def test_is_stun_bytes_like() -> None:
    """is_stun takes a bytearray or memoryview, as reactors and buffers hand them over."""
    assert is_stun(bytearray(vectors.REQUEST))
    assert is_stun(memoryview(vectors.REQUEST))


def test_frame_length_bytes_like() -> None:
    """frame_length reads a stream buffer's bytearray."""
    assert frame_length(bytearray(vectors.REQUEST[:4])) == len(vectors.REQUEST)


# -- RFC 3489 messages -------------------------------------------------------------

CLASSIC_REQUEST = _message(
    _tlv(0x0003, bytes(4)),
    type_field=0x0001,
    cookie=CLASSIC_TRANSACTION_ID[:4],
    transaction_id=CLASSIC_TRANSACTION_ID[4:],
)


def test_classic_decoded_when_asked() -> None:
    """With classic=True, a message without cookie has a 16-byte transaction id."""
    message = decode(CLASSIC_REQUEST, classic=True)
    assert (message.transaction_id, message.classic, message.attributes) == (
        CLASSIC_TRANSACTION_ID,
        True,
        (ChangeRequest(),),
    )


def test_classic_rejected_by_default() -> None:
    """Without classic=True, a message without cookie is refused at the header."""
    error = _decode_error(CLASSIC_REQUEST)
    assert (error.where, error.reason) == ("header", "magic cookie is 0xa1a2a3a4, not 0x2112a442")


def test_classic_flag_accepts_modern() -> None:
    """classic=True still decodes an RFC 8489 message with its 12-byte id."""
    message = decode(vectors.REQUEST, classic=True)
    assert (message.transaction_id, message.classic) == (vectors.REQUEST[8:20], False)


def test_classic_header_checks() -> None:
    """classic=True still checks the length field."""
    error = _decode_error(CLASSIC_REQUEST + b"\0\0\0\0", classic=True)
    assert error.reason == "length field says 8 bytes follow the header, but 12 do"


def test_classic_encode() -> None:
    """A 16-byte transaction id is written where the cookie would be."""
    data = Message(
        Method.BINDING, MessageClass.REQUEST, CLASSIC_TRANSACTION_ID, (ChangeRequest(),)
    ).encode()
    assert data == CLASSIC_REQUEST


# -- encoding ------------------------------------------------------------------------


def test_encode_empty() -> None:
    """A message without attributes is its 20-byte header."""
    data = encode(Method.BINDING, MessageClass.REQUEST, TRANSACTION_ID)
    assert data == b"\x00\x01\x00\x00" + MAGIC_COOKIE_BYTES + TRANSACTION_ID


def test_encode_padding_byte() -> None:
    """Values are padded to four bytes with the given byte."""
    data = encode(
        Method.BINDING, MessageClass.REQUEST, TRANSACTION_ID, [Software("x")], padding=b"!"
    )
    assert data[20:] == b"\x80\x22\x00\x01x!!!"


def test_encode_integrity_trailer() -> None:
    """Integrity attributes and FINGERPRINT are appended in RFC order."""
    data = encode(
        Method.BINDING,
        MessageClass.REQUEST,
        TRANSACTION_ID,
        [Software("x")],
        integrity_key=KEY,
        integrity_sha256_key=KEY,
        sha256_length=20,
        fingerprint=True,
    )
    message = decode(data)
    assert [(type(a), o) for a, o in zip(message.attributes, message.offsets, strict=True)] == [
        (Software, 20),
        (MessageIntegrity, 28),
        (MessageIntegritySha256, 52),
        (Fingerprint, 76),
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"transaction_id": bytes(11)}, "transaction id is 11 bytes"),
        ({"padding": b""}, "padding must be a single byte"),
        ({"padding": b"  "}, "padding must be a single byte"),
        ({"sha256_length": 18}, "sha256_length must be"),
        ({"attributes": [Padding(bytes(0x10000))]}, "PADDING value is longer than 65535"),
        ({"attributes": [Padding(bytes(0xFFFF))] * 2}, "message is longer than 65535"),
        ({"attributes": [Priority(2**32)]}, "PRIORITY cannot be encoded"),
        ({"attributes": [ResponsePort(-1)]}, "RESPONSE-PORT cannot be encoded"),
        ({"attributes": [MappedAddress(Endpoint("192.0.2.1", 65536))]}, "MAPPED-ADDRESS"),
        ({"attributes": [UnknownAttribute(0x10000, b"")]}, "0x10000 cannot be encoded"),
        ({"attributes": [ErrorCode(700)]}, "error code 700 is outside 300-699"),
        ({"attributes": [Username("u" * 509)]}, "USERNAME is 509 bytes; at most 508"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_encode_refuses(kwargs: dict[str, object], match: str) -> None:
    """Encoding what does not fit raises ValueError saying what."""
    arguments: dict[str, object] = {
        "method": Method.BINDING,
        "message_class": MessageClass.REQUEST,
        "transaction_id": TRANSACTION_ID,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        encode(**arguments)  # type: ignore[arg-type]


def test_fingerprint_pushes_over_limit() -> None:
    """FINGERPRINT is refused when it would overflow the length field."""
    with pytest.raises(ValueError, match="message is longer than 65535"):
        encode(1, 0, TRANSACTION_ID, [Padding(bytes(0xFFF8))], fingerprint=True)


def test_largest_message() -> None:
    """A message whose body is exactly 65532 bytes encodes and decodes."""
    data = encode(1, 0, TRANSACTION_ID, [Padding(bytes(0xFFF8))])
    assert len(data) == 20 + 0xFFFC
    assert decode(data).attributes == (Padding(bytes(0xFFF8)),)


# -- integrity ----------------------------------------------------------------------


def test_check_integrity_missing() -> None:
    """check_integrity raises when there is no MESSAGE-INTEGRITY."""
    with pytest.raises(StunIntegrityError, match=r"^message carries no MESSAGE-INTEGRITY$"):
        decode(_message(_tlv(0x8022, b"x"))).check_integrity(KEY)


def test_check_integrity_of_built_message() -> None:
    """A message that was built, not decoded, has no integrity to check."""
    message = Message(
        Method.BINDING, MessageClass.REQUEST, TRANSACTION_ID, (MessageIntegrity(bytes(20)),)
    )
    with pytest.raises(StunIntegrityError):
        message.check_integrity(KEY)


@pytest.mark.parametrize("length", [16, 20, 24, 28, 32])
def test_sha256_integrity(length: int) -> None:
    """MESSAGE-INTEGRITY-SHA256 truncated to each allowed length verifies."""
    data = encode(
        1, 0, TRANSACTION_ID, [Username("u")], integrity_sha256_key=KEY, sha256_length=length
    )
    message = decode(data)
    mac = message.get(MessageIntegritySha256)
    assert mac is not None
    assert len(mac.mac) == length
    message.check_integrity_sha256(KEY)


@pytest.mark.parametrize("length", [16, 32])
def test_sha256_integrity_wrong_key(length: int) -> None:
    """MESSAGE-INTEGRITY-SHA256 with another key fails, naming the offset."""
    data = encode(
        1, 0, TRANSACTION_ID, [Username("u")], integrity_sha256_key=KEY, sha256_length=length
    )
    with pytest.raises(StunIntegrityError, match="MESSAGE-INTEGRITY-SHA256 at offset 28"):
        decode(data).check_integrity_sha256(b"other")


def test_sha1_and_sha256_independent() -> None:
    """Both integrity attributes verify, each with its own key."""
    data = encode(
        1,
        0,
        TRANSACTION_ID,
        [Username("u")],
        integrity_key=b"one",
        integrity_sha256_key=b"two",
        fingerprint=True,
    )
    message = decode(data)
    message.check_integrity(b"one")
    message.check_integrity_sha256(b"two")


# -- round trips (Hypothesis) ---------------------------------------------------------

PORTS = st.integers(0, 0xFFFF)
TEXT = st.text(max_size=24)
TRANSACTION_IDS = st.binary(min_size=12, max_size=12)
CLASSIC_TRANSACTION_IDS = st.binary(min_size=16, max_size=16).filter(
    lambda b: b[:4] != MAGIC_COOKIE_BYTES
)


def _endpoint(address: IPv4Address | IPv6Address, port: int) -> Endpoint:
    return Endpoint(str(address), port)


ENDPOINTS = st.builds(_endpoint, st.ip_addresses(), PORTS)
ALGORITHMS = st.tuples(PORTS, st.binary(max_size=9))

#: A strategy for every attribute class of the default table that can
#: appear anywhere in a message; the integrity attributes and FINGERPRINT
#: are appended by ``encode`` instead.
ATTRIBUTES: dict[type[Attribute], st.SearchStrategy[Attribute]] = {
    MappedAddress: st.builds(MappedAddress, ENDPOINTS),
    XorMappedAddress: st.builds(XorMappedAddress, ENDPOINTS),
    AlternateServer: st.builds(AlternateServer, ENDPOINTS),
    ResponseOrigin: st.builds(ResponseOrigin, ENDPOINTS),
    OtherAddress: st.builds(OtherAddress, ENDPOINTS),
    SourceAddress: st.builds(SourceAddress, ENDPOINTS),
    ChangedAddress: st.builds(ChangedAddress, ENDPOINTS),
    Username: st.builds(Username, TEXT),
    Realm: st.builds(Realm, TEXT),
    Nonce: st.builds(Nonce, TEXT),
    Software: st.builds(Software, TEXT),
    AlternateDomain: st.builds(AlternateDomain, TEXT),
    Userhash: st.builds(Userhash, st.binary(min_size=32, max_size=32)),
    ErrorCode: st.builds(ErrorCode, st.integers(300, 699), TEXT),
    UnknownAttributes: st.builds(UnknownAttributes, st.lists(PORTS, max_size=5).map(tuple)),
    PasswordAlgorithm: st.builds(PasswordAlgorithm, PORTS, st.binary(max_size=9)),
    PasswordAlgorithms: st.builds(PasswordAlgorithms, st.lists(ALGORITHMS, max_size=3).map(tuple)),
    ChangeRequest: st.builds(ChangeRequest, st.booleans(), st.booleans()),
    ResponsePort: st.builds(ResponsePort, PORTS),
    Padding: st.builds(Padding, st.binary(max_size=33)),
    Priority: st.builds(Priority, st.integers(0, 2**32 - 1)),
    UseCandidate: st.just(UseCandidate()),
    IceControlled: st.builds(IceControlled, st.integers(0, 2**64 - 1)),
    IceControlling: st.builds(IceControlling, st.integers(0, 2**64 - 1)),
}
TRAILER = {MessageIntegrity, MessageIntegritySha256, Fingerprint}
UNKNOWN = st.builds(
    UnknownAttribute,
    st.integers(0, 0xFFFF).filter(lambda t: t not in DEFAULT_ATTRIBUTES),
    st.binary(max_size=17),
)
ANY_ATTRIBUTE = st.one_of(*ATTRIBUTES.values(), UNKNOWN)


@st.composite
def messages(
    draw: st.DrawFn, transaction_ids: st.SearchStrategy[bytes] = TRANSACTION_IDS
) -> Message:
    """Random messages of random attributes, with duplicates, as decode returns them."""
    attributes = draw(st.lists(ANY_ATTRIBUTE, max_size=8))
    duplicate = draw(st.booleans())
    if attributes and duplicate:
        attributes.append(draw(st.sampled_from(attributes)))
    unknown = tuple(
        a.type for a in attributes if isinstance(a, UnknownAttribute) and a.type < 0x8000
    )
    return Message(
        draw(st.integers(0, 0xFFF)),
        draw(st.sampled_from(MessageClass)),
        draw(transaction_ids),
        tuple(attributes),
        unknown_required=unknown,
    )


def test_strategies_cover_table() -> None:
    """The round-trip strategies generate every attribute class of the default table."""
    assert set(ATTRIBUTES) | TRAILER == set(DEFAULT_ATTRIBUTES.values())


@settings(max_examples=300, deadline=None)
@given(messages())
def test_round_trip(message: Message) -> None:
    """encode then decode gives an equal message, attributes in order."""
    assert decode(message.encode()) == message


@settings(deadline=None)
@given(messages())
def test_round_trip_bytes(message: Message) -> None:
    """decode then encode gives the same bytes."""
    data = message.encode()
    assert decode(data).encode() == data


@settings(deadline=None)
@given(messages())
def test_encoded_is_stun(message: Message) -> None:
    """Everything encode writes passes is_stun, and frame_length is its size."""
    data = message.encode()
    assert is_stun(data)
    assert frame_length(data[:4]) == len(data)


@settings(deadline=None)
@given(messages(), st.binary(min_size=1, max_size=1))
def test_round_trip_padding(message: Message, padding: bytes) -> None:
    """Any padding byte decodes to the same message."""
    assert decode(message.encode(padding=padding)) == message


@settings(deadline=None)
@given(messages(CLASSIC_TRANSACTION_IDS))
def test_round_trip_classic(message: Message) -> None:
    """RFC 3489 messages round-trip with classic=True."""
    assert decode(message.encode(), classic=True) == message


@settings(max_examples=200, deadline=None)
@given(
    messages(),
    st.one_of(st.none(), st.binary(max_size=40)),
    st.one_of(st.none(), st.binary(max_size=40)),
    st.sampled_from([16, 20, 24, 28, 32]),
    st.booleans(),
    st.binary(min_size=1, max_size=1),
)
def test_round_trip_integrity(
    message: Message,
    sha1_key: bytes | None,
    sha256_key: bytes | None,
    sha256_length: int,
    fingerprint: bool,
    padding: bytes,
) -> None:
    """With integrity, truncation, fingerprint and padding, the message decodes and verifies."""
    data = message.encode(
        integrity_key=sha1_key,
        integrity_sha256_key=sha256_key,
        sha256_length=sha256_length,
        fingerprint=fingerprint,
        padding=padding,
    )
    decoded = decode(data)
    count = len(message.attributes)
    assert decoded.attributes[:count] == message.attributes
    trailer = [type(a) for a in decoded.attributes[count:]]
    assert trailer == [
        kind
        for kind, present in (
            (MessageIntegrity, sha1_key is not None),
            (MessageIntegritySha256, sha256_key is not None),
            (Fingerprint, fingerprint),
        )
        if present
    ]
    if sha1_key is not None:
        decoded.check_integrity(sha1_key)
        with pytest.raises(StunIntegrityError):
            decoded.check_integrity(sha1_key + b"!")
    if sha256_key is not None:
        mac = decoded.get(MessageIntegritySha256)
        assert mac is not None
        assert len(mac.mac) == sha256_length
        decoded.check_integrity_sha256(sha256_key)
        with pytest.raises(StunIntegrityError):
            decoded.check_integrity_sha256(sha256_key + b"!")
