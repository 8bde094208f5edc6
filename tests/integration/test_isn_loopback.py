"""
:mod:`~nattraverse.punch.isn` on real loopback sockets: a pinned ISN is the
sequence number the peer's kernel receives (read back from the accepted
socket's receive queue, itself through ``TCP_REPAIR``), through
:func:`~nattraverse.punch.isn.pin_isn` and through
``SharedTcpPort.connect(isn=...)``; without ``CAP_NET_ADMIN`` (a child
process that gave up root) pinning is refused with an error that names it.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.protocol import Factory, Protocol

from nattraverse.punch.isn import can_pin_isn, pin_isn
from nattraverse.punch.tcpport import SharedTcpPort
from tests.integration.tcp_socket_support import LOCALHOST, within

#: The ISNs tried: the top bit set, and one that wraps soon after the SYN.
ISNS = (0xDEADBEEF, 0xFFFFFFFF)

#: Pinning needs CAP_NET_ADMIN, as the lab needs root: under CI these must run.
privileged = [
    pytest.mark.lab,
    pytest.mark.skipif(not can_pin_isn(), reason="choosing an ISN needs CAP_NET_ADMIN (root)"),
]


def _received_isn(sock: socket.socket) -> int:
    """The peer's ISN, from an accepted socket that has received nothing yet."""
    sock.setsockopt(socket.IPPROTO_TCP, 19, 1)  # TCP_REPAIR on
    try:
        sock.setsockopt(socket.IPPROTO_TCP, 20, 1)  # TCP_REPAIR_QUEUE: the receive queue
        raw = sock.getsockopt(socket.IPPROTO_TCP, 21, 4)  # TCP_QUEUE_SEQ: rcv_nxt
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, 19, -1)  # off, no window probe
    next_expected: int = struct.unpack("=I", raw)[0]
    return (next_expected - 1) % 2**32  # the SYN takes one number


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A blocking loopback listening socket."""
    sock = socket.socket()
    sock.bind((LOCALHOST, 0))
    sock.listen(4)
    sock.settimeout(5)
    yield sock
    sock.close()


@pytest.mark.parametrize("isn", [pytest.param(i, id=hex(i), marks=privileged) for i in ISNS])
def test_pinned_isn_is_the_one_received(listener: socket.socket, isn: int) -> None:
    """The peer's kernel receives the SYN with exactly the pinned sequence number."""
    client = socket.socket()
    try:
        pin_isn(client, isn)
        client.settimeout(5)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        with accepted:
            assert _received_isn(accepted) == isn
            client.sendall(b"after")  # the connection works on from there
            assert accepted.recv(5) == b"after"
    finally:
        client.close()


@privileged[0]
@privileged[1]
@pytest_twisted.ensureDeferred
async def test_shared_port_connects_with_the_pinned_isn(
    reactor: Any, listener: socket.socket
) -> None:
    """SharedTcpPort.connect(isn=...) sends its SYN with that number, from the shared port."""
    shared = SharedTcpPort(reactor, LOCALHOST)
    try:
        shared.listen(Factory.forProtocol(Protocol))
        protocol = await within(
            reactor,
            shared.connect(
                listener.getsockname(), Factory.forProtocol(Protocol), timeout=5, isn=0x12345678
            ),
        )
        accepted, peer = listener.accept()
        with accepted:
            assert peer[1] == shared.port
            assert _received_isn(accepted) == 0x12345678
        assert isinstance(protocol, Protocol)
        assert protocol.transport is not None
        protocol.transport.loseConnection()
    finally:
        await shared.close()


def test_isn_must_be_32_bits() -> None:
    """A number outside 0..2**32-1 is a ValueError, before any system call."""
    with socket.socket() as sock, pytest.raises(ValueError, match="32-bit"):
        pin_isn(sock, 2**32)
    with socket.socket() as sock, pytest.raises(ValueError, match="32-bit"):
        pin_isn(sock, -1)


_UNPRIVILEGED = """
import json, socket
from nattraverse.punch.isn import IsnPinningUnavailable, can_pin_isn, pin_isn
try:
    pin_isn(socket.socket(), 1)
    error = None
except IsnPinningUnavailable as e:
    error = str(e)
print(json.dumps({"can": can_pin_isn(), "error": error}))
"""


def test_without_cap_net_admin_pinning_is_refused_by_name(
    require_program: Callable[[str], str],
) -> None:
    """A process without CAP_NET_ADMIN: can_pin_isn() is False, pin_isn names the capability."""
    command = [sys.executable, "-c", _UNPRIVILEGED]
    if can_pin_isn():
        # A new user namespace keeps the files but no capability over this
        # network namespace, which the initial user namespace owns.
        command = [require_program("unshare"), "--user", *command]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        cwd=Path(__file__).parents[2],
    )
    outcome = json.loads(result.stdout)
    assert outcome["can"] is False
    assert "CAP_NET_ADMIN" in outcome["error"]
