"""
:class:`~nattraverse.punch.tcppunch.TcpPunchingPort` on real loopback
sockets (127.0.0.1 only) with the real reactor: two ports punching each
other at once end with one TCP connection carrying authenticated
:class:`~nattraverse.secure.SecurePath`\\ s; punching a port where nothing
listens fails at the deadline saying it was refused; a caller's port joins
incoming connections to the running punch and refuses them otherwise.
Every test leaves no path, port, pending connect or timer of ours behind
(the ``world`` fixture checks).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from nattraverse.identity import Identity
from nattraverse.punch.tcpport import SharedTcpPort
from nattraverse.punch.tcppunch import TcpPunch, TcpPunchConfig, TcpPunchFailed, TcpPunchingPort
from nattraverse.secure import (
    PREAMBLE_MAGIC,
    PREAMBLE_SIZE,
    PathSecrets,
    PunchTransport,
    SecurePath,
)
from tests.integration.tcp_socket_support import (
    LOCALHOST,
    STEP,
    Recorder,
    attempts,
    closed_port,
    settle,
    within,
)

#: The timeout given to punches and paths.
TIMEOUT = 5.0


class TrackedPath(SecurePath):
    """A path that says when its raw connection has closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.closed.called:
            self.closed.callback(None)


@dataclass
class Introduction:
    """Two peers and the secrets the rendezvous gave them for a ``tcp`` path."""

    caller: Identity = field(default_factory=Identity.generate)
    callee: Identity = field(default_factory=Identity.generate)
    session: bytes = field(default_factory=lambda: os.urandom(16))
    secret: bytes = field(default_factory=lambda: os.urandom(32))

    def for_caller(self) -> PathSecrets:
        return PathSecrets(self.session, self.secret, self.callee.peer_id, "tcp")

    def for_callee(self) -> PathSecrets:
        return PathSecrets(self.session, self.secret, self.caller.peer_id, "tcp")


