"""
STUN (RFC 8489, RFC 5780, RFC 3489): codec, client and server.

The codec (:mod:`~nattraverse.stun.message`,
:mod:`~nattraverse.stun.attributes`, :mod:`~nattraverse.stun.credentials`)
is pure: bytes in, objects out.
"""
