"""
The connectivity check machine of UDP hole punching, sans I/O: ICE-style
checks (RFC 8445 sections 6.1.4, 7.2, 7.3, 8.1) between two introduced
peers.  Wire interoperability with ICE agents is not a goal.

Inputs are received datagrams and the time; outputs are datagrams to send
(:meth:`CheckMachine.take_datagrams`) and the next time the machine wants
to be woken (:meth:`CheckMachine.next_deadline`).  It never reads a clock.

Checks are STUN Binding requests (RFC 8489) with USERNAME
``"<receiver ufrag>:<sender ufrag>"``, PRIORITY, ICE-CONTROLLING or
ICE-CONTROLLED, MESSAGE-INTEGRITY keyed by the *receiver's* key, and
FINGERPRINT; responses carry XOR-MAPPED-ADDRESS and MESSAGE-INTEGRITY with
the same key.  Keys and ufrags come from the introduction's session secret
(:meth:`IceCredentials.from_secret`)::

    key(role)   = HMAC-SHA256(secret, b"nattraverse ice v1 key " + role)
    ufrag(role) = hex(HMAC-SHA256(secret, b"nattraverse ice v1 ufrag " + role)[:4])

with ``role`` ``b"caller"`` (controlling) or ``b"callee"`` (controlled).
Anything that fails decoding, USERNAME, integrity, FINGERPRINT or the
role check is dropped and counted in :class:`CheckStats`, and changes no
state: a path is never chosen on an unauthenticated packet.

Pacing and retransmission: the checks of predicted pairs (port prediction,
:mod:`~nattraverse.punch.mapping`) all go out at the start, before any
other; then one new check (the next waiting pair in
:func:`~nattraverse.punch.candidates.form_pairs` order) every
:attr:`CheckConfig.ta`.  Triggered checks (answering the peer's check on a
pair not yet validated) and the nomination go out at once: they follow
the peer's own paced checks one for one, and waiting for the next tick
would add up to *Ta* to every connection through a symmetric NAT, whose
working pair is only learned from the peer's check.  When our own check on
that pair is still unanswered after one send, a new check replaces it at
once (RFC 8445 section 7.3.1.4; an answer to the old one still counts): the
peer's NAT, which dropped it, has just opened.  Each check is retransmitted
after ``rto``, ``2 rto``, ``4 rto``... (RFC 8489 section 6.2.1, shortened) up
to ``max_tries`` sends, and times out ``rm * rto`` after the last.  A
timed-out pair is checked again later while its budget lasts (the peer's
NAT may open meanwhile).  Requests sent are bounded per pair and in total;
the machine fails with :class:`PunchChecksFailed` when the budget is spent
with nothing in flight, or at the overall deadline.  Each predicted pair
adds ``max_tries`` requests to the total budget (:attr:`CheckMachine.max_checks`).

Nomination (RFC 8445 section 8.1.1, regular nomination): the controlling
side (the caller) picks the first pair validated in both directions (its
own check answered, and an authenticated check from the peer received on
it), sets :attr:`CheckMachine.selected` at once (the secure path may
start on it without waiting for the nomination's round trip), and checks
it again with USE-CANDIDATE; the answer ends the machine.  The controlled
side ends when a USE-CANDIDATE check arrives on a pair whose own check was
answered (or as soon as it is).

An ended machine still answers the peer's authenticated checks (its last
answer may have been lost, and the peer's NAT binding wants refreshing);
it changes no state and sends no checks of its own.

Probes (birthday-paradox probing, :mod:`~nattraverse.punch.birthday`):
:meth:`CheckMachine.spray` sends single checks, never retransmitted, to the
addresses a :class:`ProbeSchedule` yields when due; they count in
:attr:`CheckStats.probes_sent`, not in the check budget.  An authenticated
answer from the very address probed makes a succeeded pair of it (learned
like a peer-reflexive one); the spray stops at the first authenticated
packet from the peer, and while it goes on the machine does not fail for
lack of budget (the deadline still holds).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from nattraverse._types import Endpoint
from nattraverse.errors import PunchChecksFailed, StunDecodeError, StunIntegrityError
from nattraverse.punch.candidates import (
    Candidate,
    CandidateKind,
    CandidatePair,
    PairClass,
    candidate_priority,
    form_pairs,
    make_pair,
)
from nattraverse.stun.attributes import (
    Attribute,
    Fingerprint,
    IceControlled,
    IceControlling,
    Priority,
    UseCandidate,
    Username,
    XorMappedAddress,
)
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import Message, decode, encode, is_stun

__all__ = [
    "CheckConfig",
    "CheckMachine",
    "CheckStats",
    "IceCredentials",
    "PairState",
    "ProbeSchedule",
    "PunchChecksFailed",
    "authentic_answer",
    "authentic_request",
    "encode_check",
    "request_fault",
    "response_authentic",
]


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, b"nattraverse ice v1 " + label, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class IceCredentials:
    """
    The ufrags and MESSAGE-INTEGRITY keys of one side of a punch.

    :ivar local_ufrag: Ours.
    :ivar local_key: Checks *to* us are keyed with it.
    :ivar remote_ufrag: The peer's.
    :ivar remote_key: Checks to the peer are keyed with it.
    """

    local_ufrag: str
    local_key: bytes
    remote_ufrag: str
    remote_key: bytes

    @classmethod
    def from_secret(cls, secret: bytes, *, controlling: bool) -> IceCredentials:
        """Both sides' credentials from the session secret (see the module doc)."""
        roles = (b"caller", b"callee") if controlling else (b"callee", b"caller")
        ours, theirs = roles
        return cls(
            _derive(secret, b"ufrag " + ours)[:4].hex(),
            _derive(secret, b"key " + ours),
            _derive(secret, b"ufrag " + theirs)[:4].hex(),
            _derive(secret, b"key " + theirs),
        )


