"""
Unit tests of :mod:`nattraverse.quic`: two QuicPaths back to back over an
in-memory datagram pipe with a fake clock, latency and optional loss.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from aioquic import tls
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from nattraverse.errors import PeerAuthenticationFailed
from nattraverse.identity import Identity
from nattraverse.quic import (
    QuicPath,
    QuicPathIdle,
    QuicStreamTransport,
    is_initial,
    is_quic,
    short_header_packet,
)

CALLER_ADDRESS = ("10.0.0.1", 40001)
CALLEE_ADDRESS = ("10.0.0.2", 40002)
LATENCY = 0.005


@pytest.fixture(scope="module")
def identities() -> tuple[Identity, Identity, Identity]:
    return Identity.generate(), Identity.generate(), Identity.generate()


class Pipe:
    """Carries datagrams between two paths after LATENCY, dropping some."""

    def __init__(self, clock: Clock, loss: float = 0.0, seed: int = 5) -> None:
        self.clock = clock
        self.loss = loss
        self.random = random.Random(seed)
        self.up = True
        #: Sources whose datagrams are dropped, whatever the loss.
        self.blocked: set[tuple[str, int]] = set()
        self.paths: dict[tuple[str, int], QuicPath] = {}
        self.sent = 0

    def sender(self, source: tuple[str, int]) -> Callable[[bytes, tuple[str, int]], None]:
        def send(datagram: bytes, address: tuple[str, int]) -> None:
            self.sent += 1
            assert is_quic(datagram)
            if not self.up or source in self.blocked or self.random.random() < self.loss:
                return
            target = self.paths[address]
            self.clock.callLater(LATENCY, target.datagram_received, datagram, source)

        return send


class Recorder(Protocol):
    """Keeps what arrives and how the connection ended."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    """A half-closeable protocol."""

    read_closed = False

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass


def make_pair(
    identities: tuple[Identity, Identity, Identity],
    *,
    loss: float = 0.0,
    caller_expects: Identity | None = None,
    callee_expects: Identity | None = None,
    **options: object,
) -> tuple[Clock, Pipe, QuicPath, QuicPath]:
    caller_id, callee_id, _ = identities
    clock = Clock()
    clock.advance(1000)
    pipe = Pipe(clock, loss)
    caller = QuicPath(
        clock,
        caller_id,
        "caller",
        (caller_expects or callee_id).peer_id,
        pipe.sender(CALLER_ADDRESS),
        CALLEE_ADDRESS,
        local=CALLER_ADDRESS,
        **options,  # type: ignore[arg-type]
    )
    callee = QuicPath(
        clock,
        callee_id,
        "callee",
        (callee_expects or caller_id).peer_id,
        pipe.sender(CALLEE_ADDRESS),
        CALLER_ADDRESS,
        local=CALLEE_ADDRESS,
        **options,  # type: ignore[arg-type]
    )
    pipe.paths = {CALLER_ADDRESS: caller, CALLEE_ADDRESS: callee}
    callee.start()
    caller.start()
    return clock, pipe, caller, callee


def run_until(clock: Clock, done: Callable[[], bool], limit: float = 60.0) -> None:
    """Advance the clock in 1 ms steps until *done* or *limit* seconds passed."""
    start = clock.seconds()
    while not done() and clock.seconds() - start < limit:
        clock.advance(0.001)
    assert done(), f"not done after {limit} s of fake time"


def result(d: defer.Deferred[QuicPath]) -> QuicPath | Failure | None:
    """What *d* fired with (kept on the Deferred, so a failure is handled once)."""
    kept: list[QuicPath | Failure] | None = getattr(d, "_test_kept", None)
    if kept is None:
        kept = []
        d._test_kept = kept  # type: ignore[attr-defined]
        d.addBoth(kept.append)
    return kept[0] if kept else None


def connected(
    identities: tuple[Identity, Identity, Identity],
    caller_protocol: Recorder | None = None,
    callee_protocol: Recorder | None = None,
    **options: object,
) -> tuple[Clock, Pipe, QuicPath, QuicPath, Recorder, Recorder]:
    clock, pipe, caller, callee = make_pair(identities, **options)  # type: ignore[arg-type]
    run_until(clock, lambda: result(caller.authenticated) is not None)
    assert result(caller.authenticated) is caller
    left = caller_protocol or Recorder()
    right = callee_protocol or Recorder()
    caller.select(Factory.forProtocol(lambda: left))
    run_until(clock, lambda: result(callee.authenticated) is not None)
    assert result(callee.authenticated) is callee
    callee.attach(Factory.forProtocol(lambda: right))
    return clock, pipe, caller, callee, left, right


def transport_of(protocol: Protocol) -> QuicStreamTransport:
    transport: object = protocol.transport
    assert isinstance(transport, QuicStreamTransport)
    return transport


def assert_lost(protocol: Recorder, kind: type[BaseException]) -> None:
    """*protocol* saw connectionLost with a *kind*."""
    assert protocol.lost is not None
    assert protocol.lost.check(kind), protocol.lost


def test_is_quic() -> None:
    """QUIC's fixed bit tells QUIC from STUN, whose first two bits are zero."""
    assert is_quic(b"\xc0\x00")
    assert is_quic(b"\x40")
    assert not is_quic(b"\x00\x01")
    assert not is_quic(b"\x01\x01")
    assert not is_quic(b"")


