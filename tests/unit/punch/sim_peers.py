"""
Peers behind NATs of the simulated network, each with a punching port whose
server-reflexive address it learned from a STUN server on the simulated
internet: shared by the birthday-probing and upgrade tests; and a blackout of a
peer's direct QUIC datagrams.
"""

from __future__ import annotations

from dataclasses import dataclass

from nattraverse._types import Endpoint
from nattraverse.identity import Identity
from nattraverse.punch.birthday import BirthdayConfig
from nattraverse.punch.candidates import Candidate, gather
from nattraverse.punch.port import PunchingPort
from nattraverse.quic import is_quic
from nattraverse.stun.server import StunServer
from nattraverse.testing import Network, SimulatedHost

#: The simulated STUN server.
STUN = Endpoint("192.0.2.1", 3478)


@dataclass
class NatPeer:
    host: SimulatedHost
    identity: Identity
    port: PunchingPort
    candidates: list[Candidate]
    nat: str


def stun_network(seed: str) -> Network:
    """A simulated network with a STUN server at :data:`STUN`."""
    network = Network(seed=seed)
    stun = network.host("stun", address=STUN.host)
    server = StunServer(
        stun.reactor, interface=STUN.host, port=STUN.port, tcp=False, fast_path=False
    )
    server.startService()
    return network


def nat_peer(
    network: Network, name: str, preset: str, birthday: BirthdayConfig | None = None
) -> NatPeer:
    """A host behind a NAT of *preset*, its punching port started and bound by STUN."""
    host = network.host(name, network.nat(f"nat-{name}", preset=preset).lan)
    identity = Identity.generate(now=network.clock.seconds())
    port = PunchingPort(
        host.reactor,
        identity,
        random_bytes=network.random("punch", name).randbytes,
        birthday=birthday,
    )
    bound = port.start()
    response = network.run_until(port.demux.client.binding(STUN))
    assert response.mapped_address is not None
    candidates = gather(bound.port, [host.address], response.mapped_address)
    return NatPeer(host, identity, port, candidates, preset)


def close_peers(network: Network, *peers: NatPeer) -> None:
    """Close the ports; nothing is left on any host."""
    for p in peers:
        p.port.close()
    network.run(5)
    for p in peers:
        assert p.port.sessions == 0
        assert p.port.paths == 0
        assert p.host.ports == ()
        assert p.host.reactor.getDelayedCalls() == []


class QuicBlackout:
    """
    Drops the QUIC datagrams that *peer*'s punching socket receives from
    anywhere but *spared* until the clock reaches *until*, but the first
    *passed*: a direct path that loses QUIC for a while although the
    connectivity checks get through.

    :ivar dropped: The time and source of each datagram dropped.
    """

    def __init__(
        self, network: Network, peer: NatPeer, spared: Endpoint, until: float, passed: int = 0
    ) -> None:
        self._network = network
        self._spared = spared
        self.until = until
        self._passed = passed
        self.dropped: list[tuple[float, Endpoint]] = []
        route = peer.port.demux.intercept
        assert route is not None, "the punching port is not started"
        self._route = route
        peer.port.demux.intercept = self._intercept

    def _intercept(self, data: bytes, source: Endpoint) -> bool:
        now = self._network.clock.seconds()
        if is_quic(data) and source != self._spared and now < self.until:
            if self._passed <= 0:
                self.dropped.append((now, source))
                return True
            self._passed -= 1
        return self._route(data, source)
