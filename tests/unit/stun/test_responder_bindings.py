"""
The Binding responder with a table of rendezvous UDP binding tokens: a
request whose USERNAME names a live token must authenticate, reports its
source to the token's owner, and gets an authenticated answer; everything
else is answered as before.  No reactor, no sockets.
"""

from __future__ import annotations

import pytest

from nattraverse._types import Endpoint
from nattraverse.errors import StunIntegrityError
from nattraverse.rendezvous.commands import udp_credentials
from nattraverse.rendezvous.udpbind import UdpBindings
from nattraverse.stun.attributes import ErrorCode, Fingerprint, Username, XorMappedAddress
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import Message, decode, encode
from nattraverse.stun.responder import AMPLIFICATION_FACTOR, BindingResponder, Reply, SocketKey

SOURCE = Endpoint("198.51.100.7", 40000)
REBOUND = Endpoint("198.51.100.7", 40999)
TXID = bytes(range(1, 13))
CLASSIC_TXID = b"\x5a" * 16


class Owner:
    """A token owner that records every address it is told of."""

    def __init__(self) -> None:
        self.seen: list[Endpoint] = []
        self.second: list[bool] = []

    def udp_bound(self, source: Endpoint, *, second: bool = False) -> None:
        self.seen.append(source)
        self.second.append(second)


@pytest.fixture
def bindings() -> UdpBindings:
    return UdpBindings(capacity=4)


@pytest.fixture
def owner() -> Owner:
    return Owner()


@pytest.fixture
def token(bindings: UdpBindings, owner: Owner) -> bytes:
    return bindings.issue(owner)


@pytest.fixture
def responder(bindings: UdpBindings) -> BindingResponder:
    return BindingResponder(bindings=bindings)


def request(
    username: str | None, key: bytes | None, *, fingerprint: bool = True, txid: bytes = TXID
) -> bytes:
    """A Binding request with USERNAME, MESSAGE-INTEGRITY and FINGERPRINT as asked."""
    attributes = [Username(username)] if username is not None else []
    return encode(
        Method.BINDING,
        MessageClass.REQUEST,
        txid,
        attributes,
        integrity_key=key,
        fingerprint=fingerprint,
    )


def answer(reply: Reply | None) -> Message:
    assert reply is not None
    return decode(reply.payload)


def test_authenticated_request_reports_source(
    responder: BindingResponder, token: bytes, owner: Owner
) -> None:
    """A request authenticated with a live token reports its source to the token's owner."""
    username, key = udp_credentials(token)
    responder.respond(request(username, key), SOURCE)
    assert owner.seen == [SOURCE]
    assert responder.stats.bindings == 1


def test_authenticated_answer_has_integrity_and_fingerprint(
    responder: BindingResponder, token: bytes
) -> None:
    """The answer carries XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY with the same key, FINGERPRINT."""
    username, key = udp_credentials(token)
    message = answer(responder.respond(request(username, key), SOURCE))
    assert message.message_class == MessageClass.SUCCESS
    xor = message.get(XorMappedAddress)
    assert xor is not None
    assert xor.address == SOURCE
    message.check_integrity(key)
    assert message.get(Fingerprint) is not None


def test_authenticated_answer_without_request_fingerprint(
    responder: BindingResponder, token: bytes
) -> None:
    """The authenticated answer has FINGERPRINT even when the request had none."""
    username, key = udp_credentials(token)
    message = answer(responder.respond(request(username, key, fingerprint=False), SOURCE))
    assert message.get(Fingerprint) is not None
    message.check_integrity(key)


def test_latest_source_wins(responder: BindingResponder, token: bytes, owner: Owner) -> None:
    """A keepalive from a new source (a NAT rebinding) is reported too, in order."""
    username, key = udp_credentials(token)
    responder.respond(request(username, key), SOURCE)
    responder.respond(request(username, key), REBOUND)
    assert owner.seen == [SOURCE, REBOUND]


def test_wrong_key_gets_401(responder: BindingResponder, token: bytes, owner: Owner) -> None:
    """A live USERNAME with a wrong MESSAGE-INTEGRITY gets 401; nothing is reported; counted."""
    username, _ = udp_credentials(token)
    message = answer(responder.respond(request(username, b"x" * 16), SOURCE))
    assert message.message_class == MessageClass.ERROR
    error = message.get(ErrorCode)
    assert error is not None
    assert error.code == 401
    assert owner.seen == []
    assert responder.stats.integrity_failed == 1
    assert responder.stats.errors_by_code == {401: 1}
    assert responder.stats.bindings == 0


