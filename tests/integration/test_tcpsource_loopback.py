"""
:func:`~nattraverse.punch.tcpsource.from_shared_port` on real loopback
sockets (127.0.0.1 only): each supported rendezvous endpoint, plain and TLS
(a self-signed certificate made here), connects from the shared port, which
the server sees as the source port; refusals and cancellation leave no
socket, pending connect or timer behind (the ``world`` fixture checks).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import error, ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IAddress, IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from nattraverse.punch.tcpport import SharedTcpPort
from nattraverse.punch.tcpsource import from_shared_port

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
#: Seconds any one step may take before the test fails instead of hanging.
STEP = 10.0


class Peer(Protocol):
    """Echoes when :attr:`echo` is set; records what arrives and its source port."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.received = b""
        self.source_port: int | None = None
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        assert isinstance(peer, IPv4Address)
        self.source_port = peer.port

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)
        ready = [(n, d) for n, d in self._waiting if len(self.received) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.received) < n]
        for _, d in ready:
            d.callback(self.received)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)

    def expect(self, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._waiting.append((size, d))
        self.dataReceived(b"")
        return d


class Peers(Factory):
    """Builds :class:`Peer` protocols and keeps them all."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.made: list[Peer] = []

    def buildProtocol(self, addr: IAddress | None) -> Peer:
        peer = Peer(self.echo)
        peer.factory = self
        self.made.append(peer)
        return peer


def _open_fds() -> int:
    """How many sockets this process holds open."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
    return count


def within(reactor: Any, d: Deferred[T], seconds: float = STEP) -> Deferred[T]:
    """*d*, failing with TimeoutError after *seconds*."""
    return d.addTimeout(seconds, reactor)


async def _settle(reactor: Any, done: Callable[[], bool]) -> None:
    """Let the reactor run until done() holds, for at most STEP seconds."""
    deadline = time.monotonic() + STEP
    while not done() and time.monotonic() < deadline:
        await deferLater(reactor, 0.01, lambda: None)


def _certificate(name: str) -> tuple[bytes, bytes]:
    """A self-signed certificate for *name* and 127.0.0.1: (key PEM, certificate PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


class World:
    """Everything a test opens, closed by the fixture."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.shared: list[SharedTcpPort] = []
        self.listening: list[IListeningPort] = []
        self.factories: list[Peers] = []
        self.sockets: list[socket.socket] = []

    def shared_port(self) -> SharedTcpPort:
        shared = SharedTcpPort(self.reactor, LOCALHOST)
        self.shared.append(shared)
        return shared

    def peers(self, *, echo: bool = False) -> Peers:
        peers = Peers(echo)
        self.factories.append(peers)
        return peers

    def server(self) -> tuple[int, Peers]:
        """An echo server on 127.0.0.1: its port and the peers it accepts."""
        peers = self.peers(echo=True)
        port = self.reactor.listenTCP(0, peers, interface=LOCALHOST)
        self.listening.append(port)
        return port.getHost().port, peers

    def tls_server(self, key_pem: bytes, cert_pem: bytes) -> tuple[int, Peers]:
        """A TLS echo server on 127.0.0.1 with that key and certificate."""
        peers = self.peers(echo=True)
        options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
        port = self.reactor.listenSSL(0, peers, options, interface=LOCALHOST)
        self.listening.append(port)
        return port.getHost().port, peers

    def dropping(self) -> int:
        """A raw listener whose accept queue is full, so that it drops SYNs; its port."""
        listener = socket.socket()
        self.sockets.append(listener)
        listener.bind((LOCALHOST, 0))
        listener.listen(0)
        number: int = listener.getsockname()[1]
        # Loopback completes the handshake inside connect(); backlog 0 holds one.
        self.sockets.append(socket.create_connection((LOCALHOST, number), timeout=STEP))
        return number

    async def close(self) -> None:
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


@pytest_twisted.async_yield_fixture
async def world(reactor: Any) -> AsyncIterator[World]:
    """A World; afterwards no descriptor, pending connect or new timer is left."""
    fds = _open_fds()
    before = set(reactor.getDelayedCalls())
    w = World(reactor)
    try:
        yield w
    finally:
        await w.close()

    def new_calls() -> list[Any]:
        return [c for c in reactor.getDelayedCalls() if c not in before and c.active()]

    await _settle(reactor, lambda: _open_fds() == fds and not new_calls())
    assert _open_fds() == fds
    assert new_calls() == []
    assert [w for w in reactor.getWriters() if type(w).__name__ == "_Attempt"] == []


async def _round_trip(
    reactor: Any, world: World, endpoint: IStreamClientEndpoint, server: Peers
) -> SharedTcpPort:
    """Connect *endpoint* from a new shared port; check the source port and an echo."""
    shared = world.shared_port()
    shared.bind()
    client = await within(reactor, from_shared_port(endpoint, shared).connect(world.peers()))
    assert isinstance(client, Peer)
    assert client.transport is not None
    client.transport.write(b"hello")
    assert await within(reactor, client.expect(5)) == b"hello"
    assert len(server.made) == 1
    assert server.made[0].source_port == shared.port
    return shared


PLAIN: dict[str, Callable[[Any, int], IStreamClientEndpoint]] = {
    "tcp-string": lambda r, n: clientFromString(r, f"tcp:{LOCALHOST}:{n}"),
    "tcp4": lambda r, n: TCP4ClientEndpoint(r, LOCALHOST, n, timeout=5),
    "tcp4-name": lambda r, n: TCP4ClientEndpoint(r, "localhost", n),
    "hostname-literal": lambda r, n: HostnameEndpoint(r, LOCALHOST, n),
    "hostname-localhost": lambda r, n: HostnameEndpoint(r, b"localhost", n),
}


@pytest.mark.parametrize("kind", sorted(PLAIN))
@pytest_twisted.ensureDeferred
async def test_plain_endpoint_connects_from_the_shared_port(
    reactor: Any, world: World, kind: str
) -> None:
    """Each plain TCP endpoint connects from the shared port, which the server sees."""
    number, server = world.server()
    await _round_trip(reactor, world, PLAIN[kind](reactor, number), server)


@pytest.mark.parametrize("kind", ["tls-string", "wrapClientTLS"])
@pytest_twisted.ensureDeferred
async def test_tls_endpoint_connects_from_the_shared_port(
    reactor: Any, world: World, kind: str, tmp_path: Any
) -> None:
    """A TLS endpoint verifies the server, and its data flows from the shared port."""
    key_pem, cert_pem = _certificate("localhost")
    number, server = world.tls_server(key_pem, cert_pem)
    endpoint: IStreamClientEndpoint
    if kind == "tls-string":
        roots = tmp_path / "roots"
        roots.mkdir()
        (roots / "server.pem").write_bytes(cert_pem)
        endpoint = clientFromString(reactor, f"tls:localhost:{number}:trustRoots={roots}")
    else:
        options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(cert_pem))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOCALHOST, number))
    await _round_trip(reactor, world, endpoint, server)


