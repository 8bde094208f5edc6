"""
The pure Binding responder: RFC 8489 answers, RFC 5780 behaviour discovery,
RFC 3489 classic answers, error responses and the amplification budget.
No reactor, no sockets.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nattraverse._types import Endpoint
from nattraverse.stun.attributes import (
    Attribute,
    ChangedAddress,
    ChangeRequest,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    UnknownAttribute,
    UnknownAttributes,
    Username,
    XorMappedAddress,
)
from nattraverse.stun.constants import (
    MAGIC_COOKIE_BYTES,
    AttributeType,
    MessageClass,
    Method,
)
from nattraverse.stun.message import Message, decode, encode
from nattraverse.stun.responder import (
    PRIMARY,
    BindingResponder,
    Reply,
    ServerAddresses,
    SocketKey,
)

SOURCE = Endpoint("198.51.100.7", 40000)
OTHER_SOURCE = Endpoint("203.0.113.9", 1234)
SOURCE6 = Endpoint("2001:db8::7", 40000)
TXID = bytes(range(1, 13))
#: An RFC 3489 transaction id: 16 bytes, the first four not the magic cookie.
CLASSIC_TXID = b"\x5a" * 16

A = "192.0.2.1"
B = "192.0.2.2"
P = 3478
Q = 3479
ADDRESSES = ServerAddresses(Endpoint(A, P), Endpoint(B, Q))

#: Each of the four sockets of an RFC 5780 server.
AP, AQ, BP, BQ = SocketKey(0, 0), SocketKey(0, 1), SocketKey(1, 0), SocketKey(1, 1)

#: The amplification budget the issue sets for unauthenticated replies.
BUDGET = 1.6


def request(
    *attributes: Attribute,
    txid: bytes = TXID,
    method: int = Method.BINDING,
    message_class: MessageClass = MessageClass.REQUEST,
    fingerprint: bool = False,
) -> bytes:
    """A STUN message, by default a Binding request."""
    return encode(method, message_class, txid, attributes, fingerprint=fingerprint)


def answer(
    responder: BindingResponder,
    data: bytes,
    source: Endpoint = SOURCE,
    local: SocketKey = PRIMARY,
    *,
    stream: bool = False,
) -> tuple[Reply, Message]:
    """The reply to *data*, and its payload decoded."""
    reply = responder.respond(data, source, local, stream=stream)
    assert reply is not None
    return reply, decode(reply.payload, classic=True)


def error_code(message: Message) -> int:
    """The code of an error response."""
    assert message.message_class is MessageClass.ERROR
    error = message.get(ErrorCode)
    assert error is not None
    return error.code


# -- RFC 8489 Binding ------------------------------------------------------------


def test_binding_answer_is_xor_mapped_address() -> None:
    """A plain Binding request gets a success response with only XOR-MAPPED-ADDRESS."""
    _, message = answer(BindingResponder(), request())
    assert message.method == Method.BINDING
    assert message.message_class is MessageClass.SUCCESS
    assert message.transaction_id == TXID
    assert message.attributes == (XorMappedAddress(SOURCE),)


def test_answer_goes_to_source_from_receiving_socket() -> None:
    """The reply goes to the request's source, from the socket that received it."""
    reply, _ = answer(BindingResponder(), request(), OTHER_SOURCE)
    assert reply.destination == OTHER_SOURCE
    assert reply.via == PRIMARY


def test_answers_depend_only_on_the_request() -> None:
    """The same request from two sources gets each source its own address: nothing is cached."""
    responder = BindingResponder()
    _, first = answer(responder, request(), SOURCE)
    _, second = answer(responder, request(), OTHER_SOURCE)
    assert first.get(XorMappedAddress) == XorMappedAddress(SOURCE)
    assert second.get(XorMappedAddress) == XorMappedAddress(OTHER_SOURCE)


def test_plain_answer_is_32_bytes() -> None:
    """A 20-byte request gets a 32-byte answer (1.6 times)."""
    reply, _ = answer(BindingResponder(), request())
    assert len(reply.payload) == 32


