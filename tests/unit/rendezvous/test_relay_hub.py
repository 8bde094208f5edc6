"""
Tests for nattraverse.rendezvous.relay (tokens, pairing, caps, lifetime) and
the generic engine of nattraverse.rendezvous.splice, with a task.Clock and
in-memory transports: no sockets, no sleeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse.errors import LimitExceeded, RelayRefused
from nattraverse.identity import PeerId
from nattraverse.rendezvous.commands import TOKEN_SIZE, RelayJoin
from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.splice import (
    DISCARD_GRACE,
    StreamSplice,
    TokenBucket,
    can_zero_copy,
    make_engine,
)

CALLER = PeerId(b"\x01" * 32)
CALLEE = PeerId(b"\x02" * 32)
STRANGER = PeerId(b"\x03" * 32)
SESSION = b"S" * 16


def counting_random() -> Callable[[int], bytes]:
    """A random source that never repeats: 1, 2, 3... as big-endian bytes."""
    counter = itertools.count(1)
    return lambda size: next(counter).to_bytes(size, "big")


class Transport(StringTransport):
    """A StringTransport that can half-close and says whether it was aborted."""

    def __init__(self) -> None:
        StringTransport.__init__(self)
        self.write_closed = False
        self._aborted = False

    def aborted(self) -> bool:
        return self._aborted

    def value(self) -> bytes:
        return bytes(StringTransport.value(self))

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self._aborted = True
        StringTransport.abortConnection(self)

    def registered(self) -> Any:
        """The producer registered on this transport."""
        assert self.producer is not None
        return self.producer


def make_hub(clock: Clock, **limits: Any) -> RelayHub:
    return RelayHub(clock, RelayLimits(**limits), random=counting_random())


def connect(protocol: Protocol) -> Transport:
    """Give *protocol* a fresh transport, as AMP's switch does."""
    transport = Transport()
    protocol.makeConnection(transport)
    return transport


def lose(protocol: Protocol, why: type[Exception] = ConnectionDone) -> None:
    protocol.connectionLost(Failure(why()))


def joined(hub: RelayHub, session: bytes = SESSION) -> tuple[list[Protocol], list[Transport]]:
    """Allocate a relay and join both peers; their protocols and transports."""
    caller_token, callee_token = hub.allocate(session, CALLER, CALLEE)
    protocols = [hub.join(caller_token, CALLER), hub.join(callee_token, CALLEE)]
    return protocols, [connect(protocol) for protocol in protocols]


@contextmanager
def captured_logs() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


# -- tokens -------------------------------------------------------------------


def test_allocate_gives_two_distinct_tokens_from_the_random_source() -> None:
    """Each relay gets a caller's and a callee's token, 32 bytes each, from the injected source."""
    hub = make_hub(Clock())
    caller_token, callee_token = hub.allocate(SESSION, CALLER, CALLEE)
    assert caller_token == (1).to_bytes(TOKEN_SIZE, "big")
    assert callee_token == (2).to_bytes(TOKEN_SIZE, "big")
    assert hub.pending == 1


def test_a_token_joins_only_once() -> None:
    """A spent token is refused."""
    hub = make_hub(Clock())
    caller_token, _ = hub.allocate(SESSION, CALLER, CALLEE)
    hub.join(caller_token, CALLER)
    with pytest.raises(RelayRefused, match="unknown, expired or already used"):
        hub.join(caller_token, CALLER)


def test_a_token_is_only_for_its_own_peer() -> None:
    """Another peer cannot use a token, and its attempt does not spend it."""
    hub = make_hub(Clock())
    caller_token, callee_token = hub.allocate(SESSION, CALLER, CALLEE)
    with pytest.raises(RelayRefused, match="another peer"):
        hub.join(caller_token, STRANGER)
    with pytest.raises(RelayRefused, match="another peer"):
        hub.join(caller_token, CALLEE)
    hub.join(caller_token, CALLER)
    hub.join(callee_token, CALLEE)


def test_an_unknown_token_is_refused() -> None:
    """A token the hub never issued is refused."""
    hub = make_hub(Clock())
    with pytest.raises(RelayRefused):
        hub.join(b"\x00" * TOKEN_SIZE, CALLER)


