"""
The ``udp`` method end to end on the real reactor, over loopback: an
in-process rendezvous with its STUN service (sharing the UDP binding
tokens, as ``twistd natrendezvous`` wires them) on 127.0.0.1, a listening
peer that echoes, and callers that punch, secure a QUIC path and send
1 MiB through it.  Both peers announce no host addresses, so no datagram
leaves 127.0.0.0/8.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from nattraverse.endpoints import PunchClientEndpoint, PunchServerEndpoint
from nattraverse.errors import MethodNotApplicable, PunchFailed
from nattraverse.identity import Identity
from nattraverse.punch.port import PunchingPort
from nattraverse.rendezvous.server import RendezvousService
from nattraverse.rendezvous.udpbind import UdpBindings
from nattraverse.stun.server import StunServer
from tests.integration.punch_apps import Collector, Echo

LOCALHOST = "127.0.0.1"
PAYLOAD_SIZE = 1024 * 1024
TIMEOUT = 20.0
SETTLE = 5.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _settle(reactor: Any, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + SETTLE
    while not done() and time.monotonic() < deadline:
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.async_yield_fixture
async def rendezvous(reactor: Any) -> AsyncIterator[TCP4ClientEndpoint]:
    """A rendezvous and its STUN service on 127.0.0.1, sharing the binding tokens."""
    bindings = UdpBindings(capacity=100)
    stun = StunServer(reactor, interface=LOCALHOST, port=0, tcp=False, bindings=bindings)
    stun.startService()
    service = RendezvousService(
        reactor,
        [f"tcp:0:interface={LOCALHOST}"],
        stun_port=stun.endpoint().port,
        udp_bindings=bindings,
    )
    service.startService()
    port = service.ports[0].getHost().port  # type: ignore[attr-defined]
    yield TCP4ClientEndpoint(reactor, LOCALHOST, port, timeout=5)
    await service.stopService()
    await stun.stopService()


async def _listen(
    reactor: Any, rendezvous: Any, methods: list[str], transports: list[Any]
) -> tuple[Identity, Any]:
    identity = Identity.generate()
    endpoint = PunchServerEndpoint(
        reactor,
        rendezvous,
        "alice",
        identity=identity,
        interface=LOCALHOST,
        methods=methods,
        timeout=TIMEOUT,
        private=(),
    )
    port = await endpoint.listen(Factory.forProtocol(lambda: Echo(transports)))
    return identity, port


@pytest_twisted.ensureDeferred
async def test_one_mebibyte_over_a_punched_quic_path(reactor: Any, rendezvous: Any) -> None:
    """Both sides say udp, name each other, and 1 MiB comes back intact."""
    fds = _open_fds()
    transports: list[Any] = []
    identity, port = await _listen(reactor, rendezvous, ["udp"], transports)
    client = PunchClientEndpoint(
        reactor, rendezvous, "alice", methods=["udp"], timeout=TIMEOUT, private=()
    )
    collector = await client.connect(Factory.forProtocol(lambda: Collector(PAYLOAD_SIZE)))
    assert isinstance(collector, Collector)
    transport: Any = collector.transport
    assert transport.method == "udp"
    assert transport.peer_id == identity.peer_id
    assert transport.remote.startswith(f"{LOCALHOST}:")
    assert transport.connect_ms > 0
    # The race's report is on the transport from connectionMade on.
    assert collector.report is transport.report
    assert transport.report.method == "udp"
    assert transport.report.attempt("udp").outcome.value == "won"
    payload = os.urandom(PAYLOAD_SIZE)
    transport.write(payload)
    assert await collector.complete.addTimeout(TIMEOUT, reactor) == payload
    assert [t.method for t in transports] == ["udp"]
    assert transports[0].peer_id == client.identity.peer_id
    transport.loseConnection()
    await collector.lost.addTimeout(TIMEOUT, reactor)
    assert collector.reason is not None
    assert collector.reason.check(ConnectionDone)
    await port.stopListening()
    await _settle(reactor, lambda: _open_fds() <= fds)
    assert _open_fds() <= fds


@pytest_twisted.ensureDeferred
async def test_connection_outlives_the_listening_port(reactor: Any, rendezvous: Any) -> None:
    """Stopping the listener keeps the QUIC connections it handed out, as TCP would."""
    transports: list[Any] = []
    _, port = await _listen(reactor, rendezvous, ["udp"], transports)
    client = PunchClientEndpoint(
        reactor, rendezvous, "alice", methods=["udp"], timeout=TIMEOUT, private=()
    )
    collector: Any = await client.connect(Factory.forProtocol(lambda: Collector(5)))
    await _settle(reactor, lambda: bool(transports))
    assert transports
    await port.stopListening()
    collector.transport.write(b"still")
    assert await collector.complete.addTimeout(TIMEOUT, reactor) == b"still"
    collector.transport.loseConnection()
    await collector.lost.addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_udp_needs_a_punching_peer(reactor: Any, rendezvous: Any) -> None:
    """A callee that does not punch UDP: the caller's udp does not apply, and says why."""
    transports: list[Any] = []
    _, port = await _listen(reactor, rendezvous, ["direct"], transports)
    try:
        client = PunchClientEndpoint(
            reactor, rendezvous, "alice", methods=["udp"], timeout=TIMEOUT, private=()
        )
        with pytest.raises(PunchFailed) as caught:
            await client.connect(Factory.forProtocol(Protocol))
        assert isinstance(caught.value.failures["udp"], MethodNotApplicable)
        assert "no UDP candidates" in str(caught.value)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_cancel_while_punching_leaves_nothing(
    reactor: Any, rendezvous: Any, monkeypatch: Any
) -> None:
    """Cancelling connect() once the checks started closes the punching port."""
    fds = _open_fds()
    transports: list[Any] = []
    _, port = await _listen(reactor, rendezvous, ["udp"], transports)
    started: Deferred[None] = Deferred()
    original = PunchingPort.call

    def call(self: PunchingPort, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        reactor.callLater(0, started.callback, None)
        return result

    monkeypatch.setattr(PunchingPort, "call", call)
    client = PunchClientEndpoint(
        reactor, rendezvous, "alice", methods=["udp"], timeout=TIMEOUT, private=()
    )
    attempt = client.connect(Factory.forProtocol(Protocol))
    await started.addTimeout(TIMEOUT, reactor)
    attempt.cancel()
    outcome: list[Failure] = []
    attempt.addErrback(outcome.append)
    assert outcome
    assert outcome[0].check(CancelledError)
    await port.stopListening()
    await _settle(reactor, lambda: _open_fds() <= fds)
    assert _open_fds() <= fds
    assert transports == []
