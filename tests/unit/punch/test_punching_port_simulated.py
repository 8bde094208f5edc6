"""
The punching port on the simulated network: two peers behind every pair of
NAT presets run their checks and QUIC handshake, each knowing the other's
candidates as an introduction gives them (host addresses, and the
server-reflexive address a simulated STUN server observed).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import PunchChecksFailed
from nattraverse.identity import Identity
from nattraverse.punch.candidates import Candidate, CandidateKind, gather
from nattraverse.punch.checks import CheckConfig
from nattraverse.punch.port import PunchingPort
from nattraverse.quic import QuicPath
from nattraverse.secure import PathSecrets
from nattraverse.stun.server import StunServer
from nattraverse.testing import Link, Network, SimulatedHost
from tests.deferreds import failure_of

PRESET_NAMES = [
    "full-cone",
    "restricted-cone",
    "port-restricted",
    "symmetric",
    "symmetric-sequential",
]
SYMMETRIC = {"symmetric", "symmetric-sequential"}
SECRET = b"s" * 32
SESSION = b"i" * 16
STUN = Endpoint("192.0.2.1", 3478)


def punchable(a: str, b: str) -> bool:
    """Whether plain hole punching can serve NATs *a* and *b*."""
    if a in SYMMETRIC and b in SYMMETRIC:
        return False
    return not ({a, b} & SYMMETRIC and "port-restricted" in {a, b})


@dataclass
class Peer:
    host: SimulatedHost
    identity: Identity
    port: PunchingPort
    candidates: list[Candidate]


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


class OneFactory(Factory):
    """Builds one given protocol."""

    def __init__(self, protocol: Collect) -> None:
        self.protocol_built = protocol

    def buildProtocol(self, addr: object) -> Collect:
        return self.protocol_built


def attach(path: QuicPath) -> Collect:
    """Attach a collecting application to the callee's *path*."""
    app = Collect()
    path.attach(OneFactory(app))
    return app


def make_network(seed: str) -> Network:
    network = Network(seed=seed)
    stun = network.host("stun", address=STUN.host)
    server = StunServer(
        stun.reactor, interface=STUN.host, port=STUN.port, tcp=False, fast_path=False
    )
    server.startService()
    return network


def peer(network: Network, host: SimulatedHost, config: CheckConfig | None = None) -> Peer:
    """A punching port on *host*, its server-reflexive address learned by STUN."""
    identity = Identity.generate(now=network.clock.seconds())
    port = PunchingPort(
        host.reactor,
        identity,
        config=config,
        random_bytes=network.random("punch", host.name).randbytes,
    )
    bound = port.start()
    response = network.run_until(port.demux.client.binding(STUN))
    assert response.mapped_address is not None
    return Peer(host, identity, port, gather(bound.port, [host.address], response.mapped_address))


def secrets(of: Peer) -> PathSecrets:
    """The secrets a peer's side of the session holds: the other's id is *of*'s."""
    return PathSecrets(session=SESSION, secret=SECRET, expected=of.identity.peer_id, method="udp")


def punch(
    network: Network, caller: Peer, callee: Peer, timeout: float = 30.0
) -> tuple[QuicPath | Failure, QuicPath | Failure]:
    """Run both sides; the caller selects its path as soon as it has one."""
    answered = callee.port.answer(
        secrets(caller), local=callee.candidates, remote=caller.candidates, timeout=timeout
    )
    called = caller.port.call(
        secrets(callee), local=caller.candidates, remote=callee.candidates, timeout=timeout
    )
    results: dict[str, Any] = {}

    def keep(result: object, side: str) -> None:
        results[side] = result

    called.addBoth(keep, "caller")
    answered.addBoth(keep, "callee")
    deadline = network.clock.seconds() + timeout + 1
    while "caller" not in results and network.clock.seconds() < deadline:
        network.run(0.05)
    caller_path = results.get("caller")
    if isinstance(caller_path, QuicPath):
        caller_path.select(Factory.forProtocol(Collect))
    while "callee" not in results and network.clock.seconds() < deadline:
        network.run(0.05)
    return results["caller"], results["callee"]


