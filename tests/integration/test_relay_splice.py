"""
The relay on the real reactor, on loopback: two peers join a
:class:`RelayHub` through a small AMP server that answers ``RelayJoin`` with
a protocol switch, exactly as the rendezvous does, then exchange bytes.
Every test runs on both engines (``splice``: zero-copy ``os.splice``;
``stream``: Twisted producer/consumer) and checks that no file descriptor,
connection or DelayedCall is left behind.  No traffic leaves the host.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse.identity import PeerId
from nattraverse.rendezvous.commands import RelayJoin
from nattraverse.rendezvous.relay import RelayHub, RelayLimits

LOCALHOST = "127.0.0.1"
#: Seconds any single wait in these tests may take.
WAIT = 10.0
CALLER_ID = PeerId(b"\x01" * 32)
CALLEE_ID = PeerId(b"\x02" * 32)
SESSION = b"s" * 16


def join_box(token: bytes) -> bytes:
    """The bytes of a ``RelayJoin`` request, as an AMP client sends them."""
    box = amp.AmpBox({b"_ask": b"1", b"_command": b"RelayJoin", b"token": token})
    return bytes(box.serialize())


def parse_box(buffer: bytes) -> tuple[dict[bytes, bytes] | None, bytes]:
    """One AMP box from the start of *buffer* and the bytes after it, or ``None``."""
    box: dict[bytes, bytes] = {}
    offset = 0
    while True:
        if len(buffer) < offset + 2:
            return None, buffer
        (key_length,) = struct.unpack_from("!H", buffer, offset)
        offset += 2
        if key_length == 0:
            return box, buffer[offset:]
        if len(buffer) < offset + key_length + 2:
            return None, buffer
        key = buffer[offset : offset + key_length]
        offset += key_length
        (value_length,) = struct.unpack_from("!H", buffer, offset)
        offset += 2
        if len(buffer) < offset + value_length:
            return None, buffer
        box[key] = buffer[offset : offset + value_length]
        offset += value_length


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """
    A peer's relay connection with plain bytes: sends ``RelayJoin`` (and
    *early* bytes right behind it), checks the answer, then collects
    everything relayed to it.
    """

    def __init__(self, token: bytes, early: bytes = b"", *, close_on_eof: bool = True) -> None:
        self.token = token
        self.early = early
        self.close_on_eof = close_on_eof
        self.answered: Deferred[None] = Deferred()
        self.eof: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.received = bytearray()
        self._head = b""
        self._switched = False
        self._wanted: list[tuple[int, Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.transport.write(join_box(self.token) + self.early)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self._switched:
            box, rest = parse_box(self._head + data)
            if box is None:
                self._head = rest
                return
            self._switched = True
            if b"_answer" in box:
                self.answered.callback(None)
            else:
                self.answered.errback(AssertionError(f"RelayJoin failed: {box!r}"))
            data = rest
        self.received += data
        self._check()

    def has(self, count: int) -> Deferred[None]:
        """Fires when *count* bytes have been received."""
        d: Deferred[None] = Deferred()
        self._wanted.append((count, d))
        self._check()
        return d

    def _check(self) -> None:
        ready = [(n, d) for n, d in self._wanted if len(self.received) >= n]
        self._wanted = [(n, d) for n, d in self._wanted if len(self.received) < n]
        for _, d in ready:
            d.callback(None)

    def readConnectionLost(self) -> None:
        self.eof.callback(None)
        if self.close_on_eof:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if not self.eof.called:
            self.eof.callback(None)
        self.reason = reason
        self.closed.callback(None)


class JoinLocator(amp.CommandLocator):
    """Answers ``RelayJoin`` the way the rendezvous does: a protocol switch."""

    def __init__(self, hub: RelayHub, peers: dict[bytes, PeerId]) -> None:
        self.hub = hub
        self.peers = peers

    @RelayJoin.responder
    def relay_join(self, token: bytes) -> Protocol:
        return self.hub.join(token, self.peers.get(token, PeerId(b"\x00" * 32)))


def open_fds() -> set[str]:
    """This process's open file descriptors, each with what it is."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        # (the directory listing's own descriptor is closed by now)
        with contextlib.suppress(OSError):
            found.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
    return found