def test_handshake_pins_both_ways(identities: tuple[Identity, Identity, Identity]) -> None:
    """Both sides authenticate, each holding the other's certificate."""
    _, _, caller, callee, left, right = connected(identities)
    assert caller.peer_certificate is not None
    assert callee.peer_certificate is not None
    assert identities[1].peer_id.matches(caller.peer_certificate)
    assert identities[0].peer_id.matches(callee.peer_certificate)
    assert transport_of(left).peer_id == identities[1].peer_id
    assert transport_of(right).peer_id == identities[0].peer_id
    assert transport_of(left).method == "udp"
    assert transport_of(left).remote == "10.0.0.2:40002"


def test_callee_rejects_wrong_caller(identities: tuple[Identity, Identity, Identity]) -> None:
    """A callee expecting another peer fails, and so does the caller."""
    clock, _, caller, callee = make_pair(identities, callee_expects=identities[2])
    run_until(clock, lambda: result(callee.authenticated) is not None)
    failure = result(callee.authenticated)
    assert isinstance(failure, Failure)
    failure.trap(PeerAuthenticationFailed)
    run_until(clock, lambda: caller._terminated and callee._terminated)
    caller_result = result(caller.authenticated)
    if isinstance(caller_result, QuicPath):  # the caller's pin held: it must not be selected
        assert caller_result._terminated
    assert clock.getDelayedCalls() == []


def test_caller_rejects_wrong_callee(identities: tuple[Identity, Identity, Identity]) -> None:
    """A caller expecting another peer fails; the callee never authenticates."""
    clock, _, caller, callee = make_pair(identities, caller_expects=identities[2])
    run_until(clock, lambda: caller._terminated and callee._terminated)
    failure = result(caller.authenticated)
    assert isinstance(failure, Failure)
    failure.trap(PeerAuthenticationFailed)
    assert isinstance(result(callee.authenticated), Failure)
    assert clock.getDelayedCalls() == []


def test_data_both_ways(identities: tuple[Identity, Identity, Identity]) -> None:
    """Bytes written on either side arrive on the other, in order."""
    clock, _, _, _, left, right = connected(identities)
    transport_of(left).write(b"hello ")
    transport_of(left).writeSequence([b"callee", b"!"])
    transport_of(right).write(b"hi caller")
    run_until(clock, lambda: left.data == b"hi caller" and right.data == b"hello callee!")


def test_megabyte_with_loss(identities: tuple[Identity, Identity, Identity]) -> None:
    """1 MB crosses intact with 15% of datagrams dropped each way."""
    payload = random.Random(1).randbytes(1024 * 1024)
    clock, _, _, _, left, right = connected(identities, loss=0.15)
    transport_of(left).write(payload)
    run_until(clock, lambda: len(right.data) >= len(payload), limit=600)
    assert bytes(right.data) == payload


