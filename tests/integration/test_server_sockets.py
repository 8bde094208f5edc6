"""
The STUN server on the real reactor, on loopback: the project's own client
against :class:`StunServer` over UDP and TCP, RFC 5780 on 127.0.0.1 and
127.0.0.2, the UDP fast path, and a clean stop.  No traffic leaves the host.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import UnknownAttribute
from nattraverse.stun import fastpath
from nattraverse.stun.attributes import (
    ChangeRequest,
    OtherAddress,
    ResponsePort,
    Software,
    XorMappedAddress,
)
from nattraverse.stun.constants import MAGIC_COOKIE_BYTES, MessageClass, Method
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.fastpath import FastStunPort
from nattraverse.stun.message import decode, encode
from nattraverse.stun.responder import BindingResponder, SocketKey
from nattraverse.stun.server import StunServer
from nattraverse.stun.tcp_client import StunTcpClientProtocol, tcp_binding

LOCALHOST = "127.0.0.1"
SECOND = "127.0.0.2"
#: The sockets of an RFC 5780 server, primary first.
FOUR_SOCKETS = [SocketKey(0, 0), SocketKey(0, 1), SocketKey(1, 0), SocketKey(1, 1)]
#: Seconds any single wait in these tests may take.
WAIT = 2.0


def responder_answer(txid: bytes, source: tuple[str, int]) -> bytes:
    """What the pure responder answers to a plain Binding request from *source*."""
    reply = BindingResponder().respond(plain_request(txid), Endpoint(*source))
    assert reply is not None
    return reply.payload


@dataclass
class Opened:
    """Servers and ports a test opened; stopped and closed afterwards."""

    servers: list[StunServer] = field(default_factory=list)
    ports: list[Any] = field(default_factory=list)


@pytest_twisted.async_yield_fixture
async def opened() -> AsyncIterator[Opened]:
    """What a test opens, closed (and waited for) afterwards."""
    things = Opened()
    yield things
    for server in things.servers:
        if server.running:
            await server.stopService()
    for port in things.ports:
        await maybeDeferred(port.stopListening)


def start(reactor: Any, opened: Opened, **kwargs: Any) -> StunServer:
    """
    A StunServer on 127.0.0.1, port 0, started.  Port 0 picks the UDP port;
    TCP (and the second address) then need the same number, which another
    socket on this busy host may hold: try again a few times.
    """
    kwargs.setdefault("interface", LOCALHOST)
    for _ in range(5):
        server = StunServer(reactor, port=0, **kwargs)
        try:
            server.startService()
        except CannotListenError:
            continue
        opened.servers.append(server)
        return server
    raise AssertionError("no port number free for both UDP and TCP in 5 tries")


def start_rfc5780(reactor: Any, opened: Opened, **kwargs: Any) -> StunServer:
    """A StunServer on 127.0.0.1 and 127.0.0.2, ports 0, started."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((SECOND, 0))
    except OSError:
        pytest.skip(f"{SECOND} is not a local address here")
    return start(reactor, opened, alt_address=SECOND, alt_port=0, **kwargs)


def stun_client(
    reactor: Any, opened: Opened, host: str = LOCALHOST
) -> tuple[StunDemultiplexer, Endpoint]:
    """A STUN client on its own UDP port, retransmitting briefly; and its address."""
    demux = StunDemultiplexer(reactor, rto=0.1, rc=4, rm=4)
    port = reactor.listenUDP(0, demux, interface=host)
    opened.ports.append(port)
    return demux, Endpoint(host, port.getHost().port)


