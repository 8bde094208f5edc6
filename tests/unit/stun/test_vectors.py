"""
The RFC 5769 sample messages: decoded, verified and re-encoded byte for byte.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nattraverse._types import Endpoint
from nattraverse.errors import FingerprintMismatch, StunDecodeError, StunIntegrityError
from nattraverse.stun.attributes import (
    Attribute,
    Fingerprint,
    IceControlled,
    MessageIntegrity,
    Nonce,
    Priority,
    Realm,
    Software,
    Username,
    XorMappedAddress,
)
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.credentials import long_term_key, saslprep, short_term_key
from nattraverse.stun.message import Message, decode
from tests.unit.stun import vectors

#: The transaction id of the three short-term samples (RFC 5769 sections 2.1-2.3).
SHORT_TERM_TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
#: The transaction id of the long-term sample (RFC 5769 section 2.4).
LONG_TERM_TRANSACTION_ID = bytes.fromhex("78ad3433c6ad72c029da412e")
SHORT_TERM_KEY = short_term_key(vectors.REQUEST_PASSWORD)
LONG_TERM_KEY = long_term_key(
    vectors.LONG_TERM_USERNAME, vectors.LONG_TERM_REALM, vectors.LONG_TERM_PASSWORD, prep=saslprep
)


@dataclass(frozen=True)
class Vector:
    """One RFC 5769 sample and everything the RFC says it holds."""

    name: str
    data: bytes
    key: bytes
    message_class: MessageClass
    transaction_id: bytes
    #: The attributes before MESSAGE-INTEGRITY, in wire order.
    attributes: tuple[Attribute, ...]
    fingerprint: bool
    padding: bytes


VECTORS = [
    Vector(
        "request",
        vectors.REQUEST,
        SHORT_TERM_KEY,
        MessageClass.REQUEST,
        SHORT_TERM_TRANSACTION_ID,
        (
            Software("STUN test client"),
            Priority(0x6E0001FF),
            IceControlled(0x932FF9B151263B36),
            Username("evtj:h6vY"),
        ),
        fingerprint=True,
        padding=b" ",
    ),
    Vector(
        "ipv4-response",
        vectors.RESPONSE_IPV4,
        SHORT_TERM_KEY,
        MessageClass.SUCCESS,
        SHORT_TERM_TRANSACTION_ID,
        (Software("test vector"), XorMappedAddress(Endpoint(*vectors.MAPPED_IPV4))),
        fingerprint=True,
        padding=b" ",
    ),
    Vector(
        "ipv6-response",
        vectors.RESPONSE_IPV6,
        SHORT_TERM_KEY,
        MessageClass.SUCCESS,
        SHORT_TERM_TRANSACTION_ID,
        (Software("test vector"), XorMappedAddress(Endpoint(*vectors.MAPPED_IPV6))),
        fingerprint=True,
        padding=b" ",
    ),
    Vector(
        "long-term-request",
        vectors.REQUEST_LONG_TERM,
        LONG_TERM_KEY,
        MessageClass.REQUEST,
        LONG_TERM_TRANSACTION_ID,
        (
            Username(vectors.LONG_TERM_USERNAME),
            Nonce(vectors.LONG_TERM_NONCE),
            Realm(vectors.LONG_TERM_REALM),
        ),
        fingerprint=False,
        padding=b"\0",
    ),
]
BY_NAME = pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])


def _integrity_offset(message: Message) -> int:
    """The offset of the MESSAGE-INTEGRITY attribute of a decoded message."""
    for attribute, offset in zip(message.attributes, message.offsets, strict=True):
        if isinstance(attribute, MessageIntegrity):
            return offset
    raise AssertionError("no MESSAGE-INTEGRITY")


def _without_fingerprint(data: bytes) -> bytes:
    """The message cut after MESSAGE-INTEGRITY, its length field fixed."""
    end = _integrity_offset(decode(data)) + 24
    return data[:2] + struct.pack("!H", end - 20) + data[4:end]


def _flipped_bits(data: bytes, end: int) -> Iterator[tuple[int, bytes]]:
    """Every copy of *data* with one bit flipped in its first *end* bytes."""
    for bit in range(end * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 0x80 >> (bit % 8)
        yield bit, bytes(damaged)


def _rejected(data: bytes, key: bytes) -> bool:
    """Whether the message fails to decode or fails its integrity check."""
    try:
        decode(data).check_integrity(key)
    except (StunDecodeError, StunIntegrityError):
        return True
    return False


@BY_NAME
def test_header(vector: Vector) -> None:
    """The method, class and transaction id are the RFC's."""
    message = decode(vector.data)
    assert (message.method, message.message_class, message.transaction_id) == (
        Method.BINDING,
        vector.message_class,
        vector.transaction_id,
    )


@BY_NAME
def test_attributes(vector: Vector) -> None:
    """Every attribute before MESSAGE-INTEGRITY has the RFC's value, in order."""
    message = decode(vector.data)
    count = len(vector.attributes)
    assert message.attributes[:count] == vector.attributes


@BY_NAME
def test_trailer(vector: Vector) -> None:
    """MESSAGE-INTEGRITY follows, then FINGERPRINT where the sample has one."""
    message = decode(vector.data)
    trailer = [type(a) for a in message.attributes[len(vector.attributes) :]]
    expected = [MessageIntegrity, Fingerprint] if vector.fingerprint else [MessageIntegrity]
    assert trailer == expected


