"""
The built-in traversal methods (:mod:`nattraverse.methods`): their plugin
registration, whether each applies, what each dials or listens on (on a
:class:`~twisted.internet.testing.MemoryReactorClock`), and that cancelling
an attempt stops it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import IPlugin, getPlugins
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from nattraverse.identity import Identity
from nattraverse.interfaces import CalleeContext, CallerContext, ITraversalMethod
from nattraverse.methods import BUILTIN_ORDER, available_methods, choose_methods
from nattraverse.methods.direct import DirectMethod, direct_targets
from nattraverse.methods.relay import RelayMethod
from nattraverse.methods.reversal import ReversalMethod
from nattraverse.rendezvous.client import Introduction, PeerInfo
from nattraverse.secure import PREAMBLE_SIZE, SecurePath, encode_preamble

ROOT = Path(__file__).resolve().parents[2]
CALLER = Identity.generate()
CALLEE = Identity.generate()
SESSION = bytes(range(16))
SECRET = bytes(range(32))
TOKEN = b"t" * 32


def _introduction(
    *, listen_port: int = 8479, private: tuple[tuple[str, int], ...] = (), relay: bool = True
) -> Introduction:
    return Introduction(
        session=SESSION,
        secret=SECRET,
        peer=PeerInfo(
            peer_id=CALLEE.peer_id,
            name="bob",
            observed=("192.0.2.20", 40000),
            listen_port=listen_port,
            private=private,
        ),
        methods=BUILTIN_ORDER,
        relay=relay,
    )


@dataclass
class FakeSession:
    """The caller's rendezvous session: records Reverse and Relay."""

    local: Any = field(default_factory=lambda: IPv4Address("TCP", "10.0.0.2", 50000))
    reversals: list[tuple[bytes, int]] = field(default_factory=list)
    relays: list[bytes] = field(default_factory=list)
    where: str = "192.0.2.1:8478"

    @property
    def local_address(self) -> Any:
        return self.local

    def reverse(self, session: bytes, port: int, host: str | None = None) -> Deferred[None]:
        self.reversals.append((session, port))
        return succeed(None)

    def relay(self, session: bytes) -> Deferred[tuple[bytes, float]]:
        self.relays.append(session)
        return succeed((TOKEN, 60.0))


class FakeEndpoint:
    """The rendezvous endpoint: connections wait until the test decides."""

    def __init__(self) -> None:
        self.attempts: list[Deferred[Any]] = []
        self.cancelled = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        attempt: Deferred[Any] = Deferred(cancel)
        self.attempts.append(attempt)
        return attempt


class RecordingPort:
    """A listening port that remembers being closed."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.stopped = False

    def getHost(self) -> Any:
        return self.host

    def stopListening(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)


class Reactor(MemoryReactorClock):
    """MemoryReactorClock whose listening ports remember being closed."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ports: list[RecordingPort] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        super().listenTCP(port, factory, backlog, interface)  # type: ignore[no-untyped-call]
        host_class = IPv6Address if ":" in interface else IPv4Address
        recording = RecordingPort(host_class("TCP", interface, 40123))
        self.ports.append(recording)
        return recording


def _caller(
    reactor: Any, introduction: Introduction | None = None, **kw: Any
) -> tuple[CallerContext, FakeSession, FakeEndpoint]:
    session = FakeSession(**kw)
    endpoint = FakeEndpoint()
    context = CallerContext(
        reactor=reactor,
        identity=CALLER,
        introduction=introduction or _introduction(),
        session=session,  # type: ignore[arg-type]
        rendezvous=endpoint,  # type: ignore[arg-type]
        peer="bob",
        timeout=7.0,
    )
    return context, session, endpoint


def _callee(reactor: Any) -> tuple[CalleeContext, FakeEndpoint]:
    endpoint = FakeEndpoint()
    context = CalleeContext(
        reactor=reactor,
        identity=CALLEE,
        name="bob",
        rendezvous=endpoint,  # type: ignore[arg-type]
        timeout=9.0,
    )
    return context, endpoint


