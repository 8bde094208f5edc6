"""
The secured path (:mod:`nattraverse.secure`) on real loopback TCP sockets
with the real reactor: a megabyte echoed intact each way, a host with the
wrong identity refused, everything written before ``loseConnection``
delivered, and flow control from a slow reader back to the writer's
producer.  No traffic leaves 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse.errors import PeerAuthenticationFailed
from nattraverse.identity import Identity
from nattraverse.secure import PathSecrets, PunchTransport, SecurePath, path_tag

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
#: Seconds any single wait in these tests may take.
WAIT = 30.0
MEGABYTE = 1024 * 1024
#: The flood a paused reader must stop long before this many bytes.
FLOOD_LIMIT = 256 * MEGABYTE
CHUNK = 16 * 1024


class TrackedPath(SecurePath):
    """A path that says when its raw connection has closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        super().connectionLost(reason)
        self.closed.callback(None)


@dataclass
class Lab:
    """What a test opened: listening ports and paths, all closed afterwards."""

    reactor: Any
    ports: list[IListeningPort] = field(default_factory=list)
    paths: list[TrackedPath] = field(default_factory=list)

    def wait(self, d: Deferred[T]) -> Deferred[T]:
        """*d*, bounded by :data:`WAIT`."""
        return d.addTimeout(WAIT, self.reactor)

    async def listen(self, build: Callable[[], TrackedPath]) -> int:
        """Accept connections on loopback with paths from *build*; the port number."""

        def protocol() -> TrackedPath:
            path = build()
            self.paths.append(path)
            return path

        port = self.reactor.listenTCP(0, Factory.forProtocol(protocol), interface=LOCALHOST)
        self.ports.append(port)
        number: int = port.getHost().port
        return number

    async def dial(self, port: int, path: TrackedPath) -> TrackedPath:
        """Open a loopback connection to *port* with *path*."""
        self.paths.append(path)
        await self.wait(connectProtocol(TCP4ClientEndpoint(self.reactor, LOCALHOST, port), path))
        return path


@pytest_twisted.async_yield_fixture
async def lab(reactor: Any) -> AsyncIterator[Lab]:
    """A :class:`Lab`; afterwards every path is closed and no timer of theirs is left."""
    opened = Lab(reactor)
    yield opened
    for path in opened.paths:
        path.abort()
        path.authenticated.addErrback(lambda failure: None)
    await opened.wait(
        DeferredList([path.closed for path in opened.paths if path.transport is not None])
    )
    for port in opened.ports:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped
    timers = [
        call
        for call in reactor.getDelayedCalls()
        if getattr(call.func, "__self__", None) in opened.paths
    ]
    assert timers == []


@dataclass
class Introduction:
    """Two peers and the secrets the rendezvous gave them."""

    caller: Identity = field(default_factory=Identity.generate)
    callee: Identity = field(default_factory=Identity.generate)
    session: bytes = field(default_factory=lambda: os.urandom(16))
    secret: bytes = field(default_factory=lambda: os.urandom(32))

    def for_caller(self, method: str) -> PathSecrets:
        return PathSecrets(self.session, self.secret, self.callee.peer_id, method)

    def for_callee(self, method: str) -> PathSecrets:
        return PathSecrets(self.session, self.secret, self.caller.peer_id, method)

    def resolver(self, secrets: PathSecrets) -> Callable[[bytes, bytes], PathSecrets | None]:
        def resolve(session: bytes, tag: bytes) -> PathSecrets | None:
            if session == self.session and path_tag(self.secret, session) == tag:
                return secrets
            return None

        return resolve