def test_ipv6_answer_is_44_bytes() -> None:
    """An IPv6 source gets the minimal 44-byte answer, the documented exception to 1.6x."""
    reply, message = answer(BindingResponder(), request(), SOURCE6)
    assert len(reply.payload) == 44
    assert message.attributes == (XorMappedAddress(SOURCE6),)


def test_answers_are_counted() -> None:
    """Requests and success responses are counted."""
    responder = BindingResponder()
    answer(responder, request())
    assert (responder.stats.requests, responder.stats.responses) == (1, 1)
    assert responder.stats.error_responses == 0


def test_no_software_by_default() -> None:
    """Answers carry no SOFTWARE unless it is configured."""
    _, message = answer(BindingResponder(), request())
    assert message.get(Software) is None


def test_software_when_configured() -> None:
    """A configured SOFTWARE text is added to answers."""
    _, message = answer(BindingResponder(software="nattraverse 1"), request())
    assert message.get(Software) == Software("nattraverse 1")


def test_fingerprint_answered_with_fingerprint() -> None:
    """A request with FINGERPRINT gets a response with a valid FINGERPRINT, last."""
    reply, message = answer(BindingResponder(), request(fingerprint=True))
    # decode() checks the CRC; check again that it is there, and last.
    assert isinstance(message.attributes[-1], Fingerprint)
    assert decode(reply.payload).attributes[-1] == message.attributes[-1]


def test_bad_fingerprint_dropped_silently() -> None:
    """A request whose FINGERPRINT fails is dropped without an answer (RFC 8489 section 7.3)."""
    data = bytearray(request(Username("alice"), fingerprint=True))
    data[-1] ^= 0x01
    responder = BindingResponder()
    assert responder.respond(bytes(data), SOURCE) is None
    assert responder.stats.dropped_malformed == 1
    assert responder.stats.error_responses == 0


def test_error_answer_carries_fingerprint_when_asked() -> None:
    """An error response to a request with FINGERPRINT carries a valid FINGERPRINT too."""
    unknown = UnknownAttribute(0x7F00, b"\x00" * 4)
    _, message = answer(BindingResponder(), request(unknown, fingerprint=True))
    assert error_code(message) == 420
    assert isinstance(message.attributes[-1], Fingerprint)


def test_error_answer_without_fingerprint_unless_asked() -> None:
    """An error response to a request without FINGERPRINT has none."""
    unknown = UnknownAttribute(0x7F00, b"\x00" * 4)
    _, message = answer(BindingResponder(), request(unknown))
    assert error_code(message) == 420
    assert message.get(Fingerprint) is None


def test_no_fingerprint_unless_asked() -> None:
    """A request without FINGERPRINT gets a response without one."""
    _, message = answer(BindingResponder(), request())
    assert message.get(Fingerprint) is None


def test_comprehension_optional_unknown_attribute_ignored() -> None:
    """An unknown attribute of type 0x8000 or more is ignored."""
    _, message = answer(BindingResponder(), request(UnknownAttribute(0xC0DE, b"abcd")))
    assert message.message_class is MessageClass.SUCCESS


def test_known_attributes_accepted() -> None:
    """Attributes the server does not act on, but knows, do not stop the answer."""
    _, message = answer(BindingResponder(), request(Username("alice")))
    assert message.message_class is MessageClass.SUCCESS


# -- error responses --------------------------------------------------------------


def test_unknown_required_attribute_gets_420() -> None:
    """An unknown comprehension-required attribute gets 420 listing it."""
    _, message = answer(BindingResponder(), request(UnknownAttribute(0x7F01, b"abcd")))
    assert error_code(message) == 420
    assert message.get(UnknownAttributes) == UnknownAttributes((0x7F01,))