@BY_NAME
def test_offsets(vector: Vector) -> None:
    """Each attribute's offset is where its header starts in the datagram."""
    message = decode(vector.data)
    types = [struct.unpack_from("!H", vector.data, o)[0] for o in message.offsets]
    assert types == [a.TYPE for a in message.attributes]


@BY_NAME
def test_nothing_unknown(vector: Vector) -> None:
    """No sample carries an attribute the default table does not know."""
    assert decode(vector.data).unknown_required == ()


@BY_NAME
def test_integrity_passes(vector: Vector) -> None:
    """MESSAGE-INTEGRITY checks out with the RFC's credentials."""
    decode(vector.data).check_integrity(vector.key)


@BY_NAME
def test_integrity_wrong_key(vector: Vector) -> None:
    """MESSAGE-INTEGRITY fails with any other key."""
    message = decode(vector.data)
    reason = (
        f"MESSAGE-INTEGRITY at offset {_integrity_offset(message)} does not match: "
        "wrong key, or the message was altered"
    )
    with pytest.raises(StunIntegrityError, match=f"^{re.escape(reason)}$"):
        message.check_integrity(vector.key[:-1] + bytes([vector.key[-1] ^ 1]))


@BY_NAME
def test_no_sha256_integrity(vector: Vector) -> None:
    """Checking MESSAGE-INTEGRITY-SHA256 fails: no sample carries it."""
    with pytest.raises(StunIntegrityError, match="carries no MESSAGE-INTEGRITY-SHA256"):
        decode(vector.data).check_integrity_sha256(vector.key)


@BY_NAME
def test_flipped_bit_up_to_integrity_rejected(vector: Vector) -> None:
    """A single flipped bit anywhere up to the end of MESSAGE-INTEGRITY is rejected."""
    end = _integrity_offset(decode(vector.data)) + 24
    flipped = _flipped_bits(vector.data, end)
    accepted = [bit for bit, damaged in flipped if not _rejected(damaged, vector.key)]
    assert accepted == []


@pytest.mark.parametrize("vector", [v for v in VECTORS if v.fingerprint], ids=lambda v: v.name)
@pytest.mark.parametrize("bit", [0, 7, 13, 31])
def test_flipped_fingerprint_bit(vector: Vector, bit: int) -> None:
    """A flipped bit in the FINGERPRINT value raises FingerprintMismatch naming it."""
    damaged = bytearray(vector.data)
    damaged[-4 + bit // 8] ^= 0x80 >> (bit % 8)
    with pytest.raises(FingerprintMismatch) as caught:
        decode(bytes(damaged))
    assert caught.value.where == f"attribute FINGERPRINT at offset {len(vector.data) - 8}"
    assert caught.value.reason == "CRC-32 does not match the message"


@BY_NAME
def test_flipped_bit_before_integrity_fails_mac(vector: Vector) -> None:
    """Without FINGERPRINT, MESSAGE-INTEGRITY alone catches every bit flipped before it."""
    data = _without_fingerprint(vector.data)
    decode(data).check_integrity(vector.key)
    end = _integrity_offset(decode(data))
    flipped = _flipped_bits(data, end)
    accepted = [bit for bit, damaged in flipped if not _rejected(damaged, vector.key)]
    assert accepted == []


@BY_NAME
def test_flipped_transaction_id_bit_is_integrity_error(vector: Vector) -> None:
    """A damaged transaction id still decodes but fails MESSAGE-INTEGRITY."""
    damaged = bytearray(_without_fingerprint(vector.data))
    damaged[8] ^= 1
    message = decode(bytes(damaged))
    with pytest.raises(StunIntegrityError):
        message.check_integrity(vector.key)


@BY_NAME
def test_reencodes_identically(vector: Vector) -> None:
    """Re-encoding the decoded attributes with the RFC's key gives the same bytes."""
    message = decode(vector.data)
    plain = Message(
        message.method,
        message.message_class,
        message.transaction_id,
        tuple(a for a in message.attributes if not isinstance(a, MessageIntegrity | Fingerprint)),
    )
    encoded = plain.encode(
        integrity_key=vector.key, fingerprint=vector.fingerprint, padding=vector.padding
    )
    assert encoded == vector.data


def test_long_term_key_value() -> None:
    """The long-term key is MD5 of the SASLprepped 'user:realm:password' of RFC 5769 2.4."""
    text = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9:example.org:TheMatrIX".encode()
    assert hashlib.md5(text).digest() == LONG_TERM_KEY


def test_short_term_key_value() -> None:
    """The short-term key of the samples is the password itself, as UTF-8."""
    assert SHORT_TERM_KEY == b"VOkJxbRl1RmTxUk/WvJxBt"


def test_long_term_vector_needs_saslprep() -> None:
    """The RFC 5769 long-term sample was made with SASLprep: OpaqueString keys fail."""
    key = long_term_key(
        vectors.LONG_TERM_USERNAME, vectors.LONG_TERM_REALM, vectors.LONG_TERM_PASSWORD
    )
    with pytest.raises(StunIntegrityError):
        decode(vectors.REQUEST_LONG_TERM).check_integrity(key)
