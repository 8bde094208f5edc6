"""
The ``punch:`` endpoints when the rendezvous goes away: a listening peer
registers again by itself once the rendezvous is back (same port, empty
memory), and a connect whose rendezvous dies under it fails at once with
:class:`~nattraverse.errors.RendezvousUnavailable` instead of hanging.
Loopback only.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from nattraverse.endpoints import PunchClientEndpoint, PunchServerEndpoint
from nattraverse.errors import PeerNotFound, PunchFailed, RendezvousUnavailable
from nattraverse.identity import Identity
from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.server import RendezvousService

LOCALHOST = "127.0.0.1"
#: Seconds the listener gets to register again (its first retry comes after
#: about a second of backoff).
REREGISTER_WITHIN = 20.0


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Once(Protocol):
    """Sends a line, fires with the echo."""

    def __init__(self) -> None:
        self.echoed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"ping\n")

    def dataReceived(self, data: bytes) -> None:
        if not self.echoed.called:
            self.echoed.callback(data)


def _service(reactor: Any, port: int) -> RendezvousService:
    service = RendezvousService(
        reactor,
        [f"tcp:{port}:interface={LOCALHOST}"],
        relay_hub=RelayHub(reactor, RelayLimits()),
    )
    service.startService()
    return service


async def _echo_once(reactor: Any, rendezvous: Any) -> bytes:
    client = PunchClientEndpoint(reactor, rendezvous, "alice", methods=["direct"], timeout=5)
    protocol = await client.connect(Factory.forProtocol(Once))
    assert isinstance(protocol, Once)
    try:
        return await protocol.echoed.addTimeout(5, reactor)
    finally:
        protocol.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_listener_registers_again_after_a_restart(reactor: Any) -> None:
    """After the rendezvous restarts on its port, the listener is reachable again by itself."""
    first = _service(reactor, 0)
    port = first.ports[0].getHost().port  # type: ignore[attr-defined]
    rendezvous = TCP4ClientEndpoint(reactor, LOCALHOST, port, timeout=5)
    listening = await PunchServerEndpoint(
        reactor, rendezvous, "alice", identity=Identity.generate(), interface=LOCALHOST
    ).listen(Factory.forProtocol(Echo))
    second = None
    try:
        assert await _echo_once(reactor, rendezvous) == b"ping\n"
        stopped = first.stopService()
        assert stopped is not None
        await stopped
        second = _service(reactor, port)
        with pytest.raises(PeerNotFound):  # the new rendezvous knows nobody yet
            second.factory.registry.find("alice", reactor.seconds())
        deadline = time.monotonic() + REREGISTER_WITHIN
        while True:
            try:
                echoed = await _echo_once(reactor, rendezvous)
                break
            except (PeerNotFound, RendezvousUnavailable, PunchFailed):
                if time.monotonic() > deadline:
                    raise
                await deferLater(reactor, 0.25, lambda: None)
        assert echoed == b"ping\n"
    finally:
        await listening.stopListening()  # type: ignore[misc]
        if second is not None:
            await second.stopService()


class Silent(Protocol):
    """A 'rendezvous' that accepts, says nothing, and drops the connection soon after."""

    def connectionMade(self) -> None:
        from twisted.internet import reactor

        self._drop = reactor.callLater(0.2, self.transport.loseConnection)  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        if self._drop.active():
            self._drop.cancel()


@pytest_twisted.ensureDeferred
async def test_a_connect_fails_at_once_when_the_rendezvous_goes_away(reactor: Any) -> None:
    """A connect pending at a rendezvous that goes away fails at once, saying so."""
    port = await TCP4ServerEndpoint(reactor, 0, interface=LOCALHOST).listen(
        Factory.forProtocol(Silent)
    )
    try:
        rendezvous = TCP4ClientEndpoint(reactor, LOCALHOST, port.getHost().port, timeout=5)
        client = PunchClientEndpoint(reactor, rendezvous, "alice", timeout=30)
        started = time.monotonic()
        with pytest.raises(RendezvousUnavailable, match="lost"):
            await client.connect(Factory.forProtocol(Protocol))
        # Long before the 30 s the connect was given: the loss was noticed.
        assert time.monotonic() - started < 5
    finally:
        await port.stopListening()
