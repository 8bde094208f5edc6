"""
Port prediction: what two observed bindings say about a NAT, which ports
to probe, the check machine's burst of predicted checks, and two peers
behind sequential symmetric NATs of the simulated network.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import PunchChecksFailed
from nattraverse.identity import Identity
from nattraverse.methods.tcp import predicted_tcp
from nattraverse.punch.candidates import Candidate, CandidateKind, PairClass, form_pairs, gather
from nattraverse.punch.checks import CheckMachine, IceCredentials
from nattraverse.punch.mapping import (
    TOLERANCE,
    WINDOW,
    MappingKind,
    NatMapping,
    infer_mapping,
    own_mapping,
    predicted_ports,
    predicted_tcp_ports,
)
from nattraverse.punch.port import PunchingPort
from nattraverse.quic import QuicPath
from nattraverse.rendezvous._protocol import PeerInfo
from nattraverse.secure import PathSecrets
from nattraverse.stun.server import StunServer
from nattraverse.testing import Network, SimulatedHost

PUBLIC = "198.51.100.7"
STUN = Endpoint("192.0.2.1", 3478)
STUN_SECOND = Endpoint("192.0.2.1", 3479)
SECRET = b"p" * 32
SESSION = b"q" * 16


def at(port: int, host: str = PUBLIC) -> Endpoint:
    return Endpoint(host, port)


# -- what two observations say --------------------------------------------------------


def test_equal_observations_are_independent_mapping() -> None:
    """The same address at both ports: the NAT maps independently of the destination."""
    assert infer_mapping(at(4000), at(4000)) == NatMapping(MappingKind.INDEPENDENT, at(4000))


@pytest.mark.parametrize(("second", "step"), [(20001, 1), (19998, -2), (20064, 64)])
def test_a_small_step_is_sequential(second: int, step: int) -> None:
    """Ports a small step apart on one address: sequential, with that step."""
    found = infer_mapping(at(20000), at(second))
    assert (found.kind, found.step, found.last) == (MappingKind.SEQUENTIAL, step, at(second))
    assert found.per_destination


def test_the_step_wraps_around_the_port_space() -> None:
    """65535 then 1 is a step of +2, not -65534."""
    assert infer_mapping(at(65535), at(1)).step == 2


@pytest.mark.parametrize(
    ("primary", "second"),
    [(at(20000), at(20065)), (at(20000), at(51234)), (at(20000), at(20001, "198.51.100.8"))],
)
def test_far_ports_or_another_address_are_random(primary: Endpoint, second: Endpoint) -> None:
    """A large step, or another external address: random, not predictable."""
    found = infer_mapping(primary, second)
    assert found.kind is MappingKind.RANDOM
    assert found.per_destination
    assert "random" in found.describe()


@pytest.mark.parametrize(("primary", "second"), [(None, at(1)), (at(1), None), (None, None)])
def test_one_observation_is_unknown(primary: Endpoint | None, second: Endpoint | None) -> None:
    """Without both observations nothing is known."""
    found = infer_mapping(primary, second)
    assert found.kind is MappingKind.UNKNOWN
    assert not found.per_destination


def test_own_mapping_reads_gathered_candidates() -> None:
    """gather() lists the primary then the second observation; own_mapping reads them."""
    local = gather(5000, ["10.0.0.2"], at(20000), at(20001))
    assert own_mapping(local) == NatMapping(MappingKind.SEQUENTIAL, at(20001), 1)
    assert own_mapping(gather(5000, ["10.0.0.2"], at(20000))).kind is MappingKind.UNKNOWN
    assert own_mapping(gather(5000, ["10.0.0.2"], None)).kind is MappingKind.UNKNOWN


# -- which ports to probe -------------------------------------------------------------

SEQ = NatMapping(MappingKind.SEQUENTIAL, at(20000), 1)
EIM = NatMapping(MappingKind.INDEPENDENT, at(4000))


def test_an_independent_side_probes_the_window() -> None:
    """Against a sequential peer, an independent side probes its next WINDOW ports."""
    ports = predicted_ports(SEQ, EIM, caller=True)
    assert ports == [at(20000 + k) for k in range(1, WINDOW + 1)]
    assert predicted_ports(SEQ, EIM, caller=False) == ports


def test_two_sequential_sides_probe_strided_and_straight() -> None:
    """Caller: every other port, TOLERANCE + 1 probes; callee: the window, straight."""
    assert predicted_ports(SEQ, SEQ, caller=True) == [
        at(20000 + 2 * k - 1) for k in range(1, TOLERANCE + 2)
    ]
    assert predicted_ports(SEQ, SEQ, caller=False) == [at(20000 + k) for k in range(1, WINDOW + 1)]


def test_the_step_scales_the_prediction() -> None:
    """A step of -2 predicts downwards, two ports apart."""
    down = NatMapping(MappingKind.SEQUENTIAL, at(30000), -2)
    assert predicted_ports(down, EIM, caller=True)[:3] == [at(29998), at(29996), at(29994)]


@pytest.mark.parametrize(
    "peer",
    [NatMapping(MappingKind.RANDOM, at(1)), EIM, NatMapping(MappingKind.UNKNOWN)],
)
def test_nothing_is_predicted_for_other_peers(peer: NatMapping) -> None:
    """Only a sequential peer gets predicted ports."""
    assert predicted_ports(peer, SEQ, caller=True) == []


def test_ports_outside_the_port_space_are_left_out() -> None:
    """Near the top of the port space, the window is cut short."""
    high = NatMapping(MappingKind.SEQUENTIAL, at(65530), 1)
    assert predicted_ports(high, EIM, caller=True) == [at(p) for p in range(65531, 65536)]


# -- TCP --------------------------------------------------------------------------------


def test_tcp_windows_follow_the_tcp_and_the_udp_mapping_interleaved() -> None:
    """After the TCP mapping and the latest UDP one: both windows, step by step, no repeats."""
    ports = predicted_tcp_ports(at(19990), SEQ, EIM)
    assert ports[:4] == [at(19991), at(20001), at(19992), at(20002)]
    assert len(ports) == len(set(ports)) == WINDOW + 10  # the windows overlap from 20001 on
    assert set(ports) == {at(p) for p in range(19991, 20000 + WINDOW + 1)}


def test_tcp_window_alone_when_the_udp_mapping_is_elsewhere() -> None:
    """A UDP mapping on another address says nothing about this one's ports."""
    elsewhere = NatMapping(MappingKind.SEQUENTIAL, at(20000, "203.0.113.9"), 2)
    ports = predicted_tcp_ports(at(30000), elsewhere, EIM)
    assert ports == [at(30000 + 2 * k) for k in range(1, WINDOW + 1)]


