"""
The STUN client on a real reactor: UDP and TCP sockets on 127.0.0.1 (and ::1
when available), answered by a small Binding responder written here with the
codec.  No traffic leaves the host.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

from nattraverse._types import Endpoint
from nattraverse.errors import BadRequest, StunTimeout
from nattraverse.stun.attributes import (
    Attribute,
    ErrorCode,
    ResponseOrigin,
    Software,
    Username,
    XorMappedAddress,
)
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.credentials import short_term_key
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.message import decode, encode, frame_length, is_stun
from nattraverse.stun.tcp_client import tcp_binding

LOCALHOST = "127.0.0.1"
PASSWORD = "correct horse"


def answer(data: bytes, source: Endpoint, origin: Endpoint) -> bytes | None:
    """
    Answer a Binding request: XOR-MAPPED-ADDRESS and RESPONSE-ORIGIN; 400
    when it carries SOFTWARE "please fail"; MESSAGE-INTEGRITY when it
    carries USERNAME.
    """
    if not is_stun(data):
        return None
    request = decode(data)
    if request.message_class is not MessageClass.REQUEST or request.method != Method.BINDING:
        return None
    key = None
    if request.get(Username) is not None:
        key = short_term_key(PASSWORD)
        request.check_integrity(key)
    attributes: list[Attribute]
    if request.get(Software) == Software("please fail"):
        klass = MessageClass.ERROR
        attributes = [ErrorCode(400, "Bad Request")]
    else:
        klass = MessageClass.SUCCESS
        attributes = [XorMappedAddress(source), ResponseOrigin(origin)]
    return encode(Method.BINDING, klass, request.transaction_id, attributes, integrity_key=key)


class UdpResponder(DatagramProtocol):
    """Answers Binding requests; ignores the first *drop* of them."""

    def __init__(self, drop: int = 0) -> None:
        self.drop = drop
        self.requests = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.requests += 1
        if self.requests <= self.drop:
            return
        assert self.transport is not None
        host = self.transport.getHost()
        reply = answer(datagram, Endpoint(addr[0], addr[1]), Endpoint(host.host, host.port))
        if reply is not None:
            self.transport.write(reply, addr)


class TcpResponder(Protocol):
    """Answers Binding requests framed over TCP."""

    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        assert self.transport is not None
        while len(self.buffer) >= 20 and len(self.buffer) >= frame_length(self.buffer):
            size = frame_length(self.buffer)
            message, self.buffer = self.buffer[:size], self.buffer[size:]
            peer, host = self.transport.getPeer(), self.transport.getHost()
            reply = answer(
                message,
                Endpoint(peer.host, peer.port),  # type: ignore[attr-defined]
                Endpoint(host.host, host.port),  # type: ignore[attr-defined]
            )
            if reply is not None:
                self.transport.write(reply)


@pytest_twisted.async_yield_fixture
async def ports(reactor: Any) -> AsyncIterator[list[Any]]:
    """Ports opened by a test; closed (and waited for) afterwards."""
    opened: list[Any] = []
    yield opened
    for port in opened:
        await maybeDeferred(port.stopListening)


def listen_udp(
    reactor: Any, ports: list[Any], protocol: DatagramProtocol, host: str = LOCALHOST
) -> Endpoint:
    port = reactor.listenUDP(0, protocol, interface=host)
    ports.append(port)
    return Endpoint(host, port.getHost().port)


@pytest_twisted.ensureDeferred
async def test_binding_over_udp(reactor: Any, ports: list[Any]) -> None:
    """A Binding request over real UDP returns the client's own address."""
    server = listen_udp(reactor, ports, UdpResponder())
    demux = StunDemultiplexer(reactor)
    client_address = listen_udp(reactor, ports, demux)
    response = await demux.client.binding(server, fingerprint=True)
    assert response.mapped_address == client_address
    assert response.response_origin == server
    assert response.source == server
    assert response.transmissions == 1
    assert demux.client.pending == 0


