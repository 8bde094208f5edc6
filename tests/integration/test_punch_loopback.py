"""
The ``punch:`` endpoints on the real reactor, over loopback: an in-process
rendezvous (with its relay) on 127.0.0.1, a listening peer that echoes, and
callers that send 1 MiB of random bytes through each method and get them
back; the errors a caller sees; and that cancelling a connect, or stopping
a listener, leaves no socket, port or timer behind.  No traffic leaves
127.0.0.0/8: the listener announces no private addresses.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from zope.interface import implementer

from nattraverse._listener import PunchListener
from nattraverse.endpoints import PunchClientEndpoint, PunchServerEndpoint
from nattraverse.errors import (
    NotAuthenticated,
    PeerAuthenticationFailed,
    PeerNotFound,
    PunchFailed,
)
from nattraverse.identity import Identity
from nattraverse.interfaces import CalleeContext
from nattraverse.methods.reversal import ReversalMethod
from nattraverse.rendezvous.client import Introduction, IRendezvousHandler
from nattraverse.rendezvous.registration import Registration
from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.server import RendezvousService
from tests.integration.punch_apps import Collector, Echo

LOCALHOST = "127.0.0.1"
PAYLOAD_SIZE = 1024 * 1024
#: Seconds anything here may take at most; loopback needs far less.
TIMEOUT = 20.0
#: Seconds to wait for sockets and timers to go after a close or a cancel.
SETTLE = 3.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _background(call: Any) -> bool:
    """Timers that are not a connect's: the server's sweeper, registration refreshes, and
    the listener's pending introductions (kept for their TTL, by design)."""
    owner = getattr(call.func, "__self__", None)
    return isinstance(owner, LoopingCall | Registration | PunchListener)


def _new_calls(reactor: Any, before: set[Any]) -> list[Any]:
    return [
        call
        for call in reactor.getDelayedCalls()
        if call not in before and call.active() and not _background(call)
    ]


async def _settle(reactor: Any, done: Callable[[], bool]) -> None:
    """Let the reactor run until *done* holds, for at most SETTLE seconds."""
    deadline = time.monotonic() + SETTLE
    while not done() and time.monotonic() < deadline:
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.async_yield_fixture
async def rendezvous(reactor: Any) -> AsyncIterator[TCP4ClientEndpoint]:
    """An in-process rendezvous with its relay on 127.0.0.1; its client endpoint."""
    service = RendezvousService(
        reactor, [f"tcp:0:interface={LOCALHOST}"], relay_hub=RelayHub(reactor, RelayLimits())
    )
    service.startService()
    port = service.ports[0].getHost().port  # type: ignore[attr-defined]
    yield TCP4ClientEndpoint(reactor, LOCALHOST, port, timeout=5)
    await service.stopService()


@dataclass
class Alice:
    """The listening peer."""

    identity: Identity
    port: Any
    transports: list[Any]


async def _listen(
    reactor: Any, rendezvous: Any, methods: list[str] | None = None
) -> tuple[Identity, Any, list[Any]]:
    identity = Identity.generate()
    transports: list[Any] = []
    endpoint = PunchServerEndpoint(
        reactor,
        rendezvous,
        "alice",
        identity=identity,
        interface=LOCALHOST,
        methods=methods,
        timeout=TIMEOUT,
    )
    port = await endpoint.listen(Factory.forProtocol(lambda: Echo(transports)))
    return identity, port, transports


@pytest_twisted.async_yield_fixture
async def alice(reactor: Any, rendezvous: Any) -> AsyncIterator[Alice]:
    """'alice', registered, echoing, serving every method."""
    identity, port, transports = await _listen(reactor, rendezvous)
    yield Alice(identity, port, transports)
    await port.stopListening()


async def _echo(reactor: Any, endpoint: Any) -> Collector:
    payload = os.urandom(PAYLOAD_SIZE)
    collector = await endpoint.connect(Factory.forProtocol(lambda: Collector(PAYLOAD_SIZE)))
    assert isinstance(collector, Collector)
    collector.transport.write(payload)  # type: ignore[union-attr]
    echoed = await collector.complete.addTimeout(TIMEOUT, reactor)
    assert echoed == payload
    return collector


async def _close(reactor: Any, collector: Collector) -> None:
    collector.transport.loseConnection()  # type: ignore[union-attr]
    await collector.lost.addTimeout(TIMEOUT, reactor)


