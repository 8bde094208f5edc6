"""
Exceptions raised by nattraverse.

Every exception derives from :class:`NatTraverseError`.  Subclasses are split
by meaning (decoding, integrity, timeouts, NAT discovery) and, for STUN error
responses, by wire code (RFC 8489 section 14.8), so that callers can catch
exactly what they can handle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet.error import ConnectionLost

if TYPE_CHECKING:
    from nattraverse.report import ConnectionReport


class NatTraverseError(Exception):
    """
    Base class of every exception raised by nattraverse.
    """


class DiscoveryError(NatTraverseError):
    """
    NAT behaviour discovery could not run: no local UDP socket could be
    opened, the server could not be sent to, or it answered the first
    Binding request with an error or without a mapped address.  The message
    says which; check the local interface address, or use another STUN
    server.  (A server that does not answer at all is not an error: the
    report then says UDP is blocked.)
    """


class StunError(NatTraverseError):
    """
    Something went wrong with a STUN message or transaction.
    """


class StunDecodeError(StunError):
    """
    Bytes could not be decoded as a STUN message.

    :ivar where: A short description of the place in the message that is
        wrong, such as ``"header"`` or ``"attribute XOR-MAPPED-ADDRESS at
        offset 20"``.
    :ivar transaction_id: The transaction id, when the header was readable
        (so that a server can still answer with 400 Bad Request), else
        ``None``.
    :ivar method: The STUN method when the header was readable, else ``None``.
    :ivar message_class: The STUN class (0 request, 1 indication, 2 success,
        3 error) when the header was readable, else ``None``.
    """

    def __init__(
        self,
        where: str,
        reason: str,
        *,
        transaction_id: bytes | None = None,
        method: int | None = None,
        message_class: int | None = None,
    ) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
        self.transaction_id = transaction_id
        self.method = method
        self.message_class = message_class


class FingerprintMismatch(StunDecodeError):
    """
    The FINGERPRINT attribute does not match the message (RFC 8489 section
    14.7), or is not the last attribute.  The datagram is not STUN, or it was
    damaged on the way.
    """


class StunIntegrityError(StunError):
    """
    A MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 check failed, or the
    message carries no integrity attribute where one was required.  Drop the
    message: it was not sent by someone who knows the key.
    """


class StunTimeout(StunError):
    """
    A STUN transaction received no response before its retransmissions ran
    out (RFC 8489 section 6.2.1).  The server may be unreachable, or UDP may
    be blocked.

    :ivar transaction_id: The id of the transaction that timed out.
    :ivar server: The address the requests were sent to.
    """

    def __init__(self, transaction_id: bytes, server: object, elapsed: float) -> None:
        super().__init__(
            f"no STUN response from {server} for transaction {transaction_id.hex()} "
            f"after {elapsed:.1f}s; check that the server is reachable and UDP is not blocked"
        )
        self.transaction_id = transaction_id
        self.server = server
        self.elapsed = elapsed


class StunTransactionCancelled(StunError):
    """
    The STUN client was stopped while the transaction was still running.
    """


class StunErrorResponse(StunError):
    """
    The server answered with a STUN error response (RFC 8489 section 14.8).

    Subclasses exist for the codes RFC 8489 defines; :func:`error_for_code`
    picks the right one.

    :ivar code: The error code, 300 to 699.
    :ivar reason: The server's reason phrase.
    :ivar response: The decoded error response, when there is one.
    """

    code: ClassVar[int] = 0

    def __init__(self, code: int, reason: str, response: object | None = None) -> None:
        super().__init__(f"STUN error {code}: {reason}")
        self.code = code  # type: ignore[misc]
        self.reason = reason
        self.response = response


class TryAlternate(StunErrorResponse):
    """300 Try Alternate: use the server named in ALTERNATE-SERVER."""

    code = 300


class BadRequest(StunErrorResponse):
    """400 Bad Request: the server found the request malformed."""

    code = 400


class Unauthenticated(StunErrorResponse):
    """401 Unauthenticated: credentials are missing or wrong."""

    code = 401


class UnknownAttribute(StunErrorResponse):
    """420 Unknown Attribute: the server does not understand a
    comprehension-required attribute of the request (listed in
    UNKNOWN-ATTRIBUTES)."""

    code = 420


class StaleNonce(StunErrorResponse):
    """438 Stale Nonce: retry with the NONCE from the response."""

    code = 438


class ServerError(StunErrorResponse):
    """500 Server Error: a temporary failure on the server; try again later."""

    code = 500


_BY_CODE: Mapping[int, type[StunErrorResponse]] = {
    cls.code: cls
    for cls in (
        TryAlternate,
        BadRequest,
        Unauthenticated,
        UnknownAttribute,
        StaleNonce,
        ServerError,
    )
}


def error_for_code(code: int, reason: str, response: object | None = None) -> StunErrorResponse:
    """
    Build the exception matching a STUN error code.
    """
    return _BY_CODE.get(code, StunErrorResponse)(code, reason, response)


class PeerAuthenticationFailed(NatTraverseError):
    """
    A peer did not prove that it holds the key of the peer id it claims, or
    of the peer id it was expected to have: a signature over a challenge did
    not verify, a public key was malformed or of the wrong type, or a
    certificate's key does not hash to the pinned peer id.  Treat the other
    side as a stranger: drop the path or the registration.  An unrelated host
    reached at a private address fails this way too.

    :ivar reason: What did not match, in words.
    :ivar peer_id: The peer id that was expected, when there was one, else
        ``None``.
    """

    def __init__(self, reason: str, peer_id: object | None = None) -> None:
        if peer_id is None:
            super().__init__(f"peer authentication failed: {reason}")
        else:
            super().__init__(f"peer {peer_id} failed authentication: {reason}")
        self.reason = reason
        self.peer_id = peer_id


class IdentityError(NatTraverseError):
    """
    This peer's identity file could not be read, written or created: the
    directory is missing or not writable, or the file is not a readable
    regular file.  The message names the path and the system's reason.

    :ivar path: The identity file's path.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"identity file {path}: {reason}")
        self.path = path
        self.reason = reason