def test_420_lists_every_unknown_attribute() -> None:
    """Every unknown comprehension-required attribute is listed in UNKNOWN-ATTRIBUTES."""
    data = request(UnknownAttribute(0x7F01, b"abcd"), UnknownAttribute(0x7F02, b""))
    _, message = answer(BindingResponder(), data)
    assert message.get(UnknownAttributes) == UnknownAttributes((0x7F01, 0x7F02))


def test_error_response_goes_to_source() -> None:
    """An error response goes to the source, from the receiving socket."""
    reply, _ = answer(BindingResponder(), request(UnknownAttribute(0x7F01, b"")), OTHER_SOURCE)
    assert reply.destination == OTHER_SOURCE
    assert reply.via == PRIMARY


def test_non_binding_method_gets_400() -> None:
    """A request of another method than Binding gets 400."""
    _, message = answer(BindingResponder(), request(method=0x003))
    assert error_code(message) == 400
    assert message.method == 0x003


def test_error_reason_shortened_to_budget() -> None:
    """The error answer to a 20-byte request stays within 32 bytes."""
    reply, message = answer(BindingResponder(), request(method=0x003))
    assert len(reply.payload) <= 32
    assert error_code(message) == 400


def test_malformed_attribute_gets_400() -> None:
    """A request whose attribute does not decode, but whose header does, gets 400."""
    bad_family = UnknownAttribute(AttributeType.XOR_MAPPED_ADDRESS, b"\x00\x03\x00\x00")
    _, message = answer(BindingResponder(), request(bad_family))
    assert error_code(message) == 400
    assert message.transaction_id == TXID


def test_truncated_attribute_gets_400() -> None:
    """A request whose attribute runs past the end gets 400."""
    data = bytearray(request(Username("abcd")))
    struct.pack_into("!H", data, 22, 64)  # the USERNAME length field
    _, message = answer(BindingResponder(), bytes(data))
    assert error_code(message) == 400


def test_errors_counted_by_code() -> None:
    """Error responses are counted, and by code."""
    responder = BindingResponder()
    answer(responder, request(method=0x003))
    answer(responder, request(UnknownAttribute(0x7F01, b"")))
    assert responder.stats.error_responses == 2
    assert responder.stats.errors_by_code == {400: 1, 420: 1}
    assert responder.stats.requests == 2


def test_bad_length_field_dropped() -> None:
    """A request whose length field disagrees with the datagram is dropped and counted."""
    responder = BindingResponder()
    assert responder.respond(request() + b"\0\0\0\0", SOURCE) is None
    assert responder.stats.dropped_malformed == 1
    assert responder.stats.requests == 0


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x60" + bytes(30),  # RTP
        b"\xc0" + bytes(19),  # first two bits set
        b"hello",  # shorter than a header
        b"",
    ],
)
def test_not_stun_dropped(data: bytes) -> None:
    """Datagrams that are not STUN are dropped silently and counted."""
    responder = BindingResponder()
    assert responder.respond(data, SOURCE) is None
    assert responder.stats.dropped_not_stun == 1
    assert responder.stats.requests == 0


@pytest.mark.parametrize(
    "message_class", [MessageClass.SUCCESS, MessageClass.ERROR, MessageClass.INDICATION]
)
def test_non_requests_dropped(message_class: MessageClass) -> None:
    """Responses and indications are dropped silently and counted."""
    responder = BindingResponder()
    data = request(XorMappedAddress(SOURCE), message_class=message_class)
    assert responder.respond(data, SOURCE) is None
    assert responder.stats.dropped_not_request == 1
    assert responder.stats.requests == 0


def test_malformed_response_dropped() -> None:
    """A response that does not decode is dropped, never answered."""
    responder = BindingResponder()
    data = request(
        UnknownAttribute(AttributeType.XOR_MAPPED_ADDRESS, b"\x00"),
        message_class=MessageClass.SUCCESS,
    )
    assert responder.respond(data, SOURCE) is None
    assert responder.stats.dropped_malformed == 1


# -- without a second address ------------------------------------------------------


