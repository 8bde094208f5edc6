"""
Tests for nattraverse.stun.client: UDP transactions on task.Clock with a fake
sender, and STUN over a stream with StringTransport.  No sockets.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionClosed, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse._types import Endpoint
from nattraverse.errors import (
    BadRequest,
    StunDecodeError,
    StunErrorResponse,
    StunIntegrityError,
    StunTimeout,
    StunTransactionCancelled,
    UnknownAttribute,
)
from nattraverse.stun.attributes import (
    Attribute,
    ChangeRequest,
    ErrorCode,
    OtherAddress,
    ResponseOrigin,
    Software,
    XorMappedAddress,
)
from nattraverse.stun.attributes import UnknownAttribute as RawAttribute
from nattraverse.stun.client import (
    StunClient,
    StunResponse,
)
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import decode, encode
from nattraverse.stun.tcp_client import StunTcpClientProtocol, tcp_binding
from tests.deferreds import failed, results, succeeded

T = TypeVar("T")

SERVER = Endpoint("192.0.2.1", 3478)
OTHER_SERVER = Endpoint("192.0.2.2", 3479)
MAPPED = Endpoint("203.0.113.5", 40000)
KEY = b"short-term key"
RFC_SEND_TIMES = [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]


class Ids:
    """Predictable transaction ids: 1, 2, 3, ... as 12-byte numbers."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, size: int) -> bytes:
        self.n += 1
        return self.n.to_bytes(size, "big")


class Sender:
    """A fake ``send`` that records when it was called, with what."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, bytes, Endpoint]] = []
        self.error: Exception | None = None

    def __call__(self, data: bytes, addr: Endpoint) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((self.clock.seconds(), data, addr))

    @property
    def times(self) -> list[float]:
        return [t for t, _, _ in self.sent]

    @property
    def last(self) -> bytes:
        return self.sent[-1][1]


def make_client(**kwargs: Any) -> tuple[Clock, Sender, StunClient]:
    clock = Clock()
    sender = Sender(clock)
    kwargs.setdefault("random_bytes", Ids())
    return clock, sender, StunClient(clock, sender, **kwargs)


def respond(
    request: bytes,
    attributes: Iterable[Attribute] = (XorMappedAddress(MAPPED),),
    *,
    message_class: MessageClass = MessageClass.SUCCESS,
    integrity_key: bytes | None = None,
    integrity_sha256_key: bytes | None = None,
    transaction_id: bytes | None = None,
    method: int | None = None,
) -> bytes:
    """A response to the encoded *request*, built with the codec."""
    message = decode(request)
    return encode(
        message.method if method is None else method,
        message_class,
        message.transaction_id if transaction_id is None else transaction_id,
        attributes,
        integrity_key=integrity_key,
        integrity_sha256_key=integrity_sha256_key,
    )


def error_response(request: bytes, code: int, reason: str) -> bytes:
    return respond(request, (ErrorCode(code, reason),), message_class=MessageClass.ERROR)


# -- retransmission ---------------------------------------------------------------


def test_retransmits_at_rfc_times() -> None:
    """The request goes out at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s, unchanged."""
    clock, sender, client = make_client()
    client.binding(SERVER).addErrback(lambda _: None)
    clock.pump([0.25] * 200)
    assert sender.times == RFC_SEND_TIMES
    assert {data for _, data, _ in sender.sent} == {sender.sent[0][1]}
    assert {addr for _, _, addr in sender.sent} == {SERVER}


def test_times_out_at_39_5_seconds() -> None:
    """Without a response the Deferred fails at 39.5 s with StunTimeout."""
    clock, sender, client = make_client()
    d = client.binding(SERVER)
    clock.pump([0.5] * 79)  # to 39.5 s, every call firing at its time
    error = failed(d, StunTimeout)
    transaction_id = decode(sender.last).transaction_id
    assert error.transaction_id == transaction_id
    assert error.server == SERVER
    assert error.elapsed == 39.5
    assert transaction_id.hex() in str(error)
    assert clock.getDelayedCalls() == []
    assert client.stats.timeouts == 1
    assert client.stats.transmissions == 7
    assert client.pending == 0


def test_timeout_at_exact_time() -> None:
    """The failure comes exactly at 39.5 s on a clock that steps through each call."""
    clock, _, client = make_client()
    d = client.binding(SERVER)
    clock.advance(39.499)
    assert not d.called
    fired_at: list[float] = []
    d.addErrback(lambda f: fired_at.append(clock.seconds()))
    while clock.getDelayedCalls():
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
    assert fired_at == [39.5]


def test_configurable_schedule() -> None:
    """rto, rc and rm change the schedule."""
    clock, sender, client = make_client(rto=1.0, rc=3, rm=2)
    d = client.binding(SERVER)
    clock.pump([0.5] * 20)
    assert sender.times == [0.0, 1.0, 3.0]
    assert failed(d, StunTimeout).elapsed == 5.0


@pytest.mark.parametrize(
    "kwargs",
    [{"rto": 0}, {"rc": 0}, {"rm": 0}, {"max_outstanding": 0}],
)
def test_constructor_rejects_bad_parameters(kwargs: dict[str, Any]) -> None:
    """Bad parameters raise ValueError naming them."""
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        make_client(**kwargs)


# -- responses --------------------------------------------------------------------


def test_success() -> None:
    """A matching response fires the Deferred and stops retransmission."""
    clock, sender, client = make_client()
    d = client.binding(SERVER)
    clock.advance(0.7)
    assert client.datagram_received(respond(sender.last), SERVER) is True
    response = succeeded(d)
    assert isinstance(response, StunResponse)
    assert response.mapped_address == MAPPED
    assert response.source == SERVER
    assert response.transmissions == 2
    assert response.elapsed == pytest.approx(0.7)
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert len(sender.sent) == 2
    assert client.stats.responses == 1


def test_binding_request_on_the_wire() -> None:
    """binding() sends a Binding request with the attributes given, and the ids drawn."""
    _, sender, client = make_client(random_bytes=lambda n: b"\xab" * n)
    client.binding(SERVER, [Software("nattraverse")], fingerprint=True)
    message = decode(sender.last)
    assert message.method == Method.BINDING
    assert message.message_class is MessageClass.REQUEST
    assert message.transaction_id == b"\xab" * 12
    assert message.get(Software) == Software("nattraverse")


def test_rfc_5780_accessors() -> None:
    """RESPONSE-ORIGIN and OTHER-ADDRESS are available on the response."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    client.datagram_received(
        respond(
            sender.last,
            (XorMappedAddress(MAPPED), ResponseOrigin(SERVER), OtherAddress(OTHER_SERVER)),
        ),
        SERVER,
    )
    response = succeeded(d)
    assert response.response_origin == SERVER
    assert response.other_address == OTHER_SERVER


