"""
The binding of a peer's UDP socket to its rendezvous connection, shared by
the rendezvous (which issues a token per connection in ``Hello``) and the
STUN server (which observes the socket), see ``docs/protocol.rst``.

A peer sends, from the UDP socket it will punch with, a STUN Binding
request whose USERNAME is the hex of the token's first half and whose
MESSAGE-INTEGRITY is keyed with its second half
(:func:`~nattraverse.rendezvous.commands.udp_credentials`).  When the
integrity holds, the STUN server reports the request's source address to
:meth:`UdpBindings.observed`, which hands it to the connection that owns
the token: that address, as observed and never as claimed, is the peer's
server-reflexive UDP address.

Pure: no reactor, no sockets.  The table holds one entry per live token,
that is at most one per rendezvous connection, and is capped; nothing is
kept per STUN source before a request authenticates.

The second half of each token is an HMAC of the first half (drawn fresh
for every token), keyed with a secret the table draws when it issues its
first token: both halves are as unpredictable as random bytes to anyone
without the secret, and a USERNAME alone gives back the whole token.  So
the table is keyed by the very token object its connection keeps: an idle
connection costs it one dict entry.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nattraverse._types import Endpoint
from nattraverse.errors import LimitExceeded
from nattraverse.rendezvous.commands import UDP_TOKEN_SIZE

__all__ = ["BindingOwner", "BindingStats", "UdpBindings"]

_HALF = UDP_TOKEN_SIZE // 2
_USERNAME = re.compile(f"[0-9a-f]{{{2 * _HALF}}}", re.ASCII)
_LABEL = b"nattraverse udp binding v1"
#: Fresh names drawn before giving up on a source of random bytes that
#: keeps repeating itself.
_DRAWS = 8


class BindingOwner(Protocol):
    """What owns a token: told each address its UDP socket is observed at."""

    def udp_bound(self, source: Endpoint, *, second: bool = False) -> None:
        """
        An authenticated Binding request for this owner came from *source*,
        to the STUN service's second port when *second* is true.
        """


@dataclass(slots=True)
class BindingStats:
    """
    Counters of a :class:`UdpBindings`.

    :ivar issued: Tokens issued.
    :ivar revoked: Tokens revoked.
    :ivar observed: Authenticated Binding requests reported to an owner.
    :ivar refused: Tokens refused because the table was full.
    """

    issued: int = 0
    revoked: int = 0
    observed: int = 0
    refused: int = 0


class UdpBindings:
    """
    The live UDP binding tokens, each with its owner (a rendezvous
    connection).

    :param capacity: Tokens at once (the rendezvous' connection cap: one
        token per connection).
    :param random: Source of the tokens and of the table's secret.
    :raises ValueError: when *capacity* is below 1.
    """

    def __init__(
        self, *, capacity: int = 20_000, random: Callable[[int], bytes] = os.urandom
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a whole number of at least 1, not {capacity!r}")
        self.capacity = capacity
        self.stats = BindingStats()
        self._random = random
        # Drawn at the first issue, after whatever the caller drew first.
        self._secret = b""
        # By whole token.
        self._owners: dict[bytes, BindingOwner] = {}

    def __len__(self) -> int:
        """Live tokens."""
        return len(self._owners)

    def _key(self, name: bytes) -> bytes:
        return hmac.new(self._secret, _LABEL + name, hashlib.sha256).digest()[:_HALF]

    def issue(self, owner: BindingOwner) -> bytes:
        """
        A fresh token for *owner*, which :meth:`observed` tells of every
        authenticated Binding request made with it, until :meth:`revoke`.

        :returns: :data:`~nattraverse.rendezvous.commands.UDP_TOKEN_SIZE`
            bytes.
        :raises LimitExceeded: when *capacity* tokens are live.
        """
        if len(self._owners) >= self.capacity:
            self.stats.refused += 1
            raise LimitExceeded(
                f"{self.capacity} UDP binding tokens are live, the cap; try again later"
            )
        for _ in range(_DRAWS):
            name = _draw(self._random, _HALF, "a UDP binding token")
            if not self._secret:
                self._secret = _draw(self._random, 32, "the table's secret")
            token = name + self._key(name)
            if token not in self._owners:
                break
        else:
            raise ValueError("the source of random bytes keeps repeating UDP binding tokens")
        self._owners[token] = owner
        self.stats.issued += 1
        return token

    def lookup(self, username: str) -> bytes | None:
        """
        The MESSAGE-INTEGRITY key of the live token a STUN USERNAME names,
        or ``None`` when it names none (it may be anyone's USERNAME).
        """
        token = self._token(username)
        if token is None or token not in self._owners:
            return None
        return token[_HALF:]

    def observed(self, username: str, source: Endpoint, *, second: bool = False) -> bool:
        """
        An authenticated Binding request with *username* came from
        *source* (to the STUN service's second port when *second* is true):
        tell the token's owner.  Call it only once the request's integrity
        was checked with :meth:`lookup`'s key.

        :returns: Whether a live token had that USERNAME.
        """
        token = self._token(username)
        owner = self._owners.get(token) if token is not None else None
        if owner is None:
            return False
        self.stats.observed += 1
        owner.udp_bound(source, second=second)
        return True

    def revoke(self, token: bytes) -> bool:
        """
        Forget *token*: its USERNAME names nothing any more.

        :returns: Whether it was live.
        """
        if self._owners.pop(token, None) is None:
            return False
        self.stats.revoked += 1
        return True

    def _token(self, username: str) -> bytes | None:
        """The whole token a USERNAME would name, ``None`` if it is not one."""
        if not self._secret or not _USERNAME.fullmatch(username):
            return None
        name = bytes.fromhex(username)
        return name + self._key(name)


def _draw(random: Callable[[int], bytes], size: int, what: str) -> bytes:
    value = random(size)
    if len(value) != size:
        raise ValueError(f"random({size}) returned {len(value)} bytes for {what}")
    return bytes(value)