def test_lost_acknowledgement_is_repeated(identities: tuple[Identity, Identity, Identity]) -> None:
    """
    When the only ACK of the callee's data is lost, the caller's later
    packets (its probes and keepalives) carry it again, as every TCP segment
    carries the cumulative ACK; aioquic alone acknowledges a packet once,
    and the callee, its window full, waited for its own probes, whose
    timeout doubles at each loss (minutes at a third of the packets lost).
    """
    clock, pipe, caller, callee, left, right = connected(identities)
    pipe.blocked.add(CALLER_ADDRESS)  # the caller's ACK of the data is lost
    transport_of(right).write(b"x" * 1000)
    run_until(clock, lambda: bytes(left.data) == b"x" * 1000)
    pipe.blocked.add(CALLEE_ADDRESS)  # and so are the callee's probes
    clock.advance(0.1)
    space = callee._quic._spaces[tls.Epoch.ONE_RTT]
    before = space.largest_acked_packet
    pipe.blocked = {CALLEE_ADDRESS}  # now only the caller gets through
    assert caller.keepalive is not None
    run_until(clock, lambda: space.largest_acked_packet > before, limit=caller.keepalive + 1)


def test_half_close(identities: tuple[Identity, Identity, Identity]) -> None:
    """loseWriteConnection sends FIN: the peer reads to the end and can still answer."""
    clock, _, _, _, left, right = connected(identities, callee_protocol=HalfCloser())
    assert isinstance(right, HalfCloser)
    transport_of(left).write(b"question")
    transport_of(left).loseWriteConnection()
    run_until(clock, lambda: right.read_closed)
    assert right.data == b"question"
    transport_of(right).write(b"answer")
    transport_of(right).loseConnection()
    run_until(clock, lambda: left.lost is not None and right.lost is not None)
    assert left.data == b"answer"
    assert_lost(left, ConnectionDone)


def test_lose_connection_flushes(identities: tuple[Identity, Identity, Identity]) -> None:
    """loseConnection right after a large write still delivers all of it, then closes."""
    payload = b"x" * 300_000
    clock, _, _, _, left, right = connected(identities)
    transport_of(left).write(payload)
    transport_of(left).loseConnection()
    run_until(clock, lambda: left.lost is not None and right.lost is not None)
    assert bytes(right.data) == payload
    assert_lost(left, ConnectionDone)
    assert_lost(right, ConnectionDone)
    assert clock.getDelayedCalls() == []


class UndeclaredProducer:
    """A push producer that does not declare IPushProducer (as StandardIO does not)."""

    def __init__(self, transport: QuicStreamTransport) -> None:
        self.transport = transport
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


@implementer(IPushProducer)
class Producer(UndeclaredProducer):
    """A push producer that writes while not paused."""


@pytest.mark.parametrize("kind", [Producer, UndeclaredProducer])
def test_flow_control_pauses_producer(
    identities: tuple[Identity, Identity, Identity], kind: type[UndeclaredProducer]
) -> None:
    """A paused receiver holds its window; the sender's producer is paused, then resumed."""
    clock, _, _, _, left, right = connected(
        identities, max_stream_data=64 * 1024, write_buffer=64 * 1024
    )
    transport_of(right).pauseProducing()
    producer = kind(transport_of(left))
    transport_of(left).registerProducer(producer, True)  # type: ignore[arg-type]
    for _ in range(200):
        if producer.paused:
            break
        transport_of(left).write(b"y" * 4096)
        clock.advance(0.01)
    assert producer.paused
    for _ in range(1000):  # 1 s more: the paused receiver delivers nothing
        clock.advance(0.001)
    held = len(right.data)
    assert held == 0
    transport_of(right).resumeProducing()
    run_until(clock, lambda: not producer.paused, limit=30)
    assert len(right.data) > 64 * 1024


def test_idle_timeout_reports_dead_path(identities: tuple[Identity, Identity, Identity]) -> None:
    """When the path dies, both sides see QuicPathIdle within the idle timeout."""
    clock, pipe, _, _, left, right = connected(identities, idle_timeout=20.0, keepalive=5.0)
    for _ in range(6000):  # 60 s: keepalives keep an idle but live path up
        clock.advance(0.01)
    assert left.lost is None
    assert right.lost is None
    pipe.up = False
    start = clock.seconds()
    run_until(clock, lambda: left.lost is not None and right.lost is not None, limit=40)
    assert clock.seconds() - start <= 30
    assert_lost(left, QuicPathIdle)
    assert_lost(right, QuicPathIdle)
    assert clock.getDelayedCalls() == []


def test_abort_leaves_nothing(identities: tuple[Identity, Identity, Identity]) -> None:
    """abortConnection ends both sides and leaves no DelayedCall."""
    clock, _, _, _, left, right = connected(identities)
    transport_of(left).abortConnection()
    run_until(clock, lambda: left.lost is not None and right.lost is not None)
    assert clock.getDelayedCalls() == []