def test_wrong_source_ignored() -> None:
    """A response from another address is dropped; the transaction goes on."""
    clock, sender, client = make_client()
    d = client.binding(SERVER)
    assert client.datagram_received(respond(sender.last), OTHER_SERVER) is True
    assert not d.called
    assert client.stats.wrong_source == 1
    clock.advance(0.5)
    assert len(sender.sent) == 2
    client.datagram_received(respond(sender.last), SERVER)
    succeeded(d)


def test_wrong_port_ignored() -> None:
    """Same IP, other port: still the wrong source."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    client.datagram_received(respond(sender.last), Endpoint(SERVER.host, 9999))
    assert not d.called


def test_match_source_off() -> None:
    """With match_source=False a response from the other address is accepted (RFC 5780)."""
    _, sender, client = make_client()
    d = client.binding(
        SERVER, [ChangeRequest(change_ip=True, change_port=True)], match_source=False
    )
    client.datagram_received(respond(sender.last), OTHER_SERVER)
    assert succeeded(d).source == OTHER_SERVER


def test_ipv4_mapped_source_matches() -> None:
    """A response reported from ::ffff:a.b.c.d matches a request sent to a.b.c.d."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    client.datagram_received(respond(sender.last), ("::ffff:192.0.2.1", 3478, 0, 0))
    succeeded(d)


def test_ipv6_server() -> None:
    """IPv6 servers are matched by canonical address text."""
    _, sender, client = make_client()
    d = client.binding(("2001:db8:0::1", 3478))
    assert sender.sent[0][2] == Endpoint("2001:db8::1", 3478)
    client.datagram_received(respond(sender.last), ("2001:DB8::1", 3478))
    succeeded(d)


