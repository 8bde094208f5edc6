"""
STUN attributes: one class per attribute type, each encoding and decoding
its own value.

Values are checked before they are trusted: every decoder checks its length
and ranges and raises :class:`AttributeValueError` with a reason, which the
message decoder turns into a :class:`~nattraverse.errors.StunDecodeError`
naming the attribute and its offset.

The table of known attributes is an ordinary mapping from type code to
class, passed to the decoder; :data:`DEFAULT_ATTRIBUTES` holds the STUN,
RFC 5780, RFC 3489 and ICE attributes, and other protocols (TURN) extend it
with ``{**DEFAULT_ATTRIBUTES, **more}``.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Self

from nattraverse._types import Endpoint
from nattraverse.stun.constants import MAGIC_COOKIE_BYTES, AttributeType


class AttributeValueError(ValueError):
    """
    An attribute value is malformed; the message says how.
    """


def xor_key(transaction_id: bytes) -> bytes:
    """
    The 16 bytes that XOR address attributes are masked with: the magic
    cookie and the 96-bit transaction id (RFC 8489 section 14.2).  A 16-byte
    RFC 3489 transaction id already stands where both are.
    """
    if len(transaction_id) == 16:
        return transaction_id
    return MAGIC_COOKIE_BYTES + transaction_id


class Attribute:
    """
    Base class of attribute values.

    Subclasses set :attr:`TYPE` and implement :meth:`encode_value` and
    :meth:`decode_value`.
    """

    __slots__ = ()

    TYPE: ClassVar[int]
    NAME: ClassVar[str]

    def encode_value(self, transaction_id: bytes) -> bytes:
        """The attribute value on the wire, without header or padding."""
        raise NotImplementedError

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        """
        Decode a value (without header or padding).

        :raises AttributeValueError: when the value is malformed.
        """
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class UnknownAttribute(Attribute):
    """
    An attribute whose type is not in the table in use; kept raw, in order.
    """

    type: int
    value: bytes

    NAME = "UNKNOWN"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return self.value

    @property
    def name(self) -> str:
        return f"0x{self.type:04X}"


def _check_length(value: bytes, *lengths: int) -> None:
    if len(value) not in lengths:
        expected = " or ".join(str(n) for n in lengths)
        raise AttributeValueError(f"value is {len(value)} bytes, expected {expected}")


# -- addresses (RFC 8489 sections 14.1 and 14.2) ---------------------------


def _encode_address(endpoint: Endpoint, mask: bytes | None) -> bytes:
    address = ipaddress.ip_address(endpoint.host)
    raw = address.packed
    port = endpoint.port
    if mask is not None:
        port ^= 0x2112
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    family = 1 if address.version == 4 else 2
    return struct.pack("!BBH", 0, family, port) + raw


def _decode_address(value: bytes, mask: bytes | None) -> Endpoint:
    if len(value) < 4:
        raise AttributeValueError(f"value is {len(value)} bytes, too short for an address")
    _, family, port = struct.unpack_from("!BBH", value)
    if family == 1:
        _check_length(value, 8)
    elif family == 2:
        _check_length(value, 20)
    else:
        raise AttributeValueError(f"address family {family} is neither 1 (IPv4) nor 2 (IPv6)")
    raw = value[4:]
    if mask is not None:
        port ^= 0x2112
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    return Endpoint(str(ipaddress.ip_address(raw)), port)


@dataclass(frozen=True, slots=True)
class _AddressAttribute(Attribute):
    address: Endpoint

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _encode_address(self.address, None)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(_decode_address(value, None))


@dataclass(frozen=True, slots=True)
class _XorAddressAttribute(Attribute):
    address: Endpoint

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _encode_address(self.address, xor_key(transaction_id))

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(_decode_address(value, xor_key(transaction_id)))


@dataclass(frozen=True, slots=True)
class MappedAddress(_AddressAttribute):
    """MAPPED-ADDRESS (RFC 8489 section 14.1), for RFC 3489 clients."""

    TYPE = AttributeType.MAPPED_ADDRESS
    NAME = "MAPPED-ADDRESS"


@dataclass(frozen=True, slots=True)
class XorMappedAddress(_XorAddressAttribute):
    """XOR-MAPPED-ADDRESS (RFC 8489 section 14.2): the reflexive address."""

    TYPE = AttributeType.XOR_MAPPED_ADDRESS
    NAME = "XOR-MAPPED-ADDRESS"


@dataclass(frozen=True, slots=True)
class AlternateServer(_AddressAttribute):
    """ALTERNATE-SERVER (RFC 8489 section 14.15)."""

    TYPE = AttributeType.ALTERNATE_SERVER
    NAME = "ALTERNATE-SERVER"


@dataclass(frozen=True, slots=True)
class ResponseOrigin(_AddressAttribute):
    """RESPONSE-ORIGIN (RFC 5780 section 7.3): where the response was sent from."""

    TYPE = AttributeType.RESPONSE_ORIGIN
    NAME = "RESPONSE-ORIGIN"


@dataclass(frozen=True, slots=True)
class OtherAddress(_AddressAttribute):
    """OTHER-ADDRESS (RFC 5780 section 7.4): the server's address of the
    other IP address and port."""

    TYPE = AttributeType.OTHER_ADDRESS
    NAME = "OTHER-ADDRESS"


@dataclass(frozen=True, slots=True)
class SourceAddress(_AddressAttribute):
    """SOURCE-ADDRESS (RFC 3489 section 11.2.3): like RESPONSE-ORIGIN."""

    TYPE = AttributeType.SOURCE_ADDRESS
    NAME = "SOURCE-ADDRESS"


@dataclass(frozen=True, slots=True)
class ChangedAddress(_AddressAttribute):
    """CHANGED-ADDRESS (RFC 3489 section 11.2.3): like OTHER-ADDRESS."""

    TYPE = AttributeType.CHANGED_ADDRESS
    NAME = "CHANGED-ADDRESS"


# -- text --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TextAttribute(Attribute):
    value: str

    #: Largest value in bytes that the RFC allows.
    MAX_BYTES: ClassVar[int] = 763

    def encode_value(self, transaction_id: bytes) -> bytes:
        raw = self.value.encode("utf-8")
        if len(raw) > self.MAX_BYTES:
            raise AttributeValueError(
                f"{self.NAME} is {len(raw)} bytes; at most {self.MAX_BYTES} are allowed"
            )
        return raw

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) > cls.MAX_BYTES:
            raise AttributeValueError(
                f"value is {len(value)} bytes; at most {cls.MAX_BYTES} are allowed"
            )
        try:
            return cls(value.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise AttributeValueError(
                f"value is not UTF-8 ({e.reason} at byte {e.start})"
            ) from None


@dataclass(frozen=True, slots=True)
class Username(_TextAttribute):
    """USERNAME (RFC 8489 section 14.3)."""

    TYPE = AttributeType.USERNAME
    NAME = "USERNAME"
    MAX_BYTES = 508


@dataclass(frozen=True, slots=True)
class Realm(_TextAttribute):
    """REALM (RFC 8489 section 14.9)."""

    TYPE = AttributeType.REALM
    NAME = "REALM"


@dataclass(frozen=True, slots=True)
class Nonce(_TextAttribute):
    """NONCE (RFC 8489 section 14.10)."""

    TYPE = AttributeType.NONCE
    NAME = "NONCE"


@dataclass(frozen=True, slots=True)
class Software(_TextAttribute):
    """SOFTWARE (RFC 8489 section 14.14)."""

    TYPE = AttributeType.SOFTWARE
    NAME = "SOFTWARE"


@dataclass(frozen=True, slots=True)
class AlternateDomain(_TextAttribute):
    """ALTERNATE-DOMAIN (RFC 8489 section 14.16)."""

    TYPE = AttributeType.ALTERNATE_DOMAIN
    NAME = "ALTERNATE-DOMAIN"


# -- opaque and integer values -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Userhash(Attribute):
    """USERHASH (RFC 8489 section 14.4): SHA-256 of ``username:realm``."""

    value: bytes

    TYPE = AttributeType.USERHASH
    NAME = "USERHASH"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return self.value

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        _check_length(value, 32)
        return cls(value)


@dataclass(frozen=True, slots=True)
class MessageIntegrity(Attribute):
    """MESSAGE-INTEGRITY (RFC 8489 section 14.5): HMAC-SHA1, 20 bytes."""

    mac: bytes

    TYPE = AttributeType.MESSAGE_INTEGRITY
    NAME = "MESSAGE-INTEGRITY"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return self.mac

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        _check_length(value, 20)
        return cls(value)


@dataclass(frozen=True, slots=True)
class MessageIntegritySha256(Attribute):
    """MESSAGE-INTEGRITY-SHA256 (RFC 8489 section 14.6): HMAC-SHA256,
    possibly truncated to 16-32 bytes in steps of 4."""

    mac: bytes

    TYPE = AttributeType.MESSAGE_INTEGRITY_SHA256
    NAME = "MESSAGE-INTEGRITY-SHA256"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return self.mac

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        _check_length(value, 16, 20, 24, 28, 32)
        return cls(value)


@dataclass(frozen=True, slots=True)
class Fingerprint(Attribute):
    """FINGERPRINT (RFC 8489 section 14.7): CRC-32 of the message XOR
    0x5354554E."""

    crc: int

    TYPE = AttributeType.FINGERPRINT
    NAME = "FINGERPRINT"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return struct.pack("!I", self.crc)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        _check_length(value, 4)
        return cls(struct.unpack("!I", value)[0])


@dataclass(frozen=True, slots=True)
class ErrorCode(Attribute):
    """ERROR-CODE (RFC 8489 section 14.8)."""

    code: int
    reason: str = ""

    TYPE = AttributeType.ERROR_CODE
    NAME = "ERROR-CODE"

    def encode_value(self, transaction_id: bytes) -> bytes:
        if not 300 <= self.code <= 699:
            raise AttributeValueError(f"error code {self.code} is outside 300-699")
        reason = self.reason.encode("utf-8")
        if len(reason) > 763:
            raise AttributeValueError("reason phrase is longer than 763 bytes")
        return struct.pack("!HBB", 0, self.code // 100, self.code % 100) + reason

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) < 4:
            raise AttributeValueError(f"value is {len(value)} bytes, at least 4 are needed")
        if len(value) > 4 + 763:
            raise AttributeValueError("reason phrase is longer than 763 bytes")
        _, klass, number = struct.unpack_from("!HBB", value)
        klass &= 0x07
        if not 3 <= klass <= 6 or number > 99:
            raise AttributeValueError(f"class {klass} number {number} is not a code 300-699")
        try:
            reason = value[4:].decode("utf-8")
        except UnicodeDecodeError:
            raise AttributeValueError("reason phrase is not UTF-8") from None
        return cls(klass * 100 + number, reason)


@dataclass(frozen=True, slots=True)
class UnknownAttributes(Attribute):
    """UNKNOWN-ATTRIBUTES (RFC 8489 section 14.13)."""

    types: tuple[int, ...]

    TYPE = AttributeType.UNKNOWN_ATTRIBUTES
    NAME = "UNKNOWN-ATTRIBUTES"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return struct.pack(f"!{len(self.types)}H", *self.types)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) % 2:
            raise AttributeValueError(f"value is {len(value)} bytes, not a multiple of 2")
        return cls(struct.unpack(f"!{len(value) // 2}H", value))


@dataclass(frozen=True, slots=True)
class PasswordAlgorithm(Attribute):
    """PASSWORD-ALGORITHM (RFC 8489 section 14.12): 1 is MD5, 2 is SHA-256."""

    algorithm: int
    parameters: bytes = b""

    TYPE = AttributeType.PASSWORD_ALGORITHM
    NAME = "PASSWORD-ALGORITHM"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return _encode_algorithm(self.algorithm, self.parameters)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        algorithms = _decode_algorithms(value)
        if len(algorithms) != 1:
            raise AttributeValueError(f"holds {len(algorithms)} algorithms, expected 1")
        return cls(*algorithms[0])


@dataclass(frozen=True, slots=True)
class PasswordAlgorithms(Attribute):
    """PASSWORD-ALGORITHMS (RFC 8489 section 14.11)."""

    algorithms: tuple[tuple[int, bytes], ...]

    TYPE = AttributeType.PASSWORD_ALGORITHMS
    NAME = "PASSWORD-ALGORITHMS"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return b"".join(_encode_algorithm(a, p) for a, p in self.algorithms)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(_decode_algorithms(value))


def _encode_algorithm(algorithm: int, parameters: bytes) -> bytes:
    padding = b"\x00" * (-len(parameters) % 4)
    return struct.pack("!HH", algorithm, len(parameters)) + parameters + padding


def _decode_algorithms(value: bytes) -> tuple[tuple[int, bytes], ...]:
    result = []
    offset = 0
    while offset < len(value):
        if len(value) - offset < 4:
            raise AttributeValueError(f"truncated algorithm entry at value byte {offset}")
        algorithm, length = struct.unpack_from("!HH", value, offset)
        end = offset + 4 + length
        if end > len(value):
            raise AttributeValueError(f"algorithm parameters at value byte {offset} overrun")
        result.append((algorithm, bytes(value[offset + 4 : end])))
        offset = end + (-length % 4)
    return tuple(result)


@dataclass(frozen=True, slots=True)
class ChangeRequest(Attribute):
    """CHANGE-REQUEST (RFC 5780 section 7.2): ask for the response from the
    other IP address and/or port."""

    change_ip: bool = False
    change_port: bool = False

    TYPE = AttributeType.CHANGE_REQUEST
    NAME = "CHANGE-REQUEST"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return struct.pack("!I", (4 if self.change_ip else 0) | (2 if self.change_port else 0))

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        _check_length(value, 4)
        (flags,) = struct.unpack("!I", value)
        return cls(bool(flags & 4), bool(flags & 2))


@dataclass(frozen=True, slots=True)
class ResponsePort(Attribute):
    """RESPONSE-PORT (RFC 5780 section 7.5): send the response to this port
    of the request's source address."""

    port: int

    TYPE = AttributeType.RESPONSE_PORT
    NAME = "RESPONSE-PORT"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return struct.pack("!HH", self.port, 0)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        _check_length(value, 4)
        return cls(struct.unpack_from("!H", value)[0])


