"""
STUN attribute values (RFC 8489 section 14, RFC 5780 section 7, RFC 8445
section 16): what each encodes to, what it decodes from, and how a
malformed value is reported.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from nattraverse._types import Endpoint
from nattraverse.errors import StunDecodeError
from nattraverse.stun.attributes import (
    DEFAULT_ATTRIBUTES,
    Attribute,
    AttributeValueError,
    ChangeRequest,
    ErrorCode,
    IceControlling,
    MappedAddress,
    Padding,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Priority,
    ResponsePort,
    Software,
    UnknownAttribute,
    UnknownAttributes,
    UseCandidate,
    Userhash,
    XorMappedAddress,
    attribute_name,
    xor_key,
)
from nattraverse.stun.constants import MAGIC_COOKIE_BYTES, AttributeType, is_comprehension_required
from nattraverse.stun.message import decode
from tests.unit.stun import vectors

TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
MAPPED_IPV4 = Endpoint(*vectors.MAPPED_IPV4)
MAPPED_IPV6 = Endpoint(*vectors.MAPPED_IPV6)


def _message_with(type_code: int, value: bytes) -> bytes:
    """A Binding request whose only attribute is *value*, zero-padded."""
    padded = value + b"\0" * (-len(value) % 4)
    attribute = struct.pack("!HH", type_code, len(value)) + padded
    header = struct.pack("!HH", 0x0001, len(attribute)) + MAGIC_COOKIE_BYTES + TRANSACTION_ID
    return header + attribute


def _decode_value(type_code: int, value: bytes) -> Attribute:
    """The attribute that a message carrying only *value* decodes to."""
    (attribute,) = decode(_message_with(type_code, value)).attributes
    return attribute


def _encode_value(attribute: Attribute) -> bytes:
    """An attribute's value on the wire, masked with TRANSACTION_ID."""
    return attribute.encode_value(TRANSACTION_ID)


# -- malformed values ------------------------------------------------------------


@dataclass(frozen=True)
class BadValue:
    """An attribute value the decoder must refuse, and the reason it gives."""

    name: str
    type_code: int
    value: bytes
    reason: str


BAD_VALUES = [
    BadValue("xor-address 5 bytes", 0x0020, b"\0\1\0\0\0", "value is 5 bytes, expected 8"),
    BadValue(
        "xor-address 3 bytes", 0x0020, b"\0\1\0", "value is 3 bytes, too short for an address"
    ),
    BadValue("ipv6 address 8 bytes", 0x0001, b"\0\2\0\0\0\0\0\0", "value is 8 bytes, expected 20"),
    BadValue("ipv4 address 20 bytes", 0x802B, b"\0\1" + bytes(18), "value is 20 bytes, expected 8"),
    BadValue(
        "address family 3",
        0x0020,
        b"\0\3\0\0\0\0\0\0",
        "address family 3 is neither 1 (IPv4) nor 2 (IPv6)",
    ),
    BadValue(
        "address family 0",
        0x8023,
        bytes(8),
        "address family 0 is neither 1 (IPv4) nor 2 (IPv6)",
    ),
    BadValue("fingerprint 3 bytes", 0x8028, b"\0\0\0", "value is 3 bytes, expected 4"),
    BadValue("integrity 19 bytes", 0x0008, bytes(19), "value is 19 bytes, expected 20"),
    BadValue("integrity 21 bytes", 0x0008, bytes(21), "value is 21 bytes, expected 20"),
    BadValue(
        "integrity-sha256 18 bytes",
        0x001C,
        bytes(18),
        "value is 18 bytes, expected 16 or 20 or 24 or 28 or 32",
    ),
    BadValue(
        "integrity-sha256 36 bytes",
        0x001C,
        bytes(36),
        "value is 36 bytes, expected 16 or 20 or 24 or 28 or 32",
    ),
    BadValue("change-request 2 bytes", 0x0003, b"\0\6", "value is 2 bytes, expected 4"),
    BadValue("response-port 2 bytes", 0x0027, b"\0\1", "value is 2 bytes, expected 4"),
    BadValue("priority 8 bytes", 0x0024, bytes(8), "value is 8 bytes, expected 4"),
    BadValue("ice-controlled 4 bytes", 0x8029, bytes(4), "value is 4 bytes, expected 8"),
    BadValue("use-candidate 4 bytes", 0x0025, bytes(4), "value is 4 bytes, expected 0"),
    BadValue("userhash 31 bytes", 0x001E, bytes(31), "value is 31 bytes, expected 32"),
    BadValue(
        "software invalid start byte",
        0x8022,
        b"\xff",
        "value is not UTF-8 (invalid start byte at byte 0)",
    ),
    BadValue(
        "username truncated sequence",
        0x0006,
        b"ab\xc3",
        "value is not UTF-8 (unexpected end of data at byte 2)",
    ),
    BadValue(
        "realm encoded surrogate",
        0x0014,
        b"x\xed\xa0\x80",
        "value is not UTF-8 (invalid continuation byte at byte 1)",
    ),
    BadValue(
        "nonce overlong encoding",
        0x0015,
        b"\xc0\xaf",
        "value is not UTF-8 (invalid start byte at byte 0)",
    ),
    BadValue(
        "username 509 bytes", 0x0006, b"u" * 509, "value is 509 bytes; at most 508 are allowed"
    ),
    BadValue(
        "software 764 bytes", 0x8022, b"s" * 764, "value is 764 bytes; at most 763 are allowed"
    ),
    BadValue("realm 764 bytes", 0x0014, b"r" * 764, "value is 764 bytes; at most 763 are allowed"),
    BadValue("error-code 3 bytes", 0x0009, b"\0\0\4", "value is 3 bytes, at least 4 are needed"),
    BadValue("error-code class 2", 0x0009, b"\0\0\2\0", "class 2 number 0 is not a code 300-699"),
    BadValue("error-code class 7", 0x0009, b"\0\0\7\0", "class 7 number 0 is not a code 300-699"),
    BadValue(
        "error-code number 100",
        0x0009,
        b"\0\0\4\x64",
        "class 4 number 100 is not a code 300-699",
    ),
    BadValue("error-code reason not UTF-8", 0x0009, b"\0\0\4\1\xff", "reason phrase is not UTF-8"),
    BadValue(
        "error-code reason 764 bytes",
        0x0009,
        b"\0\0\4\1" + b"x" * 764,
        "reason phrase is longer than 763 bytes",
    ),
    BadValue(
        "unknown-attributes odd length",
        0x000A,
        b"\0\x24\x80",
        "value is 3 bytes, not a multiple of 2",
    ),
    BadValue(
        "password-algorithm two entries",
        0x001D,
        b"\0\1\0\0\0\2\0\0",
        "holds 2 algorithms, expected 1",
    ),
    BadValue("password-algorithm empty", 0x001D, b"", "holds 0 algorithms, expected 1"),
    BadValue(
        "password-algorithms truncated entry",
        0x8002,
        b"\0\1\0\0\0\2",
        "truncated algorithm entry at value byte 4",
    ),
    BadValue(
        "password-algorithms parameters overrun",
        0x8002,
        b"\0\1\0\x08abcd",
        "algorithm parameters at value byte 0 overrun",
    ),
]