@dataclass
class RelayServer:
    """A hub behind a listening AMP port, and what the test opened on it."""

    reactor: Any
    hub: RelayHub
    port: Any
    peers: dict[bytes, PeerId] = field(default_factory=dict)
    clients: list[Peer] = field(default_factory=list)
    events: list[LogEvent] = field(default_factory=list)

    def allocate(self, session: bytes = SESSION) -> tuple[bytes, bytes]:
        tokens = self.hub.allocate(session, CALLER_ID, CALLEE_ID)
        self.peers[tokens[0]] = CALLER_ID
        self.peers[tokens[1]] = CALLEE_ID
        return tokens

    async def connect(self, peer: Peer) -> Peer:
        endpoint = TCP4ClientEndpoint(self.reactor, LOCALHOST, self.port.getHost().port)
        self.clients.append(peer)
        await connectProtocol(endpoint, peer)
        return peer

    def engines(self) -> list[str]:
        return [e["engine"] for e in self.events if "engine" in e]


async def wait(d: Deferred[Any], reactor: Any, timeout: float = WAIT) -> Any:
    """*d*'s result, failing the test after *timeout* seconds."""
    return await d.addTimeout(timeout, reactor)


async def settle(reactor: Any, done: Callable[[], bool], what: str) -> None:
    """Let the reactor run until *done*, for at most :data:`WAIT` seconds."""
    deadline = time.monotonic() + WAIT
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {WAIT}s")
        await deferLater(reactor, 0.01)