def encode_check(
    credentials: IceCredentials,
    transaction_id: bytes,
    *,
    controlling: bool,
    tie_breaker: int,
    use_candidate: bool = False,
) -> bytes:
    """A connectivity check to the peer (see the module docstring), keyed by its key."""
    role: Attribute = IceControlling(tie_breaker) if controlling else IceControlled(tie_breaker)
    attributes: list[Attribute] = [
        Username(f"{credentials.remote_ufrag}:{credentials.local_ufrag}"),
        Priority(candidate_priority(CandidateKind.PEER_REFLEXIVE)),
        role,
    ]
    if use_candidate:
        attributes.append(UseCandidate())
    return encode(
        Method.BINDING,
        MessageClass.REQUEST,
        transaction_id,
        attributes,
        integrity_key=credentials.remote_key,
        fingerprint=True,
    )


def request_fault(
    message: Message, credentials: IceCredentials, *, controlling: bool
) -> str | None:
    """
    What keeps a Binding request *message* from being a check from the peer:
    ``"integrity"`` (USERNAME, MESSAGE-INTEGRITY with our key, or FINGERPRINT
    wrong or missing), ``"role"`` (no role attribute of the peer's), or
    ``None`` when it is one.
    """
    username = message.get(Username)
    expected = f"{credentials.local_ufrag}:{credentials.remote_ufrag}"
    if username is None or username.value != expected or message.get(Fingerprint) is None:
        return "integrity"
    try:
        message.check_integrity(credentials.local_key)
    except StunIntegrityError:
        return "integrity"
    if message.get(IceControlled if controlling else IceControlling) is None:
        return "role"
    return None


def response_authentic(message: Message, credentials: IceCredentials) -> bool:
    """Whether a response *message* carries the peer's MESSAGE-INTEGRITY and a FINGERPRINT."""
    try:
        message.check_integrity(credentials.remote_key)
    except StunIntegrityError:
        return False
    return message.get(Fingerprint) is not None


