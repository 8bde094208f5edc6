"""
The rendezvous wire schema: AMP commands (``twisted.protocols.amp``) and the
checks every value passes before the server or client trusts it.

A session on one connection runs ``Hello`` (learn the server's challenge and
the address it observes), ``Authenticate`` (prove possession of the key of a
peer id), then any of ``Register``, ``Refresh``, ``Lookup``, ``Connect``,
``Reverse``, ``Relay``, ``UdpRelay``.  The server sends ``Introduce``,
``DialBack``, ``RelayOffer`` and ``UdpRelayOffer`` to registered peers.  A
fresh connection may instead run ``Hello``, ``Authenticate`` and
``RelayJoin``, after which it carries raw relayed bytes.
``docs/protocol.rst`` tells the whole exchange.

Each error class travels as its own AMP error code, so the client raises the
same :mod:`nattraverse.errors` class the server raised, with its message.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.protocols import amp

from nattraverse.errors import (
    InvalidRequest,
    LimitExceeded,
    NameTaken,
    NotAuthenticated,
    PeerAuthenticationFailed,
    PeerNotFound,
    RelayRefused,
    RendezvousUnavailable,
    ReversalRefused,
)
from nattraverse.identity import PeerId

#: Version of this schema, exchanged in ``Hello``.
PROTOCOL_VERSION = 1

#: Bytes of a challenge, a session id, a session secret and a relay token.
CHALLENGE_SIZE = 32
SESSION_ID_SIZE = 16
SECRET_SIZE = 32
TOKEN_SIZE = 32

#: Bytes of the UDP binding token ``Hello`` issues: the first half names
#: the binding (the STUN USERNAME, in hex), the second half keys it (the
#: MESSAGE-INTEGRITY key); see :func:`udp_credentials`.
UDP_TOKEN_SIZE = 32

#: Most private (host) candidates one peer may announce.
MAX_CANDIDATES = 8

#: Most methods a ``Connect`` may list, and the longest method name.
MAX_METHODS = 16
MAX_METHOD_LENGTH = 32

#: Names: 1 to 64 characters of letters, digits and ``. _ - @ +``.
MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}", re.ASCII)
_METHOD = re.compile(r"[a-z0-9][a-z0-9-]{0,31}", re.ASCII)

_ERRORS: dict[type[Exception], bytes] = {
    InvalidRequest: b"INVALID_REQUEST",
    NotAuthenticated: b"NOT_AUTHENTICATED",
    PeerAuthenticationFailed: b"AUTHENTICATION_FAILED",
    NameTaken: b"NAME_TAKEN",
    PeerNotFound: b"PEER_NOT_FOUND",
    LimitExceeded: b"LIMIT_EXCEEDED",
    ReversalRefused: b"REVERSAL_REFUSED",
    RelayRefused: b"RELAY_REFUSED",
    RendezvousUnavailable: b"UNAVAILABLE",
}


class _RemoteAuthenticationFailed(PeerAuthenticationFailed):
    """
    :class:`~nattraverse.errors.PeerAuthenticationFailed` as rebuilt from an
    AMP error: the server's whole message, not prefixed a second time.
    """

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.reason = message
        self.peer_id = None


def _errors(*kinds: type[Exception]) -> dict[type[Exception], bytes]:
    chosen = {InvalidRequest, NotAuthenticated, LimitExceeded, *kinds}
    return {kind: code for kind, code in _ERRORS.items() if kind in chosen}


def _candidates(*, optional: bool = False) -> amp.AmpList:
    return amp.AmpList([(b"host", amp.Unicode()), (b"port", amp.Integer())], optional=optional)


_PEER_FIELDS: list[tuple[bytes, amp.Argument]] = [
    (b"peer_id", amp.Unicode()),
    (b"name", amp.Unicode()),
    (b"observed_host", amp.Unicode()),
    (b"observed_port", amp.Integer()),
    (b"listen_port", amp.Integer()),
    (b"private", _candidates()),
    (b"udp_host", amp.Unicode()),
    (b"udp_port", amp.Integer()),
    (b"udp_private", _candidates()),
    # Optional: a server from before TCP punching does not send it.
    (b"tcp_private", _candidates(optional=True)),
    # Optional: where the STUN service's second port observed the same
    # socket (absent, or empty and 0, when it did not).
    (b"udp_second_host", amp.Unicode(optional=True)),
    (b"udp_second_port", amp.Integer(optional=True)),
]


# -- client to server -------------------------------------------------------


class Hello(amp.Command):
    """
    First command of every connection.  The answer carries a fresh
    challenge for ``Authenticate``, the address the server observes this
    connection coming from (never anything the client claimed), the STUN
    port of the same host (0 when none), whether the relay is on, and
    *udp_token*: :data:`UDP_TOKEN_SIZE` fresh random bytes that bind a UDP
    socket to this connection (:func:`udp_credentials`), good until the
    connection closes, and *stun_second_port*: a second STUN port of the
    same host (0 or absent when none), where a binding with the same token
    shows whether the peer's NAT maps per destination, and *udp_relay*:
    whether the UDP relay (``UdpRelay``) is on (absent: off).
    """

    commandName = b"Hello"
    arguments = [(b"version", amp.Integer())]
    response = [
        (b"version", amp.Integer()),
        (b"challenge", amp.String()),
        (b"observed_host", amp.Unicode()),
        (b"observed_port", amp.Integer()),
        (b"stun_port", amp.Integer()),
        (b"relay", amp.Boolean()),
        (b"udp_token", amp.String()),
        (b"stun_second_port", amp.Integer(optional=True)),
        # Optional: a server from before the UDP relay does not send it
        # (missing: off).
        (b"udp_relay", amp.Boolean(optional=True)),
    ]
    errors = _errors()


class Authenticate(amp.Command):
    """
    Prove possession of a key: *public_key* is its DER SubjectPublicKeyInfo,
    *signature* is :meth:`nattraverse.identity.Identity.sign` over the
    ``Hello`` challenge.  Binds the connection to the key's peer id.  A
    rendezvous run with an access key also wants *access_proof*:
    :func:`access_proof` of the key and the challenge.
    """

    commandName = b"Authenticate"
    arguments = [
        (b"public_key", amp.String()),
        (b"signature", amp.String()),
        (b"access_proof", amp.String(optional=True)),
    ]
    response = [(b"peer_id", amp.Unicode())]
    errors = _errors(PeerAuthenticationFailed)


# What arrives is the server's message whole: do not prefix it a second time.
Authenticate.reverseErrors[_ERRORS[PeerAuthenticationFailed]] = _RemoteAuthenticationFailed  # type: ignore[attr-defined]


class Register(amp.Command):
    """
    Bind *name* to this connection's peer id and announce how to reach it:
    *listen_port* is the TCP port it accepts direct connections on (0:
    none), *private* its private addresses (hints only, at most
    :data:`MAX_CANDIDATES`), *udp_private* the host addresses of its
    punching UDP socket (hints too; absent means none), *tcp_private* the
    host addresses of its TCP punching port, the local port this connection
    comes from (hints too; absent means this peer does not punch TCP, see
    ``docs/protocol.rst``).  The answer is the registration's TTL in
    seconds; ``Refresh`` before it runs out.
    """

    commandName = b"Register"
    arguments = [
        (b"name", amp.Unicode()),
        (b"listen_port", amp.Integer()),
        (b"private", _candidates()),
        (b"udp_private", _candidates(optional=True)),
        (b"tcp_private", _candidates(optional=True)),
    ]
    response = [(b"ttl", amp.Float())]
    errors = _errors(NameTaken)


class Refresh(amp.Command):
    """
    Keep this connection's registration alive for another TTL.
    """

    commandName = b"Refresh"
    arguments = []
    response = [(b"ttl", amp.Float())]
    errors = _errors(PeerNotFound)


class Lookup(amp.Command):
    """
    What the server knows of a registered peer, by name or peer id.  Its
    ``udp_host`` and ``udp_port`` are the address the STUN service last
    observed the peer's bound UDP socket at (empty and 0 when none).  When
    its ``tcp_private`` is not empty the peer punches TCP and its observed
    address is its server-reflexive TCP punching candidate.
    """

    commandName = b"Lookup"
    arguments = [(b"peer", amp.Unicode())]
    response = list(_PEER_FIELDS)
    errors = _errors(PeerNotFound)


class Connect(amp.Command):
    """
    Ask to be introduced to *peer* (a name or a peer id).  At the same
    moment the server answers with the callee's details and sends the
    callee ``Introduce`` with the caller's; both get the same fresh
    *session* id and *secret*.  *listen_port* is the caller's port for
    connection reversal (0: none); *udp_private* the host addresses of its
    punching UDP socket (absent means none); *tcp_private* the host
    addresses of its TCP punching port, the local port this connection
    comes from (absent means it does not punch TCP); *methods* the methods
    the caller will try.  Each side's ``udp_host``/``udp_port`` is the
    address the STUN service observed its bound UDP socket at, as of this
    moment.
    """

    commandName = b"Connect"
    arguments = [
        (b"peer", amp.Unicode()),
        (b"listen_port", amp.Integer()),
        (b"private", _candidates()),
        (b"methods", amp.ListOf(amp.Unicode())),
        (b"udp_private", _candidates(optional=True)),
        (b"tcp_private", _candidates(optional=True)),
    ]
    response = [
        (b"session", amp.String()),
        (b"secret", amp.String()),
        *_PEER_FIELDS,
        (b"relay", amp.Boolean()),
    ]
    errors = _errors(PeerNotFound, RendezvousUnavailable)


class Reverse(amp.Command):
    """
    Connection reversal: ask the callee of *session* to dial this caller
    back at *port* of the address the server observes the caller at.
    *host*, when given, must be that observed address; anything else is
    refused with :class:`~nattraverse.errors.ReversalRefused`.
    """

    commandName = b"Reverse"
    arguments = [
        (b"session", amp.String()),
        (b"host", amp.Unicode(optional=True)),
        (b"port", amp.Integer()),
    ]
    response = []
    errors = _errors(ReversalRefused, RendezvousUnavailable)


class Relay(amp.Command):
    """
    Ask for a relay between the two peers of *session*.  The answer is this
    peer's token; the other peer gets its own in ``RelayOffer``.  Each then
    opens a new connection and sends ``RelayJoin`` with its token.
    """

    commandName = b"Relay"
    arguments = [(b"session", amp.String())]
    response = [(b"token", amp.String()), (b"lifetime", amp.Float())]
    errors = _errors(RelayRefused, RendezvousUnavailable)


class RelayJoin(amp.ProtocolSwitchCommand):
    """
    On a fresh, authenticated connection: join the relay *token* names.
    Once answered the connection carries raw bytes, spliced to the other
    peer's connection as soon as it joins too.
    """

    commandName = b"RelayJoin"
    arguments = [(b"token", amp.String())]
    response = []
    errors = _errors(RelayRefused)


class UdpRelay(amp.Command):
    """
    Ask for a UDP relay between the two peers of *session*: a fresh UDP
    *port* on the STUN service's host, live for *lifetime* seconds.  The
    answer carries this peer's *token* (:data:`UDP_TOKEN_SIZE` bytes); the
    other peer gets its own in ``UdpRelayOffer``.  Each latches its
    punching UDP socket onto the port with a STUN Binding request
    authenticated with :func:`udp_credentials` of its token; the relay then
    forwards every other datagram between the two latched sources.
    """

    commandName = b"UdpRelay"
    arguments = [(b"session", amp.String())]
    response = [(b"port", amp.Integer()), (b"token", amp.String()), (b"lifetime", amp.Float())]
    errors = _errors(RelayRefused, RendezvousUnavailable)


# -- server to client -------------------------------------------------------


class Introduce(amp.Command):
    """
    Sent to a registered peer when someone connects to it: the caller's
    details (``name`` is empty: callers need not register; ``udp_host`` and
    ``udp_port`` are where the STUN service last observed the caller's
    bound UDP socket, empty and 0 when none), the session id and secret,
    and the methods the caller will try.
    """

    commandName = b"Introduce"
    arguments = [
        (b"session", amp.String()),
        (b"secret", amp.String()),
        *_PEER_FIELDS,
        (b"methods", amp.ListOf(amp.Unicode())),
    ]
    response = []
    errors = _errors()


class DialBack(amp.Command):
    """
    Connection reversal, to the callee: dial *host*:*port* (the caller's
    observed address) for *session*.
    """

    commandName = b"DialBack"
    arguments = [(b"session", amp.String()), (b"host", amp.Unicode()), (b"port", amp.Integer())]
    response = []
    errors = _errors()


class RelayOffer(amp.Command):
    """
    To the callee: the caller asked for a relay for *session*; join it with
    *token*.
    """

    commandName = b"RelayOffer"
    arguments = [(b"session", amp.String()), (b"token", amp.String()), (b"lifetime", amp.Float())]
    response = []
    errors = _errors()


class UdpRelayOffer(amp.Command):
    """
    To the other peer of *session*: its peer asked for a UDP relay; latch
    onto *port* of the STUN service's host with *token* within the relay's
    join timeout (it lives *lifetime* seconds).
    """

    commandName = b"UdpRelayOffer"
    arguments = [
        (b"session", amp.String()),
        (b"port", amp.Integer()),
        (b"token", amp.String()),
        (b"lifetime", amp.Float()),
    ]
    response = []
    errors = _errors()


# -- checks -----------------------------------------------------------------


def check_name(name: str) -> str:
    """
    Return *name* if it may be registered.

    :raises InvalidRequest: when it is empty, longer than
        :data:`MAX_NAME_LENGTH`, has characters other than letters, digits
        and ``. _ - @ +``, or is spelled like a peer id.
    """
    if not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"name {name[:80]!r} is not 1-{MAX_NAME_LENGTH} letters, digits or '._-@+'"
        )
    if is_peer_id(name):
        raise InvalidRequest(f"name {name!r} is spelled like a peer id; choose another")
    return name


def is_peer_id(text: str) -> bool:
    """
    Whether *text* is a peer id (rather than a name).
    """
    try:
        PeerId.parse(text)
    except ValueError:
        return False
    return True


def check_port(port: int, field: str, *, allow_zero: bool = True) -> int:
    """
    Return *port* if it is a TCP/UDP port number.

    :raises InvalidRequest: naming *field* otherwise.
    """
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise InvalidRequest(f"{field}: {port} is not a port number ({low}-65535)")
    return port


def check_host(host: str, field: str) -> str:
    """
    Return *host* in canonical form if it is an IP address literal.

    :raises InvalidRequest: naming *field* otherwise.
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise InvalidRequest(f"{field}: {host[:80]!r} is not an IP address") from None


