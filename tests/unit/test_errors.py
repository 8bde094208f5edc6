"""
The exception hierarchy of :mod:`nattraverse.errors`.
"""

from __future__ import annotations

import pytest

from nattraverse.errors import (
    BadRequest,
    FingerprintMismatch,
    NatTraverseError,
    ServerError,
    StaleNonce,
    StunDecodeError,
    StunError,
    StunErrorResponse,
    StunIntegrityError,
    StunTimeout,
    StunTransactionCancelled,
    TryAlternate,
    Unauthenticated,
    UnknownAttribute,
    error_for_code,
)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (300, TryAlternate),
        (400, BadRequest),
        (401, Unauthenticated),
        (420, UnknownAttribute),
        (438, StaleNonce),
        (500, ServerError),
    ],
)
def test_error_for_code(code: int, kind: type[StunErrorResponse]) -> None:
    """Each RFC 8489 error code maps to its own class."""
    error = error_for_code(code, "reason")
    assert (type(error), error.code, kind.code) == (kind, code, code)


@pytest.mark.parametrize("code", [403, 437, 441, 486, 508, 699])
def test_error_for_unknown_code(code: int) -> None:
    """Codes without a class of their own give a plain StunErrorResponse."""
    error = error_for_code(code, "reason")
    assert (type(error), error.code) == (StunErrorResponse, code)


def test_error_response_fields() -> None:
    """An error response keeps its code, reason and response, and says them."""
    response = object()
    error = error_for_code(438, "Stale Nonce", response)
    assert (error.code, error.reason, error.response) == (438, "Stale Nonce", response)
    assert str(error) == "STUN error 438: Stale Nonce"


def test_error_response_without_response() -> None:
    """The response defaults to None."""
    assert error_for_code(500, "oops").response is None


@pytest.mark.parametrize(
    "kind",
    [
        StunError,
        StunDecodeError,
        FingerprintMismatch,
        StunIntegrityError,
        StunTimeout,
        StunTransactionCancelled,
        StunErrorResponse,
        TryAlternate,
        StaleNonce,
    ],
)
def test_hierarchy(kind: type[Exception]) -> None:
    """Every exception is a NatTraverseError, and the STUN ones StunErrors."""
    assert issubclass(kind, StunError)
    assert issubclass(kind, NatTraverseError)


def test_fingerprint_mismatch_is_decode_error() -> None:
    """A FINGERPRINT mismatch is caught by handlers of StunDecodeError."""
    assert issubclass(FingerprintMismatch, StunDecodeError)


def test_integrity_error_is_not_decode_error() -> None:
    """An integrity failure is not a decoding failure."""
    assert not issubclass(StunIntegrityError, StunDecodeError)


def test_decode_error_fields() -> None:
    """StunDecodeError keeps where, reason and the header fields."""
    error = StunDecodeError(
        "attribute USERNAME at offset 20",
        "value is not UTF-8",
        transaction_id=b"t" * 12,
        method=1,
        message_class=0,
    )
    assert str(error) == "attribute USERNAME at offset 20: value is not UTF-8"
    assert (error.where, error.reason, error.transaction_id, error.method, error.message_class) == (
        "attribute USERNAME at offset 20",
        "value is not UTF-8",
        b"t" * 12,
        1,
        0,
    )


def test_decode_error_header_fields_default_none() -> None:
    """Without a readable header, the header fields are None."""
    error = StunDecodeError("header", "too short")
    assert (error.transaction_id, error.method, error.message_class) == (None, None, None)


def test_timeout_message() -> None:
    """StunTimeout names the server, the transaction and the time spent."""
    error = StunTimeout(bytes.fromhex("000102030405060708090a0b"), "192.0.2.1:3478", 39.5)
    assert str(error).startswith(
        "no STUN response from 192.0.2.1:3478 for transaction 000102030405060708090a0b after 39.5s"
    )
    assert (error.server, error.elapsed) == ("192.0.2.1:3478", 39.5)