def test_401_has_no_integrity(responder: BindingResponder, token: bytes) -> None:
    """The 401 answer is not authenticated: it carries no MESSAGE-INTEGRITY."""
    username, key = udp_credentials(token)
    message = answer(responder.respond(request(username, b"x" * 16), SOURCE))
    with pytest.raises(StunIntegrityError, match="carries no"):
        message.check_integrity(key)


def test_401_within_amplification_budget(responder: BindingResponder, token: bytes) -> None:
    """The 401 answer is no larger than the request's amplification budget."""
    username, _ = udp_credentials(token)
    data = request(username, b"x" * 16, fingerprint=False)
    reply = responder.respond(data, SOURCE)
    assert reply is not None
    assert len(reply.payload) <= len(data) * AMPLIFICATION_FACTOR


def test_live_username_without_integrity_gets_401(
    responder: BindingResponder, token: bytes, owner: Owner
) -> None:
    """A live USERNAME without MESSAGE-INTEGRITY is refused with 401 too."""
    username, _ = udp_credentials(token)
    message = answer(responder.respond(request(username, None), SOURCE))
    error = message.get(ErrorCode)
    assert error is not None
    assert error.code == 401
    assert owner.seen == []


def test_unknown_username_answered_as_before(responder: BindingResponder, owner: Owner) -> None:
    """A USERNAME naming no live token gets the ordinary unauthenticated answer."""
    data = request("alice:bob", b"k" * 16)
    assert responder.respond(data, SOURCE) == BindingResponder().respond(data, SOURCE)
    assert owner.seen == []
    assert responder.stats.integrity_failed == 0


def test_revoked_token_answered_as_before(
    responder: BindingResponder, bindings: UdpBindings, token: bytes, owner: Owner
) -> None:
    """Once revoked, a token's requests get the ordinary answer and report nothing."""
    username, key = udp_credentials(token)
    bindings.revoke(token)
    message = answer(responder.respond(request(username, key), SOURCE))
    assert message.message_class == MessageClass.SUCCESS
    with pytest.raises(StunIntegrityError):
        message.check_integrity(key)
    assert owner.seen == []


def test_upper_case_username_names_nothing(
    responder: BindingResponder, token: bytes, owner: Owner
) -> None:
    """The USERNAME must be the token's lower-case hex exactly; anything else names nothing."""
    username, key = udp_credentials(token)
    message = answer(responder.respond(request(username.upper(), key), SOURCE))
    assert message.message_class == MessageClass.SUCCESS
    assert owner.seen == []


def test_plain_request_unchanged(responder: BindingResponder) -> None:
    """A plain 20-byte request gets exactly the minimal answer the fast path builds."""
    data = request(None, None, fingerprint=False)
    assert len(data) == 20
    assert responder.fast_path_allowed
    assert responder.respond(data, SOURCE) == BindingResponder().respond(data, SOURCE)


def test_without_bindings_username_ignored(token: bytes) -> None:
    """A responder without a token table answers an authenticated request as any other."""
    username, key = udp_credentials(token)
    data = request(username, key)
    message = answer(BindingResponder().respond(data, SOURCE))
    assert message.message_class == MessageClass.SUCCESS
    with pytest.raises(StunIntegrityError):
        message.check_integrity(key)


def test_stream_request_binds_nothing(
    responder: BindingResponder, token: bytes, owner: Owner
) -> None:
    """Over TCP the request binds nothing: only a UDP socket's address is wanted."""
    username, key = udp_credentials(token)
    message = answer(responder.respond(request(username, key), SOURCE, stream=True))
    assert message.message_class == MessageClass.SUCCESS
    assert owner.seen == []


def test_classic_request_binds_nothing(
    responder: BindingResponder, token: bytes, owner: Owner
) -> None:
    """An RFC 3489 request (no magic cookie) binds nothing."""
    username, key = udp_credentials(token)
    responder.respond(request(username, key, fingerprint=False, txid=CLASSIC_TXID), SOURCE)
    assert owner.seen == []


def test_answer_from_receiving_socket(responder: BindingResponder, token: bytes) -> None:
    """The authenticated answer goes from the socket the request reached, to its source."""
    username, key = udp_credentials(token)
    reply = responder.respond(request(username, key), SOURCE, SocketKey(0, 0))
    assert reply is not None
    assert (reply.via, reply.destination) == (SocketKey(0, 0), SOURCE)