def _cancel(d: Deferred[Any]) -> Failure:
    """Cancel *d* and return its failure (consumed, not logged as unhandled)."""
    d.cancel()
    outcome = _outcome(d)
    assert isinstance(outcome, Failure), outcome
    return outcome


def _outcome(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    return box[0] if box else None


# -- plugins ---------------------------------------------------------------------


def test_builtin_methods_are_plugins_in_order() -> None:
    """getPlugins finds direct, reversal, udp and relay, listed in that order."""
    found = available_methods()
    assert list(found)[:5] == ["direct", "reversal", "tcp", "udp", "relay"]
    assert isinstance(found["direct"], DirectMethod)
    assert isinstance(found["reversal"], ReversalMethod)
    assert isinstance(found["relay"], RelayMethod)


def test_builtin_methods_provide_the_interfaces() -> None:
    """Each built-in method provides ITraversalMethod and IPlugin."""
    plugins = list(getPlugins(ITraversalMethod))
    assert {p.name for p in plugins} >= set(BUILTIN_ORDER)
    for method in plugins:
        assert IPlugin.providedBy(method)
        verifyObject(ITraversalMethod, method)


def test_only_relay_is_a_last_resort_and_only_direct_listens() -> None:
    """The relay is staggered; the callee's listening port serves direct."""
    found = available_methods()
    assert [n for n in BUILTIN_ORDER if found[n].last_resort] == ["relay"]
    assert [n for n in BUILTIN_ORDER if found[n].callee_listens] == ["direct"]


def test_choose_methods_by_name_and_object() -> None:
    """Names are looked up among the plugins; objects are taken as they are."""
    mine = DirectMethod()
    mine.name = "custom"
    chosen = choose_methods(["relay", mine])
    assert [m.name for m in chosen] == ["relay", "custom"]
    assert chosen[1] is mine


@pytest.mark.parametrize(
    ("wanted", "error", "match"),
    [
        (["direct", "carrier-pigeon"], ValueError, "carrier-pigeon"),
        (["relay", "relay"], ValueError, "twice"),
        ([], ValueError, "at least one"),
        ("direct", TypeError, "sequence"),
        ([42], TypeError, "42"),
    ],
)
def test_choose_methods_refuses(wanted: Any, error: type[Exception], match: str) -> None:
    """Unknown, repeated, missing or mistyped methods are refused, naming them."""
    with pytest.raises(error, match=match):
        choose_methods(wanted)


def test_method_plugin_module_is_cheap() -> None:
    """Importing the methods' plugin file imports no reactor, crypto, TLS or endpoints."""
    probe = (
        "import json, sys\n"
        "import twisted.plugins.nattraverse_methods\n"
        "heavy = ['twisted.internet.reactor', 'cryptography', 'OpenSSL',"
        " 'twisted.internet.endpoints', 'nattraverse.secure', 'nattraverse.rendezvous.client']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
        timeout=60, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert json.loads(output.stdout) == []


# -- applies ---------------------------------------------------------------------


def test_direct_targets_observed_then_private_without_repeats() -> None:
    """Direct dials the observed address at the listen port, then each new private one."""
    peer = _introduction(
        private=(("10.0.0.5", 8479), ("192.0.2.20", 8479), ("10.0.0.6", 9000))
    ).peer
    assert direct_targets(peer) == [("192.0.2.20", 8479), ("10.0.0.5", 8479), ("10.0.0.6", 9000)]


def test_direct_applies_with_a_listening_port() -> None:
    """Direct applies when the callee announced a listening port."""
    context, _, _ = _caller(MemoryReactorClock())
    assert DirectMethod().applies(context) is None


def test_direct_applies_with_private_addresses_only() -> None:
    """Direct applies to private addresses even without a public listening port."""
    introduction = _introduction(listen_port=0, private=(("10.0.0.5", 8479),))
    context, _, _ = _caller(MemoryReactorClock(), introduction)
    assert DirectMethod().applies(context) is None


def test_direct_does_not_apply_without_port() -> None:
    """Direct does not apply to a callee with no port and no private address."""
    context, _, _ = _caller(MemoryReactorClock(), _introduction(listen_port=0))
    reason = DirectMethod().applies(context)
    assert reason is not None
    assert "listening port" in reason


def test_reversal_always_applies() -> None:
    """Reversal applies whatever the callee announced."""
    context, _, _ = _caller(MemoryReactorClock(), _introduction(listen_port=0, relay=False))
    assert ReversalMethod().applies(context) is None


def test_relay_applies_when_the_rendezvous_relays() -> None:
    """Relay applies exactly when the introduction says the rendezvous relays."""
    on, _, _ = _caller(MemoryReactorClock(), _introduction(relay=True))
    off, _, _ = _caller(MemoryReactorClock(), _introduction(relay=False))
    assert RelayMethod().applies(on) is None
    reason = RelayMethod().applies(off)
    assert reason is not None
    assert "does not relay" in reason


# -- attempts --------------------------------------------------------------------


def test_direct_dials_every_target_at_once() -> None:
    """Direct connects to the observed address and each private one in parallel."""
    reactor = MemoryReactorClock()
    introduction = _introduction(private=(("10.0.0.5", 8479),))
    context, _, _ = _caller(reactor, introduction)
    attempt = DirectMethod().attempt(context)
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [
        ("192.0.2.20", 8479),
        ("10.0.0.5", 8479),
    ]
    assert all(timeout == 7.0 for *_, timeout, _bind in reactor.tcpClients)
    _cancel(attempt)


def test_direct_sends_the_preamble() -> None:
    """A direct path opens with the introduction's preamble."""
    reactor = MemoryReactorClock()
    context, _, _ = _caller(reactor)
    attempt = DirectMethod().attempt(context)
    factory: Any = reactor.tcpClients[0][2]
    transport = StringTransport()
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.20", 8479))
    protocol.makeConnection(transport)
    assert transport.value()[:PREAMBLE_SIZE] == encode_preamble(SESSION, SECRET)
    _cancel(attempt)


def test_direct_cancel_stops_every_connection_attempt() -> None:
    """Cancelling direct stops connecting everywhere and leaves no timer."""
    reactor = MemoryReactorClock()
    context, _, _ = _caller(reactor, _introduction(private=(("10.0.0.5", 8479),)))
    attempt = DirectMethod().attempt(context)
    assert _cancel(attempt).check(CancelledError)
    assert all(connector.stoppedConnecting for connector in reactor.connectors)
    assert reactor.getDelayedCalls() == []


def test_direct_failure_on_every_address_names_them() -> None:
    """When every address fails, the error lists each one."""
    reactor = MemoryReactorClock()
    context, _, _ = _caller(reactor, _introduction(private=(("10.0.0.5", 8479),)))
    attempt = DirectMethod().attempt(context)
    from twisted.internet.error import ConnectionRefusedError

    factories: list[Any] = [client[2] for client in reactor.tcpClients]
    for factory in factories:
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    failure = _outcome(attempt)
    assert isinstance(failure, Failure)
    assert "192.0.2.20:8479" in str(failure.value)
    assert "10.0.0.5:8479" in str(failure.value)


def test_reversal_listens_and_asks_for_a_dial_back() -> None:
    """Reversal listens on a wildcard temporary port and sends Reverse with its number."""
    reactor = Reactor()
    context, session, _ = _caller(reactor)
    attempt = ReversalMethod().attempt(context)
    assert reactor.tcpServers[0][0] == 0
    assert reactor.tcpServers[0][3] == "0.0.0.0"
    assert session.reversals == [(SESSION, 40123)]
    _cancel(attempt)
    assert reactor.ports[0].stopped


def test_reversal_listens_on_ipv6_when_the_rendezvous_is_reached_over_ipv6() -> None:
    """Over an IPv6 rendezvous session, the temporary port listens on '::'."""
    reactor = Reactor()
    context, _, _ = _caller(reactor, local=IPv6Address("TCP", "2001:db8::2", 50000))
    _cancel(ReversalMethod().attempt(context))
    assert reactor.tcpServers[0][3] == "::"


def test_reversal_accepts_only_this_introduction() -> None:
    """The temporary port's paths accept only this session's preamble."""
    reactor = Reactor()
    context, _, _ = _caller(reactor)
    attempt = ReversalMethod().attempt(context)
    factory: Any = reactor.tcpServers[0][1]
    good = factory.buildProtocol(IPv4Address("TCP", "192.0.2.20", 1))
    assert isinstance(good, SecurePath)
    assert good._resolve is not None
    assert good._resolve(SESSION, encode_preamble(SESSION, SECRET)[20:]) is not None
    assert good._resolve(SESSION, b"\0" * 16) is None
    assert good._resolve(b"x" * 16, encode_preamble(SESSION, SECRET)[20:]) is None
    _cancel(attempt)


def test_reversal_cancel_closes_the_port_and_paths() -> None:
    """Cancelling reversal closes its temporary port and the connections on it."""
    reactor = Reactor()
    context, _, _ = _caller(reactor)
    attempt = ReversalMethod().attempt(context)
    factory: Any = reactor.tcpServers[0][1]
    path = factory.buildProtocol(IPv4Address("TCP", "192.0.2.20", 1))
    transport = StringTransport()
    path.makeConnection(transport)
    assert _cancel(attempt).check(CancelledError)
    assert reactor.ports[0].stopped
    assert transport.disconnecting
    assert reactor.getDelayedCalls() == []


def test_relay_asks_for_a_relay_and_joins_it() -> None:
    """Relay sends Relay for the session, then opens a fresh rendezvous connection."""
    reactor = MemoryReactorClock()
    context, session, endpoint = _caller(reactor)
    attempt = RelayMethod().attempt(context)
    assert session.relays == [SESSION]
    assert len(endpoint.attempts) == 1
    assert _cancel(attempt).check(CancelledError)
    assert endpoint.cancelled == 1
    assert reactor.getDelayedCalls() == []


# -- callee hooks ------------------------------------------------------------------


def test_direct_and_relay_do_nothing_on_introduce() -> None:
    """No built-in method opens a path for a bare introduction."""
    context, _ = _callee(MemoryReactorClock())
    for method in (DirectMethod(), ReversalMethod(), RelayMethod()):
        assert method.introduced(context, _introduction()) is None


def test_reversal_dials_back_with_the_preamble() -> None:
    """On DialBack the callee dials the given address and opens with the preamble."""
    reactor = MemoryReactorClock()
    context, _ = _callee(reactor)
    attempt = ReversalMethod().dial_back(context, _introduction(), "198.51.100.7", 40123)
    assert attempt is not None
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("198.51.100.7", 40123, 9.0)
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value()[:PREAMBLE_SIZE] == encode_preamble(SESSION, SECRET)
    assert _cancel(attempt).check(CancelledError)


def test_relay_offer_joins_without_preamble() -> None:
    """On RelayOffer the callee joins the relay (the caller sends the preamble)."""
    reactor = MemoryReactorClock()
    context, endpoint = _callee(reactor)
    attempt = RelayMethod().relay_offer(context, _introduction(), TOKEN, 60.0)
    assert attempt is not None
    assert len(endpoint.attempts) == 1
    _cancel(attempt)
    assert endpoint.cancelled == 1
    assert reactor.getDelayedCalls() == []


def test_other_hooks_do_nothing() -> None:
    """Direct ignores DialBack and RelayOffer; reversal ignores RelayOffer."""
    context, _ = _callee(MemoryReactorClock())
    assert DirectMethod().dial_back(context, _introduction(), "192.0.2.1", 1) is None
    assert DirectMethod().relay_offer(context, _introduction(), TOKEN, 1.0) is None
    assert ReversalMethod().relay_offer(context, _introduction(), TOKEN, 1.0) is None
    assert RelayMethod().dial_back(context, _introduction(), "192.0.2.1", 1) is None


# -- the callee's direct port ------------------------------------------------------


def _listener(reactor: Any, factory: Any = None) -> Any:
    from twisted.internet.protocol import Factory, Protocol

    from nattraverse._listener import PunchListener

    return PunchListener(
        reactor,
        FakeEndpoint(),  # type: ignore[arg-type]
        "bob",
        CALLEE,
        factory or Factory.forProtocol(Protocol),
        port=0,
        interface="127.0.0.1",
        methods=choose_methods(["direct"]),
        access_key=None,
        timeout=9.0,
        private=(),
    )


def _caller_introduction() -> Introduction:
    """What the callee is told of the caller."""
    return Introduction(
        session=SESSION,
        secret=SECRET,
        peer=PeerInfo(
            peer_id=CALLER.peer_id, name="", observed=("203.0.113.5", 5000), listen_port=0,
            private=(),
        ),
        methods=("direct",),
        relay=False,
    )  # fmt: skip


def test_direct_port_holds_a_connection_until_its_introduction() -> None:
    """A preamble for a session not introduced yet is held, unread, until Introduce comes."""
    clock = MemoryReactorClock()
    listener = _listener(clock)
    held: Any = listener._accept(IPv4Address("TCP", "203.0.113.5", 5000), "direct")
    transport: Any = StringTransport()
    held.makeConnection(transport)
    held.dataReceived(encode_preamble(SESSION, SECRET))
    assert transport.producerState == "paused"
    assert not held.path.connected
    listener.introduced(_caller_introduction())
    assert transport.producerState == "producing"
    assert held.path.connected
    assert held.path.secrets.method == "direct"
    assert held.path.secrets.expected == CALLER.peer_id
    assert not transport.disconnecting
    listener.stop()
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_direct_port_refuses_an_unknown_session_after_the_hold() -> None:
    """When no introduction comes, the held connection is refused at the end of the hold."""
    clock = MemoryReactorClock()
    listener = _listener(clock)
    held: Any = listener._accept(IPv4Address("TCP", "203.0.113.5", 5000), "direct")
    transport: Any = StringTransport()
    held.makeConnection(transport)
    held.dataReceived(encode_preamble(SESSION, SECRET))
    assert not transport.disconnecting
    clock.advance(5.0)
    assert transport.disconnecting
    assert listener._accepted == {}
    assert clock.getDelayedCalls() == []


def test_direct_port_refuses_a_wrong_tag_at_once() -> None:
    """A known session with a wrong tag (the opener lacks the secret) is closed at once."""
    clock = MemoryReactorClock()
    listener = _listener(clock)
    listener.introduced(_caller_introduction())
    held: Any = listener._accept(IPv4Address("TCP", "203.0.113.5", 5000), "direct")
    transport: Any = StringTransport()
    held.makeConnection(transport)
    held.dataReceived(encode_preamble(SESSION, b"not the secret"))
    assert transport.disconnecting
    listener.stop()
    assert clock.getDelayedCalls() == []


def test_pending_introductions_expire_and_are_bounded() -> None:
    """Introductions are kept for their TTL, and the oldest go beyond the cap."""
    from nattraverse import _listener as module

    clock = MemoryReactorClock()
    listener = _listener(clock)
    for index in range(module.MAX_PENDING + 3):
        session = index.to_bytes(16, "big")
        intro = _caller_introduction()
        listener.introduced(
            Introduction(session, intro.secret, intro.peer, intro.methods, intro.relay)
        )
    assert len(listener._pending) == module.MAX_PENDING
    assert (0).to_bytes(16, "big") not in listener._pending
    assert len(clock.getDelayedCalls()) == module.MAX_PENDING
    clock.advance(module.PENDING_TTL)
    assert listener._pending == {}
    assert clock.getDelayedCalls() == []


def test_direct_port_drops_a_silent_connection_after_the_hold() -> None:
    """A connection that sends no whole preamble within the hold is dropped."""
    clock = MemoryReactorClock()
    listener = _listener(clock)
    held: Any = listener._accept(IPv4Address("TCP", "203.0.113.5", 5000), "direct")
    transport: Any = StringTransport()
    held.makeConnection(transport)
    held.dataReceived(b"NTP1")
    clock.advance(5.0)
    assert transport.disconnecting
    assert not held.path.connected
    held.connectionLost(Failure(Exception("gone")))
    assert listener._accepted == {}
    assert clock.getDelayedCalls() == []
