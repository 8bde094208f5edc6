"""
Tests for nattraverse.stun.transaction: the retransmission schedule of RFC
8489 section 6.2 and the judging of responses, without a reactor.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nattraverse._types import Endpoint
from nattraverse.errors import (
    BadRequest,
    StunDecodeError,
    StunErrorResponse,
    StunIntegrityError,
    UnknownAttribute,
)
from nattraverse.stun.attributes import (
    ChangedAddress,
    ErrorCode,
    MappedAddress,
    OtherAddress,
    ResponseOrigin,
    Software,
    SourceAddress,
    XorMappedAddress,
)
from nattraverse.stun.attributes import UnknownAttribute as RawAttribute
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import Message, decode, encode
from nattraverse.stun.transaction import (
    MAX_RC,
    ReliablePolicy,
    Retransmission,
    RetransmissionPolicy,
    StunRequest,
    StunResponse,
    TransactionState,
)

TID = bytes(range(12))
SERVER = Endpoint("192.0.2.1", 3478)
MAPPED = Endpoint("203.0.113.5", 40000)
KEY = b"short-term key"

#: RFC 8489 section 6.2.1: with RTO 500 ms and Rc 7.
RFC_SEND_TIMES = (0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5)
RFC_TIMEOUT = 39.5


def _response(
    attributes: tuple[object, ...] = (),
    *,
    message_class: MessageClass = MessageClass.SUCCESS,
    transaction_id: bytes = TID,
    method: int = Method.BINDING,
    integrity_key: bytes | None = None,
    integrity_sha256_key: bytes | None = None,
) -> Message:
    return decode(
        encode(
            method,
            message_class,
            transaction_id,
            attributes,  # type: ignore[arg-type]
            integrity_key=integrity_key,
            integrity_sha256_key=integrity_sha256_key,
        )
    )


def _run(machine: Retransmission, times: list[float]) -> list[float]:
    """Poll *machine* at each time; return the times it said to send."""
    sent = []
    for now in times:
        if machine.poll(now).send:
            sent.append(now)
    return sent


# -- policies -------------------------------------------------------------------


def test_default_schedule_is_rfc_8489() -> None:
    """The defaults send at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s and fail at 39.5 s."""
    policy = RetransmissionPolicy()
    assert policy.send_offsets == RFC_SEND_TIMES
    assert policy.timeout == RFC_TIMEOUT


def test_custom_schedule() -> None:
    """rto, rc and rm change the schedule as RFC 8489 section 6.2.1 describes."""
    policy = RetransmissionPolicy(rto=0.1, rc=3, rm=4)
    assert policy.send_offsets == pytest.approx((0.0, 0.1, 0.3))
    assert policy.timeout == pytest.approx(0.3 + 0.4)


def test_reliable_policy_sends_once() -> None:
    """Over TCP the request is sent once and fails after Ti (RFC 8489 section 6.2.2)."""
    policy = ReliablePolicy()
    assert policy.send_offsets == (0.0,)
    assert policy.timeout == RFC_TIMEOUT
    assert ReliablePolicy(5).timeout == 5.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rto": 0}, "rto"),
        ({"rto": -1.0}, "rto"),
        ({"rto": math.inf}, "rto"),
        ({"rto": math.nan}, "rto"),
        ({"rto": "0.5"}, "rto"),
        ({"rc": 0}, "rc"),
        ({"rc": MAX_RC + 1}, "rc"),
        ({"rc": 2.0}, "rc"),
        ({"rc": True}, "rc"),
        ({"rm": 0}, "rm"),
        ({"rm": -3}, "rm"),
    ],
)
def test_policy_rejects_bad_parameters(kwargs: dict[str, object], name: str) -> None:
    """Out-of-range parameters raise ValueError naming the parameter."""
    with pytest.raises(ValueError, match=rf"^{name} must"):
        RetransmissionPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("ti", [0, -1, math.inf, math.nan])
def test_reliable_policy_rejects_bad_ti(ti: float) -> None:
    """Ti must be a positive finite number of seconds."""
    with pytest.raises(ValueError, match=r"^ti must"):
        ReliablePolicy(ti)


@given(
    rto=st.floats(min_value=0.001, max_value=10, allow_nan=False),
    rc=st.integers(min_value=1, max_value=MAX_RC),
    rm=st.integers(min_value=1, max_value=64),
)
def test_schedule_doubles(rto: float, rc: int, rm: int) -> None:
    """Intervals start at RTO and double; the timeout is Rm RTOs after the last send."""
    policy = RetransmissionPolicy(rto, rc, rm)
    offsets = policy.send_offsets
    assert len(offsets) == rc
    assert offsets[0] == 0
    for k in range(1, rc):
        assert offsets[k] - offsets[k - 1] == pytest.approx(rto * 2 ** (k - 1))
    assert policy.timeout == pytest.approx(offsets[-1] + rm * rto)


# -- the machine ------------------------------------------------------------------


def test_machine_sends_at_rfc_times_then_times_out() -> None:
    """Polled when told, the machine sends at the RFC times and fails at 39.5 s."""
    machine = Retransmission(RetransmissionPolicy(), now=100.0)
    sent = []
    now = 100.0
    while True:
        step = machine.poll(now)
        if step.send:
            sent.append(now - 100.0)
        if step.timed_out:
            break
        assert step.next_at is not None
        now = step.next_at
    assert tuple(sent) == RFC_SEND_TIMES
    assert now - 100.0 == RFC_TIMEOUT
    assert machine.state is TransactionState.TIMED_OUT
    assert machine.transmissions == 7


def test_machine_early_poll_does_nothing() -> None:
    """A poll before the next event sends nothing and names the same next time."""
    machine = Retransmission(RetransmissionPolicy(), now=0.0)
    assert machine.poll(0.0).send
    step = machine.poll(0.25)
    assert not step.send
    assert not step.timed_out
    assert step.next_at == 0.5


def test_machine_not_timed_out_just_before_deadline() -> None:
    """The transaction is still on a moment before 39.5 s."""
    machine = Retransmission(RetransmissionPolicy(), now=0.0)
    assert _run(machine, [0.0, 39.49]) == [0.0, 39.49]
    step = machine.poll(39.49)
    assert not step.timed_out
    assert step.next_at == RFC_TIMEOUT


def test_machine_late_poll_sends_once() -> None:
    """A late poll sends once for all the transmissions that were due."""
    machine = Retransmission(RetransmissionPolicy(), now=0.0)
    assert machine.poll(0.0).send
    step = machine.poll(4.0)
    assert step.send
    assert step.next_at == 7.5
    assert machine.transmissions == 2


def test_machine_late_poll_does_not_postpone_deadline() -> None:
    """A poll after the deadline times out instead of sending."""
    machine = Retransmission(RetransmissionPolicy(), now=0.0)
    machine.poll(0.0)
    step = machine.poll(1000.0)
    assert step.timed_out
    assert not step.send


def test_machine_reliable() -> None:
    """Over a reliable transport: one send, then the timeout at Ti."""
    machine = Retransmission(ReliablePolicy(10), now=5.0)
    step = machine.poll(5.0)
    assert step.send
    assert step.next_at == 15.0
    assert machine.poll(15.0).timed_out


def test_machine_answer_ends_it() -> None:
    """After a response the machine sends nothing and asks for no more polls."""
    machine = Retransmission(RetransmissionPolicy(), now=0.0)
    machine.poll(0.0)
    machine.answer()
    assert machine.state is TransactionState.ANSWERED
    assert machine.next_at is None
    step = machine.poll(0.5)
    assert (step.send, step.timed_out, step.next_at) == (False, False, None)


def test_machine_cannot_end_twice() -> None:
    """Ending a finished transaction is a programming error."""
    machine = Retransmission(RetransmissionPolicy(), now=0.0)
    machine.cancel()
    assert machine.state is TransactionState.CANCELLED
    with pytest.raises(ValueError, match="already cancelled"):
        machine.answer()


@given(
    rc=st.integers(min_value=1, max_value=10),
    rm=st.integers(min_value=1, max_value=20),
    gaps=st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), max_size=60),
)
def test_machine_any_poll_times(rc: int, rm: int, gaps: list[float]) -> None:
    """Whatever the poll times: at most Rc sends, none at or after the deadline."""
    policy = RetransmissionPolicy(0.5, rc, rm)
    machine = Retransmission(policy, now=0.0)
    now = 0.0
    timed_out = False
    for gap in [0.0, *gaps]:
        now += gap
        step = machine.poll(now)
        assert not (step.send and now >= policy.timeout)
        if step.timed_out:
            assert now >= policy.timeout
            assert not timed_out
            timed_out = True
        elif not timed_out:
            assert step.next_at is not None
            assert step.next_at > now
    assert machine.transmissions <= rc
    assert timed_out == (now >= policy.timeout)


# -- requests ---------------------------------------------------------------------


def test_request_needs_96_bit_id() -> None:
    """A request's transaction id must be 12 bytes."""
    with pytest.raises(ValueError, match="12"):
        StunRequest(b"short")


