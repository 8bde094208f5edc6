"""
Fuzzing the STUN decoder: whatever the bytes, ``decode`` returns a message
or raises :class:`~nattraverse.errors.StunDecodeError`, nothing else.

Each test lets any other exception propagate, so Hypothesis reports it
with the smallest input that raises it.
"""

from __future__ import annotations

import struct

from hypothesis import example, given, settings
from hypothesis import strategies as st

from nattraverse.errors import StunDecodeError
from nattraverse.stun.attributes import DEFAULT_ATTRIBUTES, AttributeTable
from nattraverse.stun.constants import MAGIC_COOKIE_BYTES, split_message_type
from nattraverse.stun.message import Message, decode, is_stun
from tests.unit.stun import vectors

FOCUSED = settings(max_examples=2000, deadline=None)
BROAD = settings(max_examples=500, deadline=None)

MESSAGE_TYPES = st.integers(0, 0x3FFF)
TRANSACTION_IDS = st.binary(min_size=12, max_size=12)
#: Attribute types worth aiming at: every known one, the integrity and
#: fingerprint types among them, and some unknown ones of both ranges.
TYPE_CODES = st.one_of(st.sampled_from(sorted(DEFAULT_ATTRIBUTES)), st.integers(0, 0xFFFF))


def _header(message_type: int, length: int, transaction_id: bytes) -> bytes:
    return struct.pack("!HH", message_type, length) + MAGIC_COOKIE_BYTES + transaction_id


def _decode_or_error(
    data: bytes, *, classic: bool = False, table: AttributeTable = DEFAULT_ATTRIBUTES
) -> Message | StunDecodeError:
    """The decoded message or the StunDecodeError; any other exception escapes."""
    try:
        return decode(data, classic=classic, table=table)
    except StunDecodeError as e:
        return e


#: Values of the sizes the fixed-size attributes want, and of any size.
VALUES = st.one_of(
    st.binary(max_size=40),
    *(st.binary(min_size=n, max_size=n) for n in (4, 8, 20, 32)),
    # address-like: a family byte that is often 1 or 2
    st.tuples(st.integers(0, 3), st.binary(min_size=2, max_size=2), st.sampled_from([4, 16])).map(
        lambda t: bytes([0, t[0]]) + t[1] + bytes(t[2])
    ),
)


@st.composite
def attribute_bodies(draw: st.DrawFn) -> bytes:
    """
    A body of attribute headers with random types and values; lengths and
    padding are mostly right, so that most examples reach the value
    decoders, and sometimes wrong.
    """
    body = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        value = draw(VALUES)
        broken = draw(st.integers(0, 9)) == 0
        length = draw(st.integers(0, 0xFFFF)) if broken else len(value)
        padding = draw(st.binary(max_size=3)) if broken else bytes(-len(value) % 4)
        body += struct.pack("!HH", draw(TYPE_CODES), length) + value + padding
    return bytes(body[: len(body) - len(body) % 4])


def _assert_header_fields(
    result: Message | StunDecodeError, message_type: int, transaction_id: bytes
) -> None:
    """An error past a good header names the message it came from."""
    if isinstance(result, StunDecodeError):
        assert result.where.startswith("attribute ")
        assert result.transaction_id == transaction_id
        assert (result.method, result.message_class) == split_message_type(message_type)
    else:
        assert result.transaction_id == transaction_id
        assert (result.method, result.message_class) == split_message_type(message_type)


@FOCUSED
@given(MESSAGE_TYPES, TRANSACTION_IDS, st.binary(max_size=160))
def test_valid_header_arbitrary_body(message_type: int, transaction_id: bytes, tail: bytes) -> None:
    """Arbitrary bytes after a consistent header decode or raise StunDecodeError."""
    body = tail[: len(tail) - len(tail) % 4]
    data = _header(message_type, len(body), transaction_id) + body
    _assert_header_fields(_decode_or_error(data), message_type, transaction_id)


@FOCUSED
@given(MESSAGE_TYPES, TRANSACTION_IDS, attribute_bodies())
def test_valid_header_attribute_shaped_body(
    message_type: int, transaction_id: bytes, body: bytes
) -> None:
    """Attribute-shaped bodies of every known type decode or raise StunDecodeError."""
    data = _header(message_type, len(body), transaction_id) + body
    _assert_header_fields(_decode_or_error(data), message_type, transaction_id)


@BROAD
@given(MESSAGE_TYPES, st.binary(min_size=16, max_size=16), attribute_bodies())
def test_classic_attribute_shaped_body(
    message_type: int, transaction_id: bytes, body: bytes
) -> None:
    """With classic=True, any 16-byte id and body decode or raise StunDecodeError."""
    data = struct.pack("!HH", message_type, len(body)) + transaction_id + body
    result = _decode_or_error(data, classic=True)
    if isinstance(result, StunDecodeError):
        assert result.where.startswith("attribute ")


@BROAD
@given(st.binary(max_size=120), st.booleans())
@example(b"", False)
@example(b"\x00\x01\x00\x00" + MAGIC_COOKIE_BYTES + bytes(12), False)
def test_arbitrary_bytes(data: bytes, classic: bool) -> None:
    """Fully arbitrary bytes decode or raise StunDecodeError."""
    _decode_or_error(data, classic=classic)


@BROAD
@given(st.binary(max_size=120))
@example(vectors.REQUEST)
@example(vectors.REQUEST[:-4])
def test_is_stun_agrees_with_header_checks(data: bytes) -> None:
    """is_stun is true exactly when decode gets past the header."""
    result = _decode_or_error(data)
    header_ok = not (isinstance(result, StunDecodeError) and result.where == "header")
    assert is_stun(data) is header_ok


@BROAD
@given(
    st.sampled_from(
        [vectors.REQUEST, vectors.RESPONSE_IPV4, vectors.RESPONSE_IPV6, vectors.REQUEST_LONG_TERM]
    ),
    st.data(),
)
def test_damaged_vectors(original: bytes, data: st.DataObject) -> None:
    """RFC 5769 samples with bytes overwritten decode or raise StunDecodeError,
    with the default table or an empty one."""
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(0, 4))):
        position = data.draw(st.integers(4, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    _decode_or_error(
        bytes(damaged),
        classic=data.draw(st.booleans()),
        table=data.draw(st.sampled_from([DEFAULT_ATTRIBUTES, {}])),
    )
