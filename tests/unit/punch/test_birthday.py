"""
Birthday-paradox probing: the plan each side derives from the two NAT
mappings, the pacing, the check machine's spray, and the punching port on
the simulated network (a random symmetric NAT against a port-restricted
one, in both roles).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import PunchChecksFailed
from nattraverse.identity import Identity
from nattraverse.punch.birthday import (
    BirthdayConfig,
    BirthdayPlan,
    BirthdayRole,
    Pacer,
    PortSpray,
    birthday_plan,
    random_ports,
    success_probability,
)
from nattraverse.punch.candidates import Candidate
from nattraverse.punch.checks import (
    CheckConfig,
    CheckMachine,
    IceCredentials,
    PairState,
    encode_check,
)
from nattraverse.punch.mapping import MappingKind, NatMapping
from nattraverse.quic import QuicPath
from nattraverse.secure import PathSecrets
from nattraverse.stun.attributes import XorMappedAddress
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import decode, encode
from nattraverse.testing import Network
from tests.deferreds import failure_of
from tests.unit.punch.sim_peers import NatPeer, close_peers, nat_peer, stun_network

SECRET = b"b" * 32
SESSION = b"j" * 16
HARD = Endpoint("203.0.113.7", 40000)
EASY = Endpoint("198.51.100.9", 5000)


def mapping(kind: MappingKind, last: Endpoint = HARD, step: int = 0) -> NatMapping:
    return NatMapping(kind, last, step)


# -- the plan, the pacing -----------------------------------------------------------


def test_random_against_independent_is_hard() -> None:
    """Behind the random NAT, facing an independent one: the hard side, checking its address."""
    plan = birthday_plan(mapping(MappingKind.RANDOM), mapping(MappingKind.INDEPENDENT, EASY))
    assert plan == BirthdayPlan(BirthdayRole.HARD, EASY)


def test_independent_against_random_is_easy() -> None:
    """Behind the independent NAT, facing a random one: the easy side, probing its host."""
    plan = birthday_plan(mapping(MappingKind.INDEPENDENT, EASY), mapping(MappingKind.RANDOM))
    assert plan == BirthdayPlan(BirthdayRole.EASY, HARD)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (MappingKind.RANDOM, MappingKind.RANDOM),
        (MappingKind.RANDOM, MappingKind.SEQUENTIAL),
        (MappingKind.SEQUENTIAL, MappingKind.RANDOM),
        (MappingKind.INDEPENDENT, MappingKind.INDEPENDENT),
        (MappingKind.INDEPENDENT, MappingKind.SEQUENTIAL),
        (MappingKind.UNKNOWN, MappingKind.RANDOM),
        (MappingKind.RANDOM, MappingKind.UNKNOWN),
    ],
)
def test_no_plan_for_other_pairs(ours: MappingKind, theirs: MappingKind) -> None:
    """Both per destination, or one unknown, or no random side: no birthday probing."""
    assert birthday_plan(mapping(ours), mapping(theirs)) is None


def test_both_sides_agree() -> None:
    """The two sides, each from its own view, take the two roles."""
    random, independent = mapping(MappingKind.RANDOM), mapping(MappingKind.INDEPENDENT, EASY)
    a, b = birthday_plan(random, independent), birthday_plan(independent, random)
    assert a is not None
    assert b is not None
    assert {a.role, b.role} == {BirthdayRole.HARD, BirthdayRole.EASY}


def test_default_budget_succeeds_often() -> None:
    """256 sockets: 1000 probes find one 98 % of the time; the default budget more."""
    assert 0.979 < success_probability(256, 1000) < 0.983
    config = BirthdayConfig()
    assert success_probability(config.sockets, config.probes) > 0.99


def test_config_is_checked() -> None:
    """A budget the port range cannot hold, or a rate of zero, is refused."""
    with pytest.raises(ValueError, match="cannot hold"):
        BirthdayConfig(probes=100, ports=(1000, 1050))
    with pytest.raises(ValueError, match="rates"):
        BirthdayConfig(rate=0)


def test_random_ports_are_distinct_and_in_range() -> None:
    """Ports are drawn without repetition from the range, the same for the same randomness."""
    ports = random_ports(lambda n: b"\x01" * n, 2000, 1024, 65535)
    assert len(set(ports)) == 2000
    assert all(1024 <= p <= 65535 for p in ports)
    assert ports == random_ports(lambda n: b"\x01" * n, 2000, 1024, 65535)


def test_pacer_keeps_the_rate_in_batches() -> None:
    """Events come at the rate, batched at least a tick apart, and stop at the total."""
    pacer = Pacer(10, 200.0, 100.0)
    assert pacer.take(100.0) == 1
    assert pacer.next_time() == pytest.approx(100.01)
    assert pacer.take(100.01) == 2
    assert pacer.take(100.02) == 2
    assert pacer.take(110.0) == 5
    assert pacer.next_time() is None
    assert pacer.take(111.0) == 0


def test_spray_yields_each_port_once() -> None:
    """A spray yields its ports in order, each once."""
    spray = PortSpray("203.0.113.7", [5, 6, 7], 100.0, 0.0)
    assert spray.take(0.0) == [Endpoint("203.0.113.7", 5)]
    assert spray.take(1.0) == [Endpoint("203.0.113.7", 6), Endpoint("203.0.113.7", 7)]
    assert spray.take(2.0) == []
    assert spray.next_time() is None


# -- the check machine's spray ------------------------------------------------------


def easy_machine(config: CheckConfig | None = None) -> CheckMachine:
    counter = itertools.count(1)
    return CheckMachine(
        controlling=True,
        credentials=IceCredentials.from_secret(SECRET, controlling=True),
        local=[Candidate.host(("10.0.0.1", 5000)), Candidate.server_reflexive(EASY)],
        remote=[Candidate.server_reflexive(HARD)],
        config=config,
        random_bytes=lambda n: next(counter).to_bytes(n, "big"),
    )


def answer(request: bytes, source: Endpoint, key: bytes) -> bytes:
    """The hard side's answer to *request*, keyed with *key*."""
    return encode(
        Method.BINDING,
        MessageClass.SUCCESS,
        decode(request).transaction_id,
        [XorMappedAddress(source)],
        integrity_key=key,
        fingerprint=True,
    )


