"""
TCP punching candidates in the rendezvous protocol: ``tcp_private`` of
``Register`` and ``Connect``, carried in every peer record, and
:attr:`PeerInfo.tcp_candidates`.

No sockets: the real rendezvous (RendezvousFactory) and real clients
(RendezvousSession, Registration) joined in memory by twisted.test.iosim on
a task.Clock; the fake rendezvous of rendezvous_fakes.py stands in for a
server from before ``tcp_private``.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from nattraverse._types import Endpoint
from nattraverse.errors import InvalidRequest
from nattraverse.identity import Identity
from nattraverse.rendezvous.client import PeerInfo, RendezvousSession, open_session
from nattraverse.rendezvous.commands import (
    MAX_CANDIDATES,
    PROTOCOL_VERSION,
    Authenticate,
    Connect,
    Hello,
    Introduce,
    Lookup,
    Register,
)
from nattraverse.rendezvous.registration import Registration
from nattraverse.rendezvous.server import RendezvousFactory
from tests.deferreds import failed, succeeded
from tests.unit.rendezvous.rendezvous_fakes import (
    Handler,
    IntroducedPeer,
    Network,
    call,
    introduce_args,
)

IDENTITIES = [Identity.generate() for _ in range(2)]
SERVER = IPv4Address("TCP", "192.0.2.1", 8478)
CALLEE_HOST = "203.0.113.7"
CALLER_HOST = "198.51.100.20"
CALLEE_PRIVATE = [("10.0.0.5", 7001), ("fd00::5", 7001)]
CALLER_PRIVATE = [("10.1.0.2", 6001)]

BAD = [
    [("example.org", 7001)],
    [("10.0.0.5", 0)],
    [("10.0.0.5", 7001)] * (MAX_CANDIDATES + 1),
]


def wire(candidates: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{"host": host, "port": port} for host, port in candidates]


class Loop:
    """The real rendezvous on a Clock, and in-memory connections to it."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.factory = RendezvousFactory(self.clock, stun_port=3478)
        self.pumps: list[iosim.IOPump] = []

    def join(self, client: IProtocol, host: str) -> Endpoint:
        """Connect *client* from *host*; the address the server observes."""
        address = IPv4Address("TCP", host, 40000 + len(self.pumps))
        server = self.factory.buildProtocol(address)
        assert server is not None
        self.pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, True, SERVER, address),
                client,
                iosim.FakeTransport(client, False, address, SERVER),
                greet=False,
            )
        )
        return Endpoint(address.host, address.port)

    def flush(self) -> None:
        for _ in range(100):
            if not any([pump.flush(advanceClock=False) for pump in self.pumps]):  # noqa: C419
                return
        raise AssertionError("the in-memory network does not settle")

    def run(self, d: Deferred[Any]) -> Any:
        """Pump until nothing moves; what *d* fired with (a Failure included)."""
        out: list[Any] = []
        d.addBoth(out.append)
        self.flush()
        assert out, "no answer"
        return out[0]

    def session(
        self, identity: Identity, host: str, handler: Handler | None = None
    ) -> tuple[RendezvousSession, Endpoint]:
        """An open client session from *host*, and its observed address."""
        observed: list[Endpoint] = []
        d = open_session(self.clock, _Endpoint(self, host, observed), identity, handler=handler)
        session = self.run(d)
        assert isinstance(session, RendezvousSession), session
        return session, observed[0]

    def raw(self, identity: Identity, host: str) -> IntroducedPeer:
        """A bare AMP connection past Hello and Authenticate."""
        peer = IntroducedPeer()
        self.join(peer, host)
        hello = self.call(peer, Hello, version=PROTOCOL_VERSION)
        self.call(
            peer,
            Authenticate,
            public_key=identity.public_key_der,
            signature=identity.sign(hello["challenge"]),
        )
        return peer

    def call(
        self, conn: IntroducedPeer, command: type[amp.Command], /, **arguments: Any
    ) -> dict[str, Any]:
        """Send *command* on *conn*; its answer, or raise its error."""
        result = self.run(conn.callRemote(command, **arguments))  # type: ignore[no-untyped-call]
        if isinstance(result, Failure):
            result.raiseException()
        return cast(dict[str, Any], result)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, loop: Loop, host: str, observed: list[Endpoint]) -> None:
        self._loop = loop
        self._host = host
        self._observed = observed

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        client = protocolFactory.buildProtocol(SERVER)
        assert client is not None
        self._observed.append(self._loop.join(client, self._host))
        return succeed(client)