class IdentityFileInsecure(IdentityError):
    """
    The identity file holds a private key but other users may read or change
    it (group or other permission bits are set), or it belongs to another
    user.  Nothing is loaded from it.  Run ``chmod 600`` on it (and
    ``chown`` it to the user who runs the peer); if others may already have
    read it, delete it so that a new identity is made, and tell the peers
    that pinned the old peer id.
    """


class IdentityFileInvalid(IdentityError):
    """
    The identity file is not a usable identity: it is damaged or truncated,
    holds no private key or more than one, holds a key that is encrypted or
    not ECDSA P-256, or a certificate that is not for its key.  Nothing is
    loaded from it, and it is never overwritten.  Restore it from a backup,
    or move it away to start over with a new peer id.
    """


# -- rendezvous, relay and traversal -----------------------------------------


class RendezvousError(NatTraverseError):
    """
    The rendezvous refused a request or could not be used.  Subclasses say
    why; each is carried over the wire as an AMP error with its own code
    (see :mod:`nattraverse.rendezvous.commands`), so a client sees the same
    class the server raised, with the server's message.
    """


class RendezvousUnavailable(RendezvousError):
    """
    The rendezvous could not be reached, or the connection to it was lost
    while a request was pending.  Check the ``rendezvous=`` endpoint and
    that ``twistd natrendezvous`` runs there; listening peers reconnect on
    their own, with backoff.
    """


class InvalidRequest(RendezvousError):
    """
    A request to the rendezvous was malformed: a name, peer id, address or
    list that is empty, too long or of the wrong form, or a command sent out
    of order (for example before ``Authenticate``).  The message names the
    field.
    """


class NotAuthenticated(RendezvousError):
    """
    A command that needs a proven identity came before a successful
    ``Authenticate`` on this connection.
    """