@pytest.mark.parametrize(
    "attribute",
    [
        ChangeRequest(change_ip=True, change_port=True),
        ChangeRequest(change_ip=True),
        ChangeRequest(change_port=True),
        ChangeRequest(),
        ResponsePort(5000),
        Padding(bytes(8)),
    ],
)
def test_rfc5780_attributes_without_second_address_get_420(attribute: Attribute) -> None:
    """Without a second address, CHANGE-REQUEST, RESPONSE-PORT and PADDING get 420 naming them."""
    _, message = answer(BindingResponder(), request(attribute))
    assert error_code(message) == 420
    assert message.get(UnknownAttributes) == UnknownAttributes((attribute.TYPE,))


def test_change_request_without_second_address_answered_from_receiving_socket() -> None:
    """Without a second address, CHANGE-REQUEST never makes the answer come from elsewhere."""
    reply, _ = answer(BindingResponder(), request(ChangeRequest(True, True)))
    assert reply.via == PRIMARY
    assert reply.destination == SOURCE


def test_change_request_over_stream_without_second_address_gets_420() -> None:
    """Without a second address, CHANGE-REQUEST over TCP gets 420 too."""
    _, message = answer(BindingResponder(), request(ChangeRequest(True, True)), stream=True)
    assert error_code(message) == 420


def test_fast_path_allowed_by_default() -> None:
    """The default responder gives the minimal answer, so the fast path may stand in for it."""
    assert BindingResponder().fast_path_allowed


def test_fast_path_not_allowed_with_software() -> None:
    """With SOFTWARE the answer is not the minimal one."""
    assert not BindingResponder(software="x").fast_path_allowed


def test_fast_path_not_allowed_with_second_address() -> None:
    """With RFC 5780 the answer is not the minimal one."""
    assert not BindingResponder(ADDRESSES).fast_path_allowed


# -- RFC 3489 classic clients -------------------------------------------------------


def test_classic_request_gets_mapped_address_only() -> None:
    """An RFC 3489 request gets MAPPED-ADDRESS and no XOR-MAPPED-ADDRESS."""
    reply, message = answer(BindingResponder(), request(txid=CLASSIC_TXID))
    assert message.attributes == (MappedAddress(SOURCE),)
    assert message.transaction_id == CLASSIC_TXID
    assert reply.payload[4:20] == CLASSIC_TXID


def test_classic_request_gets_source_and_changed_address() -> None:
    """With a second address, an RFC 3489 request gets SOURCE-ADDRESS and CHANGED-ADDRESS."""
    _, message = answer(BindingResponder(ADDRESSES), request(txid=CLASSIC_TXID))
    assert message.attributes == (
        MappedAddress(SOURCE),
        SourceAddress(Endpoint(A, P)),
        ChangedAddress(Endpoint(B, Q)),
    )


def test_classic_change_request_answered_from_changed_socket() -> None:
    """An RFC 3489 change IP and port request is answered from the other address and port."""
    data = request(ChangeRequest(True, True), txid=CLASSIC_TXID)
    reply, message = answer(BindingResponder(ADDRESSES), data)
    assert reply.via == BQ
    assert message.get(SourceAddress) == SourceAddress(Endpoint(B, Q))
    assert message.get(ChangedAddress) == ChangedAddress(Endpoint(B, Q))
    assert message.get(XorMappedAddress) is None


# -- RFC 5780 ------------------------------------------------------------------------


def test_rfc5780_answer_attributes() -> None:
    """With a second address, the answer has both mapped addresses, RESPONSE-ORIGIN and
    OTHER-ADDRESS."""
    _, message = answer(BindingResponder(ADDRESSES), request())
    assert message.attributes == (
        XorMappedAddress(SOURCE),
        MappedAddress(SOURCE),
        ResponseOrigin(Endpoint(A, P)),
        OtherAddress(Endpoint(B, Q)),
    )


