"""
Relay first, then upgrade to a birthday path: the hard side (a caller behind
a random symmetric NAT) has a socket reached by birthday probing, and a child
session on it still checking or securing its direct QUIC handshake, when the
connection through the relay authenticates.  The relayed connection moves to
that socket's pair, on the simulated network, even when the application
closes the punching port when idle as soon as it gets the connection (what
the endpoint does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.punch.port import PunchingPort
from nattraverse.punch.session import PunchSession
from nattraverse.quic import QuicPath, QuicStreamTransport
from nattraverse.testing import Network
from tests.unit.punch.sim_peers import (
    RELAY,
    Exchange,
    FakeRelay,
    NatPeer,
    QuicBlackout,
    close_peers,
    make_network,
    nat_peer,
    opener,
    punch_with_relay,
)

SECRET = b"w" * 32
SESSION = b"x" * 16

#: Bytes each side writes once connected.
TOTAL = 64 * 1024


def child_session(caller: NatPeer) -> PunchSession | None:
    """The caller's session on the birthday socket that was reached, if any."""
    parent = caller.port.session_of(SESSION)
    if parent is None or parent.child is None:
        return None
    return parent.child.session_of(SESSION)


def opener_when(ready: Callable[[], bool], of: NatPeer, opened: list[str]) -> Any:
    """:func:`opener`, latching only once *ready* holds (polled every 10 ms)."""

    def open_leg() -> Deferred[Endpoint]:
        waiting: Deferred[None] = Deferred()

        def poll() -> None:
            if waiting.called:  # cancelled
                return
            if ready():
                waiting.callback(None)
            else:
                of.host.reactor.callLater(0.01, poll)

        poll()
        latched: Deferred[Endpoint] = waiting.addCallback(lambda _: opener(of, opened)())
        return latched

    return open_leg


@dataclass
class Race:
    """What the caller saw when the relayed connection authenticated, and after."""

    network: Network
    relay: FakeRelay
    caller: NatPeer
    callee: NatPeer
    blackout: QuicBlackout
    mine: Exchange
    theirs: Exchange
    #: What each side's punch fired with.
    results: dict[str, list[QuicPath | Failure]] = field(
        default_factory=lambda: {"caller": [], "callee": []}
    )
    #: The child port and its session, whether it had ended, and its direct path, at that moment.
    child: PunchingPort | None = None
    session: PunchSession | None = None
    session_ended: bool = True
    direct: QuicPath | None = None
    relayed: bool = False
    moves: list[tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=list)


def race(name: str, stage: str, *, close_when_idle: bool) -> Race:
    """
    The hard caller's relayed leg opens once its child session is at *stage*
    (``"checking"`` or ``"securing"``); the callee drops what comes from
    anywhere but the relay (the checks too while checking, else QUIC) until
    the relayed connection authenticates on the caller.  With
    *close_when_idle*, the caller closes its port when idle as it gets the
    connection.
    """
    if stage not in ("checking", "securing"):
        raise ValueError(f"stage must be 'checking' or 'securing', not {stage!r}")
    network, relay = make_network(name)
    caller = nat_peer(network, "hard", "symmetric")
    callee = nat_peer(network, "easy", "port-restricted")
    blackout = QuicBlackout(network, callee, RELAY, float("inf"), checks=stage == "checking")
    mine = Exchange(caller.host.reactor, TOTAL, seed=0)
    theirs = Exchange(callee.host.reactor, TOTAL, seed=100)
    outcome = Race(network, relay, caller, callee, blackout, mine, theirs)

    def ready() -> bool:
        session = child_session(caller)
        if session is None:
            return False
        return stage == "checking" or session.path is not None

    opened: list[str] = []
    called, answered = punch_with_relay(
        caller,
        callee,
        session=SESSION,
        secret=SECRET,
        delay=0.0,
        timeout=30,
        opened=opened,
        caller_opener=opener_when(ready, caller, opened),
    )

    def connected(path: QuicPath) -> QuicPath:
        # As the endpoint: the application gets the connection, the port
        # closes when idle; before the session gives the connection over.
        outcome.relayed = path.relayed
        parent = caller.port.session_of(SESSION)
        assert parent is not None
        outcome.child = parent.child
        outcome.session = child_session(caller)
        if outcome.session is not None:
            outcome.session_ended = outcome.session.ended
            outcome.direct = outcome.session.path
        blackout.until = network.clock.seconds()
        path.on_moved.append(lambda _, old, new: outcome.moves.append((old, new)))
        if close_when_idle:
            caller.port.close_when_idle()
        path.select(Factory.forProtocol(lambda: mine))
        return path

    def attach(path: QuicPath) -> QuicPath:
        path.attach(Factory.forProtocol(lambda: theirs))
        return path

    called.addCallback(connected).addBoth(outcome.results["caller"].append)
    answered.addCallback(attach).addBoth(outcome.results["callee"].append)
    network.run(10)
    return outcome