def authentic_request(data: bytes, credentials: IceCredentials, *, controlling: bool) -> bool:
    """Whether *data* is a check from the peer (:func:`request_fault`)."""
    try:
        message = decode(data)
    except StunDecodeError:
        return False
    if message.method != Method.BINDING or message.message_class is not MessageClass.REQUEST:
        return False
    return request_fault(message, credentials, controlling=controlling) is None


def authentic_answer(data: bytes, credentials: IceCredentials, transaction_id: bytes) -> bool:
    """Whether *data* is the peer's success response to our check *transaction_id*."""
    try:
        message = decode(data)
    except StunDecodeError:
        return False
    if message.message_class is not MessageClass.SUCCESS:
        return False
    return message.transaction_id == transaction_id and response_authentic(message, credentials)


class ProbeSchedule(Protocol):
    """Where and when :meth:`CheckMachine.spray` sends its probes."""

    def take(self, now: float) -> list[Endpoint]:
        """The addresses due by *now*, each given once."""

    def next_time(self) -> float | None:
        """When the next address is due, ``None`` when none is left."""

    def describe(self) -> str:
        """What was probed, in words."""


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """
    Pacing, retransmission and budget.

    :ivar ta: Seconds between new checks (RFC 8445 section 14.2).
    :ivar rto: First retransmission timeout; doubles after each send.
    :ivar max_tries: Sends of one check, first included.
    :ivar rm: A check times out ``rm * rto`` after its last send.
    :ivar max_checks_per_pair: Requests sent on one pair, retransmissions
        and nominations included.
    :ivar max_checks: Requests sent in total.
    :ivar deadline: Seconds from :meth:`CheckMachine.start` to failure.
    """

    ta: float = 0.05
    rto: float = 0.1
    max_tries: int = 5
    rm: int = 8
    max_checks_per_pair: int = 15
    max_checks: int = 150
    deadline: float = 10.0

    @classmethod
    def with_deadline(cls, deadline: float, ta: float | None = None) -> CheckConfig:
        """
        The defaults with another *deadline* (and *ta*, if given); beyond the default
        deadline, the budgets grow in proportion (1.5 requests per pair and
        15 in all per second), so that a long deadline on a lossy path is
        not cut short by budgets sized for 10 seconds.
        """
        default = cls()
        scale = max(deadline / default.deadline, 1.0)
        return cls(
            ta=default.ta if ta is None else ta,
            deadline=deadline,
            max_checks_per_pair=math.ceil(default.max_checks_per_pair * scale),
            max_checks=math.ceil(default.max_checks * scale),
        )

    def __post_init__(self) -> None:
        if self.ta <= 0 or self.rto <= 0 or self.deadline <= 0:
            raise ValueError("ta, rto and deadline must be positive")
        if min(self.max_tries, self.rm, self.max_checks_per_pair, self.max_checks) < 1:
            raise ValueError("max_tries, rm and the check budgets must be at least 1")


class PairState(enum.Enum):
    """RFC 8445 section 6.1.2.6 pair states (Frozen is not used)."""

    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(slots=True)
class CheckStats:
    """
    Counters of one machine.

    :ivar requests_sent: Check requests sent, retransmissions included.
    :ivar retransmissions: Of those, retransmissions.
    :ivar responses_sent: Success responses sent.
    :ivar requests_received: Authenticated requests received.
    :ivar responses_received: Authenticated responses that ended a check.
    :ivar timeouts: Checks that got no authenticated answer.
    :ivar malformed: Datagrams that were not STUN, or not decodable.
    :ivar integrity_failures: Requests or responses with a wrong or missing
        USERNAME, MESSAGE-INTEGRITY or FINGERPRINT.
    :ivar unexpected: Authenticated-looking packets that fit no check: an
        unknown transaction, a response from another address than the
        request went to, the wrong role, an error response.
    :ivar peer_reflexive: Peer-reflexive remote candidates learned.
    :ivar probes_sent: Single-shot probes sent (:meth:`CheckMachine.spray`).
    :ivar probes_answered: Probes answered with authentication.
    """

    requests_sent: int = 0
    retransmissions: int = 0
    responses_sent: int = 0
    requests_received: int = 0
    responses_received: int = 0
    timeouts: int = 0
    malformed: int = 0
    integrity_failures: int = 0
    unexpected: int = 0
    peer_reflexive: int = 0
    probes_sent: int = 0
    probes_answered: int = 0


