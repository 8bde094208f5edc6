"""
:func:`~nattraverse.punch.tcpsource.from_shared_port` on real loopback
sockets (127.0.0.1 only): each supported rendezvous endpoint, plain and TLS
(a self-signed certificate made here), connects from the shared port, which
the server sees as the source port; refusals and cancellation leave no
socket, pending connect or timer behind (the ``world`` fixture checks).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import error, ssl
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater

from nattraverse.punch.tcpport import SharedTcpPort
from nattraverse.punch.tcpsource import from_shared_port
from tests.integration.tcp_socket_support import (
    LOCALHOST,
    Peer,
    Peers,
    SocketWorld,
    closed_port,
    nothing_left,
    open_sockets,
    within,
)


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


class World(SocketWorld):
    """Everything a test opens, closed by the fixture; servers echo."""

    def server(self) -> tuple[int, Peers]:
        """An echo server on 127.0.0.1: its port and the peers it accepts."""
        port, peers = self.listen_plain(echo=True)
        return port.getHost().port, peers  # type: ignore[attr-defined]

    def tls_server(self, key_pem: bytes, cert_pem: bytes) -> tuple[int, Peers]:
        """A TLS echo server on 127.0.0.1 with that key and certificate."""
        peers = self.peers(echo=True)
        options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
        port = self.reactor.listenSSL(0, peers, options, interface=LOCALHOST)
        self.listening.append(port)
        return port.getHost().port, peers


@pytest_twisted.async_yield_fixture
async def world(reactor: Any) -> AsyncIterator[World]:
    """A World; afterwards no descriptor, pending connect or new timer is left."""
    async with nothing_left(reactor, World(reactor)) as w:
        yield w


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
    assert server.made[0].ports[1] == shared.port
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
    closed = closed_port()
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
    endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, LOCALHOST, world.full_listener())
    if tls:
        endpoint = wrapClientTLS(ssl.optionsForClientTLS("localhost"), endpoint)
    fds = open_sockets()
    d = from_shared_port(endpoint, shared).connect(world.peers())
    assert open_sockets() == fds + 1  # the SYN is out, the socket waits
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert open_sockets() == fds


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