@pytest.fixture
def loop() -> Loop:
    return Loop()


def callee(loop: Loop, **register: Any) -> tuple[RendezvousSession, Endpoint, Handler]:
    """A session registered as "alice" (with *register*'s keywords), its observed address."""
    handler = Handler()
    session, observed = loop.session(IDENTITIES[0], CALLEE_HOST, handler)
    assert loop.run(session.register("alice", 0, [], **register)) > 0
    return session, observed, handler


# -- the round trips through the real rendezvous -----------------------------------


def test_register_then_lookup(loop: Loop) -> None:
    """tcp_private of Register reaches a Lookup, which makes the candidates."""
    _, observed, _ = callee(loop, tcp_private=CALLEE_PRIVATE)
    caller, _ = loop.session(IDENTITIES[1], CALLER_HOST)
    found = loop.run(caller.lookup("alice"))
    assert isinstance(found, PeerInfo), found
    assert found.tcp_private == tuple(Endpoint(*c) for c in CALLEE_PRIVATE)
    assert found.tcp_candidates == (observed, *found.tcp_private)


def test_connect_carries_both_sides(loop: Loop) -> None:
    """Connect answers the callee's tcp_private; Introduce gives the callee the caller's."""
    _, callee_observed, handler = callee(loop, tcp_private=CALLEE_PRIVATE)
    caller, caller_observed = loop.session(IDENTITIES[1], CALLER_HOST)
    introduction = loop.run(caller.connect("alice", 0, [], ["direct"], tcp_private=CALLER_PRIVATE))
    assert introduction.peer.tcp_private == tuple(Endpoint(*c) for c in CALLEE_PRIVATE)
    assert introduction.peer.tcp_candidates[0] == callee_observed
    (introduced,) = handler.introductions
    assert introduced.session == introduction.session
    assert introduced.peer.tcp_private == (Endpoint(*CALLER_PRIVATE[0]),)
    assert introduced.peer.tcp_candidates == (caller_observed, Endpoint(*CALLER_PRIVATE[0]))


def test_without_tcp_private_no_candidates(loop: Loop) -> None:
    """Peers that announce no tcp_private have none and no TCP candidates, either way."""
    _, _, handler = callee(loop)
    caller, _ = loop.session(IDENTITIES[1], CALLER_HOST)
    found = loop.run(caller.lookup("alice"))
    introduction = loop.run(caller.connect("alice", 0, [], ["direct"]))
    (introduced,) = handler.introductions
    for peer in (found, introduction.peer, introduced.peer):
        assert (peer.tcp_private, peer.tcp_candidates) == ((), ())


def test_tcp_private_independent_of_udp_private(loop: Loop) -> None:
    """tcp_private and udp_private travel side by side, neither taking the other's value."""
    callee(loop, udp_private=[("10.0.0.5", 5000)], tcp_private=[("10.0.0.5", 7001)])
    caller, _ = loop.session(IDENTITIES[1], CALLER_HOST)
    found = loop.run(caller.lookup("alice"))
    assert found.udp_private == (Endpoint("10.0.0.5", 5000),)
    assert found.tcp_private == (Endpoint("10.0.0.5", 7001),)


def test_old_client_register_and_connect(loop: Loop) -> None:
    """Register and Connect without tcp_private (an older client) give out an empty list."""
    alice = loop.raw(IDENTITIES[0], CALLEE_HOST)
    loop.call(alice, Register, name="alice", listen_port=0, private=[])
    bob = loop.raw(IDENTITIES[1], CALLER_HOST)
    assert loop.call(bob, Lookup, peer="alice")["tcp_private"] == []
    answer = loop.call(bob, Connect, peer="alice", listen_port=0, private=[], methods=["direct"])
    assert answer["tcp_private"] == []
    assert alice.introduced[0]["tcp_private"] == []