def test_wrong_transaction_id_ignored() -> None:
    """A response with another transaction id is consumed, counted and dropped."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    stray = respond(sender.last, transaction_id=b"\xff" * 12)
    assert client.datagram_received(stray, SERVER) is True
    assert not d.called
    assert client.stats.unmatched == 1


def test_wrong_method_ignored() -> None:
    """A response of another method does not answer a Binding request."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    assert client.datagram_received(respond(sender.last, method=0x003), SERVER) is True
    assert not d.called
    assert client.stats.unmatched == 1


def test_duplicate_response_after_success() -> None:
    """A second response to a finished transaction is counted as unmatched."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    response = respond(sender.last)
    client.datagram_received(response, SERVER)
    succeeded(d)
    assert client.datagram_received(response, SERVER) is True
    assert client.stats.unmatched == 1


def test_concurrent_transactions() -> None:
    """Each response answers its own transaction."""
    _, sender, client = make_client()
    first = client.binding(SERVER)
    first_request = sender.last
    second = client.binding(SERVER)
    other = Endpoint("198.51.100.9", 1)
    client.datagram_received(respond(sender.last, [XorMappedAddress(other)]), SERVER)
    assert not first.called
    assert succeeded(second).mapped_address == other
    client.datagram_received(respond(first_request), SERVER)
    assert succeeded(first).mapped_address == MAPPED


@pytest.mark.parametrize(
    ("code", "reason", "kind"),
    [
        (400, "Bad Request", BadRequest),
        (420, "Unknown Attribute", UnknownAttribute),
        (599, "Something else", StunErrorResponse),
    ],
)
def test_error_response(code: int, reason: str, kind: type[StunErrorResponse]) -> None:
    """An error response fails the Deferred with the exception of its code."""
    clock, sender, client = make_client()
    d = client.binding(SERVER)
    client.datagram_received(error_response(sender.last, code, reason), SERVER)
    error = failed(d, kind)
    assert type(error) is kind
    assert (error.code, error.reason) == (code, reason)
    assert isinstance(error.response, StunResponse)
    assert str(code) in str(error)
    assert clock.getDelayedCalls() == []


def test_error_without_error_code() -> None:
    """An error response without ERROR-CODE fails the transaction."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    client.datagram_received(respond(sender.last, (), message_class=MessageClass.ERROR), SERVER)
    failed(d, StunDecodeError)


def test_unknown_required_attribute_fails() -> None:
    """A success response with an unknown comprehension-required attribute fails."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    client.datagram_received(respond(sender.last, (RawAttribute(0x7FF0, b""),)), SERVER)
    failed(d, StunDecodeError)


def test_unknown_optional_attribute_ignored() -> None:
    """Unknown comprehension-optional attributes are ignored."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    client.datagram_received(
        respond(sender.last, (RawAttribute(0xC0DE, b"x"), XorMappedAddress(MAPPED))), SERVER
    )
    assert succeeded(d).mapped_address == MAPPED


# -- integrity ----------------------------------------------------------------------


def test_integrity_request_and_response() -> None:
    """The request carries MESSAGE-INTEGRITY and a response with the right key passes."""
    _, sender, client = make_client()
    d = client.binding(SERVER, integrity_key=KEY)
    decode(sender.last).check_integrity(KEY)
    client.datagram_received(respond(sender.last, integrity_key=KEY), SERVER)
    succeeded(d)


@pytest.mark.parametrize("key", [None, b"wrong"])
def test_integrity_failure_dropped(key: bytes | None) -> None:
    """A response without integrity or with a wrong one is dropped; the transaction goes on."""
    clock, sender, client = make_client()
    d = client.binding(SERVER, integrity_key=KEY)
    assert client.datagram_received(respond(sender.last, integrity_key=key), SERVER) is True
    assert not d.called
    assert client.stats.integrity_failed == 1
    clock.advance(0.5)
    client.datagram_received(respond(sender.last, integrity_key=KEY), SERVER)
    succeeded(d)


def test_unauthenticated_error_dropped() -> None:
    """An error response that fails integrity cannot end an integrity-protected transaction."""
    _, sender, client = make_client()
    d = client.binding(SERVER, integrity_key=KEY)
    client.datagram_received(error_response(sender.last, 401, "Unauthenticated"), SERVER)
    assert not d.called
    assert client.stats.integrity_failed == 1


