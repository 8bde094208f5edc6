"""
:class:`~nattraverse.punch.tcpport.SharedTcpPort` on real loopback sockets
(127.0.0.1 only): listening and connecting from one port, simultaneous open,
failures, cancellation, TTL, release.  Every test leaves no port, socket,
descriptor or timer behind (the ``world`` fixture checks).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import error
from twisted.internet.defer import CancelledError, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from nattraverse.punch.tcpport import SharedTcpPort
from tests.integration.tcp_socket_support import (
    LOCALHOST,
    STEP,
    Peer,
    Peers,
    SocketWorld,
    attempts,
    closed_port,
    nothing_left,
    settle,
    within,
)


@pytest_twisted.async_yield_fixture
async def world(reactor: Any) -> AsyncIterator[SocketWorld]:
    """A SocketWorld; afterwards no descriptor, pending connect or new timer is left."""
    async with nothing_left(reactor, SocketWorld(reactor)) as w:
        yield w


async def _exchange(reactor: Any, one: Peer, other: Peer) -> None:
    """Data flows both ways between two ends of one connection."""
    assert one.transport is not None
    assert other.transport is not None
    one.transport.write(b"ping")
    other.transport.write(b"pong")
    assert await within(reactor, other.expect(4)) == b"ping"
    assert await within(reactor, one.expect(4)) == b"pong"


@pytest_twisted.ensureDeferred
async def test_listen_accepts_plain_client(reactor: Any, world: SocketWorld) -> None:
    """A plain TCP client connects to the shared port's listener."""
    shared = world.shared_port()
    host, number = shared.bind()
    assert (host, number) == (LOCALHOST, shared.port)
    accepted = world.peers()
    listening = shared.listen(accepted)
    assert listening.getHost().port == number  # type: ignore[attr-defined]
    client_peers = world.peers()
    client = await within(
        reactor, TCP4ClientEndpoint(reactor, LOCALHOST, number).connect(client_peers)
    )
    assert isinstance(client, Peer)
    await settle(reactor, lambda: len(accepted.made) == 1)
    assert len(accepted.made) == 1
    assert accepted.made[0].ports == (number, client.ports[0])
    await _exchange(reactor, client, accepted.made[0])


@pytest_twisted.ensureDeferred
async def test_connect_from_listening_port(reactor: Any, world: SocketWorld) -> None:
    """connect() leaves from the port that is listening, which keeps listening."""
    shared = world.shared_port()
    accepted = world.peers()
    shared.listen(accepted)
    remote, remote_peers = world.listen_plain()
    remote_number = remote.getHost().port  # type: ignore[attr-defined]
    mine = await within(
        reactor, shared.connect((LOCALHOST, remote_number), world.peers(), timeout=STEP)
    )
    assert isinstance(mine, Peer)
    assert mine.ports == (shared.port, remote_number)
    await settle(reactor, lambda: len(remote_peers.made) == 1)
    assert remote_peers.made[0].ports == (remote_number, shared.port)
    await _exchange(reactor, mine, remote_peers.made[0])
    # Still listening: a plain client gets through.
    await within(reactor, TCP4ClientEndpoint(reactor, LOCALHOST, shared.port).connect(Peers()))
    await settle(reactor, lambda: len(accepted.made) == 1)
    assert len(accepted.made) == 1


