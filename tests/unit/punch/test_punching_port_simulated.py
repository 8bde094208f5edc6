"""
Connectivity checks on the simulated network: two agents behind every pair
of NAT presets, each knowing the other's server-reflexive address as a
simulated STUN server observed it through the simulated NAT.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.punch import (
    Candidate,
    CandidateKind,
    CandidatePair,
    CheckConfig,
    PunchChecksFailed,
    punch,
)
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.server import StunServer
from nattraverse.testing import Link, Network, SimulatedHost, SimulatedUDPPort

PRESET_NAMES = [
    "full-cone",
    "restricted-cone",
    "port-restricted",
    "symmetric",
    "symmetric-sequential",
]
SYMMETRIC = {"symmetric", "symmetric-sequential"}
SECRET = b"s" * 32
STUN = Endpoint("192.0.2.1", 3478)


def punchable(a: str, b: str) -> bool:
    """Whether plain hole punching can serve NATs *a* and *b*."""
    if a in SYMMETRIC and b in SYMMETRIC:
        return False
    return not ({a, b} & SYMMETRIC and "port-restricted" in {a, b})


@dataclass
class Peer:
    host: SimulatedHost
    demux: StunDemultiplexer
    port: SimulatedUDPPort
    candidates: list[Candidate]


def make_network(seed: str) -> Network:
    network = Network(seed=seed)
    stun = network.host("stun", address=STUN.host)
    server = StunServer(
        stun.reactor, interface=STUN.host, port=STUN.port, tcp=False, fast_path=False
    )
    server.startService()
    return network


def peer(network: Network, host: SimulatedHost) -> Peer:
    """Listen on a port of *host* and learn its server-reflexive address by STUN."""
    demux = StunDemultiplexer(
        host.reactor, random_bytes=network.random("stun", host.name).randbytes
    )
    port = host.reactor.listenUDP(0, demux)
    response = network.run_until(demux.client.binding(STUN))
    assert response.mapped_address is not None
    local = Endpoint(host.address, port.getHost().port)
    return Peer(
        host,
        demux,
        port,
        [Candidate.host(local), Candidate.server_reflexive(response.mapped_address)],
    )


def run_pair(
    network: Network, caller: Peer, callee: Peer, config: CheckConfig | None = None
) -> list[tuple[bool, Any]]:
    ds: list[Deferred[CandidatePair]] = []
    for me, other, controlling in ((caller, callee, True), (callee, caller, False)):
        ds.append(
            punch(
                me.host.reactor,
                me.demux,
                controlling=controlling,
                secret=SECRET,
                local=me.candidates,
                remote=other.candidates,
                config=config,
                random_bytes=network.random("ice", me.host.name).randbytes,
            )
        )
    results = network.run_until(DeferredList(ds, consumeErrors=True), timeout=30.0)
    for p in (caller, callee):
        assert p.demux.intercept is None
        assert p.host.reactor.getDelayedCalls() == []
    return results


@pytest.mark.parametrize(
    ("caller_nat", "callee_nat"), list(itertools.product(PRESET_NAMES, PRESET_NAMES))
)
def test_nat_matrix(caller_nat: str, callee_nat: str) -> None:
    """Punchable NAT pairs nominate the same path on both sides; the others fail."""
    network = make_network(f"{caller_nat}/{callee_nat}")
    caller = peer(network, network.host("caller", network.nat("a", preset=caller_nat).lan))
    callee = peer(network, network.host("callee", network.nat("b", preset=callee_nat).lan))
    start = network.clock.seconds()
    (ok1, r1), (ok2, r2) = run_pair(network, caller, callee)
    if punchable(caller_nat, callee_nat):
        assert ok1, r1
        assert ok2, r2
        assert r1.remote.address.host == network.nats["b"].address
        assert r2.remote.address.host == network.nats["a"].address
    else:
        assert not ok1
        assert not ok2
        for result in (r1, r2):
            result.trap(PunchChecksFailed)
            assert result.value.reason in ("budget", "deadline")
            assert "no authenticated check from the peer" in str(result.value)
        assert network.clock.seconds() - start <= CheckConfig().deadline + 0.01


def test_same_nat_private_pair_wins() -> None:
    """Two peers behind one NAT nominate their private addresses."""
    network = make_network("same")
    nat = network.nat("home", preset="port-restricted")
    caller = peer(network, network.host("caller", nat.lan))
    callee = peer(network, network.host("callee", nat.lan))
    (ok1, r1), (ok2, r2) = run_pair(network, caller, callee)
    assert ok1
    assert ok2
    assert r1.remote.kind is CandidateKind.HOST
    assert r1.remote.address == callee.candidates[0].address
    assert r2.remote.address == caller.candidates[0].address


class Impostor(DatagramProtocol):
    """Answers every datagram with a STUN-looking success response, without the key."""

    answered = 0

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        from nattraverse.stun.attributes import XorMappedAddress
        from nattraverse.stun.constants import MessageClass, Method
        from nattraverse.stun.message import encode

        self.answered += 1
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
    """An unrelated host at the peer's private address answers, and is ignored."""
    network = make_network("wrong")
    slow = Link(delay=0.1)
    nat_a = network.nat("a", preset="full-cone", lan="192.168.1.0/24", uplink=slow)
    nat_b = network.nat("b", preset="full-cone", lan="192.168.1.0/24", uplink=slow)
    caller = peer(network, network.host("caller", nat_a.lan))
    callee = peer(network, network.host("callee", nat_b.lan, address="192.168.1.77"))
    impostor = network.host("impostor", nat_a.lan, address="192.168.1.77")
    answering = Impostor()
    impostor.reactor.listenUDP(callee.candidates[0].address.port, answering)
    (ok1, r1), (ok2, _r2) = run_pair(network, caller, callee)
    assert ok1
    assert ok2
    assert r1.remote.address.host == nat_b.address
    assert answering.answered >= 1


def test_cancel_leaves_nothing_behind() -> None:
    """Cancelling the punch clears the hook and cancels the timer."""
    network = make_network("cancel")
    caller = peer(network, network.host("caller", network.nat("a", preset="symmetric").lan))
    callee_candidates = [
        Candidate.server_reflexive(("203.0.113.99", 4000)),
        Candidate.host(("10.9.9.9", 4000)),
    ]
    d = punch(
        caller.host.reactor,
        caller.demux,
        controlling=True,
        secret=SECRET,
        local=caller.candidates,
        remote=callee_candidates,
    )
    network.run(0.3)
    d.cancel()
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures
    assert failures[0].check(CancelledError)
    assert caller.demux.intercept is None
    assert caller.host.reactor.getDelayedCalls() == []