class Collector(DatagramProtocol):
    """Collects datagrams; :meth:`next` waits for the next one."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Endpoint]] = []
        self._waiting: list[Deferred[tuple[bytes, Endpoint]]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        item = (datagram, Endpoint(addr[0], addr[1]))
        self.received.append(item)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(item)

    def next(self, reactor: Any) -> Deferred[tuple[bytes, Endpoint]]:
        d: Deferred[tuple[bytes, Endpoint]] = Deferred()
        self._waiting.append(d)
        return d.addTimeout(WAIT, reactor)


def listen(reactor: Any, opened: Opened, protocol: DatagramProtocol) -> Endpoint:
    """Listen on a new UDP port of 127.0.0.1 with *protocol*."""
    port = reactor.listenUDP(0, protocol, interface=LOCALHOST)
    opened.ports.append(port)
    return Endpoint(LOCALHOST, port.getHost().port)


def can_bind(kind: socket.SocketKind, address: Endpoint) -> bool:
    """Whether a fresh socket can bind *address*: nothing listens there any more."""
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(address)
        except OSError:
            return False
    return True


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- RFC 8489 Binding over UDP and TCP ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_udp_binding(reactor: Any, opened: Opened) -> None:
    """The client learns its own address from the server over UDP."""
    server = start(reactor, opened)
    demux, client = stun_client(reactor, opened)
    response = await demux.client.binding(server.endpoint())
    assert response.mapped_address == client
    assert response.source == server.endpoint()
    assert response.message.get(Software) is None


@pytest_twisted.ensureDeferred
async def test_udp_plain_binding_counted_as_fast_answer(reactor: Any, opened: Opened) -> None:
    """A plain Binding request is answered by the fast path and counted by the server."""
    require_batching()
    server = start(reactor, opened)
    demux, _ = stun_client(reactor, opened)
    await demux.client.binding(server.endpoint())
    assert server.fast_answers == 1
    assert server.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_udp_binding_ipv6(reactor: Any, opened: Opened) -> None:
    """Over IPv6 (::1) the client learns its IPv6 address."""
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) here")
    server = start(reactor, opened, interface="::1")
    demux, client = stun_client(reactor, opened, host="::1")
    response = await demux.client.binding(server.endpoint())
    assert response.mapped_address == client


@pytest_twisted.ensureDeferred
async def test_udp_change_request_without_second_address(reactor: Any, opened: Opened) -> None:
    """Without a second address, CHANGE-REQUEST gets 420 from the address asked."""
    server = start(reactor, opened)
    demux, _ = stun_client(reactor, opened)
    with pytest.raises(UnknownAttribute):
        await demux.client.binding(server.endpoint(), [ChangeRequest(True, True)])


@pytest_twisted.ensureDeferred
async def test_tcp_binding(reactor: Any, opened: Opened) -> None:
    """tcp_binding gets the client's address from the server over TCP."""
    server = start(reactor, opened)
    endpoint = TCP4ClientEndpoint(reactor, LOCALHOST, server.endpoint().port, timeout=WAIT)
    response = await tcp_binding(reactor, endpoint, ti=WAIT)
    assert response.mapped_address is not None
    assert response.mapped_address.host == LOCALHOST
    assert response.source == server.endpoint()


@pytest_twisted.ensureDeferred
async def test_tcp_mapped_port(reactor: Any, opened: Opened) -> None:
    """Over TCP the mapped address is the connection's own local address."""
    server = start(reactor, opened)
    endpoint = TCP4ClientEndpoint(reactor, LOCALHOST, server.endpoint().port, timeout=WAIT)
    protocol = await connectProtocol(endpoint, StunTcpClientProtocol(reactor, ti=WAIT))
    try:
        response = await protocol.binding()
        assert protocol.transport is not None
        local = protocol.transport.getHost()
        assert response.mapped_address == Endpoint(local.host, local.port)
    finally:
        assert protocol.transport is not None
        protocol.transport.loseConnection()


