"""
A rendezvous behind TLS: ``twistd natrendezvous --listen ssl:...`` on the
server side, ``rendezvous=tls\\:localhost\\:PORT\\:trustRoots=DIR`` in the
``punch:`` strings.  The client checks the server's certificate and name
with service-identity; the relay then runs inside that TLS connection (the
generic splice engine, since the sockets carry TLS records).  Loopback only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol

from nattraverse.errors import RendezvousUnavailable
from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.server import RendezvousService

TIMEOUT = 20.0
PAYLOAD_SIZE = 256 * 1024


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for *name* and 127.0.0.1: (key+cert PEM, CA directory)."""
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
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    server_pem = directory / "server.pem"
    server_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + pem
    )
    roots = directory / "roots"
    roots.mkdir()
    (roots / "rendezvous.pem").write_bytes(pem)
    return server_pem, roots


@pytest_twisted.async_yield_fixture
async def tls_rendezvous(reactor: Any, tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    """An in-process rendezvous on ``ssl:0`` (127.0.0.1); its port and trust roots."""
    server_pem, roots = _certificate(tmp_path, "localhost")
    service = RendezvousService(
        reactor,
        [f"ssl:0:interface=127.0.0.1:privateKey={server_pem}"],
        relay_hub=RelayHub(reactor, RelayLimits()),
    )
    service.startService()
    port = service.ports[0].getHost().port  # type: ignore[attr-defined]
    yield port, roots
    await service.stopService()


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Collector(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.complete: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= PAYLOAD_SIZE and not self.complete.called:
            self.complete.callback(bytes(self.received))


def _nested(description: str) -> str:
    return description.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


@pytest.mark.parametrize("methods", ["direct", "relay"])
@pytest_twisted.ensureDeferred
async def test_punch_through_a_tls_rendezvous(
    reactor: Any, tls_rendezvous: tuple[int, Path], tmp_path: Path, methods: str
) -> None:
    """Registration, introduction and the relay all work through a verified TLS rendezvous."""
    port, roots = tls_rendezvous
    rendezvous = _nested(f"tls:localhost:{port}:trustRoots={roots}")
    key = tmp_path / "alice.key"
    listening = await serverFromString(
        reactor,
        f"punch:name=alice:rendezvous={rendezvous}:identity={key}:interface=127.0.0.1",
    ).listen(Factory.forProtocol(Echo))
    try:
        collector = await clientFromString(
            reactor, f"punch:peer=alice:rendezvous={rendezvous}:methods={methods}:timeout=20"
        ).connect(Factory.forProtocol(Collector))
        assert isinstance(collector, Collector)
        payload = os.urandom(PAYLOAD_SIZE)
        collector.transport.write(payload)  # type: ignore[union-attr]
        assert await collector.complete.addTimeout(TIMEOUT, reactor) == payload
        assert collector.transport.method == methods  # type: ignore[union-attr]
        assert collector.transport.peer_id == listening.getHost().peer_id  # type: ignore[union-attr]
        collector.transport.loseConnection()  # type: ignore[union-attr]
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_rendezvous_with_the_wrong_name_is_refused(
    reactor: Any, tls_rendezvous: tuple[int, Path], tmp_path: Path
) -> None:
    """A certificate that does not name the host asked for fails the connect, saying so."""
    port, roots = tls_rendezvous
    rendezvous = _nested(
        f"tls:rv.example.org:{port}:trustRoots={roots}:endpoint=tcp\\:127.0.0.1\\:{port}"
    )
    with pytest.raises(RendezvousUnavailable, match=r"rv\.example\.org"):
        await clientFromString(
            reactor, f"punch:peer=alice:rendezvous={rendezvous}:timeout=10"
        ).connect(Factory.forProtocol(Collector))
