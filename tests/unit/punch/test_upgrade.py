"""
Relay first, then upgrade: a punching session's relayed leg (QUIC through a
UDP relay that forwards between two latched sockets), and the move of that
connection to a direct pair validated later, on the simulated network.

The relay here is a stand-in with the rendezvous relay's forwarding rule
(:class:`~tests.unit.punch.sim_peers.FakeRelay`); the real one is tested in
tests/unit/rendezvous and tests/integration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import PunchChecksFailed
from nattraverse.quic import QuicPath, QuicStreamTransport
from nattraverse.testing import Link, Network
from tests.unit.punch.sim_peers import (
    RELAY,
    Exchange,
    NatPeer,
    QuicBlackout,
    close_peers,
    make_network,
    nat_peer,
    punch_with_relay,
)

SECRET = b"u" * 32
SESSION = b"v" * 16
MEGABYTE = 1024 * 1024


class Sender(Protocol):
    """Writes *total* bytes in chunks, one every *gap* seconds, then closes."""

    def __init__(self, clock: Any, total: int, chunk: int = 32 * 1024, gap: float = 0.1) -> None:
        self.clock = clock
        self.left = total
        self.chunk = chunk
        self.gap = gap
        self.sent = bytearray()

    def connectionMade(self) -> None:
        self._next()

    def _next(self) -> None:
        if self.left <= 0:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        size = min(self.chunk, self.left)
        data = bytes((len(self.sent) + i) % 251 for i in range(size))
        self.sent += data
        self.left -= size
        self.transport.write(data)  # type: ignore[union-attr]
        self.clock.callLater(self.gap, self._next)


class Receiver(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost = reason


@dataclass
class Outcome:
    caller: QuicPath | Failure
    callee: QuicPath | Failure
    took: float
    opened: list[str]
    relayed: bool = False
    moves: list[tuple[float, tuple[str, int], tuple[str, int]]] = field(default_factory=list)
    sender: Sender | None = None
    receiver: Receiver | None = None


def punch(
    network: Network,
    caller: NatPeer,
    callee: NatPeer,
    *,
    delay: float = 0.0,
    send: int = 0,
    timeout: float = 30.0,
    caller_opener: Any = None,
) -> Outcome:
    """Both sides punch with a relayed leg; the caller sends *send* bytes once connected."""
    start = network.clock.seconds()
    opened: list[str] = []
    called, answered = punch_with_relay(
        caller,
        callee,
        session=SESSION,
        secret=SECRET,
        delay=delay,
        timeout=timeout,
        opened=opened,
        caller_opener=caller_opener,
    )
    results: dict[str, Any] = {}
    called.addBoth(lambda r: results.setdefault("caller", (r, network.clock.seconds())))
    answered.addBoth(lambda r: results.update(callee=r))
    deadline = start + timeout + 1
    while "caller" not in results and network.clock.seconds() < deadline:
        network.run(0.05)
    mine = results["caller"][0]
    outcome = Outcome(
        mine, Failure(AssertionError("no answer")), results["caller"][1] - start, opened
    )
    if isinstance(mine, QuicPath):
        outcome.relayed = mine.relayed
        mine.on_moved.append(
            lambda path, old, new: outcome.moves.append((network.clock.seconds(), old, new))
        )
        sender = outcome.sender = Sender(caller.host.reactor, send)
        mine.select(Factory.forProtocol(lambda: sender))
    while "callee" not in results and network.clock.seconds() < deadline:
        network.run(0.05)
    outcome.callee = results["callee"]
    if isinstance(outcome.callee, QuicPath):
        receiver = outcome.receiver = Receiver()
        outcome.callee.attach(Factory.forProtocol(lambda: receiver))
    return outcome


@pytest.mark.parametrize("hard_calls", [True, False], ids=["hard-caller", "easy-caller"])
def test_relayed_connection_moves_to_birthday_path_during_transfer(hard_calls: bool) -> None:
    """The relay connects first; birthday probing finds a direct path; 1 MiB arrives intact."""
    network, relay = make_network(f"upgrade-{hard_calls}")
    hard = nat_peer(network, "hard", "symmetric")
    easy = nat_peer(network, "easy", "port-restricted")
    caller, callee = (hard, easy) if hard_calls else (easy, hard)
    result = punch(network, caller, callee, send=MEGABYTE)
    assert isinstance(result.caller, QuicPath), result.caller
    assert isinstance(result.callee, QuicPath), result.callee
    assert result.relayed  # the relay won: the hard side probes only after 0.5 s
    assert result.took < 1.0
    network.run(15)
    assert result.receiver is not None
    assert result.sender is not None
    assert bytes(result.receiver.data) == bytes(result.sender.sent)
    assert len(result.receiver.data) == MEGABYTE
    assert result.receiver.lost is not None  # the sender closed after the last byte
    # Both moved off the relay, to each other's NAT, with data still flowing.
    assert len(result.moves) == 1
    moved_at, old, new = result.moves[0]
    assert old == tuple(RELAY)
    assert new[0] == network.nats[f"nat-{callee.host.name}"].address
    assert moved_at - (network.clock.seconds() - 15) < 3.2  # within the transfer
    assert not result.caller.relayed
    assert not result.callee.relayed
    assert result.callee.remote[0] == network.nats[f"nat-{caller.host.name}"].address
    forwarded = relay.forwarded
    network.run(1)
    assert relay.forwarded == forwarded  # nothing goes through the relay any more
    close_peers(network, hard, easy)


def test_pair_beyond_prediction_stays_relayed() -> None:
    """Two random symmetric NATs: connected through the relay; the checks end; it stays."""
    network, relay = make_network("upgrade-sym")
    caller = nat_peer(network, "a", "symmetric")
    callee = nat_peer(network, "b", "symmetric")
    result = punch(network, caller, callee, send=64 * 1024)
    assert isinstance(result.caller, QuicPath), result.caller
    assert isinstance(result.callee, QuicPath), result.callee
    assert result.caller.relayed
    assert result.callee.relayed
    network.run(40)  # past the checks' deadline and the session's timeout
    assert caller.port.sessions == 0
    assert callee.port.sessions == 0
    assert result.moves == []
    assert result.receiver is not None
    assert len(result.receiver.data) == 64 * 1024
    assert relay.forwarded > 0
    close_peers(network, caller, callee)


def test_direct_path_wins_before_the_relay_is_asked_for() -> None:
    """Behind full-cone NATs the checks connect within the head start: no relay at all."""
    network, relay = make_network("upgrade-cone")
    caller = nat_peer(network, "a", "full-cone")
    callee = nat_peer(network, "b", "full-cone")
    result = punch(network, caller, callee, delay=0.5)
    assert isinstance(result.caller, QuicPath), result.caller
    assert not result.caller.relayed
    network.run(2)
    assert result.opened == []
    assert relay.latched == []
    close_peers(network, caller, callee)


def test_failed_leg_and_checks_fail_saying_both() -> None:
    """No relay and no direct pair: the failure names the relayed leg's error too."""
    network, _ = make_network("upgrade-fail")
    caller = nat_peer(network, "a", "symmetric")
    callee = nat_peer(network, "b", "symmetric")

    def refused() -> Deferred[Endpoint]:
        return fail(RuntimeError("the relay is off on this rendezvous"))

    result = punch(network, caller, callee, caller_opener=refused, timeout=20)
    assert isinstance(result.caller, Failure)
    result.caller.trap(PunchChecksFailed)
    assert "relayed leg: the relay is off on this rendezvous" in str(result.caller.value)
    close_peers(network, caller, callee)