async def secured(
    reactor: Any, lab: Lab, peers: Introduction, *, opener: str
) -> tuple[SecurePath, SecurePath]:
    """A caller path and a callee path over one loopback connection, both authenticated."""
    method = "direct" if opener == "caller" else "reversal"
    if opener == "caller":
        accepted = TrackedPath(
            reactor, peers.callee, "callee", resolve=peers.resolver(peers.for_callee(method))
        )
        dialing = TrackedPath(
            reactor, peers.caller, "caller", secrets=peers.for_caller(method), send_preamble=True
        )
    else:
        accepted = TrackedPath(
            reactor, peers.caller, "caller", resolve=peers.resolver(peers.for_caller(method))
        )
        dialing = TrackedPath(
            reactor, peers.callee, "callee", secrets=peers.for_callee(method), send_preamble=True
        )
    port = await lab.listen(lambda: accepted)
    await lab.dial(port, dialing)
    caller, callee = (dialing, accepted) if opener == "caller" else (accepted, dialing)
    await lab.wait(caller.authenticated)
    return caller, callee


def punch(protocol: Protocol) -> PunchTransport:
    """The :class:`PunchTransport` of an application protocol."""
    transport: object = protocol.transport
    assert isinstance(transport, PunchTransport)
    return transport


class Echo(Protocol):
    """Sends back what it receives."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Collector(Protocol):
    """Collects bytes; ``done`` fires when *expected* bytes came, ``lost`` on close."""

    def __init__(self, expected: int, send: bytes = b"", close: bool = False) -> None:
        self.expected = expected
        self.send = send
        self.close = close
        self.data = bytearray()
        self.done: Deferred[bytes] = Deferred()
        self.lost: Deferred[BaseException] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.send:
            self.transport.write(self.send)
        if self.close:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.data))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost.callback(reason.value or ConnectionDone())


async def select_and_attach(
    lab: Lab, caller: SecurePath, callee: SecurePath, caller_app: Protocol, callee_app: Protocol
) -> None:
    """Connect both applications: the caller selects, the callee attaches on the byte."""
    selected: object = caller.select(Factory.forProtocol(lambda: caller_app))
    assert selected is caller_app
    await lab.wait(callee.authenticated)
    attached: object = callee.attach(Factory.forProtocol(lambda: callee_app))
    assert attached is callee_app


@pytest.mark.parametrize(
    ("opener", "sender"), [("caller", "caller"), ("caller", "callee"), ("callee", "caller")]
)
@pytest_twisted.ensureDeferred
async def test_megabyte_echoed_intact(reactor: Any, lab: Lab, opener: str, sender: str) -> None:
    """1 MB of random bytes goes through the path and comes back intact."""
    peers = Introduction()
    caller, callee = await secured(reactor, lab, peers, opener=opener)
    payload = os.urandom(MEGABYTE)
    collector = Collector(len(payload), send=payload)
    if sender == "caller":
        await select_and_attach(lab, caller, callee, collector, Echo())
    else:
        await select_and_attach(lab, caller, callee, Echo(), collector)
    echoed = await lab.wait(collector.done)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    transport = punch(collector)
    assert transport.method == ("direct" if opener == "caller" else "reversal")
    expected = peers.callee if sender == "caller" else peers.caller
    assert transport.peer_id == expected.peer_id
    assert transport.remote.startswith(LOCALHOST + ":")
    transport.loseConnection()
    reason = await lab.wait(collector.lost)
    assert isinstance(reason, ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_lose_connection_right_after_write_delivers_everything(
    reactor: Any, lab: Lab
) -> None:
    """A megabyte written just before loseConnection all arrives, then a clean close."""
    peers = Introduction()
    caller, callee = await secured(reactor, lab, peers, opener="caller")
    payload = os.urandom(MEGABYTE)
    sender = Collector(0, send=payload, close=True)
    receiver = Collector(len(payload))
    await select_and_attach(lab, caller, callee, sender, receiver)
    reason = await lab.wait(receiver.lost)
    assert isinstance(reason, ConnectionDone)
    assert bytes(receiver.data) == payload


@pytest_twisted.ensureDeferred
async def test_wrong_host_is_rejected(reactor: Any, lab: Lab) -> None:
    """A host with another identity at the expected address fails the caller's pin check."""
    peers = Introduction()
    stranger = Identity.generate()
    # The stranger even knows the session: only the certificate gives it away.
    port = await lab.listen(
        lambda: TrackedPath(
            reactor, stranger, "callee", resolve=peers.resolver(peers.for_callee("direct"))
        )
    )
    caller = TrackedPath(
        reactor, peers.caller, "caller", secrets=peers.for_caller("direct"), send_preamble=True
    )
    await lab.dial(port, caller)
    with pytest.raises(PeerAuthenticationFailed) as raised:
        await lab.wait(caller.authenticated)
    assert raised.value.peer_id == peers.callee.peer_id
    assert str(stranger.peer_id) in str(raised.value)
    await lab.wait(caller.closed)
    [wrong_host] = [path for path in lab.paths if path is not caller]
    with pytest.raises(PeerAuthenticationFailed):
        await lab.wait(wrong_host.authenticated)