def check_moved_to_the_birthday_socket(outcome: Race, stage: str) -> QuicPath:
    """The race happened as set up; the connection moved to the child port and works."""
    network, caller, callee = outcome.network, outcome.caller, outcome.callee
    assert len(outcome.results["caller"]) == len(outcome.results["callee"]) == 1, outcome.results
    [mine_path], [theirs_path] = outcome.results["caller"], outcome.results["callee"]
    assert isinstance(mine_path, QuicPath), mine_path
    assert isinstance(theirs_path, QuicPath), theirs_path
    # The relay won while the child session was at *stage*.
    assert outcome.relayed
    assert outcome.blackout.dropped
    child, session = outcome.child, outcome.session
    assert child is not None
    assert session is not None
    assert not outcome.session_ended
    if stage == "securing":
        assert outcome.direct is not None
        assert outcome.direct.terminated  # the direct handshake gave way
    else:
        assert outcome.direct is None
    # It moved to the child socket's pair, once, and the child port carries it.
    assert outcome.moves == [(tuple(RELAY), tuple(callee.candidates[-1].address))]
    assert not mine_path.relayed
    assert not theirs_path.relayed
    assert theirs_path.remote[0] == network.nats["nat-hard"].address
    assert child.paths == 1
    # The punching port and the birthday socket, still open.
    assert {Endpoint(p.getHost().host, p.getHost().port) for p in caller.host.ports} == {
        caller.port.address,
        child.address,
    }
    assert caller.port.sessions == child.sessions == callee.port.sessions == 0
    # Data both ways, intact, on a connection that stays up.
    mine, theirs = outcome.mine, outcome.theirs
    assert mine.made == theirs.made == 1
    assert mine.lost is None, mine.lost
    assert theirs.lost is None, theirs.lost
    assert bytes(mine.data) == bytes(theirs.sent)
    assert bytes(theirs.data) == bytes(mine.sent)
    assert len(mine.data) == len(theirs.data) == TOTAL
    for app in (mine, theirs):
        transport: Any = app.transport
        assert isinstance(transport, QuicStreamTransport)
        assert not transport.relayed
    forwarded = outcome.relay.forwarded
    network.run(1)
    assert outcome.relay.forwarded == forwarded  # nothing through the relay any more
    return mine_path


@pytest.mark.parametrize("stage", ["checking", "securing"])
def test_closing_the_port_when_idle_keeps_the_birthday_session(stage: str) -> None:
    """The port closing when idle as the relay wins keeps the birthday session it moves to."""
    outcome = race(f"birthday-upgrade-idle-{stage}", stage, close_when_idle=True)
    check_moved_to_the_birthday_socket(outcome, stage)
    caller = outcome.caller
    transport: Any = outcome.mine.transport
    transport.loseConnection()
    outcome.network.run(10)
    # The connection ended: both ports closed, nothing left.
    assert outcome.mine.lost is not None
    assert outcome.theirs.lost is not None
    assert caller.host.ports == ()
    assert caller.port.paths == 0
    assert caller.port.sessions == 0
    assert caller.host.reactor.getDelayedCalls() == []
    close_peers(outcome.network, outcome.caller, outcome.callee)


def test_direct_handshake_giving_way_on_the_birthday_socket() -> None:
    """The child's direct handshake gives way to the relayed connection, which moves to its pair."""
    outcome = race("birthday-upgrade-handshake", "securing", close_when_idle=False)
    check_moved_to_the_birthday_socket(outcome, "securing")
    transport: Any = outcome.mine.transport
    transport.loseConnection()
    outcome.network.run(10)
    # The birthday socket closed with the connection; the punching port stays open.
    assert outcome.mine.lost is not None
    assert outcome.caller.host.ports == (outcome.caller.port._listening,)
    assert outcome.caller.port.paths == 0
    close_peers(outcome.network, outcome.caller, outcome.callee)