@pytest_twisted.ensureDeferred
async def test_connects_to_two_listeners_from_one_port(reactor: Any, world: SocketWorld) -> None:
    """Two connections to different remotes share the local port number."""
    shared = world.shared_port()
    shared.listen(world.peers())
    first, _ = world.listen_plain()
    second, _ = world.listen_plain()
    results = [
        await within(
            reactor,
            shared.connect((LOCALHOST, port.getHost().port), world.peers(), timeout=STEP),  # type: ignore[attr-defined]
        )
        for port in (first, second)
    ]
    assert [peer.ports[0] for peer in results] == [shared.port, shared.port]  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_simultaneous_connect_gives_one_connection_each(
    reactor: Any, world: SocketWorld
) -> None:
    """Two listening ports connecting to each other at once: one connection per side."""
    a, b = world.shared_port(), world.shared_port()
    a_accepted, b_accepted = world.peers(), world.peers()
    a.listen(a_accepted)
    b.listen(b_accepted)
    a_connected, b_connected = world.peers(), world.peers()
    da = a.connect((LOCALHOST, b.bind()[1]), a_connected, timeout=STEP)
    db = b.connect((LOCALHOST, a.port), b_connected, timeout=STEP)
    outcomes = await within(reactor, DeferredList([da, db], consumeErrors=True))
    # A connect that lost the race to the other side's listener finds its 4-tuple taken.
    for ok, value in outcomes:
        if not ok:
            assert isinstance(value, Failure)
            assert isinstance(value.value, error.ConnectError), value.value
    assert any(ok for ok, _ in outcomes)

    def ends(port: SharedTcpPort, other: SharedTcpPort, *made: Peers) -> list[Peer]:
        return [p for f in made for p in f.made if p.ports == (port.port, other.port)]

    await settle(
        reactor,
        lambda: (
            len(ends(a, b, a_accepted, a_connected)) >= 1
            and len(ends(b, a, b_accepted, b_connected)) >= 1
        ),
    )
    a_ends = ends(a, b, a_accepted, a_connected)
    b_ends = ends(b, a, b_accepted, b_connected)
    assert len(a_ends) == 1
    assert len(b_ends) == 1
    await _exchange(reactor, a_ends[0], b_ends[0])


@pytest_twisted.ensureDeferred
async def test_crossing_syns_connect_on_both_sides(reactor: Any, world: SocketWorld) -> None:
    """SYNs that cross (a true simultaneous open) make connect() succeed on both sides."""
    a, b = world.shared_port(), world.shared_port()
    a_accepted = world.peers()
    a.listen(a_accepted)
    # b's port listens with a full accept queue: a's first SYN is dropped there and a
    # stays in SYN-SENT, so b's SYN meets a's connecting socket rather than a listener.
    world.full_listener(b.bind()[1], reuse=True)
    da = a.connect((LOCALHOST, b.port), world.peers(), timeout=STEP)
    db = b.connect((LOCALHOST, a.port), world.peers(), timeout=STEP)
    mine, theirs = await within(reactor, da), await within(reactor, db)
    assert isinstance(mine, Peer)
    assert isinstance(theirs, Peer)
    assert mine.ports == (a.port, b.port)
    assert theirs.ports == (b.port, a.port)
    assert a_accepted.made == []
    await _exchange(reactor, mine, theirs)


@pytest_twisted.ensureDeferred
async def test_connect_refused(reactor: Any, world: SocketWorld) -> None:
    """A closed remote port fails the connect with ConnectionRefusedError."""
    closed = closed_port()
    shared = world.shared_port()
    with pytest.raises(error.ConnectionRefusedError):
        await within(reactor, shared.connect((LOCALHOST, closed), world.peers(), timeout=STEP))
    assert attempts(reactor) == []


@pytest_twisted.ensureDeferred
async def test_connect_times_out(reactor: Any, world: SocketWorld) -> None:
    """A remote that drops SYNs fails the connect with TimeoutError after the timeout."""
    dropping = world.full_listener()
    shared = world.shared_port()
    started = time.monotonic()
    with pytest.raises(error.TimeoutError):
        await within(reactor, shared.connect((LOCALHOST, dropping), world.peers(), timeout=0.2))
    assert 0.15 < time.monotonic() - started < STEP
    assert attempts(reactor) == []


@pytest_twisted.ensureDeferred
async def test_cancel_closes_socket(reactor: Any, world: SocketWorld) -> None:
    """Cancelling a pending connect closes its socket and stops watching it."""
    dropping = world.full_listener()
    shared = world.shared_port()
    connecting = shared.connect((LOCALHOST, dropping), world.peers(), timeout=STEP)
    [attempt] = attempts(reactor)
    fd = attempt.fileno()
    assert fd >= 0
    connecting.cancel()
    with pytest.raises(CancelledError):
        await connecting
    assert attempts(reactor) == []
    assert attempt.fileno() == -1
    with pytest.raises(OSError):  # noqa: PT011 -- EBADF, the descriptor is closed
        os.fstat(fd)