def probes(m: CheckMachine) -> list[tuple[bytes, Endpoint]]:
    return [(d, a) for d, a in m.take_datagrams() if a != HARD]


def test_spray_sends_single_probes_at_the_rate() -> None:
    """The spray sends one probe per due port, never retransmitted, outside the check budget."""
    m = easy_machine()
    m.start(0.0)
    m.take_datagrams()
    m.spray(PortSpray(HARD.host, list(range(2000, 2400)), 200.0, 0.0), 0.0)
    sent = probes(m)
    assert [a.port for _, a in sent] == [2000]
    now = 0.0
    while now < 1.0:
        now = min(m.next_deadline() or 1.0, 1.0)
        m.handle_timer(now)
        sent += probes(m)
    ports = [a.port for _, a in sent]
    assert ports == list(range(2000, 2000 + len(ports)))
    assert 199 <= len(ports) <= 201
    assert m.stats.probes_sent == len(ports)


def test_answered_probe_makes_a_succeeded_pair() -> None:
    """An authenticated answer from the address probed validates that pair and stops the spray."""
    m = easy_machine()
    m.start(0.0)
    m.spray(PortSpray(HARD.host, [3000, 3001, 3002], 1.0, 0.0), 0.0)
    (probe, target), *_ = probes(m)
    key = m.credentials.remote_key
    m.datagram_received(answer(probe, EASY, key), target, 0.05)
    assert m.pair_state(target) is PairState.SUCCEEDED
    assert m.stats.probes_answered == 1
    assert not m.spraying
    assert "probe answered" in m.describe()


@pytest.mark.parametrize("wrong", ["key", "source"])
def test_unauthentic_answers_to_probes_count_for_nothing(wrong: str) -> None:
    """A wrong key, or an answer from another address than probed, learns no pair."""
    m = easy_machine()
    m.start(0.0)
    m.spray(PortSpray(HARD.host, [3000], 1.0, 0.0), 0.0)
    (probe, target), *_ = probes(m)
    key = b"x" * 32 if wrong == "key" else m.credentials.remote_key
    source = target if wrong == "key" else Endpoint(HARD.host, 3999)
    m.datagram_received(answer(probe, EASY, key), source, 0.05)
    assert m.stats.probes_answered == 0
    assert all(p.remote.address != source for p in m.pairs)


