"""
The UDP relay on the real reactor, on loopback: a real rendezvous server
with a :class:`UdpRelayHub` on 127.0.0.1, real client sessions that ask for
and are offered a UDP relay over AMP, and two real UDP sockets that latch
onto the relay port and exchange datagrams through it.  Each test checks
that the relay port is closed at the end.  No traffic leaves the host.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from zope.interface import implementer

from nattraverse._types import Endpoint
from nattraverse.errors import RelayRefused
from nattraverse.identity import Identity
from nattraverse.rendezvous.client import (
    Introduction,
    IRendezvousHandler,
    RendezvousSession,
    open_session,
)
from nattraverse.rendezvous.commands import udp_credentials
from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.server import RendezvousService
from nattraverse.rendezvous.udprelay import UdpRelayHub, udp_sockets
from nattraverse.stun.attributes import Username, XorMappedAddress
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import decode, encode

LOCALHOST = "127.0.0.1"
#: Seconds any one wait may take before the test fails instead of hanging.
STEP = 10.0


@implementer(IRendezvousHandler)
class Handler:
    """A callee's handler: keeps UDP relay offers (and ignores the rest)."""

    def __init__(self) -> None:
        self.introduced_to: Deferred[Introduction] = Deferred()
        self.offered: Deferred[tuple[bytes, int, bytes, float]] = Deferred()

    def introduced(self, introduction: Introduction) -> None:
        self.introduced_to.callback(introduction)

    def dial_back(self, session: bytes, host: str, port: int) -> None:
        pass

    def relay_offer(self, session: bytes, token: bytes, lifetime: float) -> None:
        pass

    def udp_relay_offer(self, session: bytes, port: int, token: bytes, lifetime: float) -> None:
        self.offered.callback((session, port, token, lifetime))