def test_tokens_expire_after_the_join_timeout() -> None:
    """Tokens are void once the join timeout has passed."""
    clock = Clock()
    hub = make_hub(clock, join_timeout=15.0)
    caller_token, _ = hub.allocate(SESSION, CALLER, CALLEE)
    clock.advance(15.0)
    with pytest.raises(RelayRefused):
        hub.join(caller_token, CALLER)
    assert hub.pending == 0
    assert clock.getDelayedCalls() == []


def test_a_session_gets_one_relay() -> None:
    """A second relay for the same session is refused."""
    hub = make_hub(Clock())
    hub.allocate(SESSION, CALLER, CALLEE)
    with pytest.raises(RelayRefused, match="already has a relay"):
        hub.allocate(SESSION, CALLER, CALLEE)


# -- caps and life cycle ----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_relays", -1), ("rate", -1.0), ("lifetime", 0.0), ("join_timeout", -5.0)],
)
def test_limits_out_of_range_are_refused(field: str, value: float) -> None:
    """A limit out of its range raises ValueError naming it."""
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        RelayLimits(**kwargs)


def test_the_cap_counts_waiting_and_running_relays() -> None:
    """max_relays counts relays waiting for their peers and relays running."""
    hub = make_hub(Clock(), max_relays=2)
    joined(hub, b"a" * 16)
    hub.allocate(b"b" * 16, CALLER, CALLEE)
    assert (hub.active, hub.pending) == (1, 1)
    with pytest.raises(LimitExceeded, match="2 relays at once"):
        hub.allocate(b"c" * 16, CALLER, CALLEE)


def test_a_relay_that_ends_frees_its_slot() -> None:
    """Once both connections of a relay are closed, another relay may be allocated."""
    hub = make_hub(Clock(), max_relays=1)
    protocols, _ = joined(hub)
    lose(protocols[0])
    lose(protocols[1])
    assert hub.active == 0
    hub.allocate(b"b" * 16, CALLER, CALLEE)


def test_a_lone_joiner_is_closed_at_the_join_timeout() -> None:
    """A peer whose partner does not join in time is disconnected and its relay freed."""
    clock = Clock()
    hub = make_hub(clock, join_timeout=15.0)
    caller_token, callee_token = hub.allocate(SESSION, CALLER, CALLEE)
    clock.advance(5.0)
    transport = connect(hub.join(caller_token, CALLER))
    clock.advance(9.9)
    assert not transport.aborted()
    clock.advance(0.1)
    assert transport.aborted()
    assert hub.pending == 0
    with pytest.raises(RelayRefused):
        hub.join(callee_token, CALLEE)
    assert clock.getDelayedCalls() == []


def test_a_joiner_that_leaves_ends_the_waiting_relay() -> None:
    """When the first joiner's connection drops, the relay and its other token are gone."""
    clock = Clock()
    hub = make_hub(clock)
    caller_token, callee_token = hub.allocate(SESSION, CALLER, CALLEE)
    protocol = hub.join(caller_token, CALLER)
    connect(protocol)
    lose(protocol)
    assert hub.pending == 0
    with pytest.raises(RelayRefused):
        hub.join(callee_token, CALLEE)
    assert clock.getDelayedCalls() == []


def test_the_lifetime_closes_a_running_relay() -> None:
    """A relay is aborted when its lifetime, counted from the second join, is over."""
    clock = Clock()
    hub = make_hub(clock, lifetime=60.0)
    clock.advance(3.0)
    _, transports = joined(hub)
    clock.advance(59.9)
    assert not any(t.aborted() for t in transports)
    clock.advance(0.1)
    assert all(t.aborted() for t in transports)
    assert hub.active == 0
    assert clock.getDelayedCalls() == []


def test_close_aborts_every_relay_and_cancels_every_timer() -> None:
    """close() aborts running and waiting relays and leaves no DelayedCall."""
    clock = Clock()
    hub = make_hub(clock)
    _, running = joined(hub, b"a" * 16)
    token, _ = hub.allocate(b"b" * 16, CALLER, CALLEE)
    waiting = connect(hub.join(token, CALLER))
    hub.close()
    assert all(t.aborted() for t in [*running, waiting])
    assert (hub.active, hub.pending) == (0, 0)
    assert clock.getDelayedCalls() == []