class World:
    """Everything a test opens, closed by the fixture."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.ports: list[TcpPunchingPort] = []
        self.shared: list[SharedTcpPort] = []
        self.paths: list[TrackedPath] = []
        self.apps: list[Recorder] = []
        self.punches: list[Deferred[SecurePath]] = []

    def punching_port(self, config: TcpPunchConfig | None = None) -> TcpPunchingPort:
        """A started caller-mode punching port on 127.0.0.1."""
        port = TcpPunchingPort(self.reactor, interface=LOCALHOST, config=config)
        self.ports.append(port)
        port.start()
        return port

    def silent_port(self) -> int:
        """A port bound with the reuse options but not listening: SYNs get a RST."""
        shared = SharedTcpPort(self.reactor, LOCALHOST)
        self.shared.append(shared)
        return shared.bind()[1]

    def maker(
        self, identity: Identity, role: str, secrets: PathSecrets, *, send_preamble: bool
    ) -> tuple[Callable[[], SecurePath], list[TrackedPath]]:
        """A make_path for a punch, and the list of the paths it made."""
        made: list[TrackedPath] = []

        def make() -> SecurePath:
            path = TrackedPath(
                self.reactor,
                identity,
                "caller" if role == "caller" else "callee",
                secrets=secrets,
                send_preamble=send_preamble,
                timeout=TIMEOUT,
            )
            made.append(path)
            self.paths.append(path)
            return path

        return make, made

    def punch(
        self, port: TcpPunchingPort, remote: int, make: Callable[[], SecurePath]
    ) -> Deferred[SecurePath]:
        """*port* punches 127.0.0.1:*remote*."""
        d = port.punch([(LOCALHOST, remote)], make, timeout=TIMEOUT)
        self.punches.append(d)
        return d

    async def client(self, port: int) -> Recorder:
        """A plain TCP client connected to 127.0.0.1:*port*."""
        app = Recorder()
        self.apps.append(app)
        endpoint = TCP4ClientEndpoint(self.reactor, LOCALHOST, port, timeout=STEP)
        await within(self.reactor, endpoint.connect(Factory.forProtocol(lambda: app)))
        return app

    async def close(self) -> None:
        for d in self.punches:
            if not d.called:
                d.cancel()
            d.addErrback(lambda _: None)
        for path in self.paths:
            path.authenticated.addErrback(lambda _: None)
            path.abort()
        for path in self.paths:
            if path.transport is not None:
                await within(self.reactor, path.closed)
        for app in self.apps:
            if app.transport is not None and not app.lost.called:
                app.transport.loseConnection()
                await within(self.reactor, app.lost)
        for port in self.ports:
            await within(self.reactor, port.close())
        for shared in self.shared:
            await within(self.reactor, shared.close())


def _ours(reactor: Any) -> list[Any]:
    """The active DelayedCalls of punches, paths and shared-port connects."""
    calls = []
    for call in reactor.getDelayedCalls():
        owner = getattr(call.func, "__self__", None)
        if call.active() and (
            isinstance(owner, TcpPunch | SecurePath)
            or type(owner).__module__.startswith("nattraverse.")
        ):
            calls.append(call)
    return calls


@pytest_twisted.async_yield_fixture
async def world(reactor: Any) -> AsyncIterator[World]:
    """A World; afterwards no timer or pending connect of ours is left."""
    w = World(reactor)
    try:
        yield w
    finally:
        await w.close()
    await settle(reactor, lambda: not _ours(reactor) and not attempts(reactor))
    assert _ours(reactor) == []
    assert attempts(reactor) == []


def _established(local: int, remote: int) -> int:
    """How many ESTABLISHED TCP sockets go from 127.0.0.1:*local* to 127.0.0.1:*remote*."""

    def decode(field: str) -> tuple[str, int]:
        host, port = field.split(":")
        return socket.inet_ntoa(struct.pack("=I", int(host, 16))), int(port, 16)

    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            columns = line.split()
            if columns[3] != "01":  # TCP_ESTABLISHED
                continue
            if decode(columns[1]) == (LOCALHOST, local) and decode(columns[2]) == (
                LOCALHOST,
                remote,
            ):
                count += 1
    return count


def _spy_connects(monkeypatch: pytest.MonkeyPatch, port: TcpPunchingPort) -> list[object]:
    """Record the protocols *port*'s shared-port ``connect()`` calls fired with."""
    made: list[object] = []
    real = port.shared.connect

    def connect(remote: tuple[str, int], factory: Any, **options: Any) -> Deferred[Any]:
        def record(protocol: object) -> object:
            made.append(protocol)
            return protocol

        return real(remote, factory, **options).addCallback(record)

    monkeypatch.setattr(port.shared, "connect", connect)
    return made


def _syns(message: str, label: str) -> int:
    """The SYN count a TcpPunchFailed message gives for the candidate *label*."""
    found = re.search(re.escape(label) + r": [^;]*? after (\d+) SYNs?\b", message)
    assert found, message
    return int(found.group(1))


def _transport(app: Protocol) -> PunchTransport:
    transport: object = app.transport
    assert isinstance(transport, PunchTransport)
    return transport


def _ports(path: SecurePath) -> tuple[int, int]:
    """(local port, remote port) of *path*'s raw connection."""
    assert path.transport is not None
    host: IAddress = path.transport.getHost()
    peer: IAddress = path.transport.getPeer()
    return host.port, peer.port  # type: ignore[attr-defined]