class Punching(DatagramProtocol):
    """A peer's punching socket: keeps every datagram it receives, with its source."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Endpoint]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, Endpoint(addr[0], addr[1])))

    @property
    def address(self) -> Endpoint:
        host = self.transport.getHost()  # type: ignore[union-attr]
        return Endpoint(host.host, host.port)

    def send(self, data: bytes, destination: Endpoint) -> None:
        self.transport.write(data, destination)  # type: ignore[union-attr]


async def settle(reactor: Any, done: Callable[[], bool], what: str, wait: float = STEP) -> None:
    """Let the reactor run until *done*, for at most *wait* seconds."""
    deadline = time.monotonic() + wait
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {wait}s")
        await deferLater(reactor, 0.01)


def latch_request(token: bytes, transaction: bytes) -> bytes:
    """A latch request for *token*."""
    username, key = udp_credentials(token)
    return encode(
        Method.BINDING,
        MessageClass.REQUEST,
        transaction,
        [Username(username)],
        integrity_key=key,
        fingerprint=True,
    )


async def latch(reactor: Any, peer: Punching, relay: Endpoint, token: bytes) -> Endpoint:
    """Latch *peer* onto *relay* (retransmitting): the address the relay answers it saw."""
    transaction = token[:12]
    request = latch_request(token, transaction)
    for _ in range(20):
        peer.send(request, relay)
        try:
            await settle(reactor, lambda: bool(peer.received), "the latch answer", 0.25)
        except AssertionError:
            continue
        reply, source = peer.received.pop(0)
        assert source == relay
        message = decode(reply)
        assert message.message_class == MessageClass.SUCCESS
        assert message.transaction_id == transaction
        message.check_integrity(udp_credentials(token)[1])
        mapped = message.get(XorMappedAddress)
        assert mapped is not None
        return mapped.address
    raise AssertionError(f"no answer to the latch at {relay}")


def port_is_free(port: int) -> bool:
    """Whether a UDP socket may bind *port* of 127.0.0.1 (nothing holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


class Rig:
    """A running rendezvous with a UDP relay, the sessions and sockets opened on it."""

    def __init__(self, reactor: Any, service: RendezvousService, hub: UdpRelayHub | None) -> None:
        self.reactor = reactor
        self.service = service
        self.hub = hub
        self.port: int = service.ports[0].getHost().port  # type: ignore[attr-defined]
        self.sessions: list[RendezvousSession] = []
        self.sockets: list[Any] = []

    async def session(self, identity: Identity, **kwargs: Any) -> RendezvousSession:
        endpoint = TCP4ClientEndpoint(self.reactor, LOCALHOST, self.port, timeout=5)
        d = open_session(self.reactor, endpoint, identity, **kwargs)
        session = await d.addTimeout(STEP, self.reactor)
        self.sessions.append(session)
        return session

    def punching(self) -> Punching:
        peer = Punching()
        self.sockets.append(self.reactor.listenUDP(0, peer, interface=LOCALHOST))
        return peer

    async def introduced(
        self, alice: Identity, bob: Identity
    ) -> tuple[RendezvousSession, Handler, RendezvousSession, Introduction]:
        """Alice registers and is introduced to Bob: her session and handler, his, his view."""
        handler = Handler()
        callee = await self.session(alice, handler=handler)
        await callee.register("alice", 0, []).addTimeout(STEP, self.reactor)
        caller = await self.session(bob)
        introduction = await caller.connect("alice", 0, [], ["udp"]).addTimeout(STEP, self.reactor)
        await handler.introduced_to.addTimeout(STEP, self.reactor)
        return callee, handler, caller, introduction


async def _serve(reactor: Any, *, udp_relay: bool = True, **hub: Any) -> AsyncIterator[Rig]:
    limits = RelayLimits(join_timeout=5.0)
    udp_hub = (
        UdpRelayHub(reactor, limits, udp_sockets(reactor, LOCALHOST), **hub) if udp_relay else None
    )
    service = RendezvousService(
        reactor,
        [f"tcp:0:interface={LOCALHOST}"],
        relay_hub=RelayHub(reactor, limits),
        udp_relay_hub=udp_hub,
    )
    service.startService()
    rig = Rig(reactor, service, udp_hub)
    try:
        yield rig
    finally:
        for session in rig.sessions:
            closed = session.closed
            session.close()
            await closed.addTimeout(STEP, reactor)
        for listening in rig.sockets:
            await listening.stopListening()
        if service.running:
            await service.stopService().addTimeout(STEP, reactor)
        assert [
            call
            for call in reactor.getDelayedCalls()
            if getattr(call.func, "__module__", "") == "nattraverse.rendezvous.udprelay"
        ] == []


@pytest_twisted.async_yield_fixture
async def rig(reactor: Any) -> AsyncIterator[Rig]:
    """A rendezvous on 127.0.0.1 whose UDP relay closes after 1 s idle."""
    async for running in _serve(reactor, idle_timeout=1.0):
        yield running


@pytest_twisted.async_yield_fixture
async def no_udp_relay(reactor: Any) -> AsyncIterator[Rig]:
    """A rendezvous on 127.0.0.1 with its UDP relay off."""
    async for running in _serve(reactor, udp_relay=False):
        yield running


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate()


@pytest_twisted.ensureDeferred
async def test_datagrams_cross_both_ways(rig: Rig, alice: Identity, bob: Identity) -> None:
    """Allocated over AMP, latched by both sockets, the relay carries datagrams both ways."""
    reactor = rig.reactor
    callee, handler, caller, introduction = await rig.introduced(alice, bob)
    assert caller.udp_relay_available
    assert callee.udp_relay_available
    port, caller_token, lifetime = await caller.udp_relay(introduction.session).addTimeout(
        STEP, reactor
    )
    session, offered_port, callee_token, offered_lifetime = await handler.offered.addTimeout(
        STEP, reactor
    )
    assert (session, offered_port, offered_lifetime) == (introduction.session, port, lifetime)
    assert caller_token != callee_token
    relay = Endpoint(LOCALHOST, port)
    caller_socket, callee_socket = rig.punching(), rig.punching()
    assert await latch(reactor, caller_socket, relay, caller_token) == caller_socket.address
    assert await latch(reactor, callee_socket, relay, callee_token) == callee_socket.address

    caller_socket.send(b"\xc0 from the caller", relay)
    await settle(reactor, lambda: bool(callee_socket.received), "the caller's datagram")
    assert callee_socket.received.pop() == (b"\xc0 from the caller", relay)
    callee_socket.send(b"\x40 from the callee", relay)
    await settle(reactor, lambda: bool(caller_socket.received), "the callee's datagram")
    assert caller_socket.received.pop() == (b"\x40 from the callee", relay)
    hub = rig.hub
    assert hub is not None
    assert (hub.stats.datagrams, hub.active) == (2, 1)

    # Idle for a second: the relay ends and its port is closed.
    await settle(reactor, lambda: len(hub) == 0, "the idle relay to end")
    await settle(reactor, lambda: port_is_free(port), "the relay port to close")


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_closes_the_port(
    rig: Rig, alice: Identity, bob: Identity
) -> None:
    """A relay waiting for its sides is closed, port and timers, when the service stops."""
    _, handler, caller, introduction = await rig.introduced(alice, bob)
    port, _, _ = await caller.udp_relay(introduction.session).addTimeout(STEP, rig.reactor)
    await handler.offered.addTimeout(STEP, rig.reactor)
    assert not port_is_free(port)
    await rig.service.stopService().addTimeout(STEP, rig.reactor)
    assert rig.hub is not None
    assert len(rig.hub) == 0
    assert port_is_free(port)


@pytest_twisted.ensureDeferred
async def test_second_request_for_a_session_refused(
    rig: Rig, alice: Identity, bob: Identity
) -> None:
    """The callee asking for the session's UDP relay after the caller did is refused."""
    callee, handler, caller, introduction = await rig.introduced(alice, bob)
    await caller.udp_relay(introduction.session).addTimeout(STEP, rig.reactor)
    await handler.offered.addTimeout(STEP, rig.reactor)
    with pytest.raises(RelayRefused, match="already has a UDP relay"):
        await callee.udp_relay(introduction.session).addTimeout(STEP, rig.reactor)


@pytest_twisted.ensureDeferred
async def test_udp_relay_off(no_udp_relay: Rig, alice: Identity, bob: Identity) -> None:
    """With the UDP relay off, Hello says so and UdpRelay is refused."""
    _, _, caller, introduction = await no_udp_relay.introduced(alice, bob)
    assert not caller.udp_relay_available
    with pytest.raises(RelayRefused, match="UDP relay is off"):
        await caller.udp_relay(introduction.session).addTimeout(STEP, no_udp_relay.reactor)


@pytest_twisted.ensureDeferred
async def test_not_introduced_refused(rig: Rig, alice: Identity) -> None:
    """A session that is not an introduction of this peer gets no UDP relay."""
    session = await rig.session(alice)
    with pytest.raises(RelayRefused, match="not an introduction"):
        await session.udp_relay(b"z" * 16).addTimeout(STEP, rig.reactor)