def check_candidates(
    candidates: Sequence[Mapping[str, Any]], field: str = "private"
) -> list[tuple[str, int]]:
    """
    Validate a list of ``{"host": str, "port": int}`` and return it as
    ``(host, port)`` tuples.

    :raises InvalidRequest: when there are more than :data:`MAX_CANDIDATES`
        or one is not an IP address and port number (1-65535).
    """
    if len(candidates) > MAX_CANDIDATES:
        raise InvalidRequest(
            f"{field}: {len(candidates)} candidates, at most {MAX_CANDIDATES} are accepted"
        )
    return [
        (
            check_host(str(item["host"]), f"{field}[{index}].host"),
            check_port(int(item["port"]), f"{field}[{index}].port", allow_zero=False),
        )
        for index, item in enumerate(candidates)
    ]


def encode_candidates(candidates: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
    """
    The AMP form of ``(host, port)`` candidates.
    """
    return [{"host": host, "port": port} for host, port in candidates]


def check_methods(methods: Sequence[str]) -> list[str]:
    """
    Validate a list of method names.

    :raises InvalidRequest: when there are more than :data:`MAX_METHODS` or
        a name is not lower-case letters, digits and dashes.
    """
    if len(methods) > MAX_METHODS:
        raise InvalidRequest(f"methods: {len(methods)} listed, at most {MAX_METHODS}")
    for method in methods:
        if not _METHOD.fullmatch(method):
            raise InvalidRequest(f"methods: {method[:40]!r} is not a method name")
    return list(methods)


def check_bytes(value: bytes, size: int, field: str) -> bytes:
    """
    Return *value* if it is exactly *size* bytes.

    :raises InvalidRequest: naming *field* otherwise.
    """
    if len(value) != size:
        raise InvalidRequest(f"{field}: {len(value)} bytes, expected {size}")
    return value


def udp_credentials(token: bytes) -> tuple[str, bytes]:
    """
    The STUN credentials of a UDP binding token from ``Hello``: the USERNAME
    (the hex of its first 16 bytes, 32 characters) and the
    MESSAGE-INTEGRITY key (its last 16 bytes; RFC 8489 section 14.5).

    :raises InvalidRequest: when *token* is not :data:`UDP_TOKEN_SIZE` bytes.
    """
    check_bytes(token, UDP_TOKEN_SIZE, "udp_token")
    half = UDP_TOKEN_SIZE // 2
    return token[:half].hex(), token[half:]


def access_proof(access_key: bytes, challenge: bytes) -> bytes:
    """
    What a client shows a rendezvous that wants an access key: HMAC-SHA256
    keyed with the access key over ``b"nattraverse access v1" + challenge``.
    """
    return hmac.new(access_key, b"nattraverse access v1" + challenge, hashlib.sha256).digest()
