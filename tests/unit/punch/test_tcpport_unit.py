"""
:class:`~nattraverse.punch.tcpport.SharedTcpPort` against a fake reactor
(``MemoryReactorClock``): argument and reactor checks, the errno mapping,
and each way a pending connect ends, driven by hand.  The sockets are real
but only bind, or connect to a listener of the test on 127.0.0.1.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from nattraverse.punch.tcpport import SharedTcpPort, _connect_error
from tests.deferreds import failed, results, succeeded

LOCALHOST = "127.0.0.1"
#: Bound on the select() that waits for a loopback handshake.
STEP = 5.0


class AdoptingReactor(MemoryReactorClock):
    """Builds the protocol on ``adoptStreamConnection``, as a real reactor does."""

    def adoptStreamConnection(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> None:
        super().adoptStreamConnection(fileDescriptor, addressFamily, factory)  # type: ignore[no-untyped-call]
        factory.buildProtocol(None)


class Boom(Exception):
    """Raised by a factory under test."""


@pytest.fixture
def listener() -> Iterator[int]:
    """A raw listener on 127.0.0.1 that never accepts; its port."""
    sock = socket.socket()
    sock.bind((LOCALHOST, 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def reactor() -> Any:
    """A fake reactor whose adoptStreamConnection builds the protocol."""
    return AdoptingReactor()  # type: ignore[no-untyped-call]


def _pending(reactor: Any) -> Any:
    """The one descriptor the reactor watches for writing."""
    [attempt] = reactor.getWriters()
    return attempt


def _handshake_done(attempt: Any) -> None:
    """Wait (bounded) until the loopback handshake of *attempt* completed."""
    _, writable, _ = select.select([], [attempt.fileno()], [], STEP)
    assert writable


def test_reactor_without_interfaces_is_refused() -> None:
    """A reactor lacking IReactorSocket and IReactorFDSet is refused, naming both."""
    with pytest.raises(TypeError, match=r"IReactorSocket, IReactorFDSet"):
        SharedTcpPort(Clock())


def test_interface_must_be_ip_literal(reactor: Any) -> None:
    """A host name as interface is a ValueError."""
    with pytest.raises(ValueError, match="IP address literal"):
        SharedTcpPort(reactor, "localhost")


@pytest.mark.parametrize(
    ("number", "kind"),
    [
        (errno.ECONNREFUSED, error.ConnectionRefusedError),
        (errno.EHOSTUNREACH, error.NoRouteError),
        (errno.ENETUNREACH, error.NoRouteError),
        (errno.ETIMEDOUT, error.TCPTimedOutError),
        (errno.EADDRNOTAVAIL, error.ConnectError),
    ],
)
def test_connect_error_mapping(number: int, kind: type[error.ConnectError]) -> None:
    """Each connect errno maps to its Twisted error class, naming the errno."""
    mapped = _connect_error(number)
    assert type(mapped) is kind
    assert mapped.osError == number


def test_port_before_bind_is_an_error(reactor: Any) -> None:
    """The port number is unknown before bind()."""
    with pytest.raises(RuntimeError, match="bind"):
        _ = SharedTcpPort(reactor, LOCALHOST).port


def test_bind_is_idempotent(reactor: Any) -> None:
    """A second bind() returns the same address."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    first = shared.bind()
    assert shared.bind() == first
    assert first[1] == shared.port > 0
    succeeded(shared.close())


def test_ipv6_interface_binds_ipv6(reactor: Any) -> None:
    """An IPv6 literal makes an IPv6 port, which refuses an IPv4 remote."""
    shared = SharedTcpPort(reactor, "::1")
    try:
        host, _ = shared.bind()
    except error.CannotListenError:
        pytest.skip("no IPv6 loopback here")
    assert host == "::1"
    failed(shared.connect((LOCALHOST, 9), Factory(), timeout=1), ValueError)
    succeeded(shared.close())


def test_connect_to_host_name_fails_without_raising(reactor: Any) -> None:
    """connect() to a host name fails its Deferred with ValueError and opens nothing."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    failed(shared.connect(("localhost", 9), Factory(), timeout=1), ValueError)
    assert reactor.getWriters() == []
    succeeded(shared.close())


def test_closed_port_refuses_work(reactor: Any) -> None:
    """After close(), bind() raises and connect() fails; close() again is harmless."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    succeeded(shared.close())
    with pytest.raises(RuntimeError, match="closed"):
        shared.bind()
    failed(shared.connect((LOCALHOST, 9), Factory(), timeout=1), RuntimeError)
    succeeded(shared.close())


