"""
Peers behind NATs of the simulated network, each with a punching port whose
server-reflexive address it learned from a STUN server on the simulated
internet: shared by the birthday-probing and upgrade tests; a blackout of a
peer's direct QUIC datagrams; a stand-in for the rendezvous' UDP relay, with
its forwarding rule (latch on a STUN Binding request, then forward
everything else to the other latched socket); and an application that
writes and keeps what arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.identity import Identity
from nattraverse.punch.birthday import BirthdayConfig, BirthdayPlan, BirthdayRole
from nattraverse.punch.candidates import Candidate, gather
from nattraverse.punch.port import PunchingPort
from nattraverse.punch.relayleg import RelayLeg
from nattraverse.quic import QuicPath, is_quic
from nattraverse.secure import PathSecrets
from nattraverse.stun.attributes import XorMappedAddress
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import decode, encode, is_stun
from nattraverse.stun.server import StunServer
from nattraverse.testing import Network, SimulatedHost

#: The simulated STUN server.
STUN = Endpoint("192.0.2.1", 3478)
#: The stand-in UDP relay, on the STUN server's host.
RELAY = Endpoint("192.0.2.1", 40000)


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
    connectivity checks get through.  With *checks*, the STUN datagrams
    too (the checks, and the answers to probes): a path still checking.

    :ivar dropped: The time and source of each datagram dropped.
    """

    def __init__(
        self,
        network: Network,
        peer: NatPeer,
        spared: Endpoint,
        until: float,
        passed: int = 0,
        *,
        checks: bool = False,
    ) -> None:
        self._network = network
        self._checks = checks
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
        dropping = is_quic(data) or (self._checks and is_stun(data))
        if dropping and source != self._spared and now < self.until:
            if self._passed <= 0:
                self.dropped.append((now, source))
                return True
            self._passed -= 1
        return self._route(data, source)


class FakeRelay(DatagramProtocol):
    """Latches the first two sources of a Binding request; forwards the rest between them."""

    def __init__(self) -> None:
        self.latched: list[tuple[str, int]] = []
        self.forwarded = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        source = (addr[0], addr[1])
        if is_stun(data):
            request = decode(data)
            if request.method == Method.BINDING and request.message_class is MessageClass.REQUEST:
                if source not in self.latched:
                    self.latched.append(source)
                answer = encode(
                    Method.BINDING,
                    MessageClass.SUCCESS,
                    request.transaction_id,
                    [XorMappedAddress(Endpoint(*source))],
                )
                self.transport.write(answer, source)  # type: ignore[union-attr]
                return
        if source in self.latched and len(self.latched) == 2:
            other = self.latched[1 - self.latched.index(source)]
            self.forwarded += 1
            self.transport.write(data, other)  # type: ignore[union-attr]


def make_network(seed: str) -> tuple[Network, FakeRelay]:
    """A :func:`stun_network` with a :class:`FakeRelay` at :data:`RELAY`."""
    network = stun_network(seed)
    relay = FakeRelay()
    network.hosts["stun"].reactor.listenUDP(RELAY.port, relay, interface=RELAY.host)
    return network, relay


def opener(of: NatPeer, opened: list[str]) -> Any:
    """Latch *of*'s punching socket to the relay (what the rendezvous' client does)."""

    def open_leg() -> Deferred[Endpoint]:
        opened.append(of.host.name)
        latched: Deferred[Endpoint] = of.port.demux.client.binding(RELAY).addCallback(
            lambda _: RELAY
        )
        return latched

    return open_leg


def punch_with_relay(
    caller: NatPeer,
    callee: NatPeer,
    *,
    session: bytes,
    secret: bytes,
    delay: float,
    timeout: float,
    opened: list[str],
    caller_opener: Any = None,
) -> tuple[Deferred[QuicPath], Deferred[QuicPath]]:
    """
    One introduction punched by both sides (birthday probing where the NATs
    call for it), the caller with a relayed leg through :data:`RELAY` after
    *delay*: its opener (by default :func:`opener`) answers the caller and
    offers the relay to the callee, as the rendezvous does; each latch is
    recorded in *opened*.  Returns the caller's and the callee's results.
    """
    answered = callee.port.answer(
        PathSecrets(session, secret, caller.identity.peer_id, "udp"),
        local=callee.candidates,
        remote=caller.candidates,
        timeout=timeout,
        birthday=birthday_plan(callee, caller),
    )
    callee_opener = opener(callee, opened)
    to_relay = caller_opener or opener(caller, opened)

    def open_both() -> Deferred[Endpoint]:
        result: Deferred[Endpoint] = to_relay()
        callee.port.relay_offered(session, callee_opener)
        return result

    called = caller.port.call(
        PathSecrets(session, secret, callee.identity.peer_id, "udp"),
        local=caller.candidates,
        remote=callee.candidates,
        timeout=timeout,
        birthday=birthday_plan(caller, callee),
        relay=RelayLeg(delay, open_both),
    )
    return called, answered


def birthday_plan(of: NatPeer, other: NatPeer) -> BirthdayPlan | None:
    """*of*'s plan: behind a random symmetric NAT facing a port-restricted one, or the reverse."""
    if {of.nat, other.nat} != {"symmetric", "port-restricted"}:
        return None
    role = BirthdayRole.HARD if of.nat == "symmetric" else BirthdayRole.EASY
    return BirthdayPlan(role, other.candidates[-1].address)


class Exchange(Protocol):
    """Writes *total* bytes in chunks, one every 50 ms; keeps what arrives."""

    def __init__(self, clock: Any, total: int, seed: int, chunk: int = 16 * 1024) -> None:
        self.clock = clock
        self.left = total
        self.seed = seed
        self.chunk = chunk
        self.gap = 0.05
        self.made = 0
        self.sent = bytearray()
        #: When each chunk was written.
        self.written_at: list[float] = []
        self.data = bytearray()
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made += 1
        self._next()

    def _next(self) -> None:
        if self.left <= 0 or self.lost is not None:
            return
        size = min(self.chunk, self.left)
        data = bytes((self.seed + len(self.sent) + i) % 251 for i in range(size))
        self.sent += data
        self.left -= size
        self.written_at.append(self.clock.seconds())
        self.transport.write(data)  # type: ignore[union-attr]
        self.clock.callLater(self.gap, self._next)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost = reason