def test_tcp_prediction_leaves_out_the_observed_port_and_the_port_space_edge() -> None:
    """The observed mapping is a candidate already; ports past 65535 do not exist."""
    below = NatMapping(MappingKind.SEQUENTIAL, at(65530), 1)
    assert predicted_tcp_ports(at(65533), below, EIM) == [
        at(p) for p in (65534, 65531, 65535, 65532)
    ]


@pytest.mark.parametrize(
    "own",
    [SEQ, NatMapping(MappingKind.RANDOM, at(1))],
    ids=["sequential", "random"],
)
def test_tcp_prediction_needs_this_side_to_map_independently(own: NatMapping) -> None:
    """A side whose own NAT maps per destination does not probe over TCP."""
    assert predicted_tcp_ports(at(19990), SEQ, own) == []


def test_tcp_prediction_without_a_measurement_of_this_side() -> None:
    """This side's NAT unknown (one observation): it probes; its one mapping may be enough."""
    assert predicted_tcp_ports(at(19990), SEQ, NatMapping(MappingKind.UNKNOWN))[:1] == [at(19991)]


@pytest.mark.parametrize(
    "peer",
    [NatMapping(MappingKind.RANDOM, at(1)), EIM, NatMapping(MappingKind.UNKNOWN)],
)
def test_nothing_is_predicted_over_tcp_for_other_peers(peer: NatMapping) -> None:
    """Only a sequential peer gets predicted TCP ports."""
    assert predicted_tcp_ports(at(19990), peer, EIM) == []


def _tcp_peer(udp: Endpoint | None, udp_second: Endpoint | None, tcp: bool = True) -> PeerInfo:
    return PeerInfo(
        peer_id=Identity.generate().peer_id,
        name="bob",
        observed=(PUBLIC, 19990),
        listen_port=0,
        private=(),
        udp=udp,
        udp_second=udp_second,
        tcp_private=(Endpoint("10.0.0.7", 5000),) if tcp else (),
    )