def test_request_encodes() -> None:
    """The encoded request decodes to the same method, id and attributes."""
    request = StunRequest.build(TID, [Software("test")], fingerprint=True, integrity_key=KEY)
    message = decode(request.encode())
    assert message.message_class is MessageClass.REQUEST
    assert message.method == Method.BINDING
    assert message.transaction_id == TID
    assert message.get(Software) == Software("test")
    message.check_integrity(KEY)


def test_request_matches() -> None:
    """Responses match by transaction id, method and class."""
    request = StunRequest(TID)
    assert request.matches(_response())
    assert request.matches(_response(message_class=MessageClass.ERROR))
    assert not request.matches(_response(transaction_id=b"x" * 12))
    assert not request.matches(_response(method=0x003))
    assert not request.matches(_response(message_class=MessageClass.REQUEST))
    assert not request.matches(_response(message_class=MessageClass.INDICATION))


def test_verify_without_key_accepts_anything() -> None:
    """A request without a key accepts responses without integrity."""
    StunRequest(TID).verify(_response())


def test_verify_accepts_right_key() -> None:
    """MESSAGE-INTEGRITY with the request's key passes."""
    StunRequest(TID, integrity_key=KEY).verify(_response(integrity_key=KEY))


@pytest.mark.parametrize("key", [None, b"wrong key"])
def test_verify_rejects_missing_or_wrong_integrity(key: bytes | None) -> None:
    """A response without MESSAGE-INTEGRITY, or with a wrong one, fails."""
    with pytest.raises(StunIntegrityError):
        StunRequest(TID, integrity_key=KEY).verify(_response(integrity_key=key))