def close(network: Network, *peers: Peer) -> None:
    """Close the ports and check that nothing is left on any host."""
    for p in peers:
        p.port.close()
    network.run(5)
    for p in peers:
        assert p.port.sessions == 0
        assert p.port.paths == 0
        assert p.host.reactor.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("caller_nat", "callee_nat"), list(itertools.product(PRESET_NAMES, PRESET_NAMES))
)
def test_nat_matrix(caller_nat: str, callee_nat: str) -> None:
    """Punchable NAT pairs get a pinned QUIC path; the others fail within the budget."""
    network = make_network(f"{caller_nat}/{callee_nat}")
    caller = peer(network, network.host("caller", network.nat("a", preset=caller_nat).lan))
    callee = peer(network, network.host("callee", network.nat("b", preset=callee_nat).lan))
    start = network.clock.seconds()
    mine, theirs = punch(network, caller, callee)
    if punchable(caller_nat, callee_nat):
        assert isinstance(mine, QuicPath), mine
        assert isinstance(theirs, QuicPath), theirs
        assert mine.remote[0] == network.nats["b"].address
        assert theirs.remote[0] == network.nats["a"].address
        assert mine.peer_certificate is not None
    else:
        for result in (mine, theirs):
            assert isinstance(result, Failure)
            result.trap(PunchChecksFailed)
            assert "no authenticated check from the peer" in str(result.value)
        assert network.clock.seconds() - start <= CheckConfig().deadline + 0.1
    close(network, caller, callee)


def test_data_flows_both_ways() -> None:
    """The application's bytes cross the punched path both ways."""
    network = make_network("data")
    caller = peer(network, network.host("caller", network.nat("a", preset="port-restricted").lan))
    callee = peer(network, network.host("callee", network.nat("b", preset="full-cone").lan))
    mine, theirs = punch(network, caller, callee)
    assert isinstance(mine, QuicPath)
    assert isinstance(theirs, QuicPath)
    app = attach(theirs)
    # QUIC starts from the round trip the checks measured, not a guess.
    assert mine._configuration.initial_rtt == 0.001
    assert mine._transport is not None
    mine._transport.write(b"hello " * 1000)
    network.run(1)
    assert app.data == b"hello " * 1000
    close(network, caller, callee)


def test_same_nat_private_pair_wins() -> None:
    """Two peers behind one NAT (no hairpin) use their private addresses."""
    network = make_network("same")
    nat = network.nat("home", preset="port-restricted")
    caller = peer(network, network.host("caller", nat.lan))
    callee = peer(network, network.host("callee", nat.lan))
    mine, theirs = punch(network, caller, callee)
    assert isinstance(mine, QuicPath), mine
    assert isinstance(theirs, QuicPath), theirs
    assert Endpoint(*mine.remote) == callee.candidates[0].address
    assert callee.candidates[0].kind is CandidateKind.HOST
    close(network, caller, callee)


class Impostor(DatagramProtocol):
    """Answers every datagram: STUN-looking answers without the key, and echoes of QUIC."""

    received = 0

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        from nattraverse.stun.attributes import XorMappedAddress
        from nattraverse.stun.constants import MessageClass, Method
        from nattraverse.stun.message import encode

        self.received += 1
        assert self.transport is not None
        self.transport.write(
            encode(
                Method.BINDING,
                MessageClass.SUCCESS,
                datagram[8:20],
                [XorMappedAddress(Endpoint(*addr))],
                integrity_key=b"not the key",
                fingerprint=True,
            ),
            addr,
        )


def test_wrong_host_at_private_address_is_ignored() -> None:
    """An unrelated host at the peer's private address answers, and is never used."""
    network = make_network("wrong")
    slow = Link(delay=0.1)
    nat_a = network.nat("a", preset="full-cone", lan="192.168.1.0/24", uplink=slow)
    nat_b = network.nat("b", preset="full-cone", lan="192.168.1.0/24", uplink=slow)
    caller = peer(network, network.host("caller", nat_a.lan))
    callee = peer(network, network.host("callee", nat_b.lan, address="192.168.1.77"))
    impostor = network.host("impostor", nat_a.lan, address="192.168.1.77")
    answering = Impostor()
    impostor.reactor.listenUDP(callee.candidates[0].address.port, answering)
    mine, theirs = punch(network, caller, callee)
    assert isinstance(mine, QuicPath), mine
    assert isinstance(theirs, QuicPath), theirs
    assert mine.remote[0] == nat_b.address
    assert answering.received >= 1
    assert caller.port.stats.quic_unknown == 0
    close(network, caller, callee)