def test_the_tcp_method_predicts_from_both_sides_udp_bindings() -> None:
    """Peer sequential by its UDP binding, this side independent by its own: predicted."""
    local = gather(4000, ["10.0.0.2"], at(4000, "203.0.113.5"), at(4000, "203.0.113.5"))
    found = predicted_tcp(_tcp_peer(at(20000), at(20001)), local)
    assert found[:3] == [at(19991), at(20002), at(19992)]


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        # The peer's NAT maps independently.
        (_tcp_peer(at(20000), at(20000)), gather(4000, ["10.0.0.2"], at(4000))),
        # The peer's NAT was not measured (it has no UDP punching port).
        (_tcp_peer(None, None), gather(4000, ["10.0.0.2"], at(4000))),
        # The peer does not punch TCP.
        (_tcp_peer(at(20000), at(20001), tcp=False), gather(4000, ["10.0.0.2"], at(4000))),
        # This side is sequential too.
        (
            _tcp_peer(at(20000), at(20001)),
            gather(4000, ["10.0.0.2"], at(30000, "203.0.113.5"), at(30001, "203.0.113.5")),
        ),
    ],
    ids=["independent-peer", "unmeasured-peer", "no-tcp", "both-sequential"],
)
def test_the_tcp_method_predicts_nothing_otherwise(peer: PeerInfo, local: list[Candidate]) -> None:
    """No predicted TCP candidates unless the peer is sequential and this side is not."""
    assert predicted_tcp(peer, local) == []


def _flows(base: int, offset: int, targets: list[Endpoint]) -> dict[int, int]:
    """A sequential NAT's new mapping per probe: source port -> destination port."""
    return {base + offset + k: target.port for k, target in enumerate(targets, start=1)}


@pytest.mark.parametrize(
    ("caller_offset", "callee_offset"),
    [(0, 0), (3, 0), (0, 7), (TOLERANCE, 0), (0, TOLERANCE), (8, 7)],
)
def test_two_sequential_sides_meet_within_the_tolerance(
    caller_offset: int, callee_offset: int
) -> None:
    """Offsets that sum to at most TOLERANCE leave one pair of probes naming each other."""
    caller = NatMapping(MappingKind.SEQUENTIAL, at(20000, "198.51.100.1"), 1)
    callee = NatMapping(MappingKind.SEQUENTIAL, at(30000, "198.51.100.2"), 1)
    a = _flows(20000, caller_offset, predicted_ports(callee, caller, caller=True))
    b = _flows(30000, callee_offset, predicted_ports(caller, callee, caller=False))
    assert [(x, y) for x, y in a.items() if b.get(y) == x]


def test_two_sequential_sides_miss_beyond_the_tolerance() -> None:
    """Offsets summing to TOLERANCE + 1 leave no matching pair: the limit is real."""
    caller = NatMapping(MappingKind.SEQUENTIAL, at(20000, "198.51.100.1"), 1)
    callee = NatMapping(MappingKind.SEQUENTIAL, at(30000, "198.51.100.2"), 1)
    a = _flows(20000, TOLERANCE + 1, predicted_ports(callee, caller, caller=True))
    b = _flows(30000, 0, predicted_ports(caller, callee, caller=False))
    assert not [(x, y) for x, y in a.items() if b.get(y) == x]


# -- the check machine ---------------------------------------------------------------


def _machine(remote: list[Candidate]) -> CheckMachine:
    counter = itertools.count(1)
    return CheckMachine(
        controlling=True,
        credentials=IceCredentials.from_secret(SECRET, controlling=True),
        local=[Candidate.host(("10.0.0.1", 4000)), Candidate.server_reflexive(at(4000))],
        remote=remote,
        random_bytes=lambda n: next(counter).to_bytes(n, "big"),
    )


def test_predicted_pairs_are_classed_last() -> None:
    """A predicted candidate makes a PREDICTED pair, after the server-reflexive one."""
    remote = [Candidate.predicted(at(20001, "203.0.113.5"))]
    remote.append(Candidate.server_reflexive(at(20000, "203.0.113.5")))
    pairs = form_pairs([Candidate.host(("10.0.0.1", 4000))], remote, controlling=True)
    assert [p.pair_class for p in pairs] == [PairClass.PUBLIC, PairClass.PREDICTED]
    assert pairs[1].remote.kind is CandidateKind.PREDICTED


def test_predicted_checks_go_out_first_and_at_once() -> None:
    """At the start, every predicted check leaves before the first paced one."""
    predicted = [Candidate.predicted(at(20000 + k, "203.0.113.5")) for k in range(1, 6)]
    srflx = Candidate.server_reflexive(at(20000, "203.0.113.5"))
    m = _machine([srflx, *predicted])
    m.start(0.0)
    sent = [address for _, address in m.take_datagrams()]
    assert sent == [c.address for c in predicted] + [srflx.address]