@dataclass(frozen=True, slots=True)
class Padding(Attribute):
    """PADDING (RFC 5780 section 7.6): bytes whose value does not matter."""

    value: bytes = field(repr=False)

    TYPE = AttributeType.PADDING
    NAME = "PADDING"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return self.value

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(bytes(value))


@dataclass(frozen=True, slots=True)
class Priority(Attribute):
    """PRIORITY (RFC 8445 section 16.1)."""

    priority: int

    TYPE = AttributeType.PRIORITY
    NAME = "PRIORITY"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return struct.pack("!I", self.priority)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        _check_length(value, 4)
        return cls(struct.unpack("!I", value)[0])


@dataclass(frozen=True, slots=True)
class UseCandidate(Attribute):
    """USE-CANDIDATE (RFC 8445 section 16.1): no value."""

    TYPE = AttributeType.USE_CANDIDATE
    NAME = "USE-CANDIDATE"

    def encode_value(self, transaction_id: bytes) -> bytes:
        return b""

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        _check_length(value, 0)
        return cls()


@dataclass(frozen=True, slots=True)
class _TieBreaker(Attribute):
    tie_breaker: int

    def encode_value(self, transaction_id: bytes) -> bytes:
        return struct.pack("!Q", self.tie_breaker)

    @classmethod
    def decode_value(cls, value: bytes, transaction_id: bytes) -> Self:
        _check_length(value, 8)
        return cls(struct.unpack("!Q", value)[0])


