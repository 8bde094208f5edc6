"""
The rendezvous server on the real reactor, on loopback: two AMP clients
register, look up, are introduced, ask for reversal and for a relay (refused
without a hub, spliced with the real one); the service stops cleanly.  No
traffic leaves the host.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from nattraverse.errors import RelayRefused
from nattraverse.identity import Identity
from nattraverse.rendezvous.commands import (
    Authenticate,
    Connect,
    DialBack,
    Hello,
    Introduce,
    Lookup,
    Register,
    Relay,
    RelayJoin,
    RelayOffer,
    Reverse,
)
from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.server import RendezvousLimits, RendezvousService
from tests.integration.rendezvous_peer import Peer

LOCALHOST = "127.0.0.1"
#: Seconds any single wait in these tests may take.
WAIT = 5.0
ALICE, BOB = Identity.generate(), Identity.generate()


class Sink(Protocol):
    """The relayed side of a joined connection: collects bytes."""

    def __init__(self) -> None:
        self.data = b""
        self._want: tuple[int, Deferred[bytes]] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def wait_for(self, reactor: Any, size: int) -> Deferred[bytes]:
        """Fires with the data once *size* bytes arrived (within WAIT)."""
        d: Deferred[bytes] = Deferred()
        self._want = (size, d)
        self._check()
        return d.addTimeout(WAIT, reactor)

    def _check(self) -> None:
        if self._want is not None and len(self.data) >= self._want[0]:
            d = self._want[1]
            self._want = None
            d.callback(self.data)


class SinkFactory:
    """What a client's RelayJoin switches to."""

    def __init__(self) -> None:
        self.sink = Sink()

    def buildProtocol(self, address: object) -> Sink:
        return self.sink

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        pass

    def clientConnectionLost(self, connector: object, reason: Failure) -> None:
        pass


@dataclass
class Rendezvous:
    """A started service and the clients a test opened."""

    reactor: Any
    service: RendezvousService
    peers: list[Peer] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.service.ports[0].getHost().port)  # type: ignore[attr-defined]

    async def peer(self, identity: Identity | None = None) -> Peer:
        """A new client; authenticated as *identity* when given."""
        endpoint = TCP4ClientEndpoint(self.reactor, LOCALHOST, self.port, timeout=WAIT)
        peer: Peer = await connectProtocol(endpoint, Peer())
        self.peers.append(peer)
        if identity is not None:
            hello = await peer.call(Hello, version=1)
            await peer.call(
                Authenticate,
                public_key=identity.public_key_der,
                signature=identity.sign(hello["challenge"]),
            )
        return peer


Start = Callable[..., Rendezvous]


@pytest_twisted.async_yield_fixture
async def start(reactor: Any) -> AsyncIterator[Start]:
    """Starts rendezvous services on 127.0.0.1; stops them and checks nothing is left."""
    started: list[Rendezvous] = []

    def run(limits: RendezvousLimits | None = None, hub: RelayHub | None = None) -> Rendezvous:
        service = RendezvousService(
            reactor, [f"tcp:0:interface={LOCALHOST}"], limits, relay_hub=hub, stun_port=3478
        )
        service.startService()
        rendezvous = Rendezvous(reactor, service)
        started.append(rendezvous)
        return rendezvous

    yield run
    for rendezvous in started:
        for peer in rendezvous.peers:
            if peer.transport is not None:
                peer.transport.loseConnection()
        if rendezvous.service.running:
            await rendezvous.service.stopService()
        for peer in rendezvous.peers:
            await peer.closed
        assert rendezvous.service.factory.connections == set()
        assert rendezvous.service.ports == []


def connect_args(peer: str) -> dict[str, Any]:
    """Arguments of a Connect to *peer*."""
    return {"peer": peer, "listen_port": 0, "private": [], "methods": ["direct"]}


@pytest_twisted.ensureDeferred
async def test_hello_observes_loopback(start: Start) -> None:
    """Hello tells the client the address and port the server sees it at."""
    rendezvous = start()
    peer = await rendezvous.peer()
    hello = await peer.call(Hello, version=1)
    local: Any = peer.transport.getHost()  # type: ignore[union-attr]
    assert (hello["observed_host"], hello["observed_port"]) == (LOCALHOST, local.port)
    assert (hello["stun_port"], hello["relay"]) == (3478, False)