def test_predicted_pairs_get_a_budget_of_their_own() -> None:
    """Each predicted pair adds max_tries requests to the total budget."""
    predicted = [Candidate.predicted(at(20000 + k, "203.0.113.5")) for k in range(1, 31)]
    m = _machine([Candidate.server_reflexive(at(20000, "203.0.113.5")), *predicted])
    assert m.max_checks == m.config.max_checks + 30 * m.config.max_tries


def test_a_failure_summarises_the_predicted_pairs() -> None:
    """The description lists the other pairs and sums up the predicted ones."""
    predicted = [Candidate.predicted(at(20000 + k, "203.0.113.5")) for k in range(1, 31)]
    m = _machine([Candidate.server_reflexive(at(20000, "203.0.113.5")), *predicted])
    m.start(0.0)
    text = m.describe()
    assert text.startswith("1 pairs: srflx 203.0.113.5:20000")
    assert "30 predicted pairs (203.0.113.5:20001 to 203.0.113.5:20030): none answered" in text


# -- the simulated network -------------------------------------------------------------


class _Sink(Protocol):
    pass


class _Quiet(DatagramProtocol):
    pass


def _network(seed: str) -> Network:
    network = Network(seed=seed)
    stun = network.host("stun", address=STUN.host)
    StunServer(
        stun.reactor,
        interface=STUN.host,
        port=STUN.port,
        alt_port=STUN_SECOND.port,
        second_port=True,
        tcp=False,
        fast_path=False,
    ).startService()
    return network


def _peer(network: Network, host: SimulatedHost) -> tuple[PunchingPort, Identity, list[Any]]:
    """A punching port bound at both STUN ports, in order, and its candidates."""
    identity = Identity.generate(now=network.clock.seconds())
    port = PunchingPort(
        host.reactor, identity, random_bytes=network.random("punch", host.name).randbytes
    )
    bound = port.start()
    primary = network.run_until(port.demux.client.binding(STUN)).mapped_address
    second = network.run_until(port.demux.client.binding(STUN_SECOND)).mapped_address
    return port, identity, gather(bound.port, [host.address], primary, second)


def _take_ports(network: Network, host: SimulatedHost, count: int) -> None:
    """Other traffic behind the NAT: *count* new mappings, one per destination."""
    udp = host.reactor.listenUDP(0, _Quiet())
    for n in range(count):
        udp.write(b"x", ("203.0.113.99", 1000 + n))
    network.run(0.1)
    udp.stopListening()


def _punch(
    network: Network,
    caller_nat: str,
    callee_nat: str,
    *,
    predict: bool = True,
    taken: tuple[int, int] = (0, 0),
) -> tuple[object, object]:
    """Punch between two peers behind *caller_nat* and *callee_nat*, as the udp method does."""
    caller_host = network.host("caller", network.nat("a", preset=caller_nat).lan)
    callee_host = network.host("callee", network.nat("b", preset=callee_nat).lan)
    caller, caller_id, caller_local = _peer(network, caller_host)
    callee, callee_id, callee_local = _peer(network, callee_host)
    _take_ports(network, caller_host, taken[0])
    _take_ports(network, callee_host, taken[1])

    def remote(local: list[Any], peer_local: list[Any], *, is_caller: bool) -> list[Candidate]:
        peer = own_mapping(peer_local)
        found = [c for c in peer_local if c.kind is not CandidateKind.SERVER_REFLEXIVE]
        found.append(next(c for c in peer_local if c.kind is CandidateKind.SERVER_REFLEXIVE))
        if predict:
            ports = predicted_ports(peer, own_mapping(local), caller=is_caller)
            found.extend(Candidate.predicted(p) for p in ports)
        return found

    def secrets(expected: Identity) -> PathSecrets:
        return PathSecrets(SESSION, SECRET, expected.peer_id, "udp")

    results: dict[str, object] = {}

    def keep(result: object, side: str) -> None:
        results[side] = result

    callee.answer(
        secrets(caller_id),
        local=callee_local,
        remote=remote(callee_local, caller_local, is_caller=False),
        timeout=15,
    ).addBoth(keep, "callee")
    caller.call(
        secrets(callee_id),
        local=caller_local,
        remote=remote(caller_local, callee_local, is_caller=True),
        timeout=15,
    ).addBoth(keep, "caller")
    for _ in range(400):
        if "caller" in results:
            break
        network.run(0.05)
    mine = results["caller"]
    if isinstance(mine, QuicPath):
        mine.select(Factory.forProtocol(_Sink))
    for _ in range(400):
        if "callee" in results:
            break
        network.run(0.05)
    outcome = (mine, results["callee"])
    caller.close()
    callee.close()
    network.run(5)
    assert caller.sessions == callee.sessions == 0
    assert caller_host.reactor.getDelayedCalls() == []
    return outcome