def test_a_check_from_the_peer_stops_the_spray() -> None:
    """Once an authenticated check from the peer arrives, no more probes go out."""
    m = easy_machine()
    m.start(0.0)
    m.spray(PortSpray(HARD.host, list(range(3000, 3100)), 100.0, 0.0), 0.0)
    peer = IceCredentials.from_secret(SECRET, controlling=False)
    check = encode_check(peer, b"t" * 12, controlling=False, tie_breaker=1)
    m.datagram_received(check, Endpoint(HARD.host, 41000), 0.1)
    m.handle_timer(0.5)
    assert not m.spraying
    assert m.stats.probes_sent <= 11


def test_no_budget_failure_while_spraying() -> None:
    """The checks' budget spent does not end the machine while probes remain; the deadline does."""
    config = CheckConfig(max_checks=3, max_checks_per_pair=3, deadline=10.0)
    m = easy_machine(config)
    m.start(0.0)
    m.spray(PortSpray(HARD.host, list(range(3000, 6000)), 200.0, 0.0), 0.0)
    now = 0.0
    while not m.done and now < 20:
        now = m.next_deadline() or 20.0
        m.handle_timer(now)
        m.take_datagrams()
    assert m.failure is not None
    assert m.failure.reason == "deadline"
    assert now == pytest.approx(10.0)
    assert "birthday probing: 2001 probes sent (of 3000 to random ports" in m.describe()


def test_budget_failure_after_the_spray_ends() -> None:
    """With the spray done and its answers no longer awaited, the spent budget ends the machine."""
    config = CheckConfig(max_checks=3, max_checks_per_pair=3, deadline=30.0)
    m = easy_machine(config)
    m.start(0.0)
    m.spray(PortSpray(HARD.host, list(range(3000, 3200)), 200.0, 0.0), 0.0)
    now = 0.0
    while not m.done and now < 40:
        now = m.next_deadline() or 40.0
        m.handle_timer(now)
        m.take_datagrams()
    assert m.failure is not None
    assert m.failure.reason == "budget"
    assert 1.0 < now < 5.0


# -- on the simulated network -------------------------------------------------------


def plan(of: NatPeer, other: NatPeer) -> BirthdayPlan:
    """*of*'s plan: hard behind the symmetric NAT, easy behind the port-restricted one."""
    srflx = other.candidates[-1].address
    role = BirthdayRole.HARD if of.nat == "symmetric" else BirthdayRole.EASY
    return BirthdayPlan(role, srflx)


def secrets(of: NatPeer) -> PathSecrets:
    return PathSecrets(session=SESSION, secret=SECRET, expected=of.identity.peer_id, method="udp")


def punch(
    network: Network, caller: NatPeer, callee: NatPeer, timeout: float = 30.0
) -> tuple[QuicPath | Failure, QuicPath | Failure, float]:
    """Both sides with their plans; the caller's result, the callee's, the caller's time."""
    start = network.clock.seconds()
    answered = callee.port.answer(
        secrets(caller),
        local=callee.candidates,
        remote=caller.candidates,
        timeout=timeout,
        birthday=plan(callee, caller),
    )
    called = caller.port.call(
        secrets(callee),
        local=caller.candidates,
        remote=callee.candidates,
        timeout=timeout,
        birthday=plan(caller, callee),
    )
    results: dict[str, Any] = {}
    called.addBoth(lambda r: results.setdefault("caller", (r, network.clock.seconds())))
    answered.addBoth(lambda r: results.setdefault("callee", (r, 0.0)))
    deadline = start + timeout + 1
    while "caller" not in results and network.clock.seconds() < deadline:
        network.run(0.05)
    mine = results["caller"][0]
    if isinstance(mine, QuicPath):
        mine.select(Factory.forProtocol(Protocol))
    while "callee" not in results and network.clock.seconds() < deadline:
        network.run(0.05)
    return mine, results["callee"][0], results["caller"][1] - start


@pytest.mark.parametrize("hard_calls", [True, False], ids=["hard-caller", "easy-caller"])
def test_random_symmetric_meets_port_restricted(hard_calls: bool) -> None:
    """The pair plain punching cannot serve connects, the hard side's QUIC on a birthday socket."""
    network = stun_network(f"birthday-{hard_calls}")
    hard = nat_peer(network, "hard", "symmetric")
    easy = nat_peer(network, "easy", "port-restricted")
    caller, callee = (hard, easy) if hard_calls else (easy, hard)
    mine, theirs, took = punch(network, caller, callee)
    assert isinstance(mine, QuicPath), mine
    assert isinstance(theirs, QuicPath), theirs
    hard_path, easy_path = (mine, theirs) if hard_calls else (theirs, mine)
    assert easy_path.remote[0] == network.nats["nat-hard"].address
    assert hard_path.remote == tuple(easy.candidates[-1].address)
    # The hard side's path runs on the socket that was reached: a birthday
    # socket, which alone is left open besides the punching port, or the
    # punching port itself (its checks to the same address opened a mapping too).
    on_child = hard_path.local[1] != hard.port.address.port
    assert len(hard.host.ports) == (2 if on_child else 1)
    assert hard.port.paths == 1
    assert took < CheckConfig().deadline
    close_peers(network, hard, easy)


