"""
The UDP binding end to end on loopback: the real rendezvous and the real
STUN server (fast path included) sharing one token table, the client's
``bind_udp`` and ``Registration`` on real StunDemultiplexer sockets.  The
addresses peers learn of each other are the ones the STUN server observed.
No traffic leaves 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from nattraverse._types import Endpoint
from nattraverse.identity import Identity
from nattraverse.rendezvous.client import (
    Introduction,
    IRendezvousHandler,
    RendezvousSession,
    open_session,
)
from nattraverse.rendezvous.commands import udp_credentials
from nattraverse.rendezvous.registration import Registration
from nattraverse.rendezvous.server import RendezvousService
from nattraverse.rendezvous.udpbind import UdpBindings
from nattraverse.stun.attributes import ErrorCode, Username
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.message import decode, encode
from nattraverse.stun.server import StunServer

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
#: Seconds any one step may take before the test fails instead of hanging.
STEP = 10.0
ALICE, BOB = Identity.generate(), Identity.generate()


def within(reactor: Any, d: Deferred[T], seconds: float = STEP) -> Deferred[T]:
    """*d*, failing with TimeoutError after *seconds*."""
    return d.addTimeout(seconds, reactor)


@implementer(IRendezvousHandler)
class Handler:
    """Records introductions; :meth:`next` waits for the next one."""

    def __init__(self) -> None:
        self.introductions: list[Introduction] = []
        self._waiting: list[Deferred[Introduction]] = []

    def next(self) -> Deferred[Introduction]:
        d: Deferred[Introduction] = Deferred()
        self._waiting.append(d)
        return d

    def introduced(self, introduction: Introduction) -> None:
        self.introductions.append(introduction)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(introduction)

    def dial_back(self, session: bytes, host: str, port: int) -> None:
        pass

    def relay_offer(self, session: bytes, token: bytes, lifetime: float) -> None:
        pass

    def udp_relay_offer(self, session: bytes, port: int, token: bytes, lifetime: float) -> None:
        pass


class Catcher(DatagramProtocol):
    """A raw UDP socket: fires :attr:`received` with the first datagram."""

    def __init__(self) -> None:
        self.received: Deferred[bytes] = Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if not self.received.called:
            self.received.callback(datagram)


class Servers:
    """The STUN server and the rendezvous, sharing a token table, and the sockets made."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.bindings = UdpBindings(capacity=100)
        self.stun = StunServer(
            reactor, interface=LOCALHOST, port=0, tcp=False, bindings=self.bindings
        )
        self.stun.startService()
        self.rendezvous = RendezvousService(
            reactor,
            [f"tcp:0:interface={LOCALHOST}"],
            stun_port=self.stun.endpoint().port,
            udp_bindings=self.bindings,
        )
        self.rendezvous.startService()
        self.sessions: list[RendezvousSession] = []
        self.ports: list[IListeningPort] = []

    def endpoint(self) -> TCP4ClientEndpoint:
        port = self.rendezvous.ports[0].getHost().port  # type: ignore[attr-defined]
        return TCP4ClientEndpoint(self.reactor, LOCALHOST, port, timeout=5)

    async def session(self, identity: Identity, **kwargs: Any) -> RendezvousSession:
        session = await within(
            self.reactor, open_session(self.reactor, self.endpoint(), identity, **kwargs)
        )
        self.sessions.append(session)
        return session

    def socket(self) -> tuple[StunDemultiplexer, Endpoint]:
        """A punching socket on loopback, and its address."""
        demux = StunDemultiplexer(self.reactor)
        port = self.reactor.listenUDP(0, demux, interface=LOCALHOST)
        self.ports.append(port)
        return demux, Endpoint(LOCALHOST, port.getHost().port)

    def raw(self) -> tuple[Catcher, IListeningPort]:
        catcher = Catcher()
        port = self.reactor.listenUDP(0, catcher, interface=LOCALHOST)
        self.ports.append(port)
        return catcher, port

    async def close(self) -> None:
        for session in self.sessions:
            closed = session.closed
            session.close()
            await within(self.reactor, closed)
        for port in self.ports:
            await within(self.reactor, maybeDeferred(port.stopListening))
        await within(self.reactor, self.rendezvous.stopService())
        await within(self.reactor, self.stun.stopService())


def _leftover_timers(reactor: Any) -> list[Any]:
    """The reactor's timers that belong to the rendezvous client or the STUN client."""
    modules = (
        "nattraverse.rendezvous._protocol",
        "nattraverse.rendezvous.client",
        "nattraverse.rendezvous.registration",
        "nattraverse.stun.client",
    )
    return [
        call
        for call in reactor.getDelayedCalls()
        if getattr(call.func, "__module__", "") in modules
    ]


@pytest_twisted.async_yield_fixture
async def servers(reactor: Any) -> AsyncIterator[Servers]:
    """STUN and rendezvous on 127.0.0.1, on free ports."""
    running = Servers(reactor)
    try:
        yield running
    finally:
        await running.close()
        assert len(running.bindings) == 0
        assert _leftover_timers(reactor) == []


