"""
STUN credentials: the keys of MESSAGE-INTEGRITY and MESSAGE-INTEGRITY-SHA256
(RFC 8489 section 9).

- Short-term: the key is the password processed with OpaqueString
  (RFC 8265), as UTF-8.
- Long-term: the key is ``MD5(username ":" realm ":" password)`` or, with
  PASSWORD-ALGORITHM SHA-256, ``SHA-256`` of the same string (RFC 8489
  section 9.2.2).  RFC 8489 processes realm and password with OpaqueString;
  RFC 5389 (and the RFC 5769 test vectors) used SASLprep, which is also here
  for servers that still expect it.
"""

from __future__ import annotations

import hashlib
import stringprep
import unicodedata
from collections.abc import Callable
from enum import IntEnum


class PasswordAlgorithmCode(IntEnum):
    """PASSWORD-ALGORITHM values (RFC 8489 section 18.5)."""

    MD5 = 0x0001
    SHA256 = 0x0002


def opaque_string(text: str) -> str:
    """
    The PRECIS OpaqueString profile (RFC 8265 section 4.2), as far as STUN
    needs it: non-ASCII spaces become ASCII spaces, then NFC; control
    characters and empty strings are refused.

    :raises ValueError: when *text* is not allowed.
    """
    mapped = "".join(" " if unicodedata.category(c) == "Zs" else c for c in text)
    normalized = unicodedata.normalize("NFC", mapped)
    if not normalized:
        raise ValueError("an OpaqueString must not be empty")
    for c in normalized:
        if unicodedata.category(c) == "Cc":
            raise ValueError(f"control character U+{ord(c):04X} is not allowed in an OpaqueString")
    return normalized


def saslprep(text: str) -> str:
    """
    SASLprep (RFC 4013), as RFC 5389 specified for long-term credentials.

    :raises ValueError: when *text* contains a prohibited character or
        breaks the bidirectional rules.
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    for c in normalized:
        if any(check(c) for check in prohibited):
            raise ValueError(f"character U+{ord(c):04X} is prohibited by SASLprep")
    if any(stringprep.in_table_d1(c) for c in normalized):
        if any(stringprep.in_table_d2(c) for c in normalized):
            raise ValueError("string mixes left-to-right and right-to-left characters")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise ValueError("right-to-left string must start and end with RTL characters")
    return normalized


def short_term_key(password: str) -> bytes:
    """The short-term credential key (RFC 8489 section 9.1.1)."""
    return opaque_string(password).encode("utf-8")


def long_term_key(
    username: str,
    realm: str,
    password: str,
    *,
    algorithm: PasswordAlgorithmCode = PasswordAlgorithmCode.MD5,
    prep: Callable[[str], str] = opaque_string,
) -> bytes:
    """
    The long-term credential key (RFC 8489 section 9.2.2).

    :param prep: How realm and password are prepared: :func:`opaque_string`
        (RFC 8489) or :func:`saslprep` (RFC 5389).
    """
    text = f"{username}:{prep(realm)}:{prep(password)}".encode()
    if algorithm == PasswordAlgorithmCode.MD5:
        return hashlib.md5(text, usedforsecurity=False).digest()
    if algorithm == PasswordAlgorithmCode.SHA256:
        return hashlib.sha256(text).digest()
    raise ValueError(f"unknown password algorithm {algorithm}")


def userhash(username: str, realm: str) -> bytes:
    """The USERHASH value: SHA-256 of ``username:realm`` (RFC 8489 section 14.4)."""
    return hashlib.sha256(f"{username}:{opaque_string(realm)}".encode()).digest()
