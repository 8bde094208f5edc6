"""
Abuse of a running ``twistd natrendezvous``, on loopback.

The server runs in a subprocess, so that its memory can be read from
``/proc`` and its log searched for tracebacks.  UDP floods send every
malformed case of the codec tests, random bytes, empty and 65,507-byte
datagrams, interleaved with valid Binding requests that must each be
answered; TCP clients leave messages half sent or trickle them a byte at a
time, and must be disconnected after the idle timeout while others are
still served.

Every flood and every loop is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nattraverse._types import Endpoint
from nattraverse.stun.constants import MAGIC_COOKIE_BYTES, AttributeType
from nattraverse.stun.message import frame_length
from tests.interop.helpers import (
    ALT_LOOPBACK,
    LOOPBACK,
    Rendezvous,
    binding_request,
    binding_success,
    mapped_address,
    require_loopback_address,
    start_rendezvous,
    tcp_binding_blocking,
    udp_binding,
)

pytestmark = pytest.mark.slow

#: The server's --tcp-idle-timeout, seconds.
IDLE_TIMEOUT = 1.0
#: How late after the idle timeout a connection may still be open.
CLOSE_MARGIN = 2.0
#: Concurrent abusive TCP connections per test.
TCP_CLIENTS = 50

#: Rounds of a flood: each sends one datagram of every case (the 65,507-byte
#: case only in the first GIANT_ROUNDS), then one valid Binding request
#: that must be answered.
FLOOD_ROUNDS = 2000
GIANT_ROUNDS = 100
#: A flood stops after this many seconds, whatever it has sent.
FLOOD_TIME_LIMIT = 4.0
#: How much a second flood may grow the server's memory after a first.
MEMORY_GROWTH_LIMIT_KIB = 5 * 1024

#: What the server's log must never contain.
LOG_ALARMS = ("Traceback", "Unhandled", "failed to answer", "handler failed")

_TID = bytes.fromhex("000102030405060708090a0b")
_T = AttributeType


# -- malformed datagrams -------------------------------------------------------


def _tlv(type_code: int, value: bytes, *, length: int | None = None) -> bytes:
    """An attribute: header (with *length* when given), value, zero padding."""
    size = len(value) if length is None else length
    return struct.pack("!HH", type_code, size) + value + b"\0" * (-len(value) % 4)


def _message(
    *attributes: bytes,
    type_field: int = 0x0001,
    cookie: bytes = MAGIC_COOKIE_BYTES,
    length: int | None = None,
) -> bytes:
    """A Binding request built by hand, the length field right unless *length* is given."""
    body = b"".join(attributes)
    size = len(body) if length is None else length
    return struct.pack("!HH", type_field, size) + cookie + _TID + body


def _with_fingerprint(data: bytes) -> bytes:
    """*data* with a correct FINGERPRINT appended (RFC 8489 section 14.7)."""
    longer = data[:2] + struct.pack("!H", len(data) - 20 + 8) + data[4:]
    crc = (zlib.crc32(longer) ^ 0x5354554E) & 0xFFFFFFFF
    return longer + _tlv(_T.FINGERPRINT, struct.pack("!I", crc))


def _address(family: int, raw: bytes = b"\x7f\x00\x00\x01", port: int = 0x1234) -> bytes:
    return struct.pack("!BBH", 0, family, port) + raw


#: Each malformed case of the issue, a few variants each.
MALFORMED: dict[str, list[bytes]] = {
    "under 20 bytes": [_message()[:n] for n in (1, 2, 4, 8, 12, 19)],
    "wrong cookie": [
        _message(cookie=b"\x21\x12\xa4\x43"),
        _message(_tlv(_T.CHANGE_REQUEST, b"\0\0\0\6"), cookie=b"\0\0\0\0"),
        _message(_tlv(_T.XOR_MAPPED_ADDRESS, _address(1)), cookie=b"\xff\xff\xff\xff"),
    ],
    "bad length": [
        _message(b"\0\0", length=2),
        _message(_tlv(_T.SOFTWARE, b"abcd"), length=12),
        _message(_tlv(_T.SOFTWARE, b"abcd"), length=4),
        _message(length=4),
        _message(_tlv(_T.SOFTWARE, b"abcd"), b"\x80\x22"),
    ],
    "truncated attribute": [
        _message(struct.pack("!HH", _T.SOFTWARE, 100) + b"abcd"),
        _message(
            _tlv(_T.PRIORITY, b"\0\0\0\1"),
            struct.pack("!HH", _T.XOR_MAPPED_ADDRESS, 8) + b"\0\1\0\0",
        ),
        _message(struct.pack("!HH", _T.USERNAME, 5) + b"abcd"),
    ],
    "wrong attribute lengths": [
        _message(_tlv(_T.CHANGE_REQUEST, b"\0\6")),
        _message(_tlv(_T.CHANGE_REQUEST, b"\0\0\0\6\0\0\0\0")),
        _message(_tlv(_T.XOR_MAPPED_ADDRESS, _address(1, b"\x7f\0\0\1" + bytes(8)))),
        _message(_tlv(_T.MAPPED_ADDRESS, b"\0\1")),
        _message(_tlv(_T.RESPONSE_PORT, b"\x12")),
        _message(_tlv(_T.FINGERPRINT, bytes(8))),
        _message(_tlv(_T.MESSAGE_INTEGRITY, bytes(16))),
        _message(_tlv(_T.MESSAGE_INTEGRITY_SHA256, bytes(12))),
        _message(_tlv(_T.PRIORITY, b"\0\0\1")),
        _message(_tlv(_T.ICE_CONTROLLING, bytes(4))),
        _message(_tlv(_T.ERROR_CODE, b"\0\0")),
        _message(_tlv(_T.UNKNOWN_ATTRIBUTES, b"\0\1\0")),
        _message(_tlv(_T.USERNAME, b"u" * 600)),
        _message(_tlv(_T.SOFTWARE, b"\xff\xfe")),
    ],
    "bad fingerprint": [
        _message(_tlv(_T.FINGERPRINT, b"\0\0\0\0")),
        _with_fingerprint(_message())[:-4] + b"\xde\xad\xbe\xef",
        _message(_with_fingerprint(_message())[20:], _tlv(_T.SOFTWARE, b"late")),
    ],
    "address family 3": [
        _message(_tlv(_T.XOR_MAPPED_ADDRESS, _address(3))),
        _message(_tlv(_T.MAPPED_ADDRESS, _address(3))),
        _message(_tlv(_T.RESPONSE_ORIGIN, _address(3, bytes(16)))),
        _message(_tlv(_T.OTHER_ADDRESS, _address(0))),
        _message(_tlv(_T.XOR_MAPPED_ADDRESS, _address(2))),
    ],
    "length overflow": [
        _message(length=0xFFFC),
        _message(length=0xFFFF),
        _message(struct.pack("!HH", _T.SOFTWARE, 0xFFFF)),
        _message(struct.pack("!HH", 0x7777, 0xFFFC), type_field=0x3FFF),
        _message(_tlv(_T.PADDING, bytes(64)), struct.pack("!HH", _T.PADDING, 0xFFFF)),
    ],
    "not a request": [
        _message(type_field=0x0011),  # indication
        _message(_tlv(_T.XOR_MAPPED_ADDRESS, _address(1)), type_field=0x0101),  # success
        _message(_tlv(_T.ERROR_CODE, b"\0\0\4\0"), type_field=0x0111),  # error
    ],
    "unsupported request": [
        _message(type_field=0x0003),  # TURN Allocate
        _message(_tlv(0x0777, b"must understand")),
        _message(_tlv(_T.CHANGE_REQUEST, b"\0\0\0\6")),
        # RESPONSE-PORT only with PADDING, which no server accepts together:
        # nothing is reflected to other ports of this host.
        _message(_tlv(_T.RESPONSE_PORT, b"\x12\x34\0\0"), _tlv(_T.PADDING, bytes(64))),
        _message(_tlv(_T.PADDING, bytes(512))),
    ],
}


def _random_cases(rng: random.Random, variants: int = 64) -> dict[str, list[bytes]]:
    """
    Random datagrams: raw bytes, and STUN headers with random bodies or
    attributes (never RESPONSE-PORT, which would reflect answers to other
    ports of this host).
    """
    types = [int(t) for t in AttributeType if t != _T.RESPONSE_PORT] + [0x0777, 0x8777]
    raw = [rng.randbytes(rng.randrange(0, 1501)) for _ in range(variants)]
    bodies = [_message(rng.randbytes(4 * rng.randrange(0, 138))) for _ in range(variants)]
    attributes = [
        _message(*(
            _tlv(rng.choice(types), rng.randbytes(rng.randrange(0, 41)))
            for _ in range(rng.randrange(1, 6))
        ))
        for _ in range(variants)
    ]  # fmt: skip
    return {"random bytes": raw, "random body": bodies, "random attributes": attributes}


def _giant_cases(rng: random.Random) -> list[bytes]:
    """
    65,507-byte datagrams, the largest UDP payload over IPv4, and the
    largest well-formed request: 65,480 bytes of PADDING.
    """
    size = 65507
    return [
        rng.randbytes(size),
        _message(rng.randbytes(size - 20), length=size - 20),
        _message(rng.randbytes(size - 20), length=0xFFFC),
        _message(b"\0" * (size - 20)),
        _message(_tlv(_T.PADDING, bytes(65480))),
    ]


# -- floods --------------------------------------------------------------------


@dataclass
class Flood:
    """What a flood sent, and how the valid requests among it fared."""

    rounds: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    probes: int = 0
    unanswered: list[int] = field(default_factory=list)
    elapsed: float = 0.0


def flood(target: Endpoint, seed: int) -> Flood:
    """
    Send every case to *target* round after round, and after each round a
    valid Binding request (plain and with FINGERPRINT by turns), which
    must be answered within a few retransmissions.  Bounded by
    FLOOD_ROUNDS and FLOOD_TIME_LIMIT.
    """
    rng = random.Random(seed)
    cases = {
        **MALFORMED,
        **_random_cases(rng),
        "empty": [b""],
    }
    giant = _giant_cases(rng)
    result = Flood()
    start = time.monotonic()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as prober,
    ):
        flooder.bind((LOOPBACK, 0))
        prober.bind((LOOPBACK, 0))
        flooder.setblocking(False)
        for round_number in range(FLOOD_ROUNDS):
            if time.monotonic() - start > FLOOD_TIME_LIMIT:
                break
            batch = [(name, variants[round_number % len(variants)])
                     for name, variants in cases.items()]  # fmt: skip
            if round_number < GIANT_ROUNDS:
                batch.append(("largest datagrams", giant[round_number % len(giant)]))
            for name, datagram in batch:
                try:
                    flooder.sendto(datagram, target)
                except BlockingIOError:
                    continue
                result.sent[name] = result.sent.get(name, 0) + 1
            _drain(flooder)
            result.probes += 1
            try:
                udp_binding(
                    target, sock=prober, timeout=0.5, attempts=4, fingerprint=bool(round_number % 2)
                )
            except TimeoutError:
                result.unanswered.append(round_number)
            result.rounds += 1
    result.elapsed = time.monotonic() - start
    return result


def _drain(sock: socket.socket) -> None:
    """Read and drop what the server answered to the flood, a bounded amount."""
    for _ in range(256):
        try:
            sock.recv(65535)
        except (BlockingIOError, ConnectionRefusedError):
            return


# -- the server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendezvous]:
    """A single-address server on 127.0.0.1 with a 1-second TCP idle timeout."""
    with start_rendezvous(
        tmp_path_factory.mktemp("abuse"),
        "--stun-interface", LOOPBACK,
        "--stun-port", "0", "--alt-port", "0",
        "--tcp-idle-timeout", str(IDLE_TIMEOUT),
    ) as rendezvous:  # fmt: skip
        yield rendezvous


@pytest.fixture(scope="module")
def server_rfc5780(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendezvous]:
    """An RFC 5780 server on 127.0.0.1 and 127.0.0.2: no fast path, every answer decoded."""
    require_loopback_address(ALT_LOOPBACK)
    with start_rendezvous(
        tmp_path_factory.mktemp("abuse-rfc5780"),
        "--stun-interface", LOOPBACK,
        "--stun-port", "0",
        "--alt-address", ALT_LOOPBACK,
        "--alt-port", "0",
    ) as rendezvous:  # fmt: skip
        yield rendezvous


def assert_healthy(server: Rendezvous) -> None:
    """The server still runs, answers, and logged no exception."""
    assert server.server.process.poll() is None, server.server.log_text()
    local, response = udp_binding(server.primary, timeout=1.0, attempts=3)
    assert mapped_address(response) == local
    log = server.server.log_text()
    for alarm in LOG_ALARMS:
        assert alarm not in log, f"{alarm!r} in the server's log:\n{log}"


# -- UDP -----------------------------------------------------------------------


def test_flood_keeps_answering(server: Rendezvous) -> None:
    """Through a flood of malformed and random datagrams, every valid request is answered."""
    result = flood(server.primary, seed=1)
    assert result.unanswered == [], result
    # The flood was not cut short by the time limit before it meant anything.
    assert result.rounds >= FLOOD_ROUNDS // 4, result
    assert set(result.sent) >= {*MALFORMED, "empty", "random bytes", "largest datagrams"}, result
    assert_healthy(server)


def test_flood_keeps_answering_rfc5780(server_rfc5780: Rendezvous) -> None:
    """
    An RFC 5780 server, which answers every request through the full
    responder, survives the same flood; its answer to the largest PADDING
    request does not fit in a datagram and is dropped, not raised.
    """
    result = flood(server_rfc5780.primary, seed=4)
    assert result.unanswered == [], result
    assert result.rounds >= FLOOD_ROUNDS // 4, result
    assert_healthy(server_rfc5780)


def test_flood_memory_flat(server: Rendezvous) -> None:
    """A second flood leaves the server's resident memory where the first left it."""
    if not Path(f"/proc/{server.server.pid}/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    warm_up = flood(server.primary, seed=2)
    assert warm_up.unanswered == [], warm_up
    before = server.server.rss_kib()
    second = flood(server.primary, seed=3)
    after = server.server.rss_kib()
    assert second.unanswered == [], second
    assert after - before < MEMORY_GROWTH_LIMIT_KIB, (before, after, second)
    assert_healthy(server)


# -- TCP -----------------------------------------------------------------------


def _is_closed(sock: socket.socket) -> bool:
    """Whether the server closed (or reset) this non-blocking connection."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def _connect(target: Endpoint, first_bytes: bytes) -> tuple[socket.socket, float]:
    sock = socket.create_connection(target, timeout=2.0)
    if first_bytes:
        sock.sendall(first_bytes)
    sock.setblocking(False)
    return sock, time.monotonic()


def _watch_closing(
    target: Endpoint,
    connections: Sequence[tuple[socket.socket, float]],
    *,
    trickle: bytes = b"",
    sent: int = 0,
    tick: float = 0.2,
) -> list[float]:
    """
    Wait for the server to close *connections*, sending the next byte of
    *trickle* on each every *tick* seconds, and checking once that a fresh
    TCP Binding is answered meanwhile.

    :returns: How long after its connect each connection was closed.
    """
    lifetimes: dict[int, float] = {}
    deadline = max(opened for _, opened in connections) + IDLE_TIMEOUT + CLOSE_MARGIN + 1.0
    fresh_checked = False
    next_tick = time.monotonic() + tick
    with selectors.DefaultSelector() as selector:
        for index, (sock, _) in enumerate(connections):
            selector.register(sock, selectors.EVENT_READ, index)
        while len(lifetimes) < len(connections) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.05):
                index = key.data
                sock, opened = connections[index]
                if _is_closed(sock):
                    lifetimes[index] = time.monotonic() - opened
                    selector.unregister(sock)
            if not fresh_checked:
                local, response = tcp_binding_blocking(target)
                assert mapped_address(response) == local
                fresh_checked = True
            if trickle and time.monotonic() >= next_tick and sent < len(trickle):
                next_tick += tick
                for index, (sock, _) in enumerate(connections):
                    if index in lifetimes:
                        continue
                    # A closed connection is noticed by the reads above.
                    with contextlib.suppress(BlockingIOError, ConnectionError):
                        sock.send(trickle[sent : sent + 1])
                sent += 1
    assert fresh_checked
    assert len(lifetimes) == len(connections), (
        f"{len(connections) - len(lifetimes)} of {len(connections)} connections still open "
        f"{IDLE_TIMEOUT + CLOSE_MARGIN + 1.0}s after the last one was made"
    )
    return [lifetimes[i] for i in range(len(connections))]


@pytest.fixture
def connections() -> Iterator[list[tuple[socket.socket, float]]]:
    """TCP connections a test made, closed afterwards."""
    made: list[tuple[socket.socket, float]] = []
    try:
        yield made
    finally:
        for sock, _ in made:
            sock.close()


def _assert_closed_after_idle_timeout(lifetimes: Sequence[float]) -> None:
    assert min(lifetimes) >= IDLE_TIMEOUT * 0.8, lifetimes
    assert max(lifetimes) <= IDLE_TIMEOUT + CLOSE_MARGIN, lifetimes


def test_half_sent_messages_closed_after_idle_timeout(
    server: Rendezvous, connections: list[tuple[socket.socket, float]]
) -> None:
    """Connections that stop halfway through a request are closed after the idle timeout."""
    request = binding_request(fingerprint=True)
    for _ in range(TCP_CLIENTS):
        connections.append(_connect(server.primary, request[: len(request) // 2]))
    lifetimes = _watch_closing(server.primary, connections)
    _assert_closed_after_idle_timeout(lifetimes)
    assert_healthy(server)


def test_silent_connections_closed_after_idle_timeout(
    server: Rendezvous, connections: list[tuple[socket.socket, float]]
) -> None:
    """Connections that send nothing are closed after the idle timeout."""
    for _ in range(TCP_CLIENTS):
        connections.append(_connect(server.primary, b""))
    lifetimes = _watch_closing(server.primary, connections)
    _assert_closed_after_idle_timeout(lifetimes)
    assert_healthy(server)


def test_byte_at_a_time_closed_after_idle_timeout(
    server: Rendezvous, connections: list[tuple[socket.socket, float]]
) -> None:
    """
    Connections that trickle a request a byte at a time are closed after
    the idle timeout, though bytes keep arriving: only a whole message
    restarts the timer.
    """
    request = binding_request(fingerprint=True)
    for _ in range(TCP_CLIENTS):
        connections.append(_connect(server.primary, request[:1]))
    # One byte per 0.2s: the 28-byte request would take 5.4s to arrive.
    lifetimes = _watch_closing(server.primary, connections, trickle=request, sent=1, tick=0.2)
    _assert_closed_after_idle_timeout(lifetimes)
    assert_healthy(server)


def test_whole_requests_keep_connection_open(server: Rendezvous) -> None:
    """A client that sends whole requests more often than the timeout stays connected."""
    with socket.create_connection(server.primary, timeout=2.0) as sock:
        local = Endpoint(*sock.getsockname()[:2])
        started = time.monotonic()
        # A request every third of the timeout, for twice the timeout.
        for _ in range(7):
            request = binding_request()
            sock.sendall(request)
            response = binding_success(_read_frame(sock), request)
            assert response is not None
            assert mapped_address(response) == local
            time.sleep(IDLE_TIMEOUT / 3)
        assert time.monotonic() - started > 2 * IDLE_TIMEOUT
    assert_healthy(server)


def _read_frame(sock: socket.socket) -> bytes:
    """One STUN message from a blocking stream."""
    data = b""
    while len(data) < 4 or len(data) < frame_length(data):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {len(data)} bytes"
        data += chunk
    return data


def test_unread_answers_do_not_grow_memory(server: Rendezvous) -> None:
    """
    A client that pipelines requests and never reads the answers stops
    being read once they back up, and is cut off by the idle timeout; the
    server's memory does not grow with what it sends.
    """
    if not Path(f"/proc/{server.server.pid}/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    before = peak = server.server.rss_kib()
    requests = b"".join(binding_request() for _ in range(5000))  # 100 KB
    sent = 0
    reset = False
    start = time.monotonic()
    with socket.create_connection(server.primary, timeout=2.0) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        pending = memoryview(requests)
        # At most 64 MB, for at most a few idle timeouts.
        while sent < 64_000_000 and time.monotonic() - start < IDLE_TIMEOUT + CLOSE_MARGIN + 1:
            try:
                count = sock.send(pending)
            except BlockingIOError:
                peak = max(peak, server.server.rss_kib())
                time.sleep(0.01)
                continue
            except ConnectionError:
                reset = True
                break
            sent += count
            # Whole requests only: a partial one would break the framing.
            pending = pending[count:] or memoryview(requests)
        peak = max(peak, server.server.rss_kib())
    assert reset, f"still connected after sending {sent} bytes of requests"
    assert peak - before < MEMORY_GROWTH_LIMIT_KIB, (before, peak, sent)
    assert_healthy(server)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00\x01\xff\xfc" + MAGIC_COOKIE_BYTES,  # a 65,552-byte message
    ],
    ids=["not-stun", "too-long"],
)
def test_tcp_garbage_closed_at_once(server: Rendezvous, garbage: bytes) -> None:
    """A stream that cannot be STUN is closed at once, not after the idle timeout."""
    sock, opened = _connect(server.primary, garbage)
    with sock:
        deadline = opened + IDLE_TIMEOUT / 2
        while not _is_closed(sock):
            assert time.monotonic() < deadline, "still open"
            time.sleep(0.01)
    assert_healthy(server)
