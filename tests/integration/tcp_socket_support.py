"""
Helpers shared by the TCP loopback tests (shared port, sources, punching):
a protocol that records what arrives, a world of loopback sockets closed
after each test, and the checks that nothing is left behind (socket
descriptors, new timers, pending shared-port connects).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from nattraverse.punch.tcpport import SharedTcpPort

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
#: Seconds any one step may take before the test fails instead of hanging.
STEP = 10.0


def within(reactor: Any, d: Deferred[T], seconds: float = STEP) -> Deferred[T]:
    """*d*, failing with TimeoutError after *seconds*."""
    return d.addTimeout(seconds, reactor)


async def settle(reactor: Any, done: Callable[[], bool]) -> None:
    """Let the reactor run until done() holds, for at most STEP seconds."""
    deadline = time.monotonic() + STEP
    while not done() and time.monotonic() < deadline:
        await deferLater(reactor, 0.01, lambda: None)


def open_sockets() -> int:
    """How many sockets this process holds open."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        # The listing's own descriptor is closed by now.
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
    return count


def attempts(reactor: Any) -> list[Any]:
    """The pending SharedTcpPort connects the reactor watches."""
    return [w for w in reactor.getWriters() if type(w).__name__ == "_Attempt"]


def closed_port() -> int:
    """A port number on 127.0.0.1 that nothing is bound to (it was, a moment ago)."""
    probe = socket.socket()
    try:
        probe.bind((LOCALHOST, 0))
        number: int = probe.getsockname()[1]
    finally:
        probe.close()
    return number


class Recorder(Protocol):
    """Records what arrives; :meth:`expect` waits for an amount of it."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        ready = [(n, d) for n, d in self._waiting if len(self.received) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.received) < n]
        for _, d in ready:
            d.callback(self.received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.lost.called:
            self.lost.callback(None)

    def expect(self, size: int) -> Deferred[bytes]:
        """Fires with all received so far once at least *size* bytes have arrived."""
        d: Deferred[bytes] = Deferred()
        self._waiting.append((size, d))
        self.dataReceived(b"")
        return d


class Peer(Recorder):
    """A :class:`Recorder` on a TCP connection that echoes when :attr:`echo` is set."""

    def __init__(self, echo: bool = False) -> None:
        super().__init__()
        self.echo = echo

    def dataReceived(self, data: bytes) -> None:
        if self.echo and data:
            assert self.transport is not None
            self.transport.write(data)
        super().dataReceived(data)

    @property
    def ports(self) -> tuple[int, int]:
        """(local port, remote port) of the connection."""
        assert self.transport is not None
        host, peer = self.transport.getHost(), self.transport.getPeer()
        assert isinstance(host, IPv4Address)
        assert isinstance(peer, IPv4Address)
        return host.port, peer.port


class Peers(Factory):
    """Builds :class:`Peer` protocols and keeps them all."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.made: list[Peer] = []

    def buildProtocol(self, addr: IAddress | None) -> Peer:
        peer = Peer(self.echo)
        peer.factory = self
        self.made.append(peer)
        return peer


class SocketWorld:
    """Shared ports, listeners, connections and raw sockets a test opens, closed by its fixture."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.shared: list[SharedTcpPort] = []
        self.listening: list[IListeningPort] = []
        self.factories: list[Peers] = []
        self.sockets: list[socket.socket] = []

    def shared_port(self, port: int = 0) -> SharedTcpPort:
        """A SharedTcpPort on 127.0.0.1 (*port*, or any free one)."""
        shared = SharedTcpPort(self.reactor, LOCALHOST, port)
        self.shared.append(shared)
        return shared

    def peers(self, *, echo: bool = False) -> Peers:
        """A factory whose peers are closed afterwards."""
        peers = Peers(echo)
        self.factories.append(peers)
        return peers

    def listen_plain(self, *, echo: bool = False) -> tuple[IListeningPort, Peers]:
        """An ordinary Twisted listener on 127.0.0.1 and the peers it accepts."""
        peers = self.peers(echo=echo)
        port = self.reactor.listenTCP(0, peers, interface=LOCALHOST)
        self.listening.append(port)
        return port, peers

    def full_listener(self, port: int = 0, *, reuse: bool = False) -> int:
        """A raw listener whose accept queue is full, so that it drops SYNs; its port."""
        listener = socket.socket()
        self.sockets.append(listener)
        if reuse:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((LOCALHOST, port))
        listener.listen(0)
        number: int = listener.getsockname()[1]
        # Loopback completes the handshake inside connect(); backlog 0 holds one.
        self.sockets.append(socket.create_connection((LOCALHOST, number), timeout=STEP))
        return number

    async def close(self) -> None:
        """Close all of it: shared ports, listeners, connections, raw sockets."""
        for shared in self.shared:
            await within(self.reactor, shared.close())
        for port in self.listening:
            await within(self.reactor, port.stopListening())  # type: ignore[arg-type]
        for peers in self.factories:
            for peer in peers.made:
                if peer.transport is not None and not peer.lost.called:
                    peer.transport.loseConnection()
                    await within(self.reactor, peer.lost)
        for sock in self.sockets:
            sock.close()


W = TypeVar("W", bound=SocketWorld)


@contextlib.asynccontextmanager
async def nothing_left(reactor: Any, world: W) -> AsyncIterator[W]:
    """*world*, closed on exit; then no new descriptor, pending connect or new timer is left."""
    fds = open_sockets()
    before = set(reactor.getDelayedCalls())
    try:
        yield world
    finally:
        await world.close()

    def new_calls() -> list[Any]:
        return [c for c in reactor.getDelayedCalls() if c not in before and c.active()]

    await settle(reactor, lambda: open_sockets() == fds and not new_calls())
    assert open_sockets() == fds
    assert new_calls() == []
    assert attempts(reactor) == []