def test_the_hard_socket_closes_with_its_path() -> None:
    """When the connection ends, the birthday socket carrying it closes too."""
    network = stun_network("birthday-end")
    hard = nat_peer(network, "hard", "symmetric")
    easy = nat_peer(network, "easy", "port-restricted")
    mine, theirs, _ = punch(network, hard, easy)
    assert isinstance(mine, QuicPath)
    assert isinstance(theirs, QuicPath)
    hard.port.close_when_idle()
    network.run(1)
    carrying = len(hard.host.ports)
    assert carrying == 2  # still carrying the connection
    assert mine._transport is not None
    mine._transport.loseConnection()
    network.run(10)
    assert hard.host.ports == ()
    assert hard.port.paths == 0
    assert hard.host.reactor.getDelayedCalls() == []
    close_peers(network, easy)


def test_a_small_budget_fails_saying_what_was_tried() -> None:
    """Too few sockets and probes: both sides fail within the deadline, counting them."""
    config = BirthdayConfig(sockets=2, probes=20)
    network = stun_network("birthday-small")
    hard = nat_peer(network, "hard", "symmetric", config)
    easy = nat_peer(network, "easy", "port-restricted", config)
    mine, theirs, took = punch(network, easy, hard)
    assert isinstance(mine, Failure)
    assert isinstance(theirs, Failure)
    mine.trap(PunchChecksFailed)
    theirs.trap(PunchChecksFailed)
    assert "birthday probing: 20 probes sent" in str(mine.value)
    assert "birthday probing: 2 of 2 sockets sent a check" in str(theirs.value)
    assert "none was reached" in str(theirs.value)
    assert took <= CheckConfig().deadline + 0.1
    close_peers(network, hard, easy)


@pytest.mark.parametrize("when", [0.2, 1.0], ids=["before-probing", "while-probing"])
def test_cancel_leaves_no_socket_or_timer(when: float) -> None:
    """Cancelling the hard side's punch closes its sockets and cancels its timers."""
    network = stun_network(f"birthday-cancel-{when}")
    hard = nat_peer(network, "hard", "symmetric")
    d = hard.port.call(
        PathSecrets(SESSION, SECRET, Identity.generate().peer_id, "udp"),
        local=hard.candidates,
        remote=[Candidate.server_reflexive(EASY)],
        timeout=30,
        birthday=BirthdayPlan(BirthdayRole.HARD, EASY),
    )
    network.run(when)
    assert len(hard.host.ports) == (1 if when < 0.5 else 257)
    d.cancel()
    failure_of(d).trap(CancelledError)
    network.run(1)
    assert hard.host.ports == (hard.port._listening,)
    assert hard.host.reactor.getDelayedCalls() == []
    close_peers(network, hard)


def test_no_probing_when_the_checks_reach_the_peer() -> None:
    """Behind a full-cone NAT the plain checks connect: no socket opened, no probe sent."""
    network = stun_network("birthday-cone")
    hard = nat_peer(network, "hard", "symmetric")
    easy = nat_peer(network, "easy", "full-cone")
    hard_plan = BirthdayPlan(BirthdayRole.HARD, easy.candidates[-1].address)
    answered = easy.port.answer(
        secrets(hard),
        local=easy.candidates,
        remote=hard.candidates,
        timeout=30,
        birthday=BirthdayPlan(BirthdayRole.EASY, hard.candidates[-1].address),
    )
    called = hard.port.call(
        secrets(easy),
        local=hard.candidates,
        remote=easy.candidates,
        timeout=30,
        birthday=hard_plan,
    )
    network.run(0.3)
    got: list[Any] = []
    called.addBoth(got.append)
    assert got, "the caller did not connect within 0.3 s"
    assert isinstance(got[0], QuicPath), got
    got[0].select(Factory.forProtocol(Protocol))
    network.run(2)
    assert len(hard.host.ports) == 1
    assert answered.called
    close_peers(network, hard, easy)