def test_start_and_end_are_logged_with_bytes_each_way() -> None:
    """The relay logs its start and its end, with bytes each way and duration, as fields."""
    clock = Clock()
    hub = make_hub(clock)
    with captured_logs() as events:
        protocols, _ = joined(hub)
        protocols[0].dataReceived(b"12345")
        protocols[1].dataReceived(b"12")
        clock.advance(2.5)
        lose(protocols[0])
        lose(protocols[1])
    started = [e for e in events if e.get("engine") == "stream"]
    ended = [e for e in events if "caller_to_callee" in e]
    assert started[0]["caller"] == str(CALLER)
    assert started[0]["callee"] == str(CALLEE)
    assert (ended[0]["caller_to_callee"], ended[0]["callee_to_caller"]) == (5, 2)
    assert ended[0]["duration"] == 2.5
    assert ended[0]["session"] == SESSION.hex()
    assert hub.bytes_relayed == 7


# -- holding back, order, flow control (generic engine) ---------------------------


def test_the_first_joiner_is_not_read_until_its_partner_joins() -> None:
    """The first joiner's transport is paused while it waits, and resumed at the start."""
    hub = make_hub(Clock())
    caller_token, callee_token = hub.allocate(SESSION, CALLER, CALLEE)
    first = connect(hub.join(caller_token, CALLER))
    assert first.producerState == "paused"
    second = connect(hub.join(callee_token, CALLEE))
    assert first.producerState == second.producerState == "producing"


def test_early_bytes_go_out_first_and_in_order() -> None:
    """Bytes received before the partner joined are delivered before later ones, in order."""
    hub = make_hub(Clock())
    caller_token, callee_token = hub.allocate(SESSION, CALLER, CALLEE)
    caller = hub.join(caller_token, CALLER)
    caller_transport = connect(caller)
    caller.dataReceived(b"early ")
    caller.dataReceived(b"bytes ")
    callee = hub.join(callee_token, CALLEE)
    callee_transport = connect(callee)
    callee.dataReceived(b"back")
    caller.dataReceived(b"later")
    assert callee_transport.value() == b"early bytes later"
    assert caller_transport.value() == b"back"


def test_bytes_flow_both_ways_in_order() -> None:
    """Every chunk each side sends reaches the other side, in order."""
    hub = make_hub(Clock())
    protocols, transports = joined(hub)
    for index in range(50):
        protocols[0].dataReceived(b"a%d," % index)
        protocols[1].dataReceived(b"b%d," % index)
    assert transports[1].value() == b"".join(b"a%d," % i for i in range(50))
    assert transports[0].value() == b"".join(b"b%d," % i for i in range(50))


def test_a_full_consumer_pauses_the_other_side() -> None:
    """When one transport's buffer is full, the other side is not read until it drains."""
    hub = make_hub(Clock())
    _, transports = joined(hub)
    transports[1].registered().pauseProducing()
    assert transports[0].producerState == "paused"
    assert transports[1].producerState == "producing"
    transports[1].registered().resumeProducing()
    assert transports[0].producerState == "producing"


def test_a_half_close_closes_the_other_sides_sending_half() -> None:
    """A half-close is passed on as a half-close; the other direction keeps flowing."""
    hub = make_hub(Clock())
    protocols, transports = joined(hub)
    protocols[0].dataReceived(b"question")
    protocols[0].readConnectionLost()  # type: ignore[attr-defined]
    assert transports[1].write_closed
    assert not transports[1].disconnecting
    protocols[1].dataReceived(b"answer")
    assert transports[0].value() == b"answer"
    assert transports[1].value() == b"question"


def test_when_both_halves_are_closed_both_connections_close() -> None:
    """After a half-close each way, both connections are closed."""
    hub = make_hub(Clock())
    protocols, transports = joined(hub)
    protocols[0].readConnectionLost()  # type: ignore[attr-defined]
    protocols[1].readConnectionLost()  # type: ignore[attr-defined]
    assert transports[0].disconnecting
    assert transports[1].disconnecting
    assert not transports[0].aborted()


def test_a_close_is_passed_on_after_the_bytes_before_it() -> None:
    """A side that writes then closes: its bytes are written, then the other side closes."""
    clock = Clock()
    hub = make_hub(clock)
    protocols, transports = joined(hub)
    protocols[0].dataReceived(b"last words")
    lose(protocols[0])
    assert transports[1].value() == b"last words"
    assert transports[1].write_closed
    assert transports[1].producer is None
    lose(protocols[1])
    assert hub.active == 0
    assert clock.getDelayedCalls() == []