def test_closing_the_relayed_connection_stops_the_checks() -> None:
    """The application closes a relayed connection: the session stops at once, nothing left."""
    network, _ = make_network("upgrade-close")
    caller = nat_peer(network, "a", "symmetric")
    callee = nat_peer(network, "b", "symmetric")
    result = punch(network, caller, callee)
    assert isinstance(result.caller, QuicPath)
    assert caller.port.sessions == 1  # still checking, to upgrade
    assert result.caller._transport is not None
    result.caller._transport.loseConnection()
    network.run(5)
    assert caller.port.sessions == 0
    close_peers(network, caller, callee)


@pytest.mark.parametrize("select", ["at-once", "later"])
@pytest.mark.parametrize("lost", ["to-callee", "to-caller", "after-initial"])
def test_direct_handshake_under_way_gives_way_to_the_relayed_connection(
    lost: str, select: str
) -> None:
    """The relay wins while a direct QUIC handshake is under way: it gives way, and moves there."""
    network, relay = make_network(f"handover-{lost}-{select}")
    caller = nat_peer(network, "a", "port-restricted")
    callee = nat_peer(network, "b", "port-restricted")
    for nat in network.nats.values():
        nat.uplink = Link(delay=0.01)
    start = network.clock.seconds()
    # The checks get through at once; direct QUIC is lost for a second (to
    # the callee, to the caller, or both ways once the caller's Initial got
    # through: the callee has a handshake under way and never hears it
    # dropped); the relay, asked for after 0.2 s, loses nothing.
    until = start + 1.0
    blackouts = []
    if lost != "to-caller":
        passed = 1 if lost == "after-initial" else 0
        blackouts.append(QuicBlackout(network, callee, RELAY, until, passed))
    if lost != "to-callee":
        blackouts.append(QuicBlackout(network, caller, RELAY, until))
    total = 256 * 1024
    mine = Exchange(caller.host.reactor, total, seed=0)
    theirs = Exchange(callee.host.reactor, total, seed=100)
    opened: list[str] = []
    called, answered = punch_with_relay(
        caller, callee, session=SESSION, secret=SECRET, delay=0.2, timeout=30, opened=opened
    )
    at_auth: dict[str, Any] = {}
    moves: list[tuple[float, int, tuple[str, int], tuple[str, int]]] = []

    def connected(path: QuicPath) -> QuicPath:
        # Called as the session reports the relayed path, before it gives way.
        caller_session = caller.port.session_of(SESSION)
        callee_session = callee.port.session_of(SESSION)
        assert caller_session is not None
        assert callee_session is not None
        at_auth.update(
            time=network.clock.seconds(),
            relayed=path.relayed,
            direct=caller_session.path,
            callee_direct=callee_session.path,
            callee_relayed=callee_session.relay_path,
        )
        path.on_moved.append(
            lambda _, old, new: moves.append((network.clock.seconds(), len(mine.sent), old, new))
        )
        factory = Factory.forProtocol(lambda: mine)
        if select == "at-once":
            path.select(factory)  # the application takes it in the callback
        else:
            caller.host.reactor.callLater(0.1, path.select, factory)
        return path

    def attach(path: QuicPath) -> QuicPath:
        path.attach(Factory.forProtocol(lambda: theirs))
        return path

    results: dict[str, list[QuicPath | Failure]] = {"caller": [], "callee": []}
    called.addCallback(connected).addBoth(results["caller"].append)
    answered.addCallback(attach).addBoth(results["callee"].append)
    network.run(6)

    assert len(results["caller"]) == len(results["callee"]) == 1, results
    [caller_path], [callee_path] = results["caller"], results["callee"]
    assert isinstance(caller_path, QuicPath), caller_path
    assert isinstance(callee_path, QuicPath), callee_path
    # The race happened: the relay won while a direct handshake was under way.
    assert at_auth["relayed"]
    direct = at_auth["direct"]
    assert isinstance(direct, QuicPath)
    assert direct is not caller_path
    assert all(blackout.dropped for blackout in blackouts)
    assert at_auth["time"] < until
    # That handshake was dropped; only the relayed connection reached the application.
    assert direct.terminated
    assert callee_path is at_auth["callee_relayed"]
    callee_direct = at_auth["callee_direct"]
    assert (callee_direct is None) == (lost == "to-callee")
    if callee_direct is not None:
        assert callee_direct.terminated
    assert mine.made == theirs.made == 1
    assert caller.port.stats.paths == 2  # the relayed one and the direct one dropped
    assert callee.port.stats.paths == (1 if lost == "to-callee" else 2)
    # It moved to the direct pair at once, both ways.
    assert len(moves) == 1
    moved_at, written, old, new = moves[0]
    assert moved_at == at_auth["time"]
    assert old == tuple(RELAY)
    assert new == tuple(direct.remote)
    assert new[0] == network.nats["nat-b"].address
    assert written == (mine.chunk if select == "at-once" else 0)
    for app, peer_nat in ((mine, "nat-b"), (theirs, "nat-a")):
        transport: Any = app.transport
        assert isinstance(transport, QuicStreamTransport)
        assert not transport.relayed
        assert transport.getPeer().host == network.nats[peer_nat].address
    assert mine.lost is None
    assert theirs.lost is None
    # Data written before, during and after the blackout arrived intact, in order.
    assert min(mine.written_at) < until < max(mine.written_at)
    assert bytes(mine.data) == bytes(theirs.sent)
    assert bytes(theirs.data) == bytes(mine.sent)
    assert len(mine.data) == len(theirs.data) == total
    # Nothing goes through the relay any more; nothing is left but the connection.
    forwarded = relay.forwarded
    network.run(1)
    assert relay.forwarded == forwarded
    assert caller.port.sessions == callee.port.sessions == 0
    for peer in (caller, callee):  # the connection's one timer
        assert len(peer.host.reactor.getDelayedCalls()) == 1, peer.host.reactor.getDelayedCalls()
    close_peers(network, caller, callee)
