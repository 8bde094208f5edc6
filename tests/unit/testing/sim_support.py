"""
Protocols and small topologies shared by the tests of nattraverse.testing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import DatagramProtocol

from nattraverse._types import Endpoint
from nattraverse.testing import (
    Network,
    SimulatedHost,
    SimulatedNAT,
    SimulatedUDPPort,
)

#: The two addresses of the public test server, and its two ports.
A = "192.0.2.1"
B = "192.0.2.2"
P1 = 1000
P2 = 2000


class Recorder(DatagramProtocol):
    """Records what arrives, with the clock time, and refusals."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.times: list[float] = []
        self.refused = 0
        self.started = 0
        self.stopped = 0

    def startProtocol(self) -> None:
        self.started += 1

    def stopProtocol(self) -> None:
        self.stopped += 1

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))
        transport: Any = self.transport
        self.times.append(transport.host.reactor.seconds())

    def connectionRefused(self) -> None:
        self.refused += 1

    @property
    def payloads(self) -> list[bytes]:
        """The datagrams, in order of arrival."""
        return [data for data, _ in self.received]

    @property
    def sources(self) -> list[Endpoint]:
        """Where each datagram came from."""
        return [Endpoint(*addr) for _, addr in self.received]


class Echo(DatagramProtocol):
    """Sends every datagram back where it came from."""

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.transport.write(datagram, addr)  # type: ignore[union-attr]


def listen(
    host: SimulatedHost, port: int = 0, interface: str = ""
) -> tuple[SimulatedUDPPort, Recorder]:
    """A recording port on *host*."""
    recorder = Recorder()
    return host.reactor.listenUDP(port, recorder, interface=interface), recorder


@dataclass
class World:
    """
    One NAT with a host inside, and a public server with two addresses
    (``A``, ``B``) listening on two ports (``P1``, ``P2``) each.
    """

    network: Network
    nat: SimulatedNAT
    inside: SimulatedHost
    server: SimulatedHost
    port: SimulatedUDPPort
    recorder: Recorder
    server_ports: dict[Endpoint, tuple[SimulatedUDPPort, Recorder]]

    def send(self, to: tuple[str, int], data: bytes = b"out") -> None:
        """Send from the inside host's port."""
        self.port.write(data, to)
        self.network.pump()

    def seen_by(self, to: tuple[str, int], data: bytes = b"out") -> Endpoint:
        """Send from the inside port to a server port: the source it saw."""
        self.send(to, data)
        return self.server_ports[Endpoint(*to)][1].sources[-1]

    def probe(self, source: tuple[str, int], to: tuple[str, int], data: bytes = b"in") -> bool:
        """Send from a server port to *to*; whether the inside port got it."""
        before = len(self.recorder.received)
        self.server_ports[Endpoint(*source)][0].write(data, to)
        self.network.pump()
        return len(self.recorder.received) > before


def world(
    preset: str | None = None, *, seed: int = 0, local_port: int = 40000, **behaviour: Any
) -> World:
    """Build a :class:`World` with the NAT *preset* changed by *behaviour*."""
    network = Network(seed=seed)
    server = network.host("server", address=A, aliases=[B])
    server_ports = {}
    for address in (A, B):
        for number in (P1, P2):
            server_ports[Endpoint(address, number)] = listen(server, number, interface=address)
    nat = network.nat("nat", preset=preset, **behaviour)
    inside = network.host("inside", nat.lan)
    port, recorder = listen(inside, local_port)
    return World(network, nat, inside, server, port, recorder, server_ports)