@pytest.mark.parametrize("first", ["caller", "callee"])
@pytest_twisted.ensureDeferred
async def test_two_ports_punch_each_other(
    reactor: Any, world: World, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """Both sides end with one connection, authenticated paths and data both ways."""
    peers = Introduction()
    a = world.punching_port()
    b = world.punching_port()
    a_connected = _spy_connects(monkeypatch, a)
    b_connected = _spy_connects(monkeypatch, b)
    make_a, made_a = world.maker(peers.caller, "caller", peers.for_caller(), send_preamble=True)
    make_b, made_b = world.maker(peers.callee, "callee", peers.for_callee(), send_preamble=False)
    if first == "caller":
        punch_a = world.punch(a, b.shared.port, make_a)
        punch_b = world.punch(b, a.shared.port, make_b)
    else:
        punch_b = world.punch(b, a.shared.port, make_b)
        punch_a = world.punch(a, b.shared.port, make_a)

    path_a = await within(reactor, punch_a)
    assert path_a.role == "caller"
    app_a = Recorder()
    selected: object = path_a.select(Factory.forProtocol(lambda: app_a))
    assert selected is app_a
    path_b = await within(reactor, punch_b)  # the callee's path fires on the selection
    assert path_b.role == "callee"
    app_b = Recorder()
    attached: object = path_b.attach(Factory.forProtocol(lambda: app_b))
    assert attached is app_b

    assert _ports(path_a) == (a.shared.port, b.shared.port)
    assert _ports(path_b) == (b.shared.port, a.shared.port)
    assert _transport(app_a).peer_id == peers.callee.peer_id
    assert _transport(app_b).peer_id == peers.caller.peer_id
    assert _transport(app_a).method == "tcp"

    _transport(app_a).write(b"from the caller")
    assert await within(reactor, app_b.expect(15)) == b"from the caller"
    _transport(app_b).write(b"from the callee")
    assert await within(reactor, app_a.expect(15)) == b"from the callee"

    # One connection: one path made on each side, one socket each way in the kernel.
    assert [p for p in made_a if p.transport is not None] == [path_a]
    assert [p for p in made_b if p.transport is not None] == [path_b]
    assert _established(a.shared.port, b.shared.port) == 1
    assert _established(b.shared.port, a.shared.port) == 1
    # Loopback completes the handshake inside connect(): the first side's connect() made
    # the connection, the other side's listener accepted it into that side's punch.
    if first == "caller":
        assert (path_a in a_connected, path_b in b_connected) == (True, False)
    else:
        assert (path_a in a_connected, path_b in b_connected) == (False, True)
    assert (a.running, b.running) == (None, None)


@pytest.mark.parametrize("target", ["reserved", "closed"])
@pytest_twisted.ensureDeferred
async def test_punching_silent_port_fails_refused(reactor: Any, world: World, target: str) -> None:
    """Punching a port where nothing listens fails at the deadline: refused, several SYNs."""
    number = world.silent_port() if target == "reserved" else closed_port()
    port = world.punching_port(TcpPunchConfig(deadline=1))
    make, made = world.maker(
        Identity.generate(), "caller", Introduction().for_caller(), send_preamble=True
    )
    started = time.monotonic()
    with pytest.raises(TcpPunchFailed) as raised:
        await within(reactor, world.punch(port, number, make))
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0
    message = str(raised.value)
    assert f"{LOCALHOST}:{number}: refused (RST)" in message
    assert _syns(message, f"{LOCALHOST}:{number}") > 1
    assert made == []
    assert port.running is None


@pytest.mark.parametrize("when", ["before", "after"])
@pytest_twisted.ensureDeferred
async def test_caller_port_refuses_connection_without_punch(
    reactor: Any, world: World, when: str
) -> None:
    """A caller's port closes an incoming connection when no punch is running."""
    port = world.punching_port(TcpPunchConfig(deadline=0.25))
    make, made = world.maker(
        Identity.generate(), "caller", Introduction().for_caller(), send_preamble=True
    )
    if when == "after":
        with pytest.raises(TcpPunchFailed):
            await within(reactor, world.punch(port, world.silent_port(), make))
    app = await world.client(port.shared.port)
    await within(reactor, app.lost)
    assert app.received == b""
    assert made == []


@pytest_twisted.ensureDeferred
async def test_caller_port_adopts_connection_during_punch(reactor: Any, world: World) -> None:
    """During a punch an incoming connection gets a path (preamble sent); cancelling closes it."""
    peers = Introduction()
    port = world.punching_port()
    make, made = world.maker(peers.caller, "caller", peers.for_caller(), send_preamble=True)
    punching = world.punch(port, world.silent_port(), make)
    app = await world.client(port.shared.port)
    received = await within(reactor, app.expect(PREAMBLE_SIZE))
    assert received.startswith(PREAMBLE_MAGIC)
    assert len(made) == 1
    assert made[0].transport is not None
    punching.cancel()
    with pytest.raises(CancelledError):
        await punching
    await within(reactor, app.lost)
    await within(reactor, made[0].closed)
    assert port.running is None