def test_verify_sha256() -> None:
    """MESSAGE-INTEGRITY-SHA256 is checked when the request used it."""
    request = StunRequest(TID, integrity_sha256_key=KEY)
    request.verify(_response(integrity_sha256_key=KEY))
    with pytest.raises(StunIntegrityError):
        request.verify(_response(integrity_key=KEY))
    with pytest.raises(StunIntegrityError):
        request.verify(_response(integrity_sha256_key=b"wrong"))


def test_verify_both_accepts_either() -> None:
    """A request with both integrity attributes accepts a response with either."""
    request = StunRequest(TID, integrity_key=KEY, integrity_sha256_key=KEY)
    request.verify(_response(integrity_key=KEY))
    request.verify(_response(integrity_sha256_key=KEY))
    with pytest.raises(StunIntegrityError, match="neither"):
        request.verify(_response())


def test_outcome_success() -> None:
    """A success response becomes a StunResponse."""
    outcome = StunRequest(TID).outcome(
        _response((XorMappedAddress(MAPPED),)), SERVER, elapsed=0.25, transmissions=1
    )
    assert isinstance(outcome, StunResponse)
    assert outcome.mapped_address == MAPPED
    assert outcome.source == SERVER
    assert outcome.elapsed == 0.25
    assert outcome.transaction_id == TID


@pytest.mark.parametrize(
    ("code", "kind"),
    [(400, BadRequest), (420, UnknownAttribute), (599, StunErrorResponse)],
)
def test_outcome_error(code: int, kind: type[StunErrorResponse]) -> None:
    """An error response becomes the exception of its code, with reason and response."""
    message = _response((ErrorCode(code, "nope"),), message_class=MessageClass.ERROR)
    outcome = StunRequest(TID).outcome(message, SERVER)
    assert type(outcome) is kind
    assert isinstance(outcome, StunErrorResponse)
    assert outcome.code == code
    assert outcome.reason == "nope"
    assert isinstance(outcome.response, StunResponse)
    assert outcome.response.message == message


def test_outcome_error_without_code() -> None:
    """An error response without ERROR-CODE fails the transaction."""
    outcome = StunRequest(TID).outcome(_response(message_class=MessageClass.ERROR), SERVER)
    assert isinstance(outcome, StunDecodeError)
    assert "ERROR-CODE" in str(outcome)


def test_outcome_unknown_required_attribute() -> None:
    """Unknown comprehension-required attributes fail the transaction (RFC 8489 6.3.3)."""
    outcome = StunRequest(TID).outcome(_response((RawAttribute(0x7777, b"abcd"),)), SERVER)
    assert isinstance(outcome, StunDecodeError)
    assert "0x7777" in str(outcome)
    assert outcome.transaction_id == TID


# -- response accessors ---------------------------------------------------------------


def test_mapped_address_prefers_xor() -> None:
    """XOR-MAPPED-ADDRESS wins over MAPPED-ADDRESS."""
    other = Endpoint("198.51.100.1", 1)
    response = StunResponse(_response((MappedAddress(other), XorMappedAddress(MAPPED))), SERVER)
    assert response.mapped_address == MAPPED


def test_mapped_address_falls_back() -> None:
    """MAPPED-ADDRESS serves when XOR-MAPPED-ADDRESS is absent."""
    assert StunResponse(_response((MappedAddress(MAPPED),)), SERVER).mapped_address == MAPPED


def test_rfc_5780_accessors() -> None:
    """RESPONSE-ORIGIN and OTHER-ADDRESS are read, with RFC 3489 fallbacks."""
    a, b = Endpoint("192.0.2.1", 3478), Endpoint("192.0.2.2", 3479)
    new = StunResponse(_response((ResponseOrigin(a), OtherAddress(b))), SERVER)
    assert (new.response_origin, new.other_address) == (a, b)
    old = StunResponse(_response((SourceAddress(a), ChangedAddress(b))), SERVER)
    assert (old.response_origin, old.other_address) == (a, b)


def test_accessors_absent() -> None:
    """Absent attributes read as None."""
    response = StunResponse(_response(), SERVER)
    assert response.mapped_address is None
    assert response.response_origin is None
    assert response.other_address is None
    assert response.alternate_server is None
    assert response.software is None