def test_integrity_sha256() -> None:
    """MESSAGE-INTEGRITY-SHA256 is verified when the request used it."""
    _, sender, client = make_client()
    d = client.binding(SERVER, integrity_sha256_key=KEY)
    client.datagram_received(respond(sender.last, integrity_sha256_key=b"wrong"), SERVER)
    assert not d.called
    client.datagram_received(respond(sender.last, integrity_sha256_key=KEY), SERVER)
    succeeded(d)


# -- what datagram_received takes ------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\x00" * 20, b"\xc0" + b"\x00" * 40, b"QUIC" * 30],
)
def test_non_stun_not_consumed(data: bytes) -> None:
    """Datagrams that are not STUN are left to the socket's owner and not counted."""
    _, _, client = make_client()
    assert client.datagram_received(data, SERVER) is False
    assert client.stats.malformed == 0


@pytest.mark.parametrize("message_class", [MessageClass.REQUEST, MessageClass.INDICATION])
def test_requests_not_consumed(message_class: MessageClass) -> None:
    """STUN requests and indications (a peer's checks) go to the owner."""
    _, _, client = make_client()
    data = encode(Method.BINDING, message_class, b"\x01" * 12)
    assert client.datagram_received(data, SERVER) is False


def test_malformed_response_counted_and_dropped() -> None:
    """A STUN response that does not decode is consumed, counted, and never raises."""
    _, sender, client = make_client()
    d = client.binding(SERVER)
    good = respond(sender.last)
    bad = good[:20] + b"\x00\x20\x00\x08" + b"\x00\x07" + good[26:]  # family 7
    assert client.datagram_received(bad, SERVER) is True
    assert client.stats.malformed == 1
    assert not d.called


@given(body=st.binary(max_size=64), klass=st.sampled_from([0x0101, 0x0111]))
@settings(max_examples=300)
def test_fuzzed_responses_never_raise(body: bytes, klass: int) -> None:
    """Random response bodies are consumed and counted, never raised."""
    body = body[: len(body) - len(body) % 4]
    data = klass.to_bytes(2, "big") + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42"
    data += b"\x00" * 11 + b"\x01" + body
    _, _, client = make_client()
    d = client.binding(SERVER)
    assert client.datagram_received(data, SERVER) is True
    stats = client.stats
    assert stats.malformed + stats.responses == 1
    assert d.called == (stats.responses == 1)
    results(d)


@given(data=st.binary(max_size=100))
def test_random_bytes_never_raise(data: bytes) -> None:
    """Arbitrary datagrams never raise out of datagram_received."""
    _, _, client = make_client()
    client.binding(SERVER).addErrback(lambda _: None)
    assert client.datagram_received(data, SERVER) in (True, False)


# -- cancellation, stop, send errors, arguments ------------------------------------------


def test_cancel_stops_retransmission() -> None:
    """Cancelling the Deferred cancels the timer and sends nothing more."""
    clock, sender, client = make_client()
    d = client.binding(SERVER)
    clock.advance(0.5)
    d.cancel()
    failed(d, CancelledError)
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert len(sender.sent) == 2
    assert client.pending == 0


def test_stop_fails_pending() -> None:
    """stop() fails every pending transaction and leaves no timer."""
    clock, _, client = make_client()
    first, second = client.binding(SERVER), client.binding(OTHER_SERVER)
    client.stop()
    for d in (first, second):
        assert "stopped" in str(failed(d, StunTransactionCancelled))
    assert clock.getDelayedCalls() == []
    assert client.pending == 0


def test_no_requests_after_stop() -> None:
    """After stop() requests fail at once and nothing is sent."""
    clock, sender, client = make_client()
    client.stop()
    failed(client.binding(SERVER), StunTransactionCancelled)
    assert sender.sent == []
    assert clock.getDelayedCalls() == []


def test_send_error_fails_transaction() -> None:
    """An exception from send fails the transaction with it."""
    clock, sender, client = make_client()
    sender.error = OSError(101, "Network is unreachable")
    failed(client.binding(SERVER), OSError)
    assert clock.getDelayedCalls() == []
    assert client.pending == 0