#: RFC 5780 section 6.1: (receiving socket, change IP, change port) -> the
#: socket the answer leaves from.  Written out, not computed.
CHANGE_TABLE = [
    (AP, False, False, AP, Endpoint(A, P)),
    (AP, False, True, AQ, Endpoint(A, Q)),
    (AP, True, False, BP, Endpoint(B, P)),
    (AP, True, True, BQ, Endpoint(B, Q)),
    (AQ, False, False, AQ, Endpoint(A, Q)),
    (AQ, False, True, AP, Endpoint(A, P)),
    (AQ, True, False, BQ, Endpoint(B, Q)),
    (AQ, True, True, BP, Endpoint(B, P)),
    (BP, False, False, BP, Endpoint(B, P)),
    (BP, False, True, BQ, Endpoint(B, Q)),
    (BP, True, False, AP, Endpoint(A, P)),
    (BP, True, True, AQ, Endpoint(A, Q)),
    (BQ, False, False, BQ, Endpoint(B, Q)),
    (BQ, False, True, BP, Endpoint(B, P)),
    (BQ, True, False, AQ, Endpoint(A, Q)),
    (BQ, True, True, AP, Endpoint(A, P)),
]


@pytest.mark.parametrize(("local", "change_ip", "change_port", "via", "origin"), CHANGE_TABLE)
def test_change_request_source_socket(
    local: SocketKey, change_ip: bool, change_port: bool, via: SocketKey, origin: Endpoint
) -> None:
    """CHANGE-REQUEST picks the sending socket per RFC 5780 section 6.1, and RESPONSE-ORIGIN
    says which."""
    data = request(ChangeRequest(change_ip, change_port))
    reply, message = answer(BindingResponder(ADDRESSES), data, local=local)
    assert reply.via == via
    assert message.get(ResponseOrigin) == ResponseOrigin(origin)
    assert reply.destination == SOURCE


@pytest.mark.parametrize(
    ("local", "other"),
    [
        (AP, Endpoint(B, Q)),
        (AQ, Endpoint(B, P)),
        (BP, Endpoint(A, Q)),
        (BQ, Endpoint(A, P)),
    ],
)
@pytest.mark.parametrize("change", [None, ChangeRequest(True, False), ChangeRequest(True, True)])
def test_other_address_differs_in_address_and_port(
    local: SocketKey, other: Endpoint, change: ChangeRequest | None
) -> None:
    """OTHER-ADDRESS is the socket differing in both address and port from the receiving one."""
    data = request() if change is None else request(change)
    _, message = answer(BindingResponder(ADDRESSES), data, local=local)
    assert message.get(OtherAddress) == OtherAddress(other)


def test_response_port_sets_destination_port() -> None:
    """RESPONSE-PORT sends the answer to that port of the source's address."""
    reply, message = answer(BindingResponder(ADDRESSES), request(ResponsePort(5555)))
    assert reply.destination == Endpoint(SOURCE.host, 5555)
    assert reply.via == PRIMARY
    assert message.get(XorMappedAddress) == XorMappedAddress(SOURCE)


def test_padding_echoed() -> None:
    """PADDING gets PADDING of the same length back, never more."""
    _, message = answer(BindingResponder(ADDRESSES), request(Padding(b"\xff" * 100)))
    assert message.get(Padding) == Padding(bytes(100))


def test_padding_with_response_port_gets_400() -> None:
    """PADDING together with RESPONSE-PORT gets 400 (RFC 5780 section 6.1)."""
    data = request(Padding(bytes(8)), ResponsePort(5555))
    reply, message = answer(BindingResponder(ADDRESSES), data)
    assert error_code(message) == 400
    assert reply.destination == SOURCE


@pytest.mark.parametrize(
    "attribute",
    [ChangeRequest(change_ip=True), ChangeRequest(change_port=True), ResponsePort(5555)],
)
def test_udp_only_attributes_over_stream_get_400(attribute: Attribute) -> None:
    """Over TCP, CHANGE-REQUEST with a flag set and RESPONSE-PORT get 400."""
    reply, message = answer(BindingResponder(ADDRESSES), request(attribute), stream=True)
    assert error_code(message) == 400
    assert reply.via == PRIMARY