class Watcher(Protocol):
    """Fires :attr:`lost` when the connection ends."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


async def until(reactor: Any, condition: Callable[[], bool]) -> None:
    """Wait, polling, for *condition()* to hold; fail after WAIT seconds."""
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not met in time")


@pytest_twisted.ensureDeferred
async def test_tcp_idle_connection_closed(reactor: Any, opened: Opened) -> None:
    """A silent TCP connection is closed by the server after tcp_idle_timeout."""
    server = start(reactor, opened, tcp_idle_timeout=0.1)
    endpoint = TCP4ClientEndpoint(reactor, LOCALHOST, server.endpoint().port, timeout=WAIT)
    watcher = await connectProtocol(endpoint, Watcher())
    await watcher.lost.addTimeout(WAIT, reactor)
    assert server.tcp_timeouts == 1


@pytest_twisted.ensureDeferred
async def test_tcp_connection_cap(reactor: Any, opened: Opened) -> None:
    """Past max_tcp_connections the server closes new connections; closing one frees it."""
    server = start(reactor, opened, max_tcp_connections=1)
    endpoint = TCP4ClientEndpoint(reactor, LOCALHOST, server.endpoint().port, timeout=WAIT)
    first = await connectProtocol(endpoint, Watcher())
    second = await connectProtocol(endpoint, Watcher())
    await second.lost.addTimeout(WAIT, reactor)
    assert server.tcp_refused == 1
    assert server.tcp_connections == 1
    assert first.transport is not None
    first.transport.loseConnection()
    await until(reactor, lambda: server.tcp_connections == 0)


# -- stopping -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_closes_every_port(reactor: Any, opened: Opened) -> None:
    """After stopService the UDP and TCP ports can be bound again."""
    server = start(reactor, opened)
    address = server.endpoint()
    await server.stopService()
    assert can_bind(socket.SOCK_DGRAM, address)
    assert can_bind(socket.SOCK_STREAM, address)


@pytest_twisted.ensureDeferred
async def test_stop_closes_rfc5780_ports(reactor: Any, opened: Opened) -> None:
    """After stopService all four UDP sockets and the TCP listener are closed."""
    server = start_rfc5780(reactor, opened)
    addresses = [server.endpoint(key) for key in FOUR_SOCKETS]
    await server.stopService()
    assert [can_bind(socket.SOCK_DGRAM, a) for a in addresses] == [True] * 4
    assert can_bind(socket.SOCK_STREAM, addresses[0])


@pytest_twisted.ensureDeferred
async def test_stop_closes_open_connections(reactor: Any, opened: Opened) -> None:
    """stopService closes TCP connections still open, leaving no idle timer behind."""
    server = start(reactor, opened)
    endpoint = TCP4ClientEndpoint(reactor, LOCALHOST, server.endpoint().port, timeout=WAIT)
    watcher = await connectProtocol(endpoint, Watcher())
    await until(reactor, lambda: server.tcp_connections == 1)
    await server.stopService()
    await watcher.lost.addTimeout(WAIT, reactor)
    await until(reactor, lambda: server.tcp_connections == 0)


# -- RFC 5780 ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rfc5780_four_sockets(reactor: Any, opened: Opened) -> None:
    """Each of the four sockets answers, naming itself and the socket across from it."""
    server = start_rfc5780(reactor, opened)
    primary = server.endpoint()
    demux, _ = stun_client(reactor, opened)
    response = await demux.client.binding(primary)
    other = response.other_address
    assert other is not None
    assert other.host == SECOND
    assert other.port != primary.port
    sockets = [
        primary,
        Endpoint(LOCALHOST, other.port),
        Endpoint(SECOND, primary.port),
        other,
    ]
    assert [server.endpoint(key) for key in FOUR_SOCKETS] == sockets
    across = [sockets[3], sockets[2], sockets[1], sockets[0]]
    for target, expected_other in zip(sockets, across, strict=True):
        answer = await demux.client.binding(target)
        assert answer.source == target
        assert answer.response_origin == target
        assert answer.other_address == expected_other


@pytest.mark.parametrize(
    ("change_ip", "change_port"), [(False, False), (False, True), (True, False), (True, True)]
)
@pytest_twisted.ensureDeferred
async def test_change_request_from_right_socket(
    reactor: Any, opened: Opened, change_ip: bool, change_port: bool
) -> None:
    """CHANGE-REQUEST answers come from the asked-for address and port, as RESPONSE-ORIGIN says."""
    server = start_rfc5780(reactor, opened)
    primary = server.endpoint()
    demux, client = stun_client(reactor, opened)
    response = await demux.client.binding(
        primary, [ChangeRequest(change_ip, change_port)], match_source=False
    )
    alternate_port = server.endpoint(SocketKey(0, 1)).port
    expected = Endpoint(
        SECOND if change_ip else LOCALHOST, alternate_port if change_port else primary.port
    )
    assert response.source == expected
    assert response.response_origin == expected
    assert response.mapped_address == client


@pytest_twisted.ensureDeferred
async def test_response_port(reactor: Any, opened: Opened) -> None:
    """RESPONSE-PORT sends the answer to the other port of the client's address."""
    server = start_rfc5780(reactor, opened)
    sender, receiver = Collector(), Collector()
    sender_address = listen(reactor, opened, sender)
    receiver_address = listen(reactor, opened, receiver)
    txid = bytes(range(12))
    data = encode(Method.BINDING, MessageClass.REQUEST, txid, [ResponsePort(receiver_address.port)])
    arrived = receiver.next(reactor)
    assert sender.transport is not None
    sender.transport.write(data, server.endpoint())
    payload, source = await arrived
    message = decode(payload)
    assert message.transaction_id == txid
    assert message.get(XorMappedAddress) == XorMappedAddress(sender_address)
    assert source == server.endpoint()
    assert sender.received == []


