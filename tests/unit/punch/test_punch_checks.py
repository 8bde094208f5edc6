"""The pure connectivity check machine: pacing, retransmission, nomination, integrity, budget."""

from __future__ import annotations

import itertools

import pytest

from nattraverse._types import Endpoint
from nattraverse.punch.candidates import Candidate, CandidateKind
from nattraverse.punch.checks import (
    CheckConfig,
    CheckMachine,
    IceCredentials,
    PairState,
    PunchChecksFailed,
)
from nattraverse.stun.attributes import IceControlling, Priority, UseCandidate, Username
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import decode, encode

SECRET = b"k" * 32
A = Endpoint("10.0.0.1", 4000)
B = Endpoint("10.0.0.2", 5000)


def ids() -> itertools.count[int]:
    return itertools.count(1)


def machine(
    controlling: bool,
    local: Endpoint,
    remote: list[Endpoint],
    config: CheckConfig | None = None,
    seed: int = 0,
) -> CheckMachine:
    counter = itertools.count(seed * 1000)
    return CheckMachine(
        controlling=controlling,
        credentials=IceCredentials.from_secret(SECRET, controlling=controlling),
        local=[Candidate.host(local)],
        remote=[Candidate.host(r) for r in remote],
        config=config,
        random_bytes=lambda n: next(counter).to_bytes(n, "big"),
    )


def test_credentials_match_across_roles() -> None:
    """The caller's remote credentials are the callee's local ones."""
    caller = IceCredentials.from_secret(SECRET, controlling=True)
    callee = IceCredentials.from_secret(SECRET, controlling=False)
    assert (caller.remote_ufrag, caller.remote_key) == (callee.local_ufrag, callee.local_key)
    assert caller.local_key != caller.remote_key


def test_pacing_one_new_check_per_ta() -> None:
    """New checks go out one per Ta, in pair order."""
    m = machine(True, A, [B, Endpoint("10.0.0.3", 1), Endpoint("10.0.0.4", 1)])
    m.start(0.0)
    assert [d for _, d in m.take_datagrams()] == [B]
    assert m.next_deadline() == pytest.approx(0.05)
    m.handle_timer(0.05)
    assert [d for _, d in m.take_datagrams()] == [Endpoint("10.0.0.3", 1)]
    m.handle_timer(0.07)
    assert m.take_datagrams() == []


def test_retransmission_schedule() -> None:
    """An unanswered check is resent at rto, 2 rto, 4 rto... then the pair waits again."""
    m = machine(True, A, [B], CheckConfig(max_checks_per_pair=5))
    m.start(0.0)
    sent = [0.0] if m.take_datagrams() else []
    t = 0.0
    while (when := m.next_deadline()) is not None and when < 5:
        t = when
        m.handle_timer(t)
        sent += [t] * len(m.take_datagrams())
    assert sent == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.5])
    assert m.stats.retransmissions == 4


def test_budget_exhaustion_fails() -> None:
    """When every allowed check timed out, the machine fails naming the budget."""
    m = machine(True, A, [B], CheckConfig(max_checks_per_pair=3, max_tries=3))
    m.start(0.0)
    for _ in range(100):
        when = m.next_deadline()
        if when is None:
            break
        m.handle_timer(when)
    assert isinstance(m.failure, PunchChecksFailed)
    assert m.failure.reason == "budget"
    assert m.stats.requests_sent == 3
    assert "budget" in str(m.failure)
    assert "no authenticated check from the peer" in str(m.failure)


def test_deadline_fails() -> None:
    """The overall deadline ends the checks."""
    m = machine(True, A, [B], CheckConfig(deadline=0.5))
    m.start(0.0)
    while (when := m.next_deadline()) is not None:
        m.handle_timer(when)
    assert m.failure is not None
    assert m.failure.reason == "deadline"


def exchange(
    a: CheckMachine, b: CheckMachine, now: float, a_addr: Endpoint, b_addr: Endpoint
) -> None:
    """Deliver everything each machine sends to the other, until quiet."""
    for _ in range(50):
        moved = False
        for src, src_addr, dst in ((a, a_addr, b), (b, b_addr, a)):
            for data, _dest in src.take_datagrams():
                dst.datagram_received(data, src_addr, now)
                moved = True
        if not moved:
            return