def test_send_error_on_retransmission() -> None:
    """A send that fails later fails the transaction then."""
    clock, sender, client = make_client()
    d = client.binding(SERVER)
    sender.error = OSError("gone")
    clock.advance(0.5)
    failed(d, OSError)
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("server", "match"),
    [
        (("stun.example.org", 3478), "not an IP address"),
        (("192.0.2.1", 0), "port"),
        (("192.0.2.1", 70000), "port"),
        (("192.0.2.1", "3478"), "port"),
    ],
)
def test_bad_server(server: tuple[str, int], match: str) -> None:
    """A server that is not an IP address and port fails the Deferred with ValueError."""
    _, sender, client = make_client()
    error = failed(client.binding(server), ValueError)
    assert match in str(error)
    assert sender.sent == []


def test_unencodable_attribute_fails() -> None:
    """An attribute the codec refuses fails the Deferred; nothing is sent."""
    _, sender, client = make_client()
    failed(client.binding(SERVER, [Software("x" * 800)]), ValueError)
    assert sender.sent == []
    assert client.pending == 0


def test_duplicate_ids_redrawn() -> None:
    """A random id equal to a pending one is drawn again."""
    draws = iter([b"a" * 12, b"a" * 12, b"b" * 12])
    _, sender, client = make_client(random_bytes=lambda n: next(draws))
    client.binding(SERVER)
    client.binding(SERVER)
    assert [decode(data).transaction_id for _, data, _ in sender.sent] == [b"a" * 12, b"b" * 12]


def test_stuck_random_source_fails() -> None:
    """A random source that keeps repeating itself fails the request."""
    _, _, client = make_client(random_bytes=lambda n: b"a" * n)
    client.binding(SERVER)
    assert "random_bytes" in str(failed(client.binding(SERVER), ValueError))


# -- outstanding limit -------------------------------------------------------------------


def test_outstanding_limit_queues() -> None:
    """At most max_outstanding transactions per server are in flight (RFC 8489 6.2)."""
    _, sender, client = make_client(max_outstanding=2)
    first = client.binding(SERVER)
    request = sender.last
    client.binding(SERVER)
    third = client.binding(SERVER)
    other = client.binding(OTHER_SERVER)
    assert len(sender.sent) == 3  # two to SERVER, one to OTHER_SERVER
    assert client.pending == 4
    client.datagram_received(respond(sender.sent[0][1]), SERVER)
    succeeded(first)
    assert len(sender.sent) == 4
    assert sender.last != request
    client.datagram_received(respond(sender.last), SERVER)
    succeeded(third)
    assert not other.called


def test_cancel_queued() -> None:
    """Cancelling a queued request removes it; it is never sent."""
    clock, sender, client = make_client(max_outstanding=1)
    first = client.binding(SERVER)
    second = client.binding(SERVER)
    second.cancel()
    failed(second, CancelledError)
    first.cancel()
    assert len(sender.sent) == 1
    assert clock.getDelayedCalls() == []
    assert client.pending == 0


def test_queued_starts_its_own_schedule() -> None:
    """A queued request starts its retransmission schedule when it is sent."""
    clock, sender, client = make_client(max_outstanding=1)
    client.binding(SERVER).addErrback(lambda _: None)
    second = client.binding(SERVER)
    clock.pump([0.5] * 79)  # the first times out at 39.5 s
    assert len(sender.sent) == 8
    assert sender.sent[-1][0] == 39.5
    clock.pump([0.5] * 80)
    assert failed(second, StunTimeout).elapsed == 39.5
    assert clock.getDelayedCalls() == []


def test_stop_fails_queued() -> None:
    """stop() fails queued requests too, and does not send them."""
    clock, sender, client = make_client(max_outstanding=1)
    client.binding(SERVER).addErrback(lambda _: None)
    queued = client.binding(SERVER)
    client.stop()
    failed(queued, StunTransactionCancelled)
    assert len(sender.sent) == 1
    assert clock.getDelayedCalls() == []


# -- TCP --------------------------------------------------------------------------------


SERVER_ADDRESS = IPv4Address("TCP", "192.0.2.1", 3478)


def string_transport() -> StringTransport:
    return StringTransport(peerAddress=SERVER_ADDRESS)