@pytest_twisted.ensureDeferred
async def test_close_cancels_pending_connect(reactor: Any, world: SocketWorld) -> None:
    """close() cancels a connect still in progress."""
    dropping = world.full_listener()
    shared = world.shared_port()
    connecting = shared.connect((LOCALHOST, dropping), world.peers(), timeout=STEP)
    await within(reactor, shared.close())
    with pytest.raises(CancelledError):
        await connecting
    assert attempts(reactor) == []


@pytest_twisted.ensureDeferred
async def test_low_ttl_connects_and_restores_default(reactor: Any, world: SocketWorld) -> None:
    """ttl=1 connects on loopback and the connected socket has the default TTL again."""
    fresh = socket.socket()
    default = fresh.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
    fresh.close()
    assert default != 1
    remote, _ = world.listen_plain()
    shared = world.shared_port()
    mine = await within(
        reactor,
        shared.connect((LOCALHOST, remote.getHost().port), world.peers(), timeout=STEP, ttl=1),  # type: ignore[attr-defined]
    )
    assert isinstance(mine, Peer)
    handle = mine.transport.getHandle()  # type: ignore[union-attr]
    assert handle.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == default


@pytest_twisted.ensureDeferred
async def test_close_releases_port(reactor: Any, world: SocketWorld) -> None:
    """After close() the port number binds again, shared or plain."""
    shared = world.shared_port()
    number = shared.bind()[1]
    shared.listen(world.peers())
    await within(reactor, shared.close())
    again = world.shared_port(number)
    assert again.bind() == (LOCALHOST, number)
    await within(reactor, again.close())
    plain = socket.socket()
    try:
        plain.bind((LOCALHOST, number))
        plain.listen(1)
    finally:
        plain.close()


@pytest_twisted.ensureDeferred
async def test_plain_socket_cannot_take_shared_port(reactor: Any, world: SocketWorld) -> None:
    """While shared, the port refuses a socket without SO_REUSEPORT."""
    number = world.shared_port().bind()[1]
    plain = socket.socket()
    try:
        with pytest.raises(OSError):  # noqa: PT011 -- EADDRINUSE
            plain.bind((LOCALHOST, number))
    finally:
        plain.close()


@pytest_twisted.ensureDeferred
async def test_bind_refused_raises_cannot_listen(reactor: Any, world: SocketWorld) -> None:
    """bind() on a port a plain socket holds raises CannotListenError naming SO_REUSEPORT."""
    plain = socket.socket()
    try:
        plain.bind((LOCALHOST, 0))
        number = plain.getsockname()[1]
        with pytest.raises(error.CannotListenError, match="SO_REUSEPORT"):
            world.shared_port(number).bind()
    finally:
        plain.close()


@pytest_twisted.ensureDeferred
async def test_factory_without_protocol_fails_and_closes(reactor: Any, world: SocketWorld) -> None:
    """A factory that builds no protocol fails the connect with NoProtocol; no socket kept."""
    remote, remote_peers = world.listen_plain()

    class Refusing(Factory):
        def buildProtocol(self, addr: IAddress | None) -> None:
            return None

    shared = world.shared_port()
    with pytest.raises(error.NoProtocol):
        await within(
            reactor,
            shared.connect((LOCALHOST, remote.getHost().port), Refusing(), timeout=STEP),  # type: ignore[attr-defined]
        )
    await settle(reactor, lambda: bool(remote_peers.made) and remote_peers.made[0].lost.called)
    assert remote_peers.made[0].lost.called


@pytest_twisted.ensureDeferred
async def test_client_endpoint_connects_from_shared_port(reactor: Any, world: SocketWorld) -> None:
    """client_endpoint() is an IStreamClientEndpoint connecting from the shared port."""
    remote, remote_peers = world.listen_plain()
    shared = world.shared_port()
    shared.listen(world.peers())
    endpoint = shared.client_endpoint((LOCALHOST, remote.getHost().port), timeout=STEP)  # type: ignore[attr-defined]
    assert verifyObject(IStreamClientEndpoint, endpoint)
    mine = await within(reactor, endpoint.connect(world.peers()))
    assert isinstance(mine, Peer)
    assert mine.ports[0] == shared.port
    await settle(reactor, lambda: len(remote_peers.made) == 1)
    assert remote_peers.made[0].ports[1] == shared.port
