"""
Bad input and abuse against the rendezvous on real loopback sockets:
malformed AMP frames, oversized values, someone else's key, unknown peers,
relay and reversal requests that are not the requester's to make, commands
before authentication.  Each gets a clear error (garbage frames: only that
connection is closed), and a well-behaved client is served afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from nattraverse.errors import (
    InvalidRequest,
    NameTaken,
    NotAuthenticated,
    PeerAuthenticationFailed,
    PeerNotFound,
    RelayRefused,
    ReversalRefused,
)
from nattraverse.identity import Identity
from nattraverse.rendezvous.commands import (
    Authenticate,
    Connect,
    Hello,
    Introduce,
    Lookup,
    Refresh,
    Register,
    Relay,
    Reverse,
)
from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.server import MAX_BOX_SIZE, RendezvousService
from tests.integration.rendezvous_peer import Peer

LOCALHOST = "127.0.0.1"
#: Seconds any single wait in these tests may take.
WAIT = 5.0
ALICE, MALLORY, CAROL = Identity.generate(), Identity.generate(), Identity.generate()


class Raw(Protocol):
    """A client that writes raw bytes and notices when it is cut off."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class Server:
    """A started rendezvous with a relay, and helpers to reach it."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.hub = RelayHub(reactor, RelayLimits(max_relays=4))
        self.service = RendezvousService(
            reactor, [f"tcp:0:interface={LOCALHOST}"], relay_hub=self.hub
        )
        self.service.startService()
        self.clients: list[Peer | Raw] = []

    def endpoint(self) -> TCP4ClientEndpoint:
        port: int = self.service.ports[0].getHost().port  # type: ignore[attr-defined]
        return TCP4ClientEndpoint(self.reactor, LOCALHOST, port, timeout=WAIT)

    async def raw(self) -> Raw:
        """A raw connection."""
        raw: Raw = await connectProtocol(self.endpoint(), Raw())
        self.clients.append(raw)
        return raw

    async def peer(self, identity: Identity | None = None) -> Peer:
        """An AMP connection, authenticated as *identity* when given."""
        peer: Peer = await connectProtocol(self.endpoint(), Peer())
        self.clients.append(peer)
        if identity is not None:
            hello = await peer.call(Hello, version=1)
            await peer.call(
                Authenticate,
                public_key=identity.public_key_der,
                signature=identity.sign(hello["challenge"]),
            )
        return peer

    async def still_serves(self) -> None:
        """A well-behaved client registers, refreshes and is found."""
        peer = await self.peer(CAROL)
        name = f"carol-{len(self.clients)}"
        await peer.call(Register, name=name, listen_port=0, private=[])
        await peer.call(Refresh)
        found = await peer.call(Lookup, peer=name)
        assert found["peer_id"] == str(CAROL.peer_id)

    async def closed(self, client: Peer | Raw) -> None:
        """Wait until the server closed *client*."""
        await client.closed.addTimeout(WAIT, self.reactor)


@pytest_twisted.async_yield_fixture
async def server(reactor: Any) -> AsyncIterator[Server]:
    """A rendezvous on 127.0.0.1; stopped afterwards, with nothing left open."""
    running = Server(reactor)
    yield running
    for client in running.clients:
        if client.transport is not None:
            client.transport.loseConnection()
    await running.service.stopService()
    for client in running.clients:
        await client.closed
    assert running.service.factory.connections == set()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: rendezvous\r\n\r\n",  # key length 0x4745 > 255
        b"\x00\x05hello\x00\x05world\x00\x00",  # a box with no command
        b"\x00\x08_command\x00\x05Hello\x00\x04_ask\x00\x011\x00\x07version\x00\x03one\x00\x00"
        b"\x00\x07_answer\x00\x0299\x00\x00",  # a bad number, then an answer to nothing
    ],
)
@pytest_twisted.ensureDeferred
async def test_garbage_closes_only_that_connection(server: Server, garbage: bytes) -> None:
    """Malformed AMP frames close that connection; the server keeps serving others."""
    bystander = await server.peer(ALICE)
    await bystander.call(Register, name="alice", listen_port=0, private=[])
    raw = await server.raw()
    raw.transport.write(garbage)  # type: ignore[union-attr]
    await server.closed(raw)
    await server.still_serves()
    assert (await bystander.call(Refresh))["ttl"] == 60.0


@pytest_twisted.ensureDeferred
async def test_oversized_box_closes(server: Server) -> None:
    """A box beyond the size cap closes the connection."""
    raw = await server.raw()
    box = amp.AmpBox(_command=b"Register", _ask=b"1", name=b"n" * 65000, private=b"p" * 65000)
    assert len(box.serialize()) > MAX_BOX_SIZE
    raw.transport.write(box.serialize())  # type: ignore[union-attr]
    await server.closed(raw)
    await server.still_serves()


@pytest_twisted.ensureDeferred
async def test_oversized_value_refused(server: Server) -> None:
    """An oversized name is refused with InvalidRequest; the connection stays usable."""
    peer = await server.peer(ALICE)
    with pytest.raises(InvalidRequest, match="name"):
        await peer.call(Register, name="a" * 60000, listen_port=0, private=[])
    private = [{"host": "10.0.0.1", "port": 1}] * 100
    with pytest.raises(InvalidRequest, match="private"):
        await peer.call(Register, name="alice", listen_port=0, private=private)
    await peer.call(Register, name="alice", listen_port=0, private=[])
    await server.still_serves()


@pytest_twisted.ensureDeferred
async def test_name_with_someone_elses_key(server: Server) -> None:
    """Another key cannot take a registered name, nor sign with a key it does not hold."""
    owner = await server.peer(ALICE)
    await owner.call(Register, name="alice", listen_port=0, private=[])
    thief = await server.peer(MALLORY)
    with pytest.raises(NameTaken, match="alice"):
        await thief.call(Register, name="alice", listen_port=0, private=[])
    impostor = await server.peer()
    hello = await impostor.call(Hello, version=1)
    with pytest.raises(PeerAuthenticationFailed):
        await impostor.call(
            Authenticate,
            public_key=ALICE.public_key_der,
            signature=MALLORY.sign(hello["challenge"]),
        )
    found = await thief.call(Lookup, peer="alice")
    assert found["peer_id"] == str(ALICE.peer_id)
    await server.still_serves()


@pytest_twisted.ensureDeferred
async def test_connect_to_unknown_peer(server: Server) -> None:
    """Connect to a peer nobody registered is PeerNotFound, naming it."""
    caller = await server.peer(MALLORY)
    with pytest.raises(PeerNotFound, match="ghost"):
        await caller.call(Connect, peer="ghost", listen_port=0, private=[], methods=[])
    await server.still_serves()


async def introduced(server: Server) -> tuple[Peer, Peer, bytes]:
    """Alice registered, Mallory introduced to her; their session id."""
    callee = await server.peer(ALICE)
    await callee.call(Register, name="alice", listen_port=0, private=[])
    caller = await server.peer(MALLORY)
    answer = await caller.call(Connect, peer="alice", listen_port=0, private=[], methods=[])
    return callee, caller, answer["session"]


@pytest_twisted.ensureDeferred
async def test_relay_for_session_not_introduced(server: Server) -> None:
    """A relay for a session that was never introduced, or is someone else's, is refused."""
    _, _, session = await introduced(server)
    stranger = await server.peer(CAROL)
    with pytest.raises(RelayRefused, match="not an introduction"):
        await stranger.call(Relay, session=b"\x00" * 16)
    with pytest.raises(RelayRefused, match="not an introduction"):
        await stranger.call(Relay, session=session)
    assert server.hub.pending == 0
    await server.still_serves()