def closing(transport: StringTransport) -> bool:
    """Whether the protocol asked to close the connection."""
    return bool(transport.disconnecting)


def connected(**kwargs: Any) -> tuple[Clock, StringTransport, StunTcpClientProtocol]:
    clock = Clock()
    kwargs.setdefault("random_bytes", Ids())
    protocol = StunTcpClientProtocol(clock, **kwargs)
    transport = string_transport()
    protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
    return clock, transport, protocol


def written(transport: StringTransport) -> list[bytes]:
    """Split what the protocol wrote into STUN messages."""
    data: bytes = transport.value()
    out = []
    while data:
        size = 20 + int.from_bytes(data[2:4], "big")
        out.append(data[:size])
        data = data[size:]
    return out


def test_tcp_response_in_single_bytes() -> None:
    """A response split into 1-byte chunks is reassembled."""
    clock, transport, protocol = connected()
    d = protocol.binding()
    (request,) = written(transport)
    for i, byte in enumerate(respond(request)):
        assert not d.called, f"fired after {i} bytes"
        protocol.dataReceived(bytes([byte]))
    response = succeeded(d)
    assert response.mapped_address == MAPPED
    assert response.source == SERVER
    assert clock.getDelayedCalls() == []


def test_tcp_two_responses_in_one_chunk() -> None:
    """Two responses in one chunk answer both requests."""
    _, transport, protocol = connected()
    first, second = protocol.binding(), protocol.binding()
    requests = written(transport)
    protocol.dataReceived(respond(requests[1]) + respond(requests[0], ()))
    assert succeeded(first).mapped_address is None
    assert succeeded(second).mapped_address == MAPPED


