"""
An in-process network for testing peer-to-peer code across NATs, without
root, sockets or waiting.

:class:`Network` holds realms (the internet, and the inside of each NAT),
hosts and NATs, all driven by one :class:`~twisted.internet.task.Clock`.
Each NAT maps and filters as RFC 4787 describes (mapping: section 4.1;
port assignment: 4.2; lifetime and refresh: 4.3; filtering: 5;
hairpinning: 6).  Each host's :attr:`~SimulatedHost.reactor` provides
``IReactorUDP`` and ``IReactorTime``, so Twisted code runs on it unchanged::

    network = Network(seed=1)
    nat = network.nat("home", preset="port-restricted")
    laptop = network.host("laptop", nat.lan)
    server = network.host("server")
    server.reactor.listenUDP(7, Echo())
    port = laptop.reactor.listenUDP(0, client)
    port.write(b"hello", (server.address, 7))
    network.pump()

Links may delay, jitter, drop, duplicate and reorder packets
(:class:`Link`); every random choice comes from generators seeded by the
network's *seed*, so every run is the same.
"""

from nattraverse._types import Filtering, Mapping
from nattraverse.testing._behaviour import PRESETS, Allocation, NatBehaviour
from nattraverse.testing._host import SimulatedHost, SimulatedReactor, SimulatedUDPPort
from nattraverse.testing._link import Link
from nattraverse.testing._nat import SimulatedNAT
from nattraverse.testing._network import Network, NetworkStats, TraceEntry
from nattraverse.testing._realm import Realm
from nattraverse.testing._table import NatMapping, NatStats

__all__ = [
    "PRESETS",
    "Allocation",
    "Filtering",
    "Link",
    "Mapping",
    "NatBehaviour",
    "NatMapping",
    "NatStats",
    "Network",
    "NetworkStats",
    "Realm",
    "SimulatedHost",
    "SimulatedNAT",
    "SimulatedReactor",
    "SimulatedUDPPort",
    "TraceEntry",
]