def test_handshake_timeout(identities: tuple[Identity, Identity, Identity]) -> None:
    """With no peer, authenticated fails with a timeout and nothing is left."""
    clock, pipe, caller, callee = make_pair(identities, handshake_timeout=3.0)
    pipe.up = False
    run_until(clock, lambda: caller._terminated and callee._terminated, limit=20)
    failure = result(caller.authenticated)
    assert isinstance(failure, Failure)
    failure.trap(defer.TimeoutError)
    assert isinstance(result(callee.authenticated), Failure)
    assert clock.getDelayedCalls() == []


def test_cancel_before_handshake(identities: tuple[Identity, Identity, Identity]) -> None:
    """Cancelling authenticated closes the path and leaves nothing."""
    clock, _, caller, callee = make_pair(identities)
    caller.authenticated.cancel()
    callee.authenticated.cancel()
    run_until(clock, lambda: caller._terminated and callee._terminated)
    for path in (caller, callee):
        failure = result(path.authenticated)
        assert isinstance(failure, Failure)
        failure.trap(defer.CancelledError)
    assert clock.getDelayedCalls() == []


def test_interfaces(identities: tuple[Identity, Identity, Identity]) -> None:
    """The stream transport provides the transport, consumer and producer interfaces."""
    _, _, _, _, left, _ = connected(identities)
    transport = transport_of(left)
    for interface in (ITransport, ITCPTransport, IConsumer, IPushProducer):
        assert verifyObject(interface, transport)


#: Seeds of the pipe's losses with which, at 59% loss each way (the lossy
#: lab test's), the handshake ended in the idle timeout while the stall
#: probe waited for the handshake to end and sent a bare PING: aioquic's own
#: probe timeout, doubled at each loss, tried again only after the 25 s idle
#: timeout (at 45 the caller, at 62 the callee waiting for the caller's
#: Finished, as in the lab).  11 of 200 seeds failed so, none since.
HEAVY_LOSS_SEEDS = [45, 47, 62, 73, 117]


@pytest.mark.parametrize("seed", HEAVY_LOSS_SEEDS)
def test_handshake_survives_heavy_loss(
    identities: tuple[Identity, Identity, Identity], seed: int
) -> None:
    """The stall probe resends the handshake's CRYPTO data; both sides complete."""
    # As in the punching port, the handshake may take the whole connect timeout.
    clock, pipe, caller, callee = make_pair(identities, handshake_timeout=150.0)
    pipe.random = random.Random(seed)
    pipe.loss = 0.59
    run_until(clock, lambda: result(caller.authenticated) is not None, limit=150)
    assert result(caller.authenticated) is caller
    caller.select(Factory.forProtocol(Recorder))
    run_until(clock, lambda: result(callee.authenticated) is not None, limit=150)
    assert result(callee.authenticated) is callee


# -- telling packets apart -------------------------------------------------------------


def _long(kind: int, payload: bytes) -> bytes:
    """A QUIC v1 long-header packet of type *kind* (0 Initial, 2 Handshake), ids of 8 bytes."""
    head = bytes([0xC0 | kind << 4]) + (1).to_bytes(4, "big")
    head += bytes([8]) + b"d" * 8 + bytes([8]) + b"s" * 8
    if kind == 0:
        head += bytes([0])  # no token
    return head + bytes([0x40 | len(payload) >> 8, len(payload) & 0xFF]) + payload


SHORT = bytes([0x41]) + b"d" * 8 + b"protected payload"


def test_is_initial_tells_an_initial_from_other_packets() -> None:
    """Only a long header of type 0 is an Initial."""
    assert is_initial(_long(0, b"x" * 30))
    assert not is_initial(_long(2, b"x" * 30))
    assert not is_initial(SHORT)
    assert not is_initial(b"")


def test_short_header_packet_of_a_coalesced_datagram() -> None:
    """The 1-RTT packet after a Handshake (and an Initial) in one datagram; or the datagram."""
    assert short_header_packet(_long(0, b"i" * 20) + _long(2, b"h" * 40) + SHORT) == SHORT
    assert short_header_packet(SHORT) == SHORT
    assert short_header_packet(_long(2, b"h" * 40)) is None
    # A long header cut short cannot be parsed: no packet, no exception.
    assert short_header_packet(_long(2, b"h" * 40)[:12]) is None