@pytest_twisted.ensureDeferred
async def test_two_clients_introduced(reactor: Any, start: Start) -> None:
    """A registered callee is found and introduced; both sides get the same session."""
    rendezvous = start()
    callee = await rendezvous.peer(ALICE)
    await callee.call(Register, name="alice", listen_port=8000, private=[])
    caller = await rendezvous.peer(BOB)
    found = await caller.call(Lookup, peer="alice")
    assert (found["peer_id"], found["observed_host"]) == (str(ALICE.peer_id), LOCALHOST)
    assert found["observed_port"] == callee.transport.getHost().port  # type: ignore[union-attr]
    answer = await caller.call(Connect, **connect_args("alice"))
    introduced = await callee.next(reactor, Introduce)
    assert (introduced["session"], introduced["secret"]) == (answer["session"], answer["secret"])
    assert introduced["peer_id"] == str(BOB.peer_id)
    assert introduced["observed_port"] == caller.transport.getHost().port  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_reverse_reaches_callee(reactor: Any, start: Start) -> None:
    """Reverse makes the server send the callee DialBack with the caller's observed address."""
    rendezvous = start()
    callee = await rendezvous.peer(ALICE)
    await callee.call(Register, name="alice", listen_port=0, private=[])
    caller = await rendezvous.peer(BOB)
    session = (await caller.call(Connect, **connect_args("alice")))["session"]
    await caller.call(Reverse, session=session, host=LOCALHOST, port=45678)
    dial_back = await callee.next(reactor, DialBack)
    assert dial_back == {"session": session, "host": LOCALHOST, "port": 45678}


@pytest_twisted.ensureDeferred
async def test_relay_refused_without_hub(start: Start) -> None:
    """Without a relay, Relay is refused with RelayRefused."""
    rendezvous = start()
    callee = await rendezvous.peer(ALICE)
    await callee.call(Register, name="alice", listen_port=0, private=[])
    caller = await rendezvous.peer(BOB)
    session = (await caller.call(Connect, **connect_args("alice")))["session"]
    with pytest.raises(RelayRefused, match="relay is off"):
        await caller.call(Relay, session=session)


@pytest_twisted.ensureDeferred
async def test_relay_spliced(reactor: Any, start: Start) -> None:
    """With the real hub, two fresh connections join and carry bytes both ways."""
    hub = RelayHub(reactor, RelayLimits(max_relays=2, rate=0, join_timeout=WAIT))
    rendezvous = start(hub=hub)
    callee = await rendezvous.peer(ALICE)
    await callee.call(Register, name="alice", listen_port=0, private=[])
    caller = await rendezvous.peer(BOB)
    session = (await caller.call(Connect, **connect_args("alice")))["session"]
    mine = await caller.call(Relay, session=session)
    offer = await callee.next(reactor, RelayOffer)
    assert offer["session"] == session
    assert offer["lifetime"] == mine["lifetime"] == hub.lifetime
    legs = []
    for identity, token in ((BOB, mine["token"]), (ALICE, offer["token"])):
        leg = await rendezvous.peer(identity)
        factory = SinkFactory()
        await leg.call(RelayJoin, factory, token=token)
        legs.append((leg, factory.sink))
    (caller_leg, caller_sink), (callee_leg, callee_sink) = legs
    caller_leg.transport.write(b"ping" * 1000)  # type: ignore[union-attr]
    callee_leg.transport.write(b"pong")  # type: ignore[union-attr]
    assert await callee_sink.wait_for(reactor, 4000) == b"ping" * 1000
    assert await caller_sink.wait_for(reactor, 4) == b"pong"


@pytest_twisted.ensureDeferred
async def test_handshake_timeout(start: Start) -> None:
    """A client that never authenticates is disconnected after the handshake timeout."""
    rendezvous = start(RendezvousLimits(handshake_timeout=0.2))
    peer = await rendezvous.peer()
    await peer.call(Hello, version=1)
    await peer.closed.addTimeout(WAIT, rendezvous.reactor)
    assert rendezvous.service.factory.stats.handshake_timeouts == 1


@pytest_twisted.ensureDeferred
async def test_stop_closes_everything(start: Start) -> None:
    """Stopping the service closes client connections and the listening port."""
    rendezvous = start()
    peer = await rendezvous.peer(ALICE)
    port = rendezvous.port
    await rendezvous.service.stopService()
    await peer.closed.addTimeout(WAIT, rendezvous.reactor)
    endpoint = TCP4ClientEndpoint(rendezvous.reactor, LOCALHOST, port, timeout=WAIT)
    with pytest.raises(ConnectError):
        await connectProtocol(endpoint, Protocol())
