"""
The SYN filter of the TCP punching port (:mod:`nattraverse.punch.synfilter`)
on real loopback sockets: ignored SYNs go unanswered, other SYNs are
accepted, and connections that exist, even from an ignored address, keep
every segment.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import pytest

from nattraverse.punch.synfilter import MAX_IGNORED, ignore_syns_from, program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux socket filters")

LOCALHOST = "127.0.0.1"
#: Seconds a connect() to an ignoring listener waits before the test calls it unanswered.
WAIT = 0.5


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind((LOCALHOST, 0))
    sock.listen(8)
    yield sock
    sock.close()


def _client() -> socket.socket:
    sock = socket.socket()
    sock.bind((LOCALHOST, 0))
    sock.settimeout(WAIT)
    return sock


def test_a_syn_from_an_ignored_address_goes_unanswered(listener: socket.socket) -> None:
    """connect() from an ignored (host, port) gets neither SYN-ACK nor RST; others connect."""
    ignored, other = _client(), _client()
    with ignored, other:
        assert ignore_syns_from(listener, [ignored.getsockname()])
        with pytest.raises(TimeoutError):
            ignored.connect(listener.getsockname())
        other.connect(listener.getsockname())


def test_no_address_accepts_every_syn_again(listener: socket.socket) -> None:
    """An empty list removes the filter."""
    client = _client()
    with client:
        assert ignore_syns_from(listener, [client.getsockname()])
        assert ignore_syns_from(listener, [])
        client.connect(listener.getsockname())


def test_a_connection_made_under_the_filter_keeps_its_segments(listener: socket.socket) -> None:
    """
    A connection whose handshake ends after its peer's address came to be
    ignored inherits the listener's filter, and still carries data both
    ways: only pure SYNs are dropped.  (TCP_DEFER_ACCEPT holds the handshake
    open until the first data, after the filter is on.)
    """
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
    client = _client()
    with client:
        client.connect(listener.getsockname())
        assert ignore_syns_from(listener, [client.getsockname()])
        client.sendall(b"one")
        listener.settimeout(WAIT * 4)
        accepted, _ = listener.accept()
        with accepted:
            accepted.settimeout(WAIT)
            assert accepted.recv(10) == b"one"
            accepted.sendall(b"back")
            assert client.recv(10) == b"back"


def test_the_program_drops_only_pure_syns_from_the_addresses() -> None:
    """Three instructions test the flags, four per address, then accept and drop."""
    code = program([("10.0.0.1", 5), ("10.0.0.2", 6), ("10.0.0.1", 5)])
    assert len(code) == 3 + 4 * 2 + 2
    assert code[2][2] == 8  # not a pure SYN: straight to the accept
    assert code[-2][3] == 0xFFFFFFFF
    assert code[-1][3] == 0


def test_the_program_refuses_what_it_cannot_hold() -> None:
    """More than MAX_IGNORED addresses, or a host that is not IPv4, is a ValueError."""
    with pytest.raises(ValueError, match="at most"):
        program([("10.0.0.1", port) for port in range(1, MAX_IGNORED + 2)])
    with pytest.raises(ValueError, match="IPv4"):
        program([("::1", 5)])


def test_an_ipv6_socket_is_left_alone() -> None:
    """IPv6 listening sockets get no filter (False), and nothing fails."""
    try:
        sock = socket.socket(socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 here")
    with sock:
        assert ignore_syns_from(sock, [("::1", 5)]) is False