def test_a_side_left_alone_is_heard_out_then_aborted() -> None:
    """After one side left, what the other sends is dropped; it is aborted after the grace."""
    clock = Clock()
    hub = make_hub(clock)
    protocols, transports = joined(hub)
    lose(protocols[0], ConnectionLost)
    protocols[1].dataReceived(b"into the void")
    assert transports[0].value() == b""
    assert transports[1].producerState == "producing"
    clock.advance(DISCARD_GRACE)
    assert transports[1].aborted()
    lose(protocols[1])
    assert hub.active == 0
    assert clock.getDelayedCalls() == []


def test_the_rate_cap_limits_bytes_per_clock_second() -> None:
    """At 10 kB/s a side that sends as fast as it may gets 10 kB per second (plus the burst)."""
    clock = Clock()
    hub = make_hub(clock, rate=10_000)
    protocols, transports = joined(hub)
    for _ in range(500):  # 5 s of Clock time in 10 ms steps, 1 kB per step when not paused
        if transports[0].producerState == "producing":
            protocols[0].dataReceived(b"x" * 1000)
        clock.advance(0.01)
    delivered = len(transports[1].value())
    assert 50_000 <= delivered <= 50_000 + 5_000 + 1000  # rate x time + burst + one chunk
    lose(protocols[0])
    lose(protocols[1])
    assert clock.getDelayedCalls() == []


def test_no_rate_cap_when_rate_is_zero() -> None:
    """With rate 0, nothing is ever paused for the rate."""
    clock = Clock()
    hub = make_hub(clock, rate=0)
    protocols, transports = joined(hub)
    protocols[0].dataReceived(b"x" * 10_000_000)
    assert transports[0].producerState == "producing"
    assert len(clock.getDelayedCalls()) == 1  # the lifetime, no rate timer


# -- the AMP protocol switch --------------------------------------------------------


class JoinLocator(amp.CommandLocator):
    def __init__(self, hub: RelayHub, peer: PeerId) -> None:
        self.hub = hub
        self.peer = peer

    @RelayJoin.responder
    def relay_join(self, token: bytes) -> Protocol:
        return self.hub.join(token, self.peer)


def amp_join(hub: RelayHub, token: bytes, peer: PeerId, extra: bytes = b"") -> Transport:
    """An AMP server connection that receives RelayJoin with *token*, then *extra*."""
    server = amp.AMP(locator=JoinLocator(hub, peer))
    transport = Transport()
    server.makeConnection(transport)
    box = amp.AmpBox({b"_ask": b"1", b"_command": b"RelayJoin", b"token": token})
    server.dataReceived(box.serialize() + extra)
    return transport


def test_bytes_behind_relay_join_are_relayed_not_parsed() -> None:
    """Bytes that arrive right behind RelayJoin go to the partner, after AMP's answer."""
    hub = make_hub(Clock())
    caller_token, callee_token = hub.allocate(SESSION, CALLER, CALLEE)
    caller = amp_join(hub, caller_token, CALLER, extra=b"\x00\x05hello, not AMP")
    answer = amp.AmpBox({b"_answer": b"1"}).serialize()
    assert caller.value() == answer
    assert caller.producerState == "paused"
    callee = amp_join(hub, callee_token, CALLEE)
    assert callee.value() == answer + b"\x00\x05hello, not AMP"


def test_an_amp_join_with_a_bad_token_gets_relay_refused() -> None:
    """RelayJoin with an unknown token is answered with the RELAY_REFUSED error."""
    hub = make_hub(Clock())
    transport = amp_join(hub, b"\x00" * TOKEN_SIZE, CALLER)
    assert b"RELAY_REFUSED" in transport.value()


# -- engines -----------------------------------------------------------------


def test_the_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    """A token bucket refills at its rate, never beyond its burst."""
    bucket = TokenBucket(rate=100.0, burst=50.0, now=0.0)
    bucket.take(80, 0.0)
    assert bucket.allowance(0.0) == 0
    assert bucket.wait(0.0) == pytest.approx((50 + 30) / 100)
    assert bucket.allowance(0.5) == 20
    assert bucket.allowance(100.0) == 50


def test_no_bucket_without_a_rate() -> None:
    """Rate 0 means no bucket at all."""
    assert TokenBucket.for_rate(0, 0.0) is None


def test_transports_without_sockets_use_the_generic_engine() -> None:
    """Test transports (and a reactor without file descriptors) get the generic engine."""
    transports = [StringTransport(), StringTransport()]
    assert not can_zero_copy(Clock(), transports)
    assert isinstance(make_engine(Clock(), transports, [b"", b""], 0), StreamSplice)