def test_listen_twice_is_an_error(reactor: Any) -> None:
    """A second listen() raises RuntimeError; the first adopted a listening socket."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    shared.listen(Factory())
    assert len(reactor.adoptedPorts) == 1
    with pytest.raises(RuntimeError, match="already listening"):
        shared.listen(Factory())
    succeeded(shared.close())


def test_timeout_closes_and_unwatches(reactor: Any, listener: int) -> None:
    """With no write event, the timeout fails the connect and releases everything."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    d = shared.connect((LOCALHOST, listener), Factory(), timeout=3)
    attempt = _pending(reactor)
    outcome = results(d)
    reactor.advance(2.9)
    assert outcome == []
    reactor.advance(0.1)
    [failure] = outcome
    assert isinstance(failure, Failure)
    failure.trap(error.TimeoutError)
    assert reactor.getWriters() == []
    assert reactor.getDelayedCalls() == []
    assert attempt.fileno() == -1
    succeeded(shared.close())


class _Recording(socket.socket):
    """A socket that logs its TTL changes and its connect."""

    log: list[tuple[str, int]]

    def setsockopt(self, level: int, name: int, value: Any, *rest: Any) -> None:
        if (level, name) == (socket.IPPROTO_IP, socket.IP_TTL):
            self.log.append(("ttl", value))
        super().setsockopt(level, name, value, *rest)

    def connect_ex(self, address: Any) -> int:
        self.log.append(("connect", self.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)))
        return super().connect_ex(address)


def test_low_ttl_is_only_the_first_syns(
    reactor: Any, listener: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SYN sent inside connect() has the asked TTL; the default is back right after."""
    made: list[_Recording] = []

    def recording(family: socket.AddressFamily, isn: int | None = None) -> socket.socket:
        sock = _Recording(family, socket.SOCK_STREAM)
        sock.log = []
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        made.append(sock)
        return sock

    monkeypatch.setattr("nattraverse.punch.tcpport._reuse_socket", recording)
    shared = SharedTcpPort(reactor, LOCALHOST)
    shared.bind()
    d = shared.connect((LOCALHOST, listener), Factory(), timeout=3, ttl=2)
    sock = made[-1]
    default = socket.socket().getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
    assert sock.log == [("ttl", 2), ("connect", 2), ("ttl", default)]
    d.cancel()
    failed(d, CancelledError)
    succeeded(shared.close())


def test_write_event_adopts_connection(reactor: Any, listener: int) -> None:
    """Once writable without error, the socket is adopted and the protocol returned."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    d = shared.connect((LOCALHOST, listener), Factory.forProtocol(Protocol), timeout=3)
    attempt = _pending(reactor)
    _handshake_done(attempt)
    attempt.doWrite()
    assert isinstance(succeeded(d), Protocol)
    [(_, family, _)] = reactor.adoptedStreamConnections
    assert family == socket.AF_INET
    assert reactor.getWriters() == []
    assert reactor.getDelayedCalls() == []
    assert attempt.fileno() == -1
    succeeded(shared.close())


def test_factory_error_fails_connect(reactor: Any, listener: int) -> None:
    """An exception from buildProtocol fails the connect with it."""

    class Exploding(Factory):
        def buildProtocol(self, addr: IAddress | None) -> Protocol:
            raise Boom()

    shared = SharedTcpPort(reactor, LOCALHOST)
    d = shared.connect((LOCALHOST, listener), Exploding(), timeout=3)
    attempt = _pending(reactor)
    _handshake_done(attempt)
    attempt.doWrite()
    failed(d, Boom)
    assert attempt.fileno() == -1
    succeeded(shared.close())


def test_reactor_dropping_descriptor_fails_connect(reactor: Any, listener: int) -> None:
    """connectionLost from the reactor without a socket error is a ConnectError."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    d = shared.connect((LOCALHOST, listener), Factory.forProtocol(Protocol), timeout=3)
    attempt = _pending(reactor)
    _handshake_done(attempt)
    reactor.removeWriter(attempt)
    attempt.connectionLost(Failure(error.ConnectionLost()))
    assert "dropped" in str(failed(d, error.ConnectError))
    assert reactor.getDelayedCalls() == []
    assert attempt.fileno() == -1
    succeeded(shared.close())


def test_close_cancels_pending(reactor: Any, listener: int) -> None:
    """close() cancels a pending connect and unwatches it."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    d = shared.connect((LOCALHOST, listener), Factory(), timeout=3)
    succeeded(shared.close())
    failed(d, CancelledError)
    assert reactor.getWriters() == []
    assert reactor.getDelayedCalls() == []


def test_client_endpoint_passes_timeout(reactor: Any, listener: int) -> None:
    """The endpoint's connect uses its remote and timeout."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    d = shared.client_endpoint((LOCALHOST, listener), timeout=7).connect(Factory())
    outcome = results(d)
    reactor.advance(6.9)
    assert outcome == []
    reactor.advance(0.1)
    [failure] = outcome
    assert isinstance(failure, Failure)
    failure.trap(error.TimeoutError)
    succeeded(shared.close())
