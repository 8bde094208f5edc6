"""
STUN credentials (RFC 8489 section 9): string preparation and keys.
"""

from __future__ import annotations

import hashlib

import pytest

from nattraverse.stun.credentials import (
    PasswordAlgorithmCode,
    long_term_key,
    opaque_string,
    saslprep,
    short_term_key,
    userhash,
)
from tests.unit.stun import vectors

#: RFC 4013 section 3: the SASLprep examples that succeed.
SASLPREP_EXAMPLES = [
    ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
    ("user", "user"),
    ("USER", "USER"),  # case preserved
    ("\u00aa", "a"),  # NFKC
    ("\u2168", "IX"),  # NFKC
]
#: RFC 4013 section 3: the SASLprep examples that fail.
SASLPREP_ERRORS = [
    ("\u0007", "character U\\+0007 is prohibited by SASLprep"),
    ("\u0627\u0031", "right-to-left string must start and end with RTL characters"),
]
#: RFC 8489 appendix B.1: USERHASH of the RFC 5769 long-term user and realm.
USERHASH_B1 = bytes.fromhex("4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704")


@pytest.mark.parametrize(("text", "prepared"), SASLPREP_EXAMPLES)
def test_saslprep_rfc4013(text: str, prepared: str) -> None:
    """SASLprep gives the RFC 4013 results."""
    assert saslprep(text) == prepared


@pytest.mark.parametrize(("text", "match"), SASLPREP_ERRORS)
def test_saslprep_rfc4013_errors(text: str, match: str) -> None:
    """SASLprep refuses the RFC 4013 examples it must refuse."""
    with pytest.raises(ValueError, match=match):
        saslprep(text)


def test_saslprep_rfc5769_password() -> None:
    """The RFC 5769 long-term password prepares to 'TheMatrIX'."""
    assert saslprep(vectors.LONG_TERM_PASSWORD) == "TheMatrIX"


def test_saslprep_non_ascii_space() -> None:
    """SASLprep maps non-ASCII spaces to SPACE."""
    assert saslprep("a\u00a0b\u3000c") == "a b c"


def test_saslprep_zero_width_removed() -> None:
    """SASLprep removes characters commonly mapped to nothing (zero width space)."""
    assert saslprep("a\u200bb") == "ab"


def test_saslprep_mixed_direction() -> None:
    """SASLprep refuses a string mixing right-to-left and left-to-right characters."""
    with pytest.raises(ValueError, match="mixes left-to-right and right-to-left"):
        saslprep("\u0627a\u0627")


def test_saslprep_rtl() -> None:
    """A right-to-left string that starts and ends with RTL characters is kept."""
    assert saslprep("\u0627\u0031\u0628") == "\u0627\u0031\u0628"


def test_saslprep_private_use() -> None:
    """SASLprep refuses private use characters."""
    with pytest.raises(ValueError, match="U\\+E000 is prohibited"):
        saslprep("\ue000")


def test_opaque_string_keeps_ascii() -> None:
    """OpaqueString leaves printable ASCII as it is, case included."""
    assert opaque_string("VOkJxbRl1RmTxUk/WvJxBt") == "VOkJxbRl1RmTxUk/WvJxBt"


def test_opaque_string_non_ascii_space() -> None:
    """OpaqueString maps non-ASCII spaces to SPACE."""
    assert opaque_string("a\u00a0b\u2003c") == "a b c"


def test_opaque_string_nfc() -> None:
    """OpaqueString normalises to NFC: a combining accent joins its letter."""
    assert opaque_string("e\u0301") == "\u00e9"


def test_opaque_string_not_nfkc() -> None:
    """OpaqueString does not apply compatibility mappings, unlike SASLprep."""
    assert opaque_string("\u2168\u00aa") == "\u2168\u00aa"


def test_opaque_string_keeps_soft_hyphen() -> None:
    """OpaqueString keeps the soft hyphen that SASLprep removes."""
    assert opaque_string("I\u00adX") == "I\u00adX"


def test_opaque_string_empty() -> None:
    """OpaqueString refuses the empty string."""
    with pytest.raises(ValueError, match="must not be empty"):
        opaque_string("")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("a\u0007b", "0007"),
        ("\u0000", "0000"),
        ("tab\there", "0009"),
        ("\u007f", "007F"),
        ("\u0085", "0085"),
    ],
)
def test_opaque_string_control(text: str, code: str) -> None:
    """OpaqueString refuses control characters, naming them."""
    with pytest.raises(ValueError, match=f"control character U\\+{code} is not allowed"):
        opaque_string(text)


def test_short_term_key() -> None:
    """The short-term key is the OpaqueString-prepared password as UTF-8."""
    assert short_term_key("p\u00e4ss\u00a0word") == "p\u00e4ss word".encode()


def test_long_term_key_md5() -> None:
    """The MD5 long-term key is MD5 of 'username:realm:password'."""
    key = long_term_key("user", "realm", "pass")
    assert key == hashlib.md5(b"user:realm:pass").digest()
    assert len(key) == 16


def test_long_term_key_sha256() -> None:
    """The SHA-256 long-term key is SHA-256 of 'username:realm:password'."""
    key = long_term_key("user", "realm", "pass", algorithm=PasswordAlgorithmCode.SHA256)
    assert key == hashlib.sha256(b"user:realm:pass").digest()
    assert len(key) == 32


def test_long_term_key_saslprep() -> None:
    """With prep=saslprep the password is SASLprepped (RFC 5389)."""
    key = long_term_key("u", "r", "I\u00adX", prep=saslprep)
    assert key == hashlib.md5(b"u:r:IX").digest()


def test_long_term_key_opaque_string_default() -> None:
    """By default realm and password are prepared with OpaqueString (RFC 8489)."""
    key = long_term_key("u", "r\u00a0m", "I\u00adX")
    assert key == hashlib.md5("u:r m:I\u00adX".encode()).digest()


def test_long_term_key_unknown_algorithm() -> None:
    """An unknown password algorithm raises ValueError."""
    with pytest.raises(ValueError, match="unknown password algorithm"):
        long_term_key("u", "r", "p", algorithm=3)  # type: ignore[arg-type]


def test_long_term_key_refuses_control_characters() -> None:
    """A password with a control character is refused, not hashed."""
    with pytest.raises(ValueError, match="control character"):
        long_term_key("u", "r", "p\u0007")


def test_password_algorithm_codes() -> None:
    """PASSWORD-ALGORITHM codes are 1 for MD5 and 2 for SHA-256 (RFC 8489 section 18.5)."""
    assert (PasswordAlgorithmCode.MD5, PasswordAlgorithmCode.SHA256) == (1, 2)


def test_userhash_length() -> None:
    """USERHASH is 32 bytes."""
    assert len(userhash("user", "realm")) == 32


def test_userhash_value() -> None:
    """USERHASH is SHA-256 of 'username:realm'."""
    assert userhash("user", "realm") == hashlib.sha256(b"user:realm").digest()


def test_userhash_rfc8489() -> None:
    """USERHASH of the RFC 8489 appendix B.1 user and realm is the RFC's value."""
    assert userhash(vectors.LONG_TERM_USERNAME, vectors.LONG_TERM_REALM) == USERHASH_B1