@pytest_twisted.ensureDeferred
async def test_bind_udp_observes_the_socket(servers: Servers) -> None:
    """bind_udp fires with the socket's own address, as the STUN server observed it."""
    session = await servers.session(ALICE)
    demux, address = servers.socket()
    assert await within(servers.reactor, session.bind_udp(demux)) == address
    assert servers.stun.stats.bindings == 1


@pytest_twisted.ensureDeferred
async def test_peers_learn_each_other_udp(servers: Servers) -> None:
    """Lookup and Connect show the callee's bound socket; Introduce carries the caller's."""
    handler = Handler()
    callee = await servers.session(ALICE, handler=handler)
    callee_udp, callee_address = servers.socket()
    await within(servers.reactor, callee.bind_udp(callee_udp))
    await within(servers.reactor, callee.register("alice", 0, [], udp_private=[callee_address]))
    caller = await servers.session(BOB)
    caller_udp, caller_address = servers.socket()
    await within(servers.reactor, caller.bind_udp(caller_udp))

    found = await within(servers.reactor, caller.lookup("alice"))
    assert found.udp == callee_address
    assert found.udp_private == (callee_address,)

    introduced = handler.next()
    introduction = await within(
        servers.reactor,
        caller.connect("alice", 0, [], ["udp"], udp_private=[caller_address]),
    )
    assert introduction.peer.udp == callee_address
    other_side = await within(servers.reactor, introduced)
    assert other_side.peer.udp == caller_address
    assert other_side.peer.udp_private == (caller_address,)


@pytest_twisted.ensureDeferred
async def test_wrong_key_records_nothing(servers: Servers) -> None:
    """A request with the right USERNAME and a wrong key gets 401; nothing is recorded."""
    callee = await servers.session(ALICE)
    await within(servers.reactor, callee.register("alice", 0, []))
    username, _ = udp_credentials(callee.hello.udp_token)
    catcher, port = servers.raw()
    request = encode(
        Method.BINDING,
        MessageClass.REQUEST,
        b"w" * 12,
        [Username(username)],
        integrity_key=b"not the key.....",
        fingerprint=True,
    )
    port.write(request, tuple(servers.stun.endpoint()))  # type: ignore[attr-defined]
    data = await within(servers.reactor, catcher.received)
    answer = decode(data)
    error = answer.get(ErrorCode)
    assert error is not None
    assert error.code == 401
    assert servers.stun.stats.integrity_failed == 1
    caller = await servers.session(BOB)
    found = await within(servers.reactor, caller.lookup("alice"))
    assert found.udp is None


@pytest_twisted.ensureDeferred
async def test_plain_request_still_answered(servers: Servers) -> None:
    """A standard unauthenticated Binding request (fast path) is answered as before."""
    catcher, port = servers.raw()
    request = encode(Method.BINDING, MessageClass.REQUEST, b"p" * 12)
    port.write(request, tuple(servers.stun.endpoint()))  # type: ignore[attr-defined]
    data = await within(servers.reactor, catcher.received)
    answer = decode(data)
    assert answer.message_class == MessageClass.SUCCESS
    assert servers.stun.stats.bindings == 0


@pytest_twisted.ensureDeferred
async def test_keepalive_from_a_new_socket_updates(servers: Servers) -> None:
    """Binding again from another port (a NAT rebinding) changes what Lookup shows."""
    callee = await servers.session(ALICE)
    first, _ = servers.socket()
    await within(servers.reactor, callee.bind_udp(first))
    await within(servers.reactor, callee.register("alice", 0, []))
    second, second_address = servers.socket()
    assert await within(servers.reactor, callee.bind_udp(second)) == second_address
    caller = await servers.session(BOB)
    found = await within(servers.reactor, caller.lookup("alice"))
    assert found.udp == second_address


@pytest_twisted.ensureDeferred
async def test_token_dies_with_the_session(servers: Servers) -> None:
    """When the session closes its token is revoked."""
    session = await servers.session(ALICE)
    assert len(servers.bindings) == 1
    closed = session.closed
    session.close()
    await within(servers.reactor, closed)
    for _ in range(100):
        if len(servers.bindings) == 0:
            break
        await within(servers.reactor, _sleep(servers.reactor, 0.01))
    assert len(servers.bindings) == 0


@pytest_twisted.ensureDeferred
async def test_registration_binds_and_keeps_alive(servers: Servers) -> None:
    """A Registration with a UDP socket binds it, callers see it, and the keepalive runs."""
    demux, address = servers.socket()
    registration = Registration(
        servers.reactor,
        servers.endpoint(),
        ALICE,
        "alice",
        listen_port=0,
        private=[],
        handler=Handler(),
        udp=demux,
        udp_keepalive=0.2,
    )
    registration.startService()
    try:
        await within(servers.reactor, registration.when_registered())
        assert registration.udp_observed == address
        caller = await servers.session(BOB)
        found = await within(servers.reactor, caller.lookup("alice"))
        assert found.udp == address
        before = servers.stun.stats.bindings
        for _ in range(100):
            if servers.stun.stats.bindings > before:
                break
            await within(servers.reactor, _sleep(servers.reactor, 0.05))
        assert servers.stun.stats.bindings > before
    finally:
        await within(servers.reactor, registration.stopService())
    assert _leftover_timers(servers.reactor) == []


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
