"""
Probing a NAT from inside the lab, RFC 4787/5780 style, with plain UDP
sockets that live in the lab's namespaces (see
:meth:`tests.natlab.lab.Node.udp_socket`): the probing code runs in the
test process, synchronously, so nothing waits for an interpreter to start
in a namespace and nothing needs parsing.

A :class:`Reflector` is four UDP sockets of a public host with two
addresses (address 0 or 1, port 0 or 1), as an RFC 5780 server has them.
:func:`classify` sends from one inside socket to all four and compares the
sources they see (mapping), then opens a fresh mapping towards socket
(0, 0) and has all four answer it (filtering).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Mapping as MappingType
from dataclasses import dataclass
from typing import TypeVar

from tests.natlab.errors import LabError
from tests.natlab.lab import Node, PublicHost
from tests.natlab.presets import Filtering, Mapping

__all__ = [
    "NEGATIVE_WAIT",
    "Observation",
    "Reflector",
    "arrivals",
    "classify",
    "expect_nothing",
    "receive_token",
    "round_trips",
    "seen_from",
    "token",
]

K = TypeVar("K")
Address = tuple[str, int]

#: Seconds to wait before concluding that a packet is not coming (in a lab
#: without delay a packet crosses in well under a millisecond).
NEGATIVE_WAIT = 0.3


def token() -> bytes:
    """A random payload that identifies one probe datagram."""
    return os.urandom(8).hex().encode()


def _address(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return (str(host), int(port))


def receive_token(sock: socket.socket, expected: bytes, timeout: float) -> Address | None:
    """
    Read from *sock* until the datagram *expected* arrives (others are
    ignored) or *timeout* seconds pass.

    :returns: The source of *expected*, or ``None``.
    """
    found = arrivals(sock, {expected: expected}, timeout)
    return found.get(expected)


def arrivals(
    sock: socket.socket, expected: MappingType[bytes, K], timeout: float
) -> dict[K, Address]:
    """
    Read from *sock* for up to *timeout* seconds, or until every datagram
    in *expected* (payload to label) has arrived.

    :returns: The labels of the datagrams that arrived, with their sources.
    """
    found: dict[K, Address] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(expected):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data, source = sock.recvfrom(2048)
        except TimeoutError:
            break
        except ConnectionRefusedError:
            continue
        if data in expected:
            found[expected[data]] = (str(source[0]), int(source[1]))
    return found


def expect_nothing(sock: socket.socket, wait: float = NEGATIVE_WAIT) -> list[bytes]:
    """Everything that arrives on *sock* within *wait* seconds (hoped empty)."""
    got = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recvfrom(2048)[0])
        except (TimeoutError, ConnectionRefusedError):
            break
    return got


def seen_from(
    client: socket.socket,
    server: socket.socket,
    *,
    timeout: float = 1.0,
    attempts: int = 3,
    target: Address | None = None,
) -> Address | None:
    """
    Send a probe from *client* to *server* (at *target*, by default its
    bound address) and return the source *server* saw: the client's
    mapping.  ``None`` when nothing arrives after *attempts* tries.
    """
    target = target or _address(server)
    for _ in range(attempts):
        payload = token()
        client.sendto(payload, target)
        source = receive_token(server, payload, timeout)
        if source is not None:
            return source
    return None


def round_trips(
    client: socket.socket, server: socket.socket, count: int = 5, timeout: float = 5.0
) -> list[float]:
    """
    *count* round trips client -> server -> client, in seconds, each
    measured from the client's send to its receive of the echo.

    :raises LabError: when a probe or its echo is lost.
    """
    times = []
    target = _address(server)
    for _ in range(count):
        payload = token()
        started = time.monotonic()
        client.sendto(payload, target)
        source = receive_token(server, payload, timeout)
        if source is None:
            raise LabError(f"round trip to {target}: the probe did not arrive")
        server.sendto(payload, source)
        if receive_token(client, payload, timeout) is None:
            raise LabError(f"round trip to {target}: the echo did not come back")
        times.append(time.monotonic() - started)
    return times


class Reflector:
    """
    Four UDP sockets of *server*: its first two addresses, each with the
    same two ports.  ``reflector[i, j]`` is the socket of address *i* and
    port *j*.
    """

    def __init__(self, server: PublicHost) -> None:
        if len(server.addresses) < 2:
            raise LabError(f"a reflector needs a public host with two addresses, not {server!r}")
        self.server = server
        first = server.udp_socket(0, server.addresses[0])
        second = server.udp_socket(0, server.addresses[0])
        ports = (_address(first)[1], _address(second)[1])
        self.sockets = {
            (0, 0): first,
            (0, 1): second,
            (1, 0): server.udp_socket(ports[0], server.addresses[1]),
            (1, 1): server.udp_socket(ports[1], server.addresses[1]),
        }

    def __getitem__(self, key: tuple[int, int]) -> socket.socket:
        return self.sockets[key]

    def address(self, key: tuple[int, int] = (0, 0)) -> Address:
        """The address and port of one socket."""
        return _address(self.sockets[key])


@dataclass(frozen=True)
class Observation:
    """
    What :func:`classify` saw of the NAT (or NATs) between a host and the
    internet.

    :ivar mapping: The mapping behaviour, ``None`` when no UDP got through.
    :ivar filtering: The filtering behaviour, ``None`` when no UDP got through.
    :ivar local: The inside socket of the mapping probes.
    :ivar mapped: The endpoints the reflector's sockets (0,0), (0,1), (1,0),
        (1,1) saw for it, in the order they were created.
    """

    mapping: Mapping | None
    filtering: Filtering | None
    local: Address
    mapped: tuple[Address, ...]

    @property
    def ports(self) -> tuple[int, ...]:
        """The external ports, in the order the mappings were made."""
        return tuple(port for _, port in self.mapped)

    @property
    def sequential(self) -> bool:
        """Whether each new mapping took the port after the previous one."""
        ports = self.ports
        return len(set(ports)) > 1 and all(b - a == 1 for a, b in itertools.pairwise(ports))

    @property
    def port_preserved(self) -> bool:
        """Whether the first mapping kept the inside port."""
        return bool(self.mapped) and self.mapped[0][1] == self.local[1]


_ORDER = ((0, 0), (0, 1), (1, 0), (1, 1))


def classify(host: Node, reflector: Reflector, *, wait: float | None = None) -> Observation:
    """
    Classify the NAT behaviour between *host* and the internet: mapping
    (RFC 4787 section 4.1) from the endpoints four reflector sockets see
    for one inside socket; filtering (section 5) from which of the four
    reach a fresh mapping that has only sent to socket (0, 0); and, when
    nothing is translated, whether a port that never sent anything is
    reachable (no filtering).  *wait* bounds each wait for packets that
    may never come: by default :data:`NEGATIVE_WAIT` plus the round trip
    the links' delays make.
    """
    if wait is None:
        one_way = host.delay_to_internet_ms + reflector.server.delay_to_internet_ms
        wait = NEGATIVE_WAIT + 2 * one_way / 1000
    client = host.udp_socket()
    local = (host.address, _address(client)[1])
    mapped: list[Address] = []
    for key in _ORDER:
        seen = seen_from(client, reflector[key], timeout=wait, attempts=1 if mapped else 2)
        if seen is None:
            if not mapped:
                return Observation(None, None, local, ())
            raise LabError(f"{host!r}: the probe to reflector socket {key} did not arrive")
        mapped.append(seen)
    return Observation(
        _mapping(local, mapped), _filtering(host, reflector, wait), local, tuple(mapped)
    )


def _mapping(local: Address, mapped: list[Address]) -> Mapping:
    if mapped[0] == local:
        return Mapping.NONE
    if len(set(mapped)) == 1:
        return Mapping.ENDPOINT_INDEPENDENT
    if mapped[0] == mapped[1] and mapped[0] != mapped[2]:
        return Mapping.ADDRESS_DEPENDENT
    return Mapping.ADDRESS_AND_PORT_DEPENDENT


def _filtering(host: Node, reflector: Reflector, wait: float) -> Filtering:
    client = host.udp_socket()
    seen = seen_from(client, reflector[0, 0], timeout=max(wait, 1.0))
    if seen is None:
        raise LabError(f"{host!r}: the filtering probe did not reach the reflector")
    tokens = {token(): key for key in _ORDER}
    for payload, key in tokens.items():
        reflector[key].sendto(payload, seen)
    came = set(arrivals(client, tokens, wait))
    if (0, 0) not in came:
        raise LabError(f"{host!r}: the reply to the filtering probe did not come back")
    if (1, 0) in came and (1, 1) in came:
        if seen == (host.address, _address(client)[1]) and _unsolicited_arrives(
            host, reflector, wait
        ):
            return Filtering.NONE
        return Filtering.ENDPOINT_INDEPENDENT
    if (0, 1) in came:
        return Filtering.ADDRESS_DEPENDENT
    return Filtering.ADDRESS_AND_PORT_DEPENDENT


def _unsolicited_arrives(host: Node, reflector: Reflector, wait: float) -> bool:
    """Whether a datagram reaches a port of *host* that never sent anything."""
    quiet = host.udp_socket()
    payload = token()
    reflector[0, 0].sendto(payload, (host.address, _address(quiet)[1]))
    return receive_token(quiet, payload, wait) is not None