@pytest_twisted.ensureDeferred
async def test_reverse_naming_another_address(server: Server) -> None:
    """A reversal asking to be dialed at another address is refused; the callee hears nothing."""
    callee, caller, session = await introduced(server)
    with pytest.raises(ReversalRefused, match=r"observes this peer at 127\.0\.0\.1"):
        await caller.call(Reverse, session=session, host="192.0.2.1", port=80)
    stranger = await server.peer(CAROL)
    with pytest.raises(ReversalRefused):
        await stranger.call(Reverse, session=session, port=80)
    await server.still_serves()
    # Anything the server sent the callee came before this answer.
    await callee.call(Refresh)
    assert [(command, len(sent)) for command, sent in callee.received.items()] == [
        (Introduce.commandName, 1)
    ]


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        (Register, {"name": "alice", "listen_port": 0, "private": []}),
        (Lookup, {"peer": "alice"}),
        (Connect, {"peer": "alice", "listen_port": 0, "private": [], "methods": []}),
        (Relay, {"session": b"\x00" * 16}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_commands_before_auth(
    server: Server, command: type[amp.Command], arguments: dict[str, Any]
) -> None:
    """Commands before Hello and Authenticate are refused with NotAuthenticated."""
    peer = await server.peer()
    with pytest.raises(NotAuthenticated):
        await peer.call(command, **arguments)
    await peer.call(Hello, version=1)
    with pytest.raises(NotAuthenticated):
        await peer.call(command, **arguments)
    await server.still_serves()