def test_empty_change_request_over_stream_answered() -> None:
    """Over TCP, a CHANGE-REQUEST with no flag set is answered normally."""
    data = request(ChangeRequest())
    reply, message = answer(BindingResponder(ADDRESSES), data, stream=True)
    assert message.message_class is MessageClass.SUCCESS
    assert reply.via == PRIMARY


def test_rfc5780_fingerprint() -> None:
    """In RFC 5780 mode a request with FINGERPRINT gets a valid FINGERPRINT, last."""
    _, message = answer(BindingResponder(ADDRESSES), request(fingerprint=True))
    assert isinstance(message.attributes[-1], Fingerprint)


# -- amplification --------------------------------------------------------------------

_TYPES = [int(t) for t in AttributeType] + [0x7F01, 0xC0DE, 0x0000, 0xFFFF]


@st.composite
def _attribute(draw: st.DrawFn) -> Attribute:
    """Any attribute type with any (often malformed) value."""
    type_code = draw(st.one_of(st.sampled_from(_TYPES), st.integers(0, 0xFFFF)))
    value = draw(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b"", b"\x00\x01\x30\x39\xc0\x00\x02\x01", b"\x00\x00\x00\x06"]),
        )
    )
    return UnknownAttribute(type_code, value)


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    """STUN messages of many shapes: requests mostly, classic or not, sometimes corrupted."""
    classic = draw(st.booleans())
    if classic:
        classic_ids = st.binary(min_size=16, max_size=16)
        txid = draw(classic_ids.filter(lambda t: t[:4] != MAGIC_COOKIE_BYTES))
    else:
        txid = draw(st.binary(min_size=12, max_size=12))
    method = draw(st.sampled_from([Method.BINDING, Method.BINDING, 0x002, 0x003, 0xFFF]))
    message_class = draw(st.sampled_from([MessageClass.REQUEST] * 5 + list(MessageClass)))
    attributes = draw(st.lists(_attribute(), max_size=5))
    fingerprint = draw(st.booleans())
    data = bytearray(encode(method, message_class, txid, attributes, fingerprint=fingerprint))
    corruption = draw(st.sampled_from(["none", "none", "flip", "truncate", "append"]))
    if corruption == "flip" and len(data) > 20:
        at = draw(st.integers(20, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
    elif corruption == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif corruption == "append":
        data += draw(st.binary(min_size=1, max_size=12))
    return bytes(data)


@settings(max_examples=400)
@given(
    data=st.one_of(_requests(), st.binary(max_size=80)),
    host=st.ip_addresses(v=4).map(str),
    port=st.integers(0, 65535),
    stream=st.booleans(),
)
@example(data=request(method=0x003), host="192.0.2.9", port=1, stream=False)
@example(data=request(UnknownAttribute(0x7F01, b"")), host="192.0.2.9", port=1, stream=False)
@example(data=request(ChangeRequest(True, True)), host="192.0.2.9", port=1, stream=False)
@example(data=request(ResponsePort(1)), host="192.0.2.9", port=1, stream=True)
@example(data=request(Padding(b"")), host="192.0.2.9", port=1, stream=False)
@example(data=request(fingerprint=True), host="192.0.2.9", port=1, stream=False)
@example(data=request(txid=CLASSIC_TXID), host="192.0.2.9", port=1, stream=False)
@example(
    data=request(UnknownAttribute(AttributeType.XOR_MAPPED_ADDRESS, b"\x00\x03\x00\x00")),
    host="192.0.2.9",
    port=1,
    stream=False,
)
def test_replies_within_amplification_budget(
    data: bytes, host: str, port: int, stream: bool
) -> None:
    """No reply to an IPv4 source is larger than 1.6 times its request."""
    reply = BindingResponder().respond(data, Endpoint(host, port), stream=stream)
    if reply is not None:
        assert len(reply.payload) <= BUDGET * len(data)