# -- each method -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "expected"),
    [(["direct"], "direct"), (["reversal"], "reversal"), (["relay"], "relay"), (None, "direct")],
)
@pytest_twisted.ensureDeferred
async def test_one_mebibyte_echoes_through(
    reactor: Any, rendezvous: Any, alice: Alice, methods: list[str] | None, expected: str
) -> None:
    """1 MiB of random bytes comes back intact; both transports name the method and the peer."""
    client = PunchClientEndpoint(reactor, rendezvous, "alice", methods=methods, timeout=TIMEOUT)
    collector = await _echo(reactor, client)
    transport = collector.transport
    assert transport.method == expected  # type: ignore[union-attr]
    assert transport.peer_id == alice.identity.peer_id  # type: ignore[union-attr]
    assert transport.remote.startswith(f"{LOCALHOST}:")  # type: ignore[union-attr]
    assert [t.method for t in alice.transports] == [expected]
    assert alice.transports[0].peer_id == client.identity.peer_id
    await _close(reactor, collector)


@pytest_twisted.ensureDeferred
async def test_endpoint_strings_reach_the_peer(
    reactor: Any, rendezvous: Any, tmp_path: Any
) -> None:
    """serverFromString and clientFromString with punch: strings, and a pinned peer id."""
    nested = f"tcp\\:{LOCALHOST}\\:{rendezvous._port}"
    transports: list[Any] = []
    server = serverFromString(
        reactor,
        f"punch:name=alice:rendezvous={nested}:identity={tmp_path / 'alice.key'}"
        f":interface={LOCALHOST}",
    )
    port = await server.listen(Factory.forProtocol(lambda: Echo(transports)))
    try:
        peer_id = port.getHost().peer_id
        client = clientFromString(reactor, f"punch:peer={peer_id}:rendezvous={nested}")
        collector = await _echo(reactor, client)
        assert collector.transport.peer_id == peer_id  # type: ignore[union-attr]
        await _close(reactor, collector)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_access_key(reactor: Any) -> None:
    """Behind a rendezvous with an access key, peers that know it connect; others cannot."""
    service = RendezvousService(
        reactor, [f"tcp:0:interface={LOCALHOST}"], access_key=b"s3cret", relay_hub=None
    )
    service.startService()
    try:
        address: Any = service.ports[0].getHost()
        rendezvous = TCP4ClientEndpoint(reactor, LOCALHOST, address.port, timeout=5)
        transports: list[Any] = []
        server = PunchServerEndpoint(reactor, rendezvous, "alice", identity=Identity.generate(),
                                     interface=LOCALHOST, access_key=b"s3cret")  # fmt: skip
        port: Any = await server.listen(Factory.forProtocol(lambda: Echo(transports)))
        try:
            client = PunchClientEndpoint(reactor, rendezvous, "alice", access_key=b"s3cret",
                                         timeout=TIMEOUT)  # fmt: skip
            await _close(reactor, await _echo(reactor, client))
            stranger = PunchClientEndpoint(reactor, rendezvous, "alice", timeout=TIMEOUT)
            with pytest.raises(NotAuthenticated, match="access key"):
                await stranger.connect(Factory.forProtocol(Protocol))
        finally:
            await port.stopListening()
    finally:
        await service.stopService()


# -- errors ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_peer(reactor: Any, rendezvous: Any, alice: Alice) -> None:
    """Connecting to a name nobody registered fails with PeerNotFound."""
    client = PunchClientEndpoint(reactor, rendezvous, "bob", timeout=TIMEOUT)
    with pytest.raises(PeerNotFound):
        await client.connect(Factory.forProtocol(Protocol))


@implementer(IRendezvousHandler)
class Impostor:
    """
    Registered with the owner's key, but dials back with another key: the
    host reached is not the peer the rendezvous vouched for.
    """

    def __init__(self, reactor: Any, rendezvous: Any, key: Identity) -> None:
        self.context = CalleeContext(reactor=reactor, identity=key, name="mallory",
                                     rendezvous=rendezvous, timeout=TIMEOUT)  # fmt: skip
        self.introductions: dict[bytes, Introduction] = {}
        self.attempts: list[Deferred[Any]] = []

    def introduced(self, introduction: Introduction) -> None:
        self.introductions[introduction.session] = introduction

    def dial_back(self, session: bytes, host: str, port: int) -> None:
        attempt = ReversalMethod().dial_back(self.context, self.introductions[session], host, port)
        assert attempt is not None
        self.attempts.append(attempt.addErrback(lambda failure: failure.value))

    def relay_offer(self, session: bytes, token: bytes, lifetime: float) -> None:
        pass

    def udp_relay_offer(self, session: bytes, port: int, token: bytes, lifetime: float) -> None:
        pass