def test_quic_from_an_unchecked_address_is_dropped() -> None:
    """A QUIC packet from an address no check authenticated opens no path."""
    network = make_network("unchecked")
    callee = peer(network, network.host("callee", network.nat("b", preset="full-cone").lan))
    stranger = network.host("stranger")
    sock = stranger.reactor.listenUDP(0, DatagramProtocol())
    d = callee.port.answer(
        PathSecrets(SESSION, SECRET, Identity.generate().peer_id, "udp"),
        local=callee.candidates,
        remote=[Candidate.server_reflexive(("203.0.113.5", 4000))],
        timeout=5,
    )
    sock.write(
        b"\xc0" + b"\x00" * 1199, (network.nats["b"].address, callee.candidates[1].address.port)
    )
    network.run(0.5)
    assert callee.port.stats.quic_unknown == 1
    assert callee.port.paths == 0
    d.cancel()
    failure_of(d).trap(CancelledError)
    close(network, callee)


def test_cancel_leaves_nothing_behind() -> None:
    """Cancelling a punch stops its checks and timers; the port routes nothing to it."""
    network = make_network("cancel")
    caller = peer(network, network.host("caller", network.nat("a", preset="symmetric").lan))
    d: Deferred[QuicPath] = caller.port.call(
        PathSecrets(SESSION, SECRET, Identity.generate().peer_id, "udp"),
        local=caller.candidates,
        remote=[
            Candidate.server_reflexive(("203.0.113.99", 4000)),
            Candidate.host(("10.9.9.9", 4000)),
        ],
        timeout=30,
    )
    network.run(0.3)
    assert caller.port.sessions == 1
    d.cancel()
    failure_of(d).trap(CancelledError)
    assert caller.port.sessions == 0
    assert caller.host.reactor.getDelayedCalls() == []
    close(network, caller)


def test_close_when_idle_waits_for_the_path() -> None:
    """A port closing when idle keeps the QUIC path that carries a connection."""
    network = make_network("idle")
    caller = peer(network, network.host("caller", network.nat("a", preset="full-cone").lan))
    callee = peer(network, network.host("callee", network.nat("b", preset="full-cone").lan))
    mine, theirs = punch(network, caller, callee)
    assert isinstance(mine, QuicPath)
    assert isinstance(theirs, QuicPath)
    app = attach(theirs)
    caller.port.close_when_idle()
    network.run(1)
    assert caller.port.paths == 1
    assert mine._transport is not None
    assert mine._transport.connected
    mine._transport.loseConnection()
    network.run(5)
    assert mine.terminated
    assert app.lost is not None
    assert caller.port.paths == 0
    assert caller.host.reactor.getDelayedCalls() == []
    close(network, caller, callee)


def test_lossy_links_still_connect_and_deliver() -> None:
    """20% loss on both NATs' links: the punch and QUIC retransmit until 32 KiB arrive intact."""
    # This seed once made the QUIC timer fire again at the same instant
    # forever (aioquic's loss time rounded below its own threshold).
    network = make_network("l2-0")
    a = network.nat("a", preset="full-cone", uplink=Link(delay=0.01, loss=0.2))
    b = network.nat("b", preset="full-cone", uplink=Link(delay=0.01, loss=0.2))
    caller = peer(network, network.host("caller", a.lan))
    callee = peer(network, network.host("callee", b.lan))
    mine, theirs = punch(network, caller, callee)
    assert isinstance(mine, QuicPath), mine
    assert isinstance(theirs, QuicPath), theirs
    app = attach(theirs)
    payload = bytes(range(256)) * 128
    assert mine._transport is not None
    mine._transport.write(payload)
    for _ in range(120):
        if len(app.data) >= len(payload):
            break
        network.run(0.5)
    assert app.data == payload
    close(network, caller, callee)
