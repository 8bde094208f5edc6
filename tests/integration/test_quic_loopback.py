"""
The QUIC path (:mod:`nattraverse.quic`) on real loopback UDP sockets with
the real reactor: a megabyte echoed intact, then a clean close that leaves
no timer behind.  No traffic leaves 127.0.0.1.
"""

from __future__ import annotations

import os
from typing import Any

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.python.failure import Failure

from nattraverse.identity import Identity
from nattraverse.quic import QuicPath, is_quic

LOCALHOST = "127.0.0.1"
#: Seconds the whole exchange may take.
WAIT = 30.0
MEGABYTE = 1024 * 1024


class Socket(DatagramProtocol):
    """A UDP socket that feeds QUIC datagrams to its path (and would give STUN elsewhere)."""

    path: QuicPath | None = None
    other = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.path is not None and is_quic(datagram):
            self.path.datagram_received(datagram, (addr[0], addr[1]))
        else:
            self.other += 1

    def send(self, datagram: bytes, address: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.write(datagram, address)


class Echo(Protocol):
    """Sends back everything; closes when the peer has finished."""

    def __init__(self) -> None:
        self.closed: defer.Deferred[BaseException] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.closed.callback(reason.value or ConnectionDone())


class Collector(Protocol):
    """Collects until it has *size* bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray()
        self.full: defer.Deferred[bytes] = defer.Deferred()
        self.closed: defer.Deferred[BaseException] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.size and not self.full.called:
            self.full.callback(bytes(self.data))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.closed.callback(reason.value or ConnectionDone())


@pytest_twisted.ensureDeferred
async def test_megabyte_echoed_over_loopback_udp() -> None:
    """1 MB written by the caller comes back intact from the callee's echo."""
    from twisted.internet import reactor

    caller_identity, callee_identity = Identity.generate(), Identity.generate()
    caller_socket, callee_socket = Socket(), Socket()
    caller_port = reactor.listenUDP(0, caller_socket, interface=LOCALHOST)  # type: ignore[attr-defined]
    callee_port = reactor.listenUDP(0, callee_socket, interface=LOCALHOST)  # type: ignore[attr-defined]
    caller_address = (LOCALHOST, caller_port.getHost().port)
    callee_address = (LOCALHOST, callee_port.getHost().port)
    try:
        caller = QuicPath(
            reactor,
            caller_identity,
            "caller",
            callee_identity.peer_id,
            caller_socket.send,
            callee_address,
            local=caller_address,
        )
        callee = QuicPath(
            reactor,
            callee_identity,
            "callee",
            caller_identity.peer_id,
            callee_socket.send,
            caller_address,
            local=callee_address,
        )
        caller_socket.path, callee_socket.path = caller, callee
        callee.start()
        caller.start()
        await caller.authenticated.addTimeout(WAIT, reactor)
        payload = os.urandom(MEGABYTE)
        collector = Collector(len(payload))
        caller.select(Factory.forProtocol(lambda: collector))
        await callee.authenticated.addTimeout(WAIT, reactor)
        echo = Echo()
        callee.attach(Factory.forProtocol(lambda: echo))
        assert collector.transport is not None
        collector.transport.write(payload)
        received = await collector.full.addTimeout(WAIT, reactor)
        assert received == payload
        collector.transport.loseConnection()
        reasons = await defer.gatherResults([collector.closed, echo.closed]).addTimeout(
            WAIT, reactor
        )
        for reason in reasons:
            assert isinstance(reason, ConnectionDone)
        assert caller._timer is None
        assert callee._timer is None
    finally:
        await defer.gatherResults(
            [
                defer.maybeDeferred(caller_port.stopListening),
                defer.maybeDeferred(callee_port.stopListening),
            ]
        )