@pytest_twisted.ensureDeferred
async def test_tls_keeps_verifying_the_name(reactor: Any, world: World) -> None:
    """The kept TLS options still refuse a certificate for another name."""
    key_pem, cert_pem = _certificate("elsewhere.test")
    number, _ = world.tls_server(key_pem, cert_pem)
    options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(cert_pem))
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOCALHOST, number))
    shared = world.shared_port()
    client = await within(reactor, from_shared_port(endpoint, shared).connect(world.peers()))
    assert isinstance(client, Peer)
    # The handshake fails after the TCP connect: the connection is dropped, nothing arrives.
    await within(reactor, client.lost)
    assert client.received == b""


@pytest_twisted.ensureDeferred
async def test_refused_leaves_nothing(reactor: Any, world: World) -> None:
    """A closed remote port fails with ConnectionRefusedError; the fixture finds no socket."""
    probe = socket.socket()
    probe.bind((LOCALHOST, 0))
    closed = probe.getsockname()[1]
    probe.close()
    shared = world.shared_port()
    endpoint = from_shared_port(HostnameEndpoint(reactor, "localhost", closed), shared)
    with pytest.raises(error.ConnectionRefusedError):
        await within(reactor, endpoint.connect(world.peers()))


@pytest.mark.parametrize("tls", [False, True])
@pytest_twisted.ensureDeferred
async def test_cancel_while_connecting_closes_the_socket(
    reactor: Any, world: World, tls: bool
) -> None:
    """Cancelling a pending connect (plain or TLS) closes its socket at once."""
    shared = world.shared_port()
    shared.bind()
    endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, LOCALHOST, world.dropping())
    if tls:
        endpoint = wrapClientTLS(ssl.optionsForClientTLS("localhost"), endpoint)
    fds = _open_fds()
    d = from_shared_port(endpoint, shared).connect(world.peers())
    assert _open_fds() == fds + 1  # the SYN is out, the socket waits
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert _open_fds() == fds


@pytest_twisted.ensureDeferred
async def test_cancel_while_resolving(reactor: Any, world: World) -> None:
    """Cancelling during name resolution fails with CancelledError and connects nowhere."""
    number, server = world.server()
    shared = world.shared_port()
    d = from_shared_port(HostnameEndpoint(reactor, "localhost", number), shared).connect(
        world.peers()
    )
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    # Let the resolver's thread answer: the late answer is ignored.
    await deferLater(reactor, 0.2, lambda: None)
    assert server.made == []