def test_nomination_by_controlling_side() -> None:
    """Both sides end on the same path; the controlling side used USE-CANDIDATE."""
    caller = machine(True, A, [B])
    callee = machine(False, B, [A], seed=1)
    caller.start(0.0)
    callee.start(0.0)
    t = 0.0
    for _ in range(20):
        exchange(caller, callee, t, A, B)
        if caller.done and callee.done:
            break
        t += 0.05
        caller.handle_timer(t)
        callee.handle_timer(t)
    assert caller.nominated is not None
    assert caller.nominated.remote.address == B
    assert callee.nominated is not None
    assert callee.nominated.remote.address == A


def request(key: bytes, username: str, txid: bytes = b"x" * 12) -> bytes:
    return encode(
        Method.BINDING,
        MessageClass.REQUEST,
        txid,
        [Username(username), Priority(123), IceControlling(1)],
        integrity_key=key,
        fingerprint=True,
    )


@pytest.mark.parametrize(
    ("key", "username"),
    [
        (b"wrong key", None),
        (None, "nobody:here"),
    ],
)
def test_integrity_failures_are_dropped_and_counted(
    key: bytes | None, username: str | None
) -> None:
    """A request with the wrong key or USERNAME gets no answer and changes nothing."""
    callee = machine(False, B, [A])
    callee.start(0.0)
    callee.take_datagrams()
    creds = callee.credentials
    data = request(
        key if key is not None else creds.local_key,
        username if username is not None else f"{creds.local_ufrag}:{creds.remote_ufrag}",
    )
    stranger = Endpoint("10.0.0.66", 9)
    assert callee.datagram_received(data, stranger, 0.01)
    assert callee.stats.integrity_failures == 1
    assert callee.take_datagrams() == []
    assert len(callee.pairs) == 1
    assert callee.stats.peer_reflexive == 0


def test_forged_response_is_dropped() -> None:
    """A response without the key leaves the pair in progress."""
    caller = machine(True, A, [B])
    caller.start(0.0)
    ((data, _),) = caller.take_datagrams()
    txid = decode(data).transaction_id
    forged = encode(
        Method.BINDING, MessageClass.SUCCESS, txid, [], integrity_key=b"bad", fingerprint=True
    )
    caller.datagram_received(forged, B, 0.01)
    assert caller.stats.integrity_failures == 1
    assert caller.pair_state(B) is PairState.IN_PROGRESS


def test_response_from_other_address_is_not_trusted() -> None:
    """A correctly keyed response from another address than the check's is dropped."""
    caller = machine(True, A, [B])
    callee = machine(False, B, [A], seed=1)
    caller.start(0.0)
    ((data, _),) = caller.take_datagrams()
    callee.datagram_received(data, A, 0.0)
    (response, _), *_ = callee.take_datagrams()
    caller.datagram_received(response, Endpoint("10.0.0.9", 1), 0.01)
    assert caller.stats.unexpected == 1
    assert caller.pair_state(B) is PairState.IN_PROGRESS


def test_peer_reflexive_learned_from_request() -> None:
    """An authenticated check from an unknown address adds a peer-reflexive pair and is answered."""
    callee = machine(False, B, [A])
    callee.start(0.0)
    callee.take_datagrams()
    creds = callee.credentials
    mapped = Endpoint("198.51.100.9", 20001)
    callee.datagram_received(
        request(creds.local_key, f"{creds.local_ufrag}:{creds.remote_ufrag}"), mapped, 0.01
    )
    assert callee.stats.peer_reflexive == 1
    learned = callee.pairs[-1].remote
    assert learned.kind is CandidateKind.PEER_REFLEXIVE
    assert learned.address == mapped
    assert learned.priority == 123
    # The answer, then at once (not at the next Ta) a triggered check to
    # the learned address: through a symmetric NAT it is the only way back.
    out = callee.take_datagrams()
    assert [d for _, d in out] == [mapped, mapped]
    assert [decode(data).message_class for data, _ in out] == [
        MessageClass.SUCCESS,
        MessageClass.REQUEST,
    ]
    assert callee.stats.requests_sent == 2