@implementer(IPushProducer)
class Flood:
    """Writes counted chunks, one per reactor turn, while not paused."""

    def __init__(self, reactor: Any, transport: PunchTransport) -> None:
        self.reactor = reactor
        self.transport = transport
        self.written = 0
        self.digest = hashlib.sha256()
        self.paused = False
        self.stopped = False
        self.pauses = 0
        self.resumes = 0
        self.overflow: Deferred[None] = Deferred()
        self._chunk = os.urandom(CHUNK)
        self._call: Any = None

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self.paused and not self.stopped:
            self._call = self.reactor.callLater(0, self._tick)

    def _tick(self) -> None:
        self._call = None
        if self.paused or self.stopped:
            return
        if self.written >= FLOOD_LIMIT:
            self.overflow.callback(None)
            return
        self.written += len(self._chunk)
        self.digest.update(self._chunk)
        self.transport.write(self._chunk)
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1
        self._schedule()

    def stopProducing(self) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None


class SlowReader(Protocol):
    """Pauses its transport at once; hashes what it gets once resumed."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.lost: Deferred[BaseException] = Deferred()

    def connectionMade(self) -> None:
        punch(self).pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost.callback(reason.value or ConnectionDone())


async def stalled(reactor: Any, flood: Flood) -> bool:
    """Whether *flood* comes to rest, paused, with nothing more written (polled, bounded)."""
    quiet = 0
    last = -1
    for _ in range(400):
        await deferLater(reactor, 0.025)
        if flood.overflow.called:
            return False
        if flood.paused and flood.written == last:
            quiet += 1
            if quiet >= 8:
                return True
        else:
            quiet = 0
        last = flood.written
    return False


@pytest_twisted.ensureDeferred
async def test_slow_reader_pauses_writer(reactor: Any, lab: Lab) -> None:
    """A reader that pauses its transport makes the writer's producer pause, then resume."""
    peers = Introduction()
    caller, callee = await secured(reactor, lab, peers, opener="caller")
    writer = Protocol()
    reader = SlowReader()
    await select_and_attach(lab, caller, callee, writer, reader)
    flood = Flood(reactor, punch(writer))
    flood.start()
    try:
        assert await stalled(reactor, flood), f"the writer never stopped: {flood.written} bytes"
        assert reader.received == 0  # a paused transport delivers nothing
        assert flood.written < FLOOD_LIMIT
        resumes = flood.resumes
        punch(reader).resumeProducing()
        for _ in range(400):
            if flood.resumes > resumes:
                break
            await deferLater(reactor, 0.025)
        assert flood.resumes > resumes, "the writer was never resumed"
    finally:
        flood.stop()
    punch(writer).unregisterProducer()
    punch(writer).loseConnection()
    await lab.wait(reader.lost)
    assert reader.received == flood.written
    assert reader.digest.digest() == flood.digest.digest()
