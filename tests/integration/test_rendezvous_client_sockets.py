"""
The rendezvous client against the real rendezvous server
(nattraverse.rendezvous.server) over loopback TCP: sessions, registration,
lookup, introduction, reversal, the relay, and re-registration after the
server drops its connections.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse._thin_stream import TCP_THIN_LINEAR_TIMEOUTS, mark_thin_stream
from nattraverse.errors import NameTaken, NotAuthenticated, PeerNotFound, RendezvousUnavailable
from nattraverse.identity import Identity
from nattraverse.rendezvous.client import (
    Introduction,
    IRendezvousHandler,
    RendezvousSession,
    join_relay,
    open_session,
)
from nattraverse.rendezvous.registration import Registration
from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.server import RendezvousService

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
#: Seconds any one step may take before the test fails instead of hanging.
STEP = 10.0


def within(reactor: Any, d: Deferred[T], seconds: float = STEP) -> Deferred[T]:
    """*d*, failing with TimeoutError after *seconds*."""
    return d.addTimeout(seconds, reactor)


class Waiter:
    """Deferreds fired by events, in order."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self._waiting: list[Deferred[Any]] = []

    def fire(self, value: Any) -> None:
        self.seen.append(value)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(value)

    def next(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._waiting.append(d)
        return d


@implementer(IRendezvousHandler)
class Handler:
    """Records the server's requests; each kind has a :class:`Waiter`."""

    def __init__(self) -> None:
        self.introductions = Waiter()
        self.dial_backs = Waiter()
        self.relay_offers = Waiter()

    def introduced(self, introduction: Introduction) -> None:
        self.introductions.fire(introduction)

    def dial_back(self, session: bytes, host: str, port: int) -> None:
        self.dial_backs.fire((session, host, port))

    def relay_offer(self, session: bytes, token: bytes, lifetime: float) -> None:
        self.relay_offers.fire((session, token, lifetime))

    def udp_relay_offer(self, session: bytes, port: int, token: bytes, lifetime: float) -> None:
        pass


class Collector(Protocol):
    """A raw protocol collecting bytes until it has *expected* of them."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = b""
        self.complete: Deferred[bytes] = Deferred()
        self.gone: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expected and not self.complete.called:
            self.complete.callback(self.received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone.callback(None)


class Rendezvous:
    """A running server and what the tests need of it."""

    def __init__(self, reactor: Any, service: RendezvousService) -> None:
        self.reactor = reactor
        self.service = service
        host = service.ports[0].getHost()
        self.port: int = host.port  # type: ignore[attr-defined]
        self.sessions: list[RendezvousSession] = []

    def endpoint(self) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, LOCALHOST, self.port, timeout=5)

    async def session(self, identity: Identity, **kwargs: Any) -> RendezvousSession:
        session = await within(
            self.reactor, open_session(self.reactor, self.endpoint(), identity, **kwargs)
        )
        self.sessions.append(session)
        return session


async def _serve(reactor: Any, **kwargs: Any) -> AsyncIterator[Rendezvous]:
    service = RendezvousService(
        reactor,
        [f"tcp:0:interface={LOCALHOST}"],
        relay_hub=RelayHub(reactor, RelayLimits()),
        **kwargs,
    )
    service.startService()
    rendezvous = Rendezvous(reactor, service)
    try:
        yield rendezvous
    finally:
        for session in rendezvous.sessions:
            closed = session.closed
            session.close()
            await within(reactor, closed)
        await within(reactor, service.stopService())
        assert _client_timers(reactor) == []


def _client_timers(reactor: Any) -> list[Any]:
    """The reactor's timers that belong to the rendezvous client or registration."""
    modules = (
        "nattraverse.rendezvous._protocol",
        "nattraverse.rendezvous.client",
        "nattraverse.rendezvous.registration",
    )
    return [
        call
        for call in reactor.getDelayedCalls()
        if getattr(call.func, "__module__", "") in modules
    ]


@pytest_twisted.async_yield_fixture
async def rendezvous(reactor: Any) -> AsyncIterator[Rendezvous]:
    """A rendezvous with its relay on 127.0.0.1, on a free port."""
    async for running in _serve(reactor):
        yield running


@pytest_twisted.async_yield_fixture
async def guarded(reactor: Any) -> AsyncIterator[Rendezvous]:
    """A rendezvous that wants the access key b"sesame"."""
    async for running in _serve(reactor, access_key=b"sesame"):
        yield running


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate()


async def introduce(
    rendezvous: Rendezvous, alice: Identity, bob: Identity
) -> tuple[RendezvousSession, Handler, RendezvousSession, Introduction, Introduction]:
    """Alice registers; Bob connects to her: both sessions, her handler, both introductions."""
    handler = Handler()
    callee = await rendezvous.session(alice, handler=handler)
    await within(rendezvous.reactor, callee.register("alice", 7000, [("10.0.0.2", 7000)]))
    caller = await rendezvous.session(bob)
    arrived = handler.introductions.next()
    mine = await within(rendezvous.reactor, caller.connect("alice", 6000, [], ["relay"]))
    theirs = await within(rendezvous.reactor, arrived)
    return callee, handler, caller, mine, theirs


@pytest_twisted.ensureDeferred
async def test_session_learns_observed_address(rendezvous: Rendezvous, alice: Identity) -> None:
    """Hello tells the address the server observes; Authenticate binds alice's peer id."""
    session = await rendezvous.session(alice)
    assert session.hello.observed[0] == LOCALHOST
    local = session.local_address
    assert session.hello.observed[1] == local.port  # type: ignore[union-attr]
    assert session.hello.relay is True
    assert session.peer_id == alice.peer_id


def _thin(transport: Any) -> int:
    """The TCP_THIN_LINEAR_TIMEOUTS option of *transport*'s socket."""
    handle = transport.getHandle()
    return int(handle.getsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux socket option")
@pytest_twisted.ensureDeferred
async def test_both_ends_retransmit_as_a_thin_stream(
    rendezvous: Rendezvous, alice: Identity
) -> None:
    """
    Both ends of a rendezvous connection ask for linear retransmission
    timeouts, so that a lost message on a lossy link is not held back by
    exponential backoff.
    """
    session = await rendezvous.session(alice)
    assert _thin(session._protocol.transport) == 1
    (server_side,) = rendezvous.service.factory.connections
    assert _thin(server_side.transport) == 1
    assert mark_thin_stream(StringTransport()) is False


@pytest_twisted.ensureDeferred
async def test_register_then_lookup_from_another_session(
    rendezvous: Rendezvous, alice: Identity, bob: Identity
) -> None:
    """A name registered on one session is found from another, with the observed address."""
    registered = await rendezvous.session(alice, handler=Handler())
    ttl = await within(rendezvous.reactor, registered.register("alice", 7000, []))
    assert ttl > 0
    looking = await rendezvous.session(bob)
    info = await within(rendezvous.reactor, looking.lookup("alice"))
    assert info.peer_id == alice.peer_id
    assert info.name == "alice"
    assert info.observed == registered.hello.observed
    assert info.listen_port == 7000
    by_id = await within(rendezvous.reactor, looking.lookup(str(alice.peer_id)))
    assert by_id == info


@pytest_twisted.ensureDeferred
async def test_name_taken_by_another_key(
    rendezvous: Rendezvous, alice: Identity, bob: Identity
) -> None:
    """Another key cannot take a registered name."""
    first = await rendezvous.session(alice, handler=Handler())
    await within(rendezvous.reactor, first.register("alice", 0, []))
    second = await rendezvous.session(bob, handler=Handler())
    with pytest.raises(NameTaken):
        await within(rendezvous.reactor, second.register("alice", 0, []))


@pytest_twisted.ensureDeferred
async def test_unknown_peer(rendezvous: Rendezvous, bob: Identity) -> None:
    """Connecting to a name nobody registered fails with PeerNotFound."""
    session = await rendezvous.session(bob)
    with pytest.raises(PeerNotFound):
        await within(rendezvous.reactor, session.connect("nobody", 0, [], ["relay"]))


@pytest_twisted.ensureDeferred
async def test_connect_introduces_both_peers(
    rendezvous: Rendezvous, alice: Identity, bob: Identity
) -> None:
    """Connect gives the caller alice's details and calls alice's introduced() with bob's."""
    callee, _, caller, mine, theirs = await introduce(rendezvous, alice, bob)
    assert mine.session == theirs.session
    assert mine.secret == theirs.secret
    assert mine.peer.peer_id == alice.peer_id
    assert mine.peer.observed == callee.hello.observed
    assert mine.peer.private == (("10.0.0.2", 7000),)
    assert theirs.peer.peer_id == bob.peer_id
    assert theirs.peer.observed == caller.hello.observed
    assert theirs.peer.listen_port == 6000
    assert theirs.methods == ("relay",)


@pytest_twisted.ensureDeferred
async def test_reverse_reaches_callee(
    rendezvous: Rendezvous, alice: Identity, bob: Identity
) -> None:
    """Reverse makes the server ask alice to dial bob's observed address."""
    _, handler, caller, mine, _ = await introduce(rendezvous, alice, bob)
    asked = handler.dial_backs.next()
    await within(rendezvous.reactor, caller.reverse(mine.session, 6000))
    assert await within(rendezvous.reactor, asked) == (mine.session, LOCALHOST, 6000)


@pytest_twisted.ensureDeferred
async def test_relay_moves_bytes_both_ways(
    rendezvous: Rendezvous, alice: Identity, bob: Identity
) -> None:
    """Both peers join the relay with their tokens; bytes cross it both ways."""
    reactor = rendezvous.reactor
    _, handler, caller, mine, _ = await introduce(rendezvous, alice, bob)
    offered = handler.relay_offers.next()
    caller_token, lifetime = await within(reactor, caller.relay(mine.session))
    session, callee_token, _ = await within(reactor, offered)
    assert session == mine.session
    assert lifetime > 0
    assert callee_token != caller_token
    bobs, alices = Collector(len(b"pong")), Collector(len(b"ping"))
    endpoint = rendezvous.endpoint()
    joined = await within(reactor, join_relay(reactor, endpoint, bob, caller_token, bobs))
    assert id(joined) == id(bobs)
    await within(reactor, join_relay(reactor, endpoint, alice, callee_token, alices))
    assert bobs.transport is not None
    assert alices.transport is not None
    bobs.transport.write(b"ping")
    alices.transport.write(b"pong")
    assert await within(reactor, alices.complete) == b"ping"
    assert await within(reactor, bobs.complete) == b"pong"
    bobs.transport.loseConnection()
    await within(reactor, bobs.gone)
    await within(reactor, alices.gone)


@pytest_twisted.ensureDeferred
async def test_server_stop_fails_requests_promptly(
    reactor: Any, alice: Identity, bob: Identity
) -> None:
    """When the server goes away the session's closed fires and requests fail at once."""
    async for rendezvous in _serve(reactor):
        session = await rendezvous.session(bob)
        closed = session.closed
        await within(reactor, rendezvous.service.stopService())
        await within(reactor, closed)
        with pytest.raises(RendezvousUnavailable):
            await within(reactor, session.lookup("alice"), 1.0)


@pytest_twisted.ensureDeferred
async def test_refused_connection_names_endpoint(reactor: Any, alice: Identity) -> None:
    """Nothing listening: RendezvousUnavailable naming the address."""
    async for rendezvous in _serve(reactor):
        port = rendezvous.port
        endpoint = rendezvous.endpoint()
    with pytest.raises(RendezvousUnavailable, match=f"127.0.0.1:{port}"):
        await within(reactor, open_session(reactor, endpoint, alice))


@pytest_twisted.ensureDeferred
async def test_access_key(guarded: Rendezvous, alice: Identity) -> None:
    """A rendezvous with an access key refuses a client without it, accepts one with it."""
    with pytest.raises(NotAuthenticated):
        await guarded.session(alice)
    session = await guarded.session(alice, access_key=b"sesame")
    assert session.peer_id == alice.peer_id


@pytest_twisted.ensureDeferred
async def test_registration_heals_after_server_drops_connections(
    rendezvous: Rendezvous, alice: Identity, bob: Identity
) -> None:
    """A Registration reconnects and registers again when the server drops its connection."""
    reactor = rendezvous.reactor
    registration = Registration(
        reactor,
        rendezvous.endpoint(),
        alice,
        "alice",
        listen_port=7000,
        private=[],
        handler=Handler(),
        retry_policy=lambda attempt: 0.05,
    )
    registration.startService()
    try:
        await within(reactor, registration.when_registered())
        first = registration.session
        assert first is not None
        lost = first.closed
        await within(reactor, rendezvous.service.factory.close_connections())
        await within(reactor, lost)
        looking = await rendezvous.session(bob)
        for _ in range(100):
            current = registration.session
            if current is not None and current is not first:
                break
            await within(reactor, _sleep(reactor, 0.05))
        assert registration.session is not None
        assert registration.session is not first
        info = await within(reactor, looking.lookup("alice"))
        assert info.observed == registration.session.hello.observed
    finally:
        await within(reactor, registration.stopService())
    assert getattr(registration, "session") is None  # noqa: B009 (mypy narrowed it)
    assert _client_timers(reactor) == []


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