def test_nomination_goes_out_with_the_validating_answer() -> None:
    """
    The controlling side sends its USE-CANDIDATE check as soon as a pair is
    validated both ways, not at the next Ta.
    """
    caller = machine(True, A, [B])
    callee = machine(False, B, [A], seed=1)
    caller.start(0.0)
    callee.start(0.0)
    (check,) = caller.take_datagrams()
    (their_check,) = callee.take_datagrams()
    caller.datagram_received(their_check[0], B, 0.01)
    callee.datagram_received(check[0], A, 0.01)
    answers = callee.take_datagrams()
    caller.take_datagrams()
    for data, _ in answers:
        if decode(data).message_class is MessageClass.SUCCESS:
            caller.datagram_received(data, B, 0.02)
    assert caller.selected is not None
    (nomination,) = caller.take_datagrams()
    assert decode(nomination[0]).get(UseCandidate) is not None


def test_check_in_flight_is_renewed_when_the_peer_checks() -> None:
    """
    A check from the peer on a pair whose own check is still unanswered
    (dropped by the peer's NAT, which has just opened) sends a new check at
    once, not at the old one's retransmission timeout; the old one is not
    resent, and an answer to the new one times the path.
    """
    caller = machine(True, A, [B])
    callee = machine(False, B, [A], seed=1)
    caller.start(0.0)
    (dropped,) = caller.take_datagrams()
    callee.start(0.01)
    (their_check,) = callee.take_datagrams()
    caller.datagram_received(their_check[0], B, 0.02)
    out = caller.take_datagrams()
    assert [decode(data).message_class for data, _ in out] == [
        MessageClass.SUCCESS,
        MessageClass.REQUEST,
    ]
    renewed = out[1][0]
    assert decode(renewed).transaction_id != decode(dropped[0]).transaction_id
    # The peer's check again (a retransmission): answered, nothing more.
    caller.datagram_received(their_check[0], B, 0.03)
    assert [decode(data).message_class for data, _ in caller.take_datagrams()] == [
        MessageClass.SUCCESS
    ]
    callee.datagram_received(renewed, A, 0.04)
    answer = next(
        data
        for data, _ in callee.take_datagrams()
        if decode(data).message_class is MessageClass.SUCCESS
    )
    caller.datagram_received(answer, B, 0.05)
    assert caller.pair_state(B) is PairState.SUCCEEDED
    assert caller.rtt_to(B) == pytest.approx(0.03)
    # Nothing is retransmitted later: the dropped check was superseded.
    caller.take_datagrams()
    caller.handle_timer(1.0)
    sent = [decode(data) for data, _ in caller.take_datagrams()]
    assert all(m.get(UseCandidate) is not None for m in sent)
    assert decode(dropped[0]).transaction_id not in {m.transaction_id for m in sent}


def test_pair_that_spent_its_budget_is_still_selected_and_nominated() -> None:
    """
    A pair whose checks were lost until its own budget was spent, then
    answered, is selected and nominated when the peer's check arrives: the
    per-pair budget bounds checks, not the nomination of the pair that works.
    """
    config = CheckConfig(max_checks_per_pair=3, max_tries=3)
    caller = machine(True, A, [B], config)
    callee = machine(False, B, [A], seed=1)
    caller.start(0.0)
    sent = [data for data, _ in caller.take_datagrams()]
    t = 0.0
    while len(sent) < 3:
        t = caller.next_deadline() or t + 0.05
        caller.handle_timer(t)
        sent += [data for data, _ in caller.take_datagrams()]
    assert caller.stats.requests_sent == 3  # the pair's whole budget
    callee.start(t)
    callee.datagram_received(sent[-1], A, t)
    out = callee.take_datagrams()
    answer = next(d for d, _ in out if decode(d).message_class is MessageClass.SUCCESS)
    their_check = next(d for d, _ in out if decode(d).message_class is MessageClass.REQUEST)
    caller.datagram_received(answer, B, t + 0.01)
    assert caller.pair_state(B) is PairState.SUCCEEDED
    before = caller.selected
    assert before is None  # not yet heard from the peer
    caller.take_datagrams()
    caller.datagram_received(their_check, B, t + 0.02)
    selected = caller.selected
    assert selected is not None
    assert selected.remote.address == B
    nominations = [decode(d) for d, _ in caller.take_datagrams()]
    assert any(m.get(UseCandidate) is not None for m in nominations)