# -- refusals: the same as udp_private's ----------------------------------------------


def refusal(d: Deferred[Any]) -> str:
    """The InvalidRequest message *d* failed with."""
    return str(failed(d, InvalidRequest))


@pytest.mark.parametrize("bad", BAD)
def test_server_refuses_bad_register(loop: Loop, bad: list[tuple[str, int]]) -> None:
    """The server refuses malformed tcp_private of Register as it does udp_private."""
    peer = loop.raw(IDENTITIES[0], CALLEE_HOST)
    messages = {}
    for field in ("udp_private", "tcp_private"):
        with pytest.raises(InvalidRequest, match=field) as raised:
            loop.call(peer, Register, name="alice", listen_port=0, private=[], **{field: wire(bad)})
        messages[field] = str(raised.value)
    assert messages["tcp_private"] == messages["udp_private"].replace("udp_", "tcp_")


@pytest.mark.parametrize("bad", BAD)
def test_server_refuses_bad_connect(loop: Loop, bad: list[tuple[str, int]]) -> None:
    """The server refuses malformed tcp_private of Connect, introducing no one."""
    _, _, handler = callee(loop)
    peer = loop.raw(IDENTITIES[1], CALLER_HOST)
    messages = {}
    for field in ("udp_private", "tcp_private"):
        with pytest.raises(InvalidRequest, match=field) as raised:
            loop.call(
                peer,
                Connect,
                peer="alice",
                listen_port=0,
                private=[],
                methods=["direct"],
                **{field: wire(bad)},
            )
        messages[field] = str(raised.value)
    assert messages["tcp_private"] == messages["udp_private"].replace("udp_", "tcp_")
    assert handler.introductions == []


@pytest.mark.parametrize("bad", BAD)
def test_session_refuses_bad_tcp_private(
    session: RendezvousSession, network: Network, bad: list[tuple[str, int]]
) -> None:
    """register() and connect() refuse malformed tcp_private before sending anything."""
    for_udp = refusal(session.register("alice", 0, [], udp_private=bad))
    assert refusal(session.register("alice", 0, [], tcp_private=bad)) == for_udp.replace(
        "udp_", "tcp_"
    )
    assert "tcp_private" in refusal(session.connect("bob", 0, [], ["direct"], tcp_private=bad))
    network.flush()
    assert network.server.named(b"Register") == network.server.named(b"Connect") == []


@pytest.mark.parametrize("bad", BAD)
def test_registration_refuses_bad_tcp_private(
    clock: Clock, network: Network, identity: Identity, bad: list[tuple[str, int]]
) -> None:
    """Registration refuses malformed tcp_private at construction, as udp_private."""
    messages = {}
    for field in ("udp_private", "tcp_private"):
        hints: dict[str, Any] = {field: bad}
        with pytest.raises(InvalidRequest, match=field) as raised:
            Registration(
                clock,
                network.endpoint(),
                identity,
                "alice",
                listen_port=0,
                private=[],
                handler=Handler(),
                **hints,
            )
        messages[field] = str(raised.value)
    assert messages["tcp_private"] == messages["udp_private"].replace("udp_", "tcp_")


# -- the client against the fake rendezvous -------------------------------------------


@pytest.fixture
def session(
    clock: Clock, network: Network, identity: Identity, handler: Handler
) -> RendezvousSession:
    return succeeded(
        call(network, open_session(clock, network.endpoint(), identity, handler=handler))
    )


def test_session_sends_tcp_private(session: RendezvousSession, network: Network) -> None:
    """register() and connect() send tcp_private, canonical."""
    call(network, session.register("alice", 0, [], tcp_private=[("fd00:0::5", 7001)]))
    call(network, session.connect("bob", 0, [], ["direct"], tcp_private=[("10.0.0.2", 6001)]))
    assert network.server.named(b"Register")[0]["tcp_private"] == wire([("fd00::5", 7001)])
    assert network.server.named(b"Connect")[0]["tcp_private"] == wire([("10.0.0.2", 6001)])