PREDICTABLE = [
    ("symmetric-sequential", "symmetric-sequential"),
    ("port-restricted", "symmetric-sequential"),
    ("symmetric-sequential", "port-restricted"),
]


@pytest.mark.parametrize(("caller_nat", "callee_nat"), PREDICTABLE)
def test_prediction_connects_what_plain_punching_cannot(caller_nat: str, callee_nat: str) -> None:
    """With the predicted ports checked, a sequential NAT meets a sequential or PRC one."""
    network = _network(f"{caller_nat}/{callee_nat}")
    mine, theirs = _punch(network, caller_nat, callee_nat)
    assert isinstance(mine, QuicPath), mine
    assert isinstance(theirs, QuicPath), theirs
    assert mine.remote[0] == network.nats["b"].address


@pytest.mark.parametrize(("caller_nat", "callee_nat"), PREDICTABLE)
def test_without_prediction_these_pairs_fail(caller_nat: str, callee_nat: str) -> None:
    """The same pairs fail when only the observed candidates are checked."""
    network = _network(f"{caller_nat}/{callee_nat}/plain")
    mine, theirs = _punch(network, caller_nat, callee_nat, predict=False)
    for result in (mine, theirs):
        assert isinstance(result, Failure), result
        result.trap(PunchChecksFailed)


@pytest.mark.parametrize("taken", [(TOLERANCE, 0), (0, TOLERANCE), (7, 8)])
def test_two_sequential_nats_absorb_other_traffic(taken: tuple[int, int]) -> None:
    """Ports taken by other traffic since the measurement, up to TOLERANCE in all, are absorbed."""
    network = _network(f"taken/{taken}")
    mine, theirs = _punch(network, "symmetric-sequential", "symmetric-sequential", taken=taken)
    assert isinstance(mine, QuicPath), mine
    assert isinstance(theirs, QuicPath), theirs


def test_two_sequential_nats_fail_beyond_the_tolerance() -> None:
    """Beyond TOLERANCE ports taken, no predicted pair can match: the checks fail."""
    network = _network("taken/beyond")
    mine, _ = _punch(
        network, "symmetric-sequential", "symmetric-sequential", taken=(TOLERANCE + 1, 0)
    )
    assert isinstance(mine, Failure), mine
    mine.trap(PunchChecksFailed)


# -- what a failure says ---------------------------------------------------------------

RANDOM = NatMapping(MappingKind.RANDOM, at(51234))


@pytest.mark.parametrize(
    ("ours", "theirs", "meaning"),
    [
        (RANDOM, SEQ, "no direct UDP path can be predicted"),
        (EIM, RANDOM, "birthday-paradox probing reached none of the random ports"),
        (SEQ, SEQ, "the predicted ports did not answer"),
    ],
    ids=["beyond-prediction", "birthday", "prediction"],
)
def test_a_udp_failure_names_both_nats(ours: NatMapping, theirs: NatMapping, meaning: str) -> None:
    """The udp method's failure says which NATs the sides are behind and what that means."""
    from nattraverse.methods.udp import _explain
    from nattraverse.punch.checks import CheckStats

    failed = Failure(PunchChecksFailed("budget", "2 pairs: ...", CheckStats()))
    error = _explain(failed, ours, theirs).value
    assert isinstance(error, PunchChecksFailed)
    assert str(error).startswith("UDP hole punching failed: check budget spent; this side is")
    assert f"this side is behind {ours.describe()}; the peer behind {theirs.describe()}" in str(
        error
    )
    assert meaning in str(error)
    assert str(error).endswith("; 2 pairs: ...")


def test_other_failures_pass_through_unexplained() -> None:
    """Only a checks failure gets the NATs added."""
    from nattraverse.methods.udp import _explain

    failed = Failure(ValueError("boom"))
    assert _explain(failed, SEQ, SEQ) is failed
