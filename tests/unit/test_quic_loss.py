"""
Unit tests of how :mod:`nattraverse.quic` ends a connection under heavy
loss: two QuicPaths over an in-memory datagram pipe with a fake clock that
jumps from one timer to the next, so that minutes of a lossy path take
milliseconds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from nattraverse.errors import QuicPathClosed
from nattraverse.identity import Identity
from nattraverse.quic import CLOSE_LINGER, QuicPath, QuicStreamTransport
from tests.unit.test_quic_path import HalfCloser, Recorder

CALLER = ("10.0.0.1", 40001)
CALLEE = ("10.0.0.2", 40002)
#: One-way delay: a LAN's, as between the lab's namespaces.
LATENCY = 0.0002
#: Datagrams lost each way in the lossy lab test: 20% on each of four links.
LAB_LOSS = 1 - 0.8**4
#: Seeds of the lossy close test.  Without the closing side's answers and
#: the clean end of a stream closed both ways, 20 of these 40 ended with one
#: side's QuicPathIdle, 25 s after the other had closed cleanly.
SEEDS = range(40)


@pytest.fixture(scope="module")
def identities() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


class JumpClock(Clock):
    """
    A clock that fails, rather than hangs, when a timer keeps firing again
    at once (``Clock.advance`` runs what is due until nothing is, and a
    timer re-armed a rounding error later crawls forward by as much).
    """

    spins = 0

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        self.spins = self.spins + 1 if delay < 1e-6 else 0
        assert self.spins < 10_000, f"a timer fires again and again at {self.seconds()}"
        return super().callLater(delay, callable, *args, **kw)


class Pipe:
    """Carries datagrams between two paths after LATENCY, dropping some."""

    def __init__(self, clock: Clock, seed: int) -> None:
        self.clock = clock
        self.loss = 0.0
        self.random = random.Random(seed)
        #: Sources whose datagrams are dropped, whatever the loss.
        self.blocked: set[tuple[str, int]] = set()
        self.paths: dict[tuple[str, int], QuicPath] = {}

    def sender(self, source: tuple[str, int]) -> Callable[[bytes, tuple[str, int]], None]:
        def send(datagram: bytes, address: tuple[str, int]) -> None:
            if source in self.blocked or self.random.random() < self.loss:
                return
            self.clock.callLater(LATENCY, self.paths[address].datagram_received, datagram, source)

        return send


class Echo(Recorder):
    """Sends back what arrives, as ``natcat --listen --echo`` does."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.write(data)


def run(clock: Clock, done: Callable[[], bool], limit: float) -> None:
    """
    Jump the clock from one delayed call to the next until *done*, for at
    most *limit* seconds.
    """
    end = clock.seconds() + limit
    for _ in range(1_000_000):
        if done() or clock.seconds() >= end:
            break
        calls = clock.getDelayedCalls()
        if not calls:
            break
        due = min(call.getTime() for call in calls)
        clock.advance(max(0.0, min(due, end) - clock.seconds()))
    assert done(), f"not done after {limit} s of fake time"


def connected(
    identities: tuple[Identity, Identity], left: Recorder, right: Recorder, seed: int = 0
) -> tuple[Clock, Pipe, QuicPath, QuicPath]:
    """A selected and attached pair (connected without loss)."""
    clock = JumpClock()
    clock.advance(1000)
    pipe = Pipe(clock, seed)
    caller = QuicPath(
        clock, identities[0], "caller", identities[1].peer_id, pipe.sender(CALLER), CALLEE
    )
    callee = QuicPath(
        clock, identities[1], "callee", identities[0].peer_id, pipe.sender(CALLEE), CALLER
    )
    pipe.paths = {CALLER: caller, CALLEE: callee}
    callee.start()
    caller.start()
    run(clock, lambda: caller.authenticated.called, 10)
    caller.select(Factory.forProtocol(lambda: left))
    run(clock, lambda: callee.authenticated.called, 10)
    callee.attach(Factory.forProtocol(lambda: right))
    return clock, pipe, caller, callee


def transport_of(protocol: Protocol) -> QuicStreamTransport:
    transport: object = protocol.transport
    assert isinstance(transport, QuicStreamTransport)
    return transport


@pytest.mark.parametrize("seed", SEEDS)
def test_echo_then_close_at_lab_loss(identities: tuple[Identity, Identity], seed: int) -> None:
    """At the lossy lab test's 59% loss each way, an echo ends with a clean close on both sides."""
    payload = random.Random(seed).randbytes(16 * 1024)
    left, right = Recorder(), Echo()
    clock, pipe, caller, _ = connected(identities, left, right, seed)
    pipe.loss = LAB_LOSS
    transport_of(left).write(payload)
    run(clock, lambda: len(left.data) == len(payload), limit=300)
    assert bytes(left.data) == payload
    transport_of(left).loseConnection()
    # Within the idle timeout, and a little more for the close itself.
    run(clock, lambda: left.lost is not None and right.lost is not None, caller.idle_timeout + 10)
    for protocol in (left, right):
        assert protocol.lost is not None
        assert protocol.lost.check(ConnectionDone), protocol.lost
    assert clock.getDelayedCalls() == []


def test_closing_side_answers_the_peer(identities: tuple[Identity, Identity]) -> None:
    """A peer that missed the CONNECTION_CLOSE gets it again with its next packet."""
    left, right = Recorder(), Recorder()
    clock, pipe, _, callee = connected(identities, left, right)
    pipe.blocked.add(CALLEE)  # the callee's CONNECTION_CLOSE is lost
    transport_of(right).abortConnection()
    clock.advance(CLOSE_LINGER / 2)  # aioquic alone would have forgotten it by now
    assert not callee.terminated
    pipe.blocked.clear()
    transport_of(left).write(b"still there?")
    run(clock, lambda: left.lost is not None, limit=CLOSE_LINGER)
    assert left.lost is not None
    assert left.lost.check(QuicPathClosed), left.lost
    run(clock, lambda: callee.terminated, limit=CLOSE_LINGER + 1)
    assert clock.getDelayedCalls() == []


def test_stream_ended_both_ways_ends_cleanly(identities: tuple[Identity, Identity]) -> None:
    """When only the last ACK and the close are lost, the idle timeout reports a clean end."""
    left, right = HalfCloser(), HalfCloser()
    clock, pipe, caller, callee = connected(identities, left, right)
    transport_of(left).write(b"question")
    transport_of(left).loseWriteConnection()
    run(
        clock,
        lambda: right.read_closed and caller._quic.sent_fin_acknowledged(0),
        limit=5,
    )
    pipe.blocked.add(CALLER)  # from now on, nothing from the caller arrives
    transport_of(right).write(b"answer")
    transport_of(right).loseWriteConnection()
    run(clock, lambda: left.lost is not None and right.lost is not None, callee.idle_timeout + 5)
    assert (bytes(right.data), bytes(left.data)) == (b"question", b"answer")
    for protocol in (left, right):
        assert protocol.lost is not None
        assert protocol.lost.check(ConnectionDone), protocol.lost
    assert clock.getDelayedCalls() == []