# -- the UDP fast path: FastStunPort's batched read loop -----------------------------


def require_batching() -> None:
    """Skip unless FastStunPort can batch here (Linux, recvmmsg/sendmmsg)."""
    if not fastpath.AVAILABLE:
        pytest.skip("FastStunPort batches only on Linux (recvmmsg/sendmmsg)")


def plain_request(txid: bytes) -> bytes:
    """A 20-byte Binding request with no attributes."""
    return b"\x00\x01\x00\x00" + MAGIC_COOKIE_BYTES + txid


def address_of(port: FastStunPort) -> Endpoint:
    """The address a FastStunPort listens on."""
    host = port.getHost()  # type: ignore[no-untyped-call]
    return Endpoint(host.host, host.port)


@contextmanager
def manual_port(
    protocol: DatagramProtocol, *, enabled: bool = True, interface: str = LOCALHOST
) -> Iterator[tuple[FastStunPort, Endpoint]]:
    """
    A listening FastStunPort whose reads this test drives with :func:`pump`
    (its reactor is a fake: nothing reads unless told); closed afterwards.
    """
    clock = MemoryReactorClock()
    port = FastStunPort(0, protocol, enabled=enabled, interface=interface, reactor=clock)
    port.startListening()
    try:
        yield port, address_of(port)
    finally:
        port.stopListening()  # type: ignore[no-untyped-call]
        clock.advance(0)  # udp.Port closes its socket in a callLater(0)


def pump(port: FastStunPort, done: Callable[[], bool]) -> None:
    """Call the port's doRead whenever its socket is readable, until *done()* or WAIT s."""
    deadline = time.monotonic() + WAIT
    with selectors.DefaultSelector() as selector:
        selector.register(port.fileno(), selectors.EVENT_READ)  # type: ignore[no-untyped-call]
        while not done():
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the port did not get there in time"
            if selector.select(min(remaining, 0.05)):
                port.doRead()