@pytest.mark.parametrize("case", BAD_VALUES, ids=[c.name for c in BAD_VALUES])
def test_bad_value(case: BadValue) -> None:
    """A malformed value raises StunDecodeError naming the attribute, its offset and the fault."""
    with pytest.raises(StunDecodeError) as caught:
        decode(_message_with(case.type_code, case.value))
    name = attribute_name(case.type_code)
    assert (caught.value.where, caught.value.reason) == (
        f"attribute {name} at offset 20",
        case.reason,
    )
    assert str(caught.value) == f"attribute {name} at offset 20: {case.reason}"


@pytest.mark.parametrize("case", BAD_VALUES[:3], ids=[c.name for c in BAD_VALUES[:3]])
def test_bad_value_carries_header(case: BadValue) -> None:
    """A malformed value's error carries the transaction id, method and class."""
    with pytest.raises(StunDecodeError) as caught:
        decode(_message_with(case.type_code, case.value))
    error = caught.value
    assert (error.transaction_id, error.method, error.message_class) == (TRANSACTION_ID, 1, 0)


def test_attribute_value_error_is_value_error() -> None:
    """AttributeValueError is a ValueError, for callers of encode_value."""
    with pytest.raises(ValueError, match="value is 3 bytes, expected 4"):
        ChangeRequest.decode_value(b"\0\0\0", TRANSACTION_ID)


# -- the table ---------------------------------------------------------------------


def test_table_keyed_by_type() -> None:
    """DEFAULT_ATTRIBUTES maps each class's own TYPE to the class."""
    assert all(code == cls.TYPE for code, cls in DEFAULT_ATTRIBUTES.items())


def test_table_covers_attribute_types() -> None:
    """Every AttributeType but the deprecated RESPONSE-ADDRESS has a class."""
    assert set(DEFAULT_ATTRIBUTES) == set(AttributeType) - {AttributeType.RESPONSE_ADDRESS}