@dataclass(slots=True)
class _Pair:
    pair: CandidatePair
    state: PairState = PairState.WAITING
    sent: int = 0
    received: bool = False
    nominate_on_success: bool = False
    mapped: Endpoint | None = None
    last_result: str = "not checked"
    rtt: float | None = None


@dataclass(slots=True)
class _Transaction:
    pair: _Pair
    data: bytes
    use_candidate: bool
    tries: int = 1
    sent_at: float = 0.0
    next_time: float = 0.0
    interval: float = 0.0
    final: bool = False
    #: Replaced by a new check on its pair: never resent, forgotten at its
    #: timeout without failing the pair; an answer to it still counts.
    superseded: bool = False
    #: Sent in place of a superseded check: not replaced again.
    renewal: bool = False


class CheckMachine:
    """
    One side's connectivity checks.

    :param controlling: The caller's side is controlling and nominates.
    :param credentials: Ufrags and keys (:meth:`IceCredentials.from_secret`).
    :param local: Our candidates: the punching socket's host address first,
        and our server-reflexive address.
    :param remote: The peer's candidates, as the introduction gave them.
    :param config: Pacing and budget.
    :param random_bytes: Source of transaction ids and the tie-breaker.
    """

    def __init__(
        self,
        *,
        controlling: bool,
        credentials: IceCredentials,
        local: Sequence[Candidate],
        remote: Sequence[Candidate],
        config: CheckConfig | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.controlling = controlling
        self.credentials = credentials
        self.config = CheckConfig() if config is None else config
        self.local = list(local)
        self.remote = list(remote)
        self.stats = CheckStats()
        self.nominated: CandidatePair | None = None
        self.selected: CandidatePair | None = None
        self.failure: PunchChecksFailed | None = None
        self._random = random_bytes
        self._tie_breaker = int.from_bytes(random_bytes(8), "big")
        self._pairs: dict[Endpoint, _Pair] = {
            p.remote.address: _Pair(p) for p in form_pairs(local, remote, controlling=controlling)
        }
        self._order: list[_Pair] = list(self._pairs.values())
        predicted = sum(1 for p in self._order if p.pair.pair_class is PairClass.PREDICTED)
        #: Requests sent in total at most: the configured budget, and each
        #: predicted pair's full retransmission series on top.
        self.max_checks = self.config.max_checks + predicted * self.config.max_tries
        self._transactions: dict[bytes, _Transaction] = {}
        self._outgoing: list[tuple[bytes, Endpoint]] = []
        self._nominating: _Pair | None = None
        self._started: float | None = None
        self._next_pace = 0.0
        self._mapped: set[Endpoint] = set()
        self._spray: ProbeSchedule | None = None
        self._sprayed: ProbeSchedule | None = None
        self._probes: dict[bytes, tuple[Endpoint, float]] = {}
        #: Until when an answer to the last probe is awaited (no budget failure before).
        self._probes_until = 0.0

    # -- public surface -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether a pair was nominated or the machine failed."""
        return self.nominated is not None or self.failure is not None

    @property
    def pairs(self) -> list[CandidatePair]:
        """The pairs in check order, peer-reflexive ones appended as learned."""
        return [p.pair for p in self._order]

    def pair_state(self, remote: tuple[str, int]) -> PairState:
        """The state of the pair to *remote*."""
        return self._pairs[Endpoint(remote[0], remote[1])].state

    def expects(self, transaction_id: bytes) -> bool:
        """Whether a response with *transaction_id* would answer one of our checks or probes."""
        return transaction_id in self._transactions or transaction_id in self._probes

    @property
    def heard_anything(self) -> bool:
        """Whether any authenticated check or answer came from the peer."""
        return any(p.received or p.state is PairState.SUCCEEDED for p in self._order)

    @property
    def spraying(self) -> bool:
        """Whether a spray has probes left to send."""
        return self._spray is not None

    def spray(self, schedule: ProbeSchedule, now: float) -> None:
        """
        Send a probe to each address *schedule* yields, when due, until an
        authenticated packet comes from the peer, :meth:`stop_spray`, or the
        end (see the module docstring).
        """
        if self._started is None or self.done:
            return
        self._spray = self._sprayed = schedule
        self.handle_timer(now)

    def stop_spray(self) -> None:
        """Send no more probes (answers to those sent still count)."""
        self._spray = None

    def rtt_to(self, remote: tuple[str, int]) -> float | None:
        """The round trip a check to *remote* took (sent once and answered), if measured."""
        pair = self._pairs.get(Endpoint(remote[0], remote[1]))
        return None if pair is None else pair.rtt

    def heard_from(self, source: tuple[str, int]) -> bool:
        """Whether an authenticated check from the peer arrived from *source*."""
        pair = self._pairs.get(Endpoint(source[0], source[1]))
        return pair is not None and pair.received

    def start(self, now: float) -> None:
        """Start checking at *now*: the first check goes out at once."""
        if self._started is not None:
            raise RuntimeError("the check machine was already started")
        self._started = now
        self._next_pace = now
        for pair in self._order:
            # All at once, before any other check: each probe may open a
            # new mapping on a sequential NAT of ours, in the order the
            # peer predicts (nattraverse.punch.mapping).
            if pair.pair.pair_class is PairClass.PREDICTED:
                self._check(pair, now, use_candidate=False)
        self.handle_timer(now)

    def take_datagrams(self) -> list[tuple[bytes, Endpoint]]:
        """The datagrams to send, oldest first; the list is emptied."""
        out, self._outgoing = self._outgoing, []
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` should next run, or ``None`` when done."""
        if self.done or self._started is None:
            return None
        times = [self._started + self.config.deadline]
        times.extend(t.next_time for t in self._transactions.values())
        if self._has_work():
            times.append(self._next_pace)
        if self._spray is not None:
            due = self._spray.next_time()
            if due is not None:
                times.append(due)
        elif self._probes_until:
            times.append(self._probes_until)
        return min(times)

    def handle_timer(self, now: float) -> None:
        """Retransmit, time out, pace new checks and check the deadline."""
        if self.done or self._started is None:
            return
        for txid, transaction in list(self._transactions.items()):
            if transaction.next_time <= now and txid in self._transactions:
                self._transaction_due(txid, transaction, now)
        if now >= self._next_pace and self._send_next(now):
            self._next_pace = now + self.config.ta
        self._send_probes(now)
        if self._probes_until and now >= self._probes_until and self._spray is None:
            self._probes_until = 0.0
        self._check_end(now)

    def datagram_received(self, data: bytes, source: tuple[str, int], now: float) -> bool:
        """
        Offer a datagram from the punching socket.

        :returns: Whether it was a STUN request or response, taken by the
            machine (authenticated or counted and dropped); ``False`` for
            anything else.  Never raises.
        """
        if not is_stun(data):
            return False
        endpoint = Endpoint(source[0], source[1])
        try:
            message = decode(data)
        except StunDecodeError:
            self.stats.malformed += 1
            return True
        if message.method != Method.BINDING:
            self.stats.unexpected += 1
        elif message.message_class is MessageClass.REQUEST:
            self._request(message, endpoint, now)
        elif message.message_class in (MessageClass.SUCCESS, MessageClass.ERROR):
            if self.done:
                return True  # late answers change nothing
            self._response(message, endpoint, now)
        else:
            self.stats.unexpected += 1
        self._check_end(now)
        return True

    # -- sending --------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return any(p.state is PairState.WAITING and self._can_send(p) for p in self._order)

    def _can_send(self, pair: _Pair, *, nomination: bool = False) -> bool:
        # A nomination is bound by the total budget only: a pair that spent
        # its own on checks lost on the way is the one that works.
        if self.stats.requests_sent >= self.max_checks:
            return False
        return nomination or pair.sent < self.config.max_checks_per_pair

    def _send_next(self, now: float) -> bool:
        for pair in self._order:
            if pair.state is PairState.WAITING and self._can_send(pair):
                self._check(pair, now, use_candidate=False)
                return True
        return False

    def _check_in_flight(self, pair: _Pair) -> _Transaction | None:
        for transaction in self._transactions.values():
            live = not (transaction.use_candidate or transaction.superseded)
            if transaction.pair is pair and live:
                return transaction
        return None

    def _send_probes(self, now: float) -> None:
        spray = self._spray
        if spray is None:
            return
        if self.heard_anything:
            self._spray = None  # the peer got through: checks take over
            return
        for address in spray.take(now):
            txid = self._random(12)
            self._probes[txid] = (address, now)
            self.stats.probes_sent += 1
            self._outgoing.append(
                (
                    encode_check(
                        self.credentials,
                        txid,
                        controlling=self.controlling,
                        tie_breaker=self._tie_breaker,
                    ),
                    address,
                )
            )
            self._probes_until = now + self.config.rm * self.config.rto
        if spray.next_time() is None:
            self._spray = None

    def _check(self, pair: _Pair, now: float, *, use_candidate: bool) -> _Transaction:
        txid = self._random(12)
        data = encode_check(
            self.credentials,
            txid,
            controlling=self.controlling,
            tie_breaker=self._tie_breaker,
            use_candidate=use_candidate,
        )
        transaction = _Transaction(pair, data, use_candidate, sent_at=now, interval=self.config.rto)
        self._transactions[txid] = transaction
        if not use_candidate:
            pair.state = PairState.IN_PROGRESS
        self._send_request(pair, data)
        self._schedule(transaction, now)
        return transaction

    def _send_request(self, pair: _Pair, data: bytes) -> None:
        pair.sent += 1
        self.stats.requests_sent += 1
        self._outgoing.append((data, pair.pair.remote.address))

    def _schedule(self, transaction: _Transaction, now: float) -> None:
        if transaction.tries >= self.config.max_tries or not self._can_send(
            transaction.pair, nomination=transaction.use_candidate
        ):
            transaction.final = True
            transaction.next_time = now + self.config.rm * self.config.rto
        else:
            transaction.next_time = now + transaction.interval

    def _transaction_due(self, txid: bytes, transaction: _Transaction, now: float) -> None:
        pair = transaction.pair
        if transaction.superseded:
            del self._transactions[txid]  # its answer did not come
            return
        if transaction.final:
            del self._transactions[txid]
            self.stats.timeouts += 1
            pair.last_result = "timed out"
            if transaction.use_candidate:
                self._nominating = None
                self._maybe_nominate(now)
            elif pair.state is PairState.IN_PROGRESS:
                # Checked again later while its budget lasts: the peer's
                # NAT may have opened meanwhile.
                pair.state = PairState.WAITING if self._can_send(pair) else PairState.FAILED
            return
        if not self._can_send(pair, nomination=transaction.use_candidate):
            self._schedule(transaction, now)
            return
        transaction.tries += 1
        transaction.interval *= 2
        self.stats.retransmissions += 1
        self._send_request(pair, transaction.data)
        self._schedule(transaction, now)

    # -- receiving ------------------------------------------------------------------------

    def _request(self, message: Message, source: Endpoint, now: float) -> None:
        credentials = self.credentials
        fault = request_fault(message, credentials, controlling=self.controlling)
        if fault == "integrity":
            self.stats.integrity_failures += 1
            return
        if fault == "role":
            self.stats.unexpected += 1
            return
        self.stats.requests_received += 1
        self._outgoing.append(
            (
                encode(
                    Method.BINDING,
                    MessageClass.SUCCESS,
                    message.transaction_id,
                    [XorMappedAddress(source)],
                    integrity_key=credentials.local_key,
                    fingerprint=True,
                ),
                source,
            )
        )
        self.stats.responses_sent += 1
        pair = self._pairs.get(source)
        if pair is None:
            priority = message.get(Priority)
            pair = self._learn(source, priority.priority if priority else 0)
        pair.received = True
        if self.done:
            return  # answered (the peer may have lost our last answer); nothing changes
        if not self.controlling and message.get(UseCandidate) is not None:
            if pair.state is PairState.SUCCEEDED:
                self.nominated = pair.pair
                return
            pair.nominate_on_success = True
        if pair.state is not PairState.SUCCEEDED:
            # A triggered check (RFC 8445 section 7.3.1.4): the peer's
            # packet just opened our NAT towards it, and its NAT towards us.
            in_flight = self._check_in_flight(pair)
            renewing = (
                in_flight is not None
                and in_flight.tries == 1
                and not in_flight.renewal
                and self._can_send(pair)
            )
            if in_flight is not None and renewing:
                # Our check may have been dropped by the NAT the peer had not
                # opened yet: check anew now rather than at its retransmission
                # timeout.  As RFC 8445 cancels it, the old one is not resent,
                # but an answer to it still counts.
                in_flight.superseded = True
                in_flight.next_time = max(
                    in_flight.next_time, in_flight.sent_at + self.config.rm * self.config.rto
                )
                in_flight = None
            if in_flight is None and self._can_send(pair):
                self._check(pair, now, use_candidate=False).renewal = renewing
        else:
            self._maybe_nominate(now)

    def _learn(self, source: Endpoint, priority: int) -> _Pair:
        candidate = Candidate(CandidateKind.PEER_REFLEXIVE, source, priority)
        self.remote.append(candidate)
        self.stats.peer_reflexive += 1
        base = self._order[0].pair.local if self._order else self.local[0]
        made = make_pair(
            base,
            candidate,
            controlling=self.controlling,
            local=self.local,
            remote_candidates=self.remote,
        )
        pair = _Pair(made, state=PairState.FAILED)
        pair.last_result = "learned from the peer's check"
        self._pairs[source] = pair
        self._order.append(pair)
        return pair

    def _probe_answered(self, message: Message, source: Endpoint, now: float) -> None:
        address, sent_at = self._probes[message.transaction_id]
        if not response_authentic(message, self.credentials):
            self.stats.integrity_failures += 1
            return
        if source != address or message.message_class is not MessageClass.SUCCESS:
            self.stats.unexpected += 1
            return
        del self._probes[message.transaction_id]
        self.stats.probes_answered += 1
        self._spray = None
        pair = self._pairs.get(source)
        if pair is None:
            pair = self._learn(source, 0)
        pair.last_result = "probe answered"
        pair.rtt = now - sent_at
        mapped = message.get(XorMappedAddress)
        if mapped is not None:
            pair.mapped = Endpoint(mapped.address[0], mapped.address[1])
        if pair.state is not PairState.SUCCEEDED:
            for txid, other in list(self._transactions.items()):
                if other.pair is pair and not other.use_candidate:
                    del self._transactions[txid]
            pair.state = PairState.SUCCEEDED
        if pair.nominate_on_success:
            self.nominated = pair.pair
            return
        self._maybe_nominate(now)

    def _response(self, message: Message, source: Endpoint, now: float) -> None:
        if message.transaction_id in self._probes:
            self._probe_answered(message, source, now)
            return
        transaction = self._transactions.get(message.transaction_id)
        if transaction is None:
            self.stats.unexpected += 1
            return
        pair = transaction.pair
        if not response_authentic(message, self.credentials):
            self.stats.integrity_failures += 1
            return
        if source != pair.pair.remote.address:
            # Not symmetric (RFC 8445 section 7.2.5.2.1): do not trust it.
            self.stats.unexpected += 1
            return
        del self._transactions[message.transaction_id]
        if message.message_class is MessageClass.ERROR:
            self.stats.unexpected += 1
            pair.last_result = "error response"
            if not transaction.use_candidate and pair.state is PairState.IN_PROGRESS:
                pair.state = PairState.FAILED
            return
        self.stats.responses_received += 1
        if transaction.tries == 1:
            # Karn's rule: only an answer to a check sent once times the path.
            pair.rtt = now - transaction.sent_at
        mapped = message.get(XorMappedAddress)
        if mapped is not None:
            pair.mapped = Endpoint(mapped.address[0], mapped.address[1])
            self._mapped.add(pair.mapped)
        pair.state = PairState.SUCCEEDED
        for txid, other in list(self._transactions.items()):
            if other.pair is pair and not other.use_candidate:
                del self._transactions[txid]  # the other copy of a superseded check
        pair.last_result = "answered"
        if transaction.use_candidate:
            self.nominated = pair.pair
            return
        if pair.nominate_on_success:
            self.nominated = pair.pair
            return
        self._maybe_nominate(now)

    def _maybe_nominate(self, now: float) -> None:
        if not self.controlling or self._nominating is not None or self.done:
            return
        for pair in self._order:
            if pair.state is PairState.SUCCEEDED and pair.received:
                # Validated both ways: the secure path may start on it even
                # when no budget is left to nominate it.
                if self.selected is None:
                    self.selected = pair.pair
                if self._can_send(pair, nomination=True):
                    self._nominating = pair
                    self._check(pair, now, use_candidate=True)
                return

    # -- ending ---------------------------------------------------------------------------

    def _check_end(self, now: float) -> None:
        if self.done or self._started is None:
            return
        if now >= self._started + self.config.deadline:
            self._fail("deadline")
        elif (
            not self._transactions
            and not self._has_work()
            and self._spray is None
            and not self._probes_until
            and not any(p.state is PairState.SUCCEEDED for p in self._order)
        ):
            # A succeeded pair still waits for the peer (its check, or its
            # nomination) until the deadline.
            self._fail("budget")

    def _fail(self, reason: str) -> None:
        self._transactions.clear()
        self.failure = PunchChecksFailed(reason, self.describe(), self.stats)

    def describe(self) -> str:
        """What the checks saw so far, in words (for logs and errors)."""
        listed = [p for p in self._order if p.pair.pair_class is not PairClass.PREDICTED]
        predicted = [p for p in self._order if p.pair.pair_class is PairClass.PREDICTED]
        parts = [
            f"{len(listed)} pairs: "
            + ", ".join(f"{p.pair.remote} {p.state.value} ({p.last_result})" for p in listed)
        ]
        if predicted:
            answered = [p for p in predicted if p.state is PairState.SUCCEEDED or p.received]
            parts.append(
                f"{len(predicted)} predicted pairs ({predicted[0].pair.remote.address} "
                f"to {predicted[-1].pair.remote.address}): "
                + (
                    ", ".join(f"{p.pair.remote.address} {p.state.value}" for p in answered)
                    if answered
                    else "none answered"
                )
            )
        if self.stats.probes_sent:
            described = self._sprayed.describe() if self._sprayed is not None else ""
            parts.append(
                f"birthday probing: {self.stats.probes_sent} probes sent"
                + (f" ({described})" if described else "")
                + f", {self.stats.probes_answered} answered"
            )
        srflx = {c.address for c in self.remote if c.kind is CandidateKind.SERVER_REFLEXIVE}
        heard = [p.pair.remote.address for p in self._order if p.received]
        if not heard:
            parts.append(
                "no authenticated check from the peer arrived: a NAT on the way filters "
                "(port-restricted or symmetric), or the peer never started"
            )
        elif any(a not in srflx and a.host in {s.host for s in srflx} for a in heard):
            parts.append(
                "the peer's checks came from another port than its server-reflexive "
                "address: its NAT maps per destination (symmetric)"
            )
        parts.append(
            f"{self.stats.requests_sent} requests sent, {self.stats.timeouts} timed out, "
            f"{self.stats.integrity_failures} failed integrity, {self.stats.malformed} malformed"
        )
        return "; ".join(parts)