@contextmanager
def udp_socket(host: str = LOCALHOST) -> Iterator[tuple[socket.socket, Endpoint]]:
    """A plain UDP socket on *host*, with a timeout, and its address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(WAIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        address = sock.getsockname()
        yield sock, Endpoint(address[0], address[1])


#: How many datagrams to queue ahead so that the next ones land in a batch
#: (the port reads this many one at a time first), or none for the single
#: reads themselves.
LEADS = pytest.mark.parametrize("lead", [0, fastpath.SINGLE_READS], ids=["single", "batched"])


def fillers(count: int) -> list[bytes]:
    """*count* plain Binding requests with ids that no test uses otherwise."""
    return [plain_request(b"\xfe" + i.to_bytes(11, "big")) for i in range(count)]


@settings(max_examples=40, deadline=None)
@given(
    lead=st.sampled_from([0, fastpath.SINGLE_READS]),
    txid=st.binary(min_size=12, max_size=12).filter(lambda t: t[0] != 0xFE),
    host=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(1, 254)).map(
        lambda t: f"127.{t[0]}.{t[1]}.{t[2]}"
    ),
)
def test_fast_answer_equals_responder(lead: int, txid: bytes, host: str) -> None:
    """The fast path's answer is byte for byte the responder's, for any id and source."""
    require_batching()
    requests = [*fillers(lead), plain_request(txid)]
    with manual_port(Collector()) as (port, server), udp_socket(host) as (client, source):
        for data in requests:
            client.sendto(data, server)
        pump(port, lambda: port.fast_answers == len(requests))
        answers = [client.recvfrom(100) for _ in requests]
    expected = [responder_answer(data[8:20], source) for data in requests]
    assert sorted(answer for answer, _ in answers) == sorted(expected)
    assert {sender for _, sender in answers} == {server}


@LEADS
def test_fast_port_mixed_datagrams(lead: int) -> None:
    """Among mixed datagrams, plain requests are answered and the rest handed over."""
    require_batching()
    collector = Collector()
    with_fingerprint = encode(Method.BINDING, MessageClass.REQUEST, bytes(12), fingerprint=True)
    first, second = b"\x01" * 12, b"\x02" * 12
    datagrams = [plain_request(first), b"\x80not stun", with_fingerprint, plain_request(second)]
    with manual_port(collector) as (port, server), udp_socket() as (client, source):
        for data in [*fillers(lead), *datagrams]:
            client.sendto(data, server)
        pump(port, lambda: port.fast_answers == lead + 2 and len(collector.received) == 2)
        answers = [client.recvfrom(100)[0] for _ in range(lead + 2)][lead:]
    assert answers == [
        responder_answer(first, source),
        responder_answer(second, source),
    ]
    assert collector.received == [(b"\x80not stun", source), (with_fingerprint, source)]


def test_fast_port_more_than_a_batch() -> None:
    """More plain requests than one batch holds are all answered."""
    require_batching()
    txids = [i.to_bytes(12, "big") for i in range(fastpath.SINGLE_READS + fastpath.BATCH + 4)]
    with manual_port(Collector()) as (port, server), udp_socket() as (client, _):
        for txid in txids:
            client.sendto(plain_request(txid), server)
        pump(port, lambda: port.fast_answers == len(txids))
        answered = {decode(client.recvfrom(100)[0]).transaction_id for _ in txids}
    assert answered == set(txids)


def test_fast_port_long_datagram_read_singly_is_handed_over() -> None:
    """A long datagram read on its own reaches the protocol whole."""
    require_batching()
    collector = Collector()
    long_datagram = b"\x00\x01" + bytes(3000)
    with manual_port(collector) as (port, server), udp_socket() as (client, source):
        client.sendto(long_datagram, server)
        pump(port, lambda: len(collector.received) == 1)
    assert collector.received == [(long_datagram, source)]
    assert port.dropped_truncated == 0


def test_fast_port_drops_oversized_datagram_in_batch() -> None:
    """A datagram too long for the batch buffers is dropped and counted, not handed over."""
    require_batching()
    collector = Collector()
    with manual_port(collector) as (port, server), udp_socket() as (client, _):
        for data in fillers(fastpath.SINGLE_READS):
            client.sendto(data, server)
        client.sendto(b"\x00\x01" + bytes(fastpath.OVERFLOW + 100), server)
        pump(port, lambda: port.dropped_truncated == 1)
    assert collector.received == []


def test_fast_port_disabled() -> None:
    """With enabled=False, plain requests go to the protocol like any datagram."""
    collector = Collector()
    with manual_port(collector, enabled=False) as (port, server), udp_socket() as (client, source):
        client.sendto(plain_request(bytes(12)), server)
        pump(port, lambda: len(collector.received) == 1)
    assert not port.batched
    assert collector.received == [(plain_request(bytes(12)), source)]
    assert port.fast_answers == 0


def test_fast_port_ipv6_not_batched() -> None:
    """On IPv6 the port reads plainly: plain requests go to the protocol."""
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) here")
    collector = Collector()
    with (
        manual_port(collector, interface="::1") as (port, server),
        udp_socket("::1") as (
            client,
            source,
        ),
    ):
        client.sendto(plain_request(bytes(12)), server)
        pump(port, lambda: len(collector.received) == 1)
    assert not port.batched
    assert collector.received == [(plain_request(bytes(12)), source)]


@pytest_twisted.ensureDeferred
async def test_fast_port_on_reactor_answers_plain_requests(reactor: Any, opened: Opened) -> None:
    """On the real reactor, FastStunPort answers a plain Binding request itself."""
    require_batching()
    protocol = Collector()
    port = FastStunPort(0, protocol, interface=LOCALHOST, reactor=reactor)
    port.startListening()
    opened.ports.append(port)
    demux, client = stun_client(reactor, opened)
    response = await demux.client.binding(address_of(port))
    assert response.mapped_address == client
    assert port.fast_answers == 1
    assert protocol.received == []


@pytest_twisted.ensureDeferred
async def test_fast_port_on_reactor_passes_other_datagrams(reactor: Any, opened: Opened) -> None:
    """On the real reactor, FastStunPort hands every other datagram to its protocol."""
    protocol = Collector()
    port = FastStunPort(0, protocol, interface=LOCALHOST, reactor=reactor)
    port.startListening()
    opened.ports.append(port)
    sender = Collector()
    sender_address = listen(reactor, opened, sender)
    assert sender.transport is not None
    target = address_of(port)
    with_fingerprint = encode(Method.BINDING, MessageClass.REQUEST, bytes(12), fingerprint=True)
    for data in (b"\x80not stun", with_fingerprint):
        arrived = protocol.next(reactor)
        sender.transport.write(data, target)
        assert await arrived == (data, sender_address)
    assert port.fast_answers == 0


# -- the server's use of the fast path ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fast_path_on_by_default(reactor: Any, opened: Opened) -> None:
    """By default a plain request is answered by the fast path, without the responder."""
    require_batching()
    server = start(reactor, opened)
    demux, client = stun_client(reactor, opened)
    response = await demux.client.binding(server.endpoint())
    assert response.mapped_address == client
    assert server.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_fast_path_off_with_software(reactor: Any, opened: Opened) -> None:
    """With SOFTWARE configured, plain requests get the full answer, with SOFTWARE."""
    server = start(reactor, opened, software="nattraverse-test")
    demux, _ = stun_client(reactor, opened)
    response = await demux.client.binding(server.endpoint())
    assert response.software == "nattraverse-test"


@pytest_twisted.ensureDeferred
async def test_fast_path_off_with_alt_address(reactor: Any, opened: Opened) -> None:
    """With a second address, plain requests get the full answer, with OTHER-ADDRESS."""
    server = start_rfc5780(reactor, opened)
    demux, client = stun_client(reactor, opened)
    response = await demux.client.binding(server.endpoint())
    assert response.message.get(OtherAddress) is not None
    assert response.mapped_address == client


@pytest_twisted.ensureDeferred
async def test_plain_request_bytes(reactor: Any, opened: Opened) -> None:
    """The server's answer to a raw 20-byte request is the 32-byte minimal one."""
    server = start(reactor, opened)
    sender = Collector()
    sender_address = listen(reactor, opened, sender)
    txid = bytes(range(12))
    arrived = sender.next(reactor)
    assert sender.transport is not None
    sender.transport.write(b"\x00\x01\x00\x00" + MAGIC_COOKIE_BYTES + txid, server.endpoint())
    payload, _ = await arrived
    assert payload == responder_answer(txid, sender_address)
