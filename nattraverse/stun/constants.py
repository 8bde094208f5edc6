"""
STUN wire constants (RFC 8489, RFC 5780, RFC 3489, RFC 8445).
"""

from __future__ import annotations

from enum import IntEnum

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_LENGTH = 20
TRANSACTION_ID_LENGTH = 12
#: RFC 3489 transaction ids are 16 bytes: what is now the cookie was random.
CLASSIC_TRANSACTION_ID_LENGTH = 16
FINGERPRINT_XOR = 0x5354554E


class MessageClass(IntEnum):
    """The two class bits of the message type (RFC 8489 section 5)."""

    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Method(IntEnum):
    """STUN methods.  TURN adds its own (Allocate, Refresh, ...)."""

    BINDING = 0x001


class AttributeType(IntEnum):
    """Attribute type codes known to the default attribute table."""

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489, deprecated
    CHANGE_REQUEST = 0x0003  # RFC 5780 / RFC 3489
    SOURCE_ADDRESS = 0x0004  # RFC 3489
    CHANGED_ADDRESS = 0x0005  # RFC 3489
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PADDING = 0x0026  # RFC 5780
    RESPONSE_PORT = 0x0027  # RFC 5780
    PRIORITY = 0x0024  # RFC 8445
    USE_CANDIDATE = 0x0025  # RFC 8445
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029  # RFC 8445
    ICE_CONTROLLING = 0x802A  # RFC 8445
    RESPONSE_ORIGIN = 0x802B  # RFC 5780
    OTHER_ADDRESS = 0x802C  # RFC 5780


def is_comprehension_required(attribute_type: int) -> bool:
    """
    Whether an agent that does not know this attribute type must reject the
    message (types 0x0000-0x7FFF, RFC 8489 section 14).
    """
    return attribute_type < 0x8000


def message_type(method: int, message_class: int) -> int:
    """
    Interleave a 12-bit method and a 2-bit class into the 14-bit message
    type (RFC 8489 section 5, figure 3).
    """
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 0x1) << 4)
        | ((message_class & 0x2) << 7)
    )


def split_message_type(value: int) -> tuple[int, int]:
    """
    The inverse of :func:`message_type`: ``(method, class)``.
    """
    method = (value & 0x000F) | ((value & 0x00E0) >> 1) | ((value & 0x3E00) >> 2)
    message_class = ((value & 0x0010) >> 4) | ((value & 0x0100) >> 7)
    return method, message_class