def test_names_distinct() -> None:
    """No two attribute classes share a name."""
    names = [cls.NAME for cls in DEFAULT_ATTRIBUTES.values()]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    ("type_code", "name"),
    [
        (0x0020, "XOR-MAPPED-ADDRESS"),
        (0x8028, "FINGERPRINT"),
        (0x7777, "0x7777"),
        (0x0002, "0x0002"),  # RESPONSE-ADDRESS: a constant, but no class
    ],
)
def test_attribute_name(type_code: int, name: str) -> None:
    """attribute_name gives the RFC name, or the hex code when unknown."""
    assert attribute_name(type_code) == name


def test_attribute_name_other_table() -> None:
    """attribute_name looks in the table it is given."""
    assert attribute_name(0x0020, {}) == "0x0020"


def test_unknown_attribute_name() -> None:
    """An unknown attribute is named by its hex type code."""
    assert UnknownAttribute(0xC0DE, b"").name == "0xC0DE"


@pytest.mark.parametrize(
    ("type_code", "required"),
    [(0x0000, True), (0x0001, True), (0x7FFF, True), (0x8000, False), (0xFFFF, False)],
)
def test_comprehension_required(type_code: int, required: bool) -> None:
    """Types 0x0000-0x7FFF are comprehension-required, 0x8000-0xFFFF optional."""
    assert is_comprehension_required(type_code) is required


# -- addresses ----------------------------------------------------------------------


def test_xor_key() -> None:
    """The XOR mask is the magic cookie then the 96-bit transaction id."""
    assert xor_key(TRANSACTION_ID) == MAGIC_COOKIE_BYTES + TRANSACTION_ID


def test_xor_key_classic() -> None:
    """A 16-byte RFC 3489 transaction id is its own mask."""
    assert xor_key(bytes(range(16))) == bytes(range(16))


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        (MappedAddress(MAPPED_IPV4), bytes.fromhex("00018055c0000201")),
        (
            MappedAddress(MAPPED_IPV6),
            bytes.fromhex("0002805520010db8123456780011223344556677"),
        ),
        # RFC 5769 sections 2.2 and 2.3
        (XorMappedAddress(MAPPED_IPV4), bytes.fromhex("0001a147e112a643")),
        (
            XorMappedAddress(MAPPED_IPV6),
            bytes.fromhex("0002a1470113a9faa5d3f179bc25f4b5bed2b9d9"),
        ),
    ],
    ids=["mapped-ipv4", "mapped-ipv6", "xor-ipv4", "xor-ipv6"],
)
def test_address_value(attribute: Attribute, value: bytes) -> None:
    """An address attribute encodes to its RFC value and decodes back from it."""
    assert _encode_value(attribute) == value
    assert type(attribute).decode_value(value, TRANSACTION_ID) == attribute


def test_address_reserved_byte_ignored() -> None:
    """The reserved first byte of an address value is ignored."""
    attribute = _decode_value(0x0001, bytes.fromhex("ff018055c0000201"))
    assert attribute == MappedAddress(MAPPED_IPV4)


def test_ipv6_text_normalised() -> None:
    """A decoded IPv6 address is in compressed text form."""
    attribute = _decode_value(0x0001, bytes.fromhex("00020001") + bytes(15) + b"\1")
    assert attribute == MappedAddress(Endpoint("::1", 1))


# -- text ------------------------------------------------------------------------------


@pytest.mark.parametrize(("type_code", "size"), [(0x0006, 508), (0x8022, 763), (0x0015, 763)])
def test_text_at_limit(type_code: int, size: int) -> None:
    """A text value of the largest allowed size decodes."""
    attribute = _decode_value(type_code, b"a" * size)
    assert getattr(attribute, "value", None) == "a" * size


def test_text_multibyte() -> None:
    """Text values are UTF-8."""
    assert _decode_value(0x8022, "caf\u00e9 \u2603".encode()) == Software("caf\u00e9 \u2603")


def test_text_encode_too_long() -> None:
    """Encoding an oversized text value raises AttributeValueError."""
    with pytest.raises(AttributeValueError, match="SOFTWARE is 764 bytes; at most 763"):
        Software("\u00e9" * 382).encode_value(TRANSACTION_ID)


# -- ERROR-CODE (RFC 8489 section 14.8) -----------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "value"),
    [
        (300, "Try Alternate", b"\0\0\3\0Try Alternate"),
        (401, "Unauthenticated", b"\0\0\4\1Unauthenticated"),
        (438, "Stale Nonce", b"\0\0\4\x26Stale Nonce"),
        (699, "", b"\0\0\6\x63"),
    ],
)
def test_error_code_value(code: int, reason: str, value: bytes) -> None:
    """An error code is a class (hundreds) and a number (0-99), then the reason."""
    assert _encode_value(ErrorCode(code, reason)) == value
    assert _decode_value(0x0009, value) == ErrorCode(code, reason)