def test_old_server_answers_parse(
    session: RendezvousSession, network: Network, handler: Handler
) -> None:
    """Lookup, Connect and Introduce without tcp_private (an older server) read as none."""
    assert "tcp_private" not in network.script.lookup
    found = succeeded(call(network, session.lookup("bob")))
    introduction = succeeded(call(network, session.connect("bob", 0, [], ["direct"])))
    succeeded(call(network, network.server.ask(Introduce, **introduce_args())))
    (introduced,) = handler.introductions
    for peer in (found, introduction.peer, introduced.peer):
        assert (peer.tcp_private, peer.tcp_candidates) == ((), ())


def test_server_tcp_private_read(session: RendezvousSession, network: Network) -> None:
    """A record's tcp_private becomes PeerInfo.tcp_private, canonical."""
    network.script.lookup["tcp_private"] = wire([("FD00::9", 7001)])
    found = succeeded(call(network, session.lookup("bob")))
    assert found.tcp_private == (Endpoint("fd00::9", 7001),)
    assert found.tcp_candidates == (Endpoint("198.51.100.9", 50000), Endpoint("fd00::9", 7001))


@pytest.mark.parametrize("bad", BAD)
def test_malformed_server_tcp_private_refused(
    session: RendezvousSession, network: Network, bad: list[tuple[str, int]]
) -> None:
    """A record whose tcp_private is malformed fails the answer, naming the field."""
    network.script.lookup["tcp_private"] = wire(bad)
    assert "Lookup.tcp_private" in refusal(call(network, session.lookup("bob")))


def test_introduce_with_malformed_tcp_private(
    session: RendezvousSession, network: Network, handler: Handler
) -> None:
    """An Introduce whose tcp_private is malformed is refused; the handler hears nothing."""
    args = introduce_args(tcp_private=wire([("10.0.0.9", 0)]))
    d = call(network, network.server.ask(Introduce, **args))
    assert "Introduce.tcp_private" in refusal(d)
    assert handler.introductions == []


def test_registration_resends_tcp_private(
    clock: Clock, network: Network, identity: Identity, handler: Handler
) -> None:
    """Registration sends tcp_private on its first and on every later registration."""
    registration = Registration(
        clock,
        network.endpoint(),
        identity,
        "alice",
        listen_port=0,
        private=[],
        handler=handler,
        retry_policy=lambda attempt: 5.0,
        tcp_private=[("10.0.0.2", 7001)],
    )
    registration.startService()
    network.flush()
    succeeded(registration.when_registered())
    network.server.drop()
    network.flush()
    clock.advance(5.0)
    network.flush()
    sent = [r["tcp_private"] for server in network.servers for r in server.named(b"Register")]
    assert sent == [wire([("10.0.0.2", 7001)])] * 2
    stopped = registration.stopService()
    network.flush()
    succeeded(stopped)
    assert clock.getDelayedCalls() == []


# -- PeerInfo.tcp_candidates ----------------------------------------------------------


def info(observed: tuple[str, int], *tcp_private: Endpoint) -> PeerInfo:
    return PeerInfo(IDENTITIES[0].peer_id, "bob", observed, 0, (), tcp_private=tcp_private)


def test_peer_info_default_has_no_tcp() -> None:
    """PeerInfo made without tcp_private has no TCP candidates."""
    plain = PeerInfo(IDENTITIES[0].peer_id, "bob", ("192.0.2.1", 1), 0, ())
    assert (plain.tcp_private, plain.tcp_candidates) == ((), ())


def test_candidates_observed_first() -> None:
    """The observed address comes first, then tcp_private in order."""
    a, b = Endpoint("10.0.0.1", 7001), Endpoint("10.0.0.2", 7001)
    assert info(("203.0.113.1", 40000), a, b).tcp_candidates == (
        Endpoint("203.0.113.1", 40000),
        a,
        b,
    )


def test_candidates_without_repeats() -> None:
    """A peer not behind NAT (observed among its host addresses) lists each address once."""
    a, b = Endpoint("192.0.2.7", 7001), Endpoint("10.0.0.2", 7001)
    assert info(("192.0.2.7", 7001), b, a, b).tcp_candidates == (a, b)