@pytest.mark.parametrize("pinned", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_host_with_another_key_fails_authentication(
    reactor: Any, rendezvous: Any, pinned: bool
) -> None:
    """A callee presenting a key other than the registered (pinned) one is refused."""
    owner = Identity.generate()
    impostor = Impostor(reactor, rendezvous, Identity.generate())
    registration = Registration(
        reactor, rendezvous, owner, "mallory", listen_port=0, private=[], handler=impostor
    )
    registration.startService()
    try:
        await registration.when_registered().addTimeout(TIMEOUT, reactor)
        peer = str(owner.peer_id) if pinned else "mallory"
        client = PunchClientEndpoint(
            reactor, rendezvous, peer, methods=["reversal"], timeout=TIMEOUT
        )
        with pytest.raises(PunchFailed) as raised:
            await client.connect(Factory.forProtocol(Protocol))
        assert isinstance(raised.value.failures["reversal"], PeerAuthenticationFailed)
        assert str(owner.peer_id) in str(raised.value)
    finally:
        await registration.stopService()


@pytest_twisted.ensureDeferred
async def test_only_relay_on_the_callee_times_out_reversal(reactor: Any, rendezvous: Any) -> None:
    """A caller trying reversal on a callee that does not serve it fails at its timeout."""
    _, port, _ = await _listen(reactor, rendezvous, methods=["relay"])
    try:
        client = PunchClientEndpoint(reactor, rendezvous, "alice", methods=["reversal"],
                                     timeout=1.0)  # fmt: skip
        with pytest.raises(PunchFailed) as raised:
            await client.connect(Factory.forProtocol(Protocol))
        assert "reversal" in raised.value.failures
        assert "timed out" in str(raised.value)
    finally:
        await port.stopListening()


# -- nothing left behind -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_winner_alone_remains(reactor: Any, rendezvous: Any, alice: Alice) -> None:
    """After the race only the chosen connection is open (two sockets here, one per side)."""
    fds = _open_fds()
    client = PunchClientEndpoint(reactor, rendezvous, "alice", timeout=TIMEOUT)
    collector = await _echo(reactor, client)
    await _settle(reactor, lambda: _open_fds() == fds + 2)
    assert _open_fds() == fds + 2
    await _close(reactor, collector)
    await _settle(reactor, lambda: _open_fds() == fds)
    assert _open_fds() == fds


@pytest.mark.parametrize("when", ["at-once", "in-flight"])
@pytest_twisted.ensureDeferred
async def test_cancel_leaves_nothing(reactor: Any, rendezvous: Any, when: str) -> None:
    """Cancelling a connect closes every socket and port and cancels every timer."""
    # The callee never dials back, so a reversal attempt stays in flight.
    _, port, _ = await _listen(reactor, rendezvous, methods=["relay"])
    try:
        fds = _open_fds()
        before = set(reactor.getDelayedCalls())
        client = PunchClientEndpoint(reactor, rendezvous, "alice", methods=["reversal"],
                                     timeout=TIMEOUT)  # fmt: skip
        connecting = client.connect(Factory.forProtocol(Protocol))
        if when == "in-flight":
            # Rendezvous session open, Connect answered, temporary port listening.
            await _settle(reactor, lambda: _open_fds() >= fds + 3)
            assert _open_fds() >= fds + 3
        connecting.cancel()
        with pytest.raises(CancelledError):
            await connecting
        await _settle(reactor, lambda: _open_fds() == fds and not _new_calls(reactor, before))
        assert _open_fds() == fds
        assert _new_calls(reactor, before) == []
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_stop_listening_leaves_nothing(reactor: Any, rendezvous: Any) -> None:
    """stopListening unregisters, closes the direct port and cancels the listener's timers."""
    fds = _open_fds()
    before = set(reactor.getDelayedCalls())
    identity, port, _ = await _listen(reactor, rendezvous)
    assert port.getHost().peer_id == identity.peer_id
    assert port.getHost().port > 0
    assert _open_fds() > fds
    await port.stopListening()
    await _settle(reactor, lambda: _open_fds() == fds)
    assert _open_fds() == fds
    leftover = [c for c in reactor.getDelayedCalls() if c not in before and c.active()
                and not isinstance(getattr(c.func, "__self__", None), LoopingCall)]  # fmt: skip
    assert leftover == []
    client = PunchClientEndpoint(reactor, rendezvous, "alice", timeout=TIMEOUT)
    with pytest.raises(PeerNotFound):
        await client.connect(Factory.forProtocol(Protocol))