def test_error_code_reserved_bits_ignored() -> None:
    """The 21 reserved bits before the class are ignored."""
    assert _decode_value(0x0009, b"\xff\xff\xfc\x14Bad") == ErrorCode(420, "Bad")


@pytest.mark.parametrize("code", [299, 700, 0, -400])
def test_error_code_out_of_range_encode(code: int) -> None:
    """Encoding an error code outside 300-699 raises AttributeValueError."""
    with pytest.raises(AttributeValueError, match=f"error code {code} is outside 300-699"):
        _encode_value(ErrorCode(code))


def test_error_code_reason_too_long_encode() -> None:
    """Encoding a reason phrase of more than 763 bytes raises AttributeValueError."""
    with pytest.raises(AttributeValueError, match="longer than 763 bytes"):
        _encode_value(ErrorCode(400, "x" * 764))


# -- RFC 5780 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change_ip", "change_port", "value"),
    [
        (False, False, b"\0\0\0\0"),
        (True, False, b"\0\0\0\4"),
        (False, True, b"\0\0\0\2"),
        (True, True, b"\0\0\0\6"),
    ],
)
def test_change_request_flags(change_ip: bool, change_port: bool, value: bytes) -> None:
    """CHANGE-REQUEST carries change-IP as 0x4 and change-port as 0x2."""
    attribute = ChangeRequest(change_ip=change_ip, change_port=change_port)
    assert _encode_value(attribute) == value
    assert _decode_value(0x0003, value) == attribute


def test_change_request_other_bits_ignored() -> None:
    """Bits of CHANGE-REQUEST other than 0x4 and 0x2 are ignored."""
    assert _decode_value(0x0003, b"\xff\xff\xff\xf9") == ChangeRequest(False, False)


def test_response_port_value() -> None:
    """RESPONSE-PORT is the port then two reserved bytes."""
    assert _encode_value(ResponsePort(0xBEEF)) == b"\xbe\xef\0\0"


def test_response_port_reserved_ignored() -> None:
    """The two reserved bytes of RESPONSE-PORT are ignored."""
    assert _decode_value(0x0027, b"\x12\x34\xff\xff") == ResponsePort(0x1234)


def test_padding_value() -> None:
    """PADDING keeps its bytes as they are."""
    assert _decode_value(0x0026, b"\1\2\3\4\5") == Padding(b"\1\2\3\4\5")


# -- RFC 8489 sections 14.11-14.13 -----------------------------------------------------


@pytest.mark.parametrize(
    ("algorithms", "value"),
    [
        ((), b""),
        (((1, b""), (2, b"")), b"\0\1\0\0\0\2\0\0"),
        (((2, b"abc"), (1, b"")), b"\0\2\0\3abc\0\0\1\0\0"),
        (((0x1234, b"abcd"),), b"\x12\x34\0\4abcd"),
    ],
    ids=["none", "md5-sha256", "padded-parameters", "aligned-parameters"],
)
def test_password_algorithms_value(algorithms: tuple[tuple[int, bytes], ...], value: bytes) -> None:
    """PASSWORD-ALGORITHMS is a list of (algorithm, parameters), each padded to 4."""
    assert _encode_value(PasswordAlgorithms(algorithms)) == value
    assert _decode_value(0x8002, value) == PasswordAlgorithms(algorithms)


def test_password_algorithm_value() -> None:
    """PASSWORD-ALGORITHM holds exactly one algorithm."""
    assert _encode_value(PasswordAlgorithm(2)) == b"\0\2\0\0"
    assert _decode_value(0x001D, b"\0\2\0\0") == PasswordAlgorithm(2)


def test_unknown_attributes_value() -> None:
    """UNKNOWN-ATTRIBUTES is a list of 16-bit types, padded on the wire when odd."""
    attribute = UnknownAttributes((0x0024, 0x8022, 0x7777))
    assert _encode_value(attribute) == b"\0\x24\x80\x22\x77\x77"
    assert _decode_value(0x000A, b"\0\x24\x80\x22\x77\x77") == attribute


def test_unknown_attributes_empty() -> None:
    """An empty UNKNOWN-ATTRIBUTES decodes to no types."""
    assert _decode_value(0x000A, b"") == UnknownAttributes(())


# -- ICE and opaque values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        (Priority(0x6E0001FF), b"\x6e\x00\x01\xff"),
        (IceControlling(0x0102030405060708), bytes(range(1, 9))),
        (UseCandidate(), b""),
        (Userhash(bytes(range(32))), bytes(range(32))),
    ],
    ids=["priority", "ice-controlling", "use-candidate", "userhash"],
)
def test_fixed_value(attribute: Attribute, value: bytes) -> None:
    """Fixed-size attributes encode to their big-endian value and decode back."""
    assert _encode_value(attribute) == value
    assert _decode_value(attribute.TYPE, value) == attribute