class NameTaken(RendezvousError):
    """
    The name is registered, and its registration still lives, under another
    peer id (another key).  Use another name, or the key that registered
    it, or wait until that registration expires.
    """


class PeerNotFound(RendezvousError):
    """
    No live registration has this name or peer id, or the peer registered
    but is not connected to the rendezvous now.  Check the spelling, and
    that the peer is listening.
    """


class LimitExceeded(RendezvousError):
    """
    A cap of the rendezvous was reached: registrations in total or from
    this address, pending introductions, concurrent relays.  Try again
    later, or ask the operator to raise the limit (``twistd natrendezvous
    --help`` lists them).
    """


class ReversalRefused(RendezvousError):
    """
    A connection-reversal request was refused: the session is not one of
    this peer's introductions, or it asked to be called back at an address
    other than the one the rendezvous observes it at (the callee dials the
    requester's observed address and nothing else).
    """


class RelayRefused(RendezvousError):
    """
    The relay refused: the session is not an introduction between these two
    peers, the token is unknown, expired or not this peer's, the relay is
    off, or its concurrent-relay cap is reached.
    """


class PunchFailed(NatTraverseError):
    """
    No traversal method reached the peer.  :attr:`failures` maps each method
    tried (``"direct"``, ``"reversal"``, ``"relay"``, ...) to the exception
    that ended it; the message lists them all, so nothing fails silently.

    :ivar peer: The peer asked for.
    :ivar failures: Method name to the exception that ended that method.
    :ivar report: When the methods were raced, the
        :class:`~nattraverse.report.ConnectionReport` of the race (when each
        method started, how long it ran); ``None`` when the failure came
        before the introduction.
    """

    def __init__(self, peer: str, failures: Mapping[str, BaseException]) -> None:
        detail = "; ".join(f"{name}: {error}" for name, error in failures.items())
        super().__init__(f"could not reach {peer}: {detail or 'no method was tried'}")
        self.peer = peer
        self.failures = dict(failures)
        self.report: ConnectionReport | None = None


class MethodNotApplicable(NatTraverseError):
    """
    A traversal method did not apply to this pair of peers (for example
    direct TCP to a peer that announced no listening port, or relay on a
    rendezvous with the relay off), so it was not attempted.
    """


class PunchChecksFailed(NatTraverseError):
    """
    UDP hole punching's connectivity checks found no path to the peer
    within their budget.

    :ivar reason: ``"deadline"`` (the overall deadline passed) or
        ``"budget"`` (every check allowed was sent and timed out).
    :ivar seen: What the checks observed, in words: pairs tried and how
        they ended, where the peer's checks came from, the NAT behaviour
        that suggests, packets dropped.
    :ivar stats: The counters at the end
        (:class:`~nattraverse.punch.checks.CheckStats`).
    """

    def __init__(self, reason: str, seen: str, stats: Any) -> None:
        what = "overall deadline passed" if reason == "deadline" else "check budget spent"
        super().__init__(f"UDP hole punching failed: {what}; {seen}")
        self.reason = reason
        self.seen = seen
        self.stats = stats


class QuicPathIdle(NatTraverseError, ConnectionLost):
    """
    The QUIC path carried nothing for its idle timeout (RFC 9000 section
    10.1) although keepalive PINGs were sent: the peer, or the path through
    the NATs, is gone.  Connect again (a new punch, or the relay).
    """


class QuicPathClosed(NatTraverseError, ConnectionLost):
    """
    The QUIC connection was closed with an error, by the peer or by this
    side (RFC 9000 section 10.2), or the stream was reset.

    :ivar error_code: The QUIC or application error code.
    :ivar reason_phrase: The reason the closing side gave.
    """

    def __init__(self, message: str, error_code: int = 0, reason_phrase: str = "") -> None:
        super().__init__(message)
        self.error_code = error_code
        self.reason_phrase = reason_phrase