@pytest.fixture(params=[True, False], ids=["splice", "stream"])
def zero_copy(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def make_server_fixture(limits: RelayLimits) -> Any:
    @pytest_twisted.async_yield_fixture
    async def fixture(reactor: Any, zero_copy: bool) -> AsyncIterator[RelayServer]:
        # (Twisted keeps one spare descriptor from the first listenTCP on.)
        fds_before = open_fds()
        calls_before = set(reactor.getDelayedCalls())
        hub = RelayHub(reactor, limits, zero_copy=zero_copy)
        server = RelayServer(reactor, hub, None)
        factory = Factory.forProtocol(lambda: amp.AMP(locator=JoinLocator(hub, server.peers)))
        server.port = reactor.listenTCP(0, factory, interface=LOCALHOST)
        fds_before |= {fd for fd in open_fds() if fd.endswith(" -> /dev/null")}

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            server.events.append(event)

        globalLogPublisher.addObserver(observe)
        try:
            yield server
        finally:
            globalLogPublisher.removeObserver(observe)
            for client in server.clients:
                if client.transport is not None and not client.closed.called:
                    client.transport.abortConnection()  # type: ignore[attr-defined]
            hub.close()
            await server.port.stopListening()
            await settle(reactor, lambda: all(c.closed.called for c in server.clients), "close")
            await settle(
                reactor,
                lambda: open_fds() <= fds_before,
                f"file descriptors to close: {sorted(open_fds() - fds_before)}",
            )
            await settle(
                reactor,
                lambda: (
                    not [
                        c for c in reactor.getDelayedCalls() if c not in calls_before and c.active()
                    ]
                ),
                "DelayedCalls to run",
            )
        assert hub.active == hub.pending == 0

    return fixture


relay = make_server_fixture(RelayLimits(rate=0))
slow_relay = make_server_fixture(RelayLimits(rate=200_000))
short_relay = make_server_fixture(RelayLimits(rate=0, lifetime=0.3))


async def ended(server: RelayServer) -> None:
    """Wait until the hub has no relay left."""
    await settle(server.reactor, lambda: server.hub.active + server.hub.pending == 0, "relay end")


@pytest_twisted.ensureDeferred
async def test_engine_is_the_one_asked_for(relay: RelayServer, zero_copy: bool) -> None:
    """Plain TCP connections use the zero-copy engine unless it is turned off."""
    caller_token, callee_token = relay.allocate()
    caller = await relay.connect(Peer(caller_token))
    callee = await relay.connect(Peer(callee_token))
    await wait(caller.answered, relay.reactor)
    await wait(callee.answered, relay.reactor)
    assert relay.engines() == ["splice" if zero_copy else "stream"]
    caller.transport.loseConnection()  # type: ignore[union-attr]
    await wait(callee.closed, relay.reactor)
    await ended(relay)


@pytest_twisted.ensureDeferred
async def test_megabytes_both_ways_arrive_intact(relay: RelayServer) -> None:
    """Two megabytes of random bytes each way, at the same time, arrive intact."""
    forward, backward = os.urandom(2 * 1024 * 1024 + 7), os.urandom(2 * 1024 * 1024 + 13)
    caller_token, callee_token = relay.allocate()
    caller = await relay.connect(Peer(caller_token))
    callee = await relay.connect(Peer(callee_token))
    await wait(caller.answered, relay.reactor)
    await wait(callee.answered, relay.reactor)
    caller.transport.write(forward)  # type: ignore[union-attr]
    callee.transport.write(backward)  # type: ignore[union-attr]
    await wait(callee.has(len(forward)), relay.reactor)
    await wait(caller.has(len(backward)), relay.reactor)
    assert bytes(callee.received) == forward
    assert bytes(caller.received) == backward
    caller.transport.loseConnection()  # type: ignore[union-attr]
    await wait(callee.closed, relay.reactor)
    await ended(relay)
    assert relay.hub.bytes_relayed == len(forward) + len(backward)


@pytest_twisted.ensureDeferred
async def test_early_bytes_wait_for_the_partner(relay: RelayServer) -> None:
    """Bytes the first peer sends before its partner joins reach the partner, in order."""
    early, later = os.urandom(300_000), os.urandom(200_000)
    caller_token, callee_token = relay.allocate()
    caller = await relay.connect(Peer(caller_token, early=early[:1000]))
    await wait(caller.answered, relay.reactor)
    caller.transport.write(early[1000:])  # type: ignore[union-attr]
    await deferLater(relay.reactor, 0.2)
    assert relay.hub.pending == 1
    callee = await relay.connect(Peer(callee_token))
    await wait(callee.has(len(early)), relay.reactor)
    caller.transport.write(later)  # type: ignore[union-attr]
    await wait(callee.has(len(early) + len(later)), relay.reactor)
    assert bytes(callee.received) == early + later
    callee.transport.loseConnection()  # type: ignore[union-attr]
    await wait(caller.closed, relay.reactor)
    await ended(relay)


@pytest_twisted.ensureDeferred
async def test_second_joiner_early_bytes_follow_its_join(relay: RelayServer) -> None:
    """Bytes the second peer sends right behind its RelayJoin are relayed, not parsed as AMP."""
    early = os.urandom(50_000)
    caller_token, callee_token = relay.allocate()
    caller = await relay.connect(Peer(caller_token))
    await wait(caller.answered, relay.reactor)
    callee = await relay.connect(Peer(callee_token, early=early))
    await wait(caller.has(len(early)), relay.reactor)
    assert bytes(caller.received) == early
    caller.transport.loseConnection()  # type: ignore[union-attr]
    await wait(callee.closed, relay.reactor)
    await ended(relay)


@pytest_twisted.ensureDeferred
async def test_a_peer_that_writes_then_closes_is_heard_in_full(relay: RelayServer) -> None:
    """A peer that writes a megabyte and closes at once has every byte delivered, then EOF."""
    payload = os.urandom(1024 * 1024 + 5)
    caller_token, callee_token = relay.allocate()
    caller = await relay.connect(Peer(caller_token))
    callee = await relay.connect(Peer(callee_token))
    await wait(caller.answered, relay.reactor)
    caller.transport.write(payload)  # type: ignore[union-attr]
    caller.transport.loseConnection()  # type: ignore[union-attr]
    await wait(callee.eof, relay.reactor)
    assert bytes(callee.received) == payload
    await wait(callee.closed, relay.reactor)
    await ended(relay)


# Behind AMP, the stream engine sees a half-close as a close (AMP is not a
# half-closeable protocol); the unit tests cover its half-close.
@pytest.mark.parametrize("zero_copy", [True], ids=["splice"])
@pytest_twisted.ensureDeferred
async def test_half_close_lets_the_other_side_answer(relay: RelayServer) -> None:
    """After one peer half-closes, the other still answers it through the relay."""
    question, answer = os.urandom(100_000), os.urandom(400_000)
    caller_token, callee_token = relay.allocate()
    caller = await relay.connect(Peer(caller_token, close_on_eof=True))
    callee = await relay.connect(Peer(callee_token, close_on_eof=False))
    await wait(caller.answered, relay.reactor)
    await wait(callee.answered, relay.reactor)
    caller.transport.write(question)  # type: ignore[union-attr]
    caller.transport.loseWriteConnection()  # type: ignore[union-attr]
    await wait(callee.eof, relay.reactor)
    assert bytes(callee.received) == question
    callee.transport.write(answer)  # type: ignore[union-attr]
    callee.transport.loseConnection()  # type: ignore[union-attr]
    await wait(caller.closed, relay.reactor)
    assert bytes(caller.received) == answer
    await ended(relay)


@pytest_twisted.ensureDeferred
async def test_rate_cap_slows_a_transfer(slow_relay: RelayServer) -> None:
    """At 200 kB/s with a 100 kB burst, 500 kB cannot arrive in under 2 s."""
    payload = os.urandom(500_000)
    caller_token, callee_token = slow_relay.allocate()
    caller = await slow_relay.connect(Peer(caller_token))
    callee = await slow_relay.connect(Peer(callee_token))
    await wait(caller.answered, slow_relay.reactor)
    await wait(callee.answered, slow_relay.reactor)
    started = time.monotonic()
    caller.transport.write(payload)  # type: ignore[union-attr]
    await wait(callee.has(len(payload)), slow_relay.reactor)
    elapsed = time.monotonic() - started
    assert bytes(callee.received) == payload
    # (500 kB - 100 kB burst - one 64 KiB read over budget) / 200 kB/s = 1.67 s
    assert elapsed >= 1.6
    caller.transport.loseConnection()  # type: ignore[union-attr]
    await wait(callee.closed, slow_relay.reactor)
    await ended(slow_relay)


@pytest_twisted.ensureDeferred
async def test_lifetime_closes_both_connections(short_relay: RelayServer) -> None:
    """A relay past its lifetime closes both connections."""
    caller_token, callee_token = short_relay.allocate()
    caller = await short_relay.connect(Peer(caller_token))
    callee = await short_relay.connect(Peer(callee_token))
    await wait(caller.answered, short_relay.reactor)
    await wait(caller.closed, short_relay.reactor)
    await wait(callee.closed, short_relay.reactor)
    await ended(short_relay)


@pytest_twisted.ensureDeferred
async def test_a_spent_token_is_refused_over_amp(relay: RelayServer) -> None:
    """Joining twice with one token gets an AMP error the second time."""
    caller_token, _ = relay.allocate()
    first = await relay.connect(Peer(caller_token))
    await wait(first.answered, relay.reactor)
    second = await relay.connect(Peer(caller_token))
    with pytest.raises(AssertionError, match="RELAY_REFUSED"):
        await wait(second.answered, relay.reactor)
    assert relay.hub.pending == 1


@pytest_twisted.ensureDeferred
async def test_a_reset_ends_the_relay(relay: RelayServer) -> None:
    """When one peer resets its connection mid-transfer, the other is closed too."""
    caller_token, callee_token = relay.allocate()
    caller = await relay.connect(Peer(caller_token))
    callee = await relay.connect(Peer(callee_token))
    await wait(caller.answered, relay.reactor)
    await wait(callee.answered, relay.reactor)
    caller.transport.write(os.urandom(4 * 1024 * 1024))  # type: ignore[union-attr]
    callee.transport.write(os.urandom(4 * 1024 * 1024))  # type: ignore[union-attr]
    await wait(callee.has(1), relay.reactor)
    callee.transport.abortConnection()  # type: ignore[union-attr]
    await wait(caller.closed, relay.reactor)
    await ended(relay)