@given(cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_tcp_any_chunking(cuts: list[int]) -> None:
    """However the stream is cut, both responses arrive."""
    _, transport, protocol = connected()
    first, second = protocol.binding(), protocol.binding()
    requests = written(transport)
    stream = respond(requests[0]) + respond(requests[1], [Software("two")])
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for start, end in itertools.pairwise(points):
        protocol.dataReceived(stream[start:end])
    succeeded(first)
    assert succeeded(second).software == "two"


def test_tcp_sends_once_and_times_out() -> None:
    """Over TCP the request is not retransmitted and fails after Ti."""
    clock, transport, protocol = connected(ti=10)
    d = protocol.binding()
    clock.pump([1.0] * 9)
    assert len(written(transport)) == 1
    assert not d.called
    clock.advance(1.0)
    assert failed(d, StunTimeout).elapsed == 10
    assert len(written(transport)) == 1
    assert clock.getDelayedCalls() == []


def test_tcp_default_ti() -> None:
    """Ti defaults to 39.5 s."""
    clock, _, protocol = connected()
    d = protocol.binding()
    clock.advance(39.4)
    assert not d.called
    clock.advance(0.1)
    failed(d, StunTimeout)


@pytest.mark.parametrize("reason", [ConnectionLost("reset"), ConnectionDone("closed")])
def test_tcp_connection_lost_fails_pending(reason: Exception) -> None:
    """Losing the connection fails pending requests with the reason."""
    clock, _, protocol = connected()
    d = protocol.binding()
    protocol.connectionLost(Failure(reason))
    failed(d, type(reason))
    assert clock.getDelayedCalls() == []
    failed(protocol.binding(), ConnectionClosed)


def test_tcp_error_response() -> None:
    """An error response over TCP fails with the exception of its code."""
    _, transport, protocol = connected()
    d = protocol.binding()
    protocol.dataReceived(error_response(written(transport)[0], 420, "Unknown Attribute"))
    assert failed(d, UnknownAttribute).code == 420


def test_tcp_integrity_failure_ends_transaction() -> None:
    """Over a reliable transport a failed integrity check ends the transaction (RFC 8489 9.1.4)."""
    clock, transport, protocol = connected()
    d = protocol.binding(integrity_key=KEY)
    protocol.dataReceived(respond(written(transport)[0], integrity_key=b"wrong"))
    failed(d, StunIntegrityError)
    assert protocol.stats.integrity_failed == 1
    assert clock.getDelayedCalls() == []


def test_tcp_malformed_response_ends_transaction() -> None:
    """A response that does not decode ends its transaction over TCP."""
    _, transport, protocol = connected()
    d = protocol.binding()
    good = respond(written(transport)[0])
    bad = good[:20] + b"\x00\x20\x00\x08" + b"\x00\x07" + good[26:]
    protocol.dataReceived(bad)
    failed(d, StunDecodeError)
    assert protocol.stats.malformed == 1
    assert not closing(transport)


def test_tcp_unmatched_ignored() -> None:
    """Responses for other ids and server requests are ignored."""
    _, transport, protocol = connected()
    d = protocol.binding()
    request = written(transport)[0]
    protocol.dataReceived(respond(request, transaction_id=b"\x09" * 12))
    protocol.dataReceived(encode(Method.BINDING, MessageClass.INDICATION, b"\x01" * 12))
    assert not d.called
    assert protocol.stats.unmatched == 2
    protocol.dataReceived(respond(request))
    succeeded(d)


def test_tcp_not_stun_closes() -> None:
    """Bytes that are not STUN framing close the connection and fail pending requests."""
    _, transport, protocol = connected()
    d = protocol.binding()
    protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    failed(d, StunDecodeError)
    assert closing(transport)
    failed(protocol.binding(), ConnectionClosed)


def test_tcp_oversized_closes() -> None:
    """A message longer than max_message closes the connection."""
    _, transport, protocol = connected(max_message=100)
    d = protocol.binding()
    response = respond(written(transport)[0], [Software("x" * 200)])
    protocol.dataReceived(response[:20])
    assert "larger" in str(failed(d, StunDecodeError))
    assert closing(transport)


def test_tcp_cancel() -> None:
    """Cancelling a TCP request cancels its timer."""
    clock, _, protocol = connected()
    d = protocol.binding()
    d.cancel()
    failed(d, CancelledError)
    assert clock.getDelayedCalls() == []
    assert protocol.pending == 0


def test_tcp_request_before_connection() -> None:
    """A request before the connection is made fails at once."""
    protocol = StunTcpClientProtocol(Clock())
    failed(protocol.binding(), RuntimeError)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects to a StringTransport at once, or never (``hang``)."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.transport = string_transport()
        self.protocol: object = None
        self.cancelled = False

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        if self.hang:
            return Deferred(lambda _: setattr(self, "cancelled", True))
        protocol = protocolFactory.buildProtocol(SERVER_ADDRESS)
        assert protocol is not None
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        return succeed(protocol)


def test_tcp_binding() -> None:
    """tcp_binding connects, sends one Binding request, returns the response, closes."""
    clock = Clock()
    endpoint = FakeEndpoint()
    d = tcp_binding(clock, endpoint, fingerprint=True)
    (request,) = written(endpoint.transport)
    assert decode(request).method == Method.BINDING
    assert not closing(endpoint.transport)
    assert isinstance(endpoint.protocol, StunTcpClientProtocol)
    endpoint.protocol.dataReceived(respond(request))
    assert succeeded(d).mapped_address == MAPPED
    assert closing(endpoint.transport)
    assert clock.getDelayedCalls() == []


def test_tcp_binding_error_closes() -> None:
    """tcp_binding closes the connection when the request fails."""
    clock = Clock()
    endpoint = FakeEndpoint()
    d = tcp_binding(clock, endpoint, ti=5)
    clock.advance(5)
    failed(d, StunTimeout)
    assert closing(endpoint.transport)


def test_tcp_binding_cancel_while_connecting() -> None:
    """Cancelling tcp_binding while connecting cancels the connection attempt."""
    endpoint = FakeEndpoint(hang=True)
    d = tcp_binding(Clock(), endpoint)
    d.cancel()
    failed(d, CancelledError)
    assert endpoint.cancelled


def test_tcp_binding_cancel_while_waiting() -> None:
    """Cancelling tcp_binding while waiting for the response closes the connection."""
    clock = Clock()
    endpoint = FakeEndpoint()
    d = tcp_binding(clock, endpoint)
    d.cancel()
    failed(d, CancelledError)
    assert closing(endpoint.transport)
    assert clock.getDelayedCalls() == []


def test_tcp_binding_bad_ti() -> None:
    """A bad Ti fails the Deferred at once."""
    failed(tcp_binding(Clock(), FakeEndpoint(), ti=0), ValueError)