@pytest_twisted.ensureDeferred
async def test_retransmission_over_udp(reactor: Any, ports: list[Any]) -> None:
    """Lost requests are retransmitted until the server answers."""
    responder = UdpResponder(drop=2)
    server = listen_udp(reactor, ports, responder)
    demux = StunDemultiplexer(reactor, rto=0.05)
    listen_udp(reactor, ports, demux)
    response = await demux.client.binding(server)
    assert response.transmissions == 3
    assert responder.requests == 3


@pytest_twisted.ensureDeferred
async def test_error_response_over_udp(reactor: Any, ports: list[Any]) -> None:
    """An error response fails with the exception of its code."""
    server = listen_udp(reactor, ports, UdpResponder())
    demux = StunDemultiplexer(reactor)
    listen_udp(reactor, ports, demux)
    with pytest.raises(BadRequest) as info:
        await demux.client.binding(server, [Software("please fail")])
    assert info.value.code == 400


@pytest_twisted.ensureDeferred
async def test_integrity_over_udp(reactor: Any, ports: list[Any]) -> None:
    """A short-term-credential request gets a verified response."""
    server = listen_udp(reactor, ports, UdpResponder())
    demux = StunDemultiplexer(reactor)
    listen_udp(reactor, ports, demux)
    response = await demux.client.binding(
        server, [Username("alice:bob")], integrity_key=short_term_key(PASSWORD)
    )
    assert response.mapped_address is not None
    assert demux.client.stats.integrity_failed == 0


@pytest_twisted.ensureDeferred
async def test_timeout_over_udp(reactor: Any, ports: list[Any]) -> None:
    """A server that never answers makes the request fail with StunTimeout."""
    silent = listen_udp(reactor, ports, UdpResponder(drop=1000))
    demux = StunDemultiplexer(reactor, rto=0.02, rc=3, rm=2)
    listen_udp(reactor, ports, demux)
    with pytest.raises(StunTimeout) as info:
        await demux.client.binding(silent)
    assert info.value.server == silent
    assert demux.client.stats.transmissions == 3


@pytest_twisted.ensureDeferred
async def test_shared_port(reactor: Any, ports: list[Any]) -> None:
    """Other traffic on the client's port reaches the other handler while STUN works."""
    server = listen_udp(reactor, ports, UdpResponder())
    received: Deferred[tuple[bytes, Endpoint]] = Deferred()
    demux = StunDemultiplexer(reactor, other=lambda data, addr: received.callback((data, addr)))
    client_address = listen_udp(reactor, ports, demux)
    response = await demux.client.binding(server)
    assert response.mapped_address == client_address

    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind((LOCALHOST, 0))
        peer.sendto(b"\xc0not stun", client_address)
        data, source = await received
    finally:
        peer.close()
    assert data == b"\xc0not stun"
    assert source.host == LOCALHOST
    assert demux.stats.other == 1


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_binding_over_udp_ipv6(reactor: Any, ports: list[Any]) -> None:
    """The client works over IPv6 (::1)."""
    if not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this host")
    server = listen_udp(reactor, ports, UdpResponder(), host="::1")
    demux = StunDemultiplexer(reactor)
    client_address = listen_udp(reactor, ports, demux, host="::1")
    response = await demux.client.binding(server)
    assert response.mapped_address == client_address


@pytest_twisted.ensureDeferred
async def test_binding_over_tcp(reactor: Any, ports: list[Any]) -> None:
    """tcp_binding connects, asks and returns the client's address."""
    port = reactor.listenTCP(0, Factory.forProtocol(TcpResponder), interface=LOCALHOST)
    ports.append(port)
    server_port = port.getHost().port
    endpoint = TCP4ClientEndpoint(reactor, LOCALHOST, server_port, timeout=5)
    response = await tcp_binding(reactor, endpoint, fingerprint=True)
    assert response.mapped_address is not None
    assert response.mapped_address.host == LOCALHOST
    assert response.response_origin == Endpoint(LOCALHOST, server_port)
    assert response.source == Endpoint(LOCALHOST, server_port)