@dataclass(frozen=True, slots=True)
class IceControlled(_TieBreaker):
    """ICE-CONTROLLED (RFC 8445 section 16.1)."""

    TYPE = AttributeType.ICE_CONTROLLED
    NAME = "ICE-CONTROLLED"


@dataclass(frozen=True, slots=True)
class IceControlling(_TieBreaker):
    """ICE-CONTROLLING (RFC 8445 section 16.1)."""

    TYPE = AttributeType.ICE_CONTROLLING
    NAME = "ICE-CONTROLLING"


AttributeTable = Mapping[int, type[Attribute]]

#: The attributes every STUN message decoder here understands.
DEFAULT_ATTRIBUTES: AttributeTable = MappingProxyType(
    {
        cls.TYPE: cls
        for cls in (
            MappedAddress,
            XorMappedAddress,
            AlternateServer,
            ResponseOrigin,
            OtherAddress,
            SourceAddress,
            ChangedAddress,
            Username,
            Realm,
            Nonce,
            Software,
            AlternateDomain,
            Userhash,
            MessageIntegrity,
            MessageIntegritySha256,
            Fingerprint,
            ErrorCode,
            UnknownAttributes,
            PasswordAlgorithm,
            PasswordAlgorithms,
            ChangeRequest,
            ResponsePort,
            Padding,
            Priority,
            UseCandidate,
            IceControlled,
            IceControlling,
        )
    }
)


def attribute_name(attribute_type: int, table: AttributeTable = DEFAULT_ATTRIBUTES) -> str:
    """A readable name for an attribute type, for error messages and logs."""
    cls = table.get(attribute_type)
    return cls.NAME if cls is not None else f"0x{attribute_type:04X}"
