"""
The binding of a peer's UDP socket to its rendezvous connection (issue 5):
the token table (nattraverse.rendezvous.udpbind), the server's side (Hello
issues a token, peer records carry the observed UDP address), the client's
``bind_udp`` and the registration's binding and keepalive.

No sockets: AMP connections in memory (twisted.test.iosim), the UDP socket
a StunDemultiplexer on a FakeDatagramTransport whose datagrams a real
BindingResponder answers, all on a task.Clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport, MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from nattraverse._types import Endpoint
from nattraverse.errors import InvalidRequest, LimitExceeded, RendezvousUnavailable
from nattraverse.identity import Identity
from nattraverse.rendezvous.client import PeerInfo, RendezvousSession, open_session
from nattraverse.rendezvous.commands import (
    MAX_CANDIDATES,
    PROTOCOL_VERSION,
    UDP_TOKEN_SIZE,
    Authenticate,
    Connect,
    Hello,
    Introduce,
    Lookup,
    Register,
    udp_credentials,
)
from nattraverse.rendezvous.registration import MAX_UDP_KEEPALIVE, Registration
from nattraverse.rendezvous.server import (
    RendezvousFactory,
    RendezvousServerProtocol,
    RendezvousService,
)
from nattraverse.rendezvous.udpbind import UdpBindings
from nattraverse.stun.attributes import Username
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.message import decode, encode
from nattraverse.stun.responder import BindingResponder, SocketKey
from nattraverse.stun.server import StunServer
from nattraverse.tap import Options, makeService
from tests.deferreds import failed, succeeded
from tests.unit.rendezvous.rendezvous_fakes import (
    Handler,
    IntroducedPeer,
    Network,
    call,
    introduce_args,
)

STUN = Endpoint("192.0.2.1", 3478)  # the fake rendezvous host, its Hello's STUN port
SECOND = Endpoint("192.0.2.1", 3479)  # its second STUN port, when Hello names it
SECOND_MAPPED = Endpoint("203.0.113.7", 41001)  # a NAT that maps per destination, +1
MAPPED = Endpoint("203.0.113.7", 41000)
REBOUND = Endpoint("203.0.113.7", 41999)
IDENTITIES = [Identity.generate() for _ in range(2)]


class Owner:
    """A token owner that records every address it is told of."""

    def __init__(self) -> None:
        self.seen: list[Endpoint] = []
        self.second: list[bool] = []

    def udp_bound(self, source: Endpoint, *, second: bool = False) -> None:
        self.seen.append(source)
        self.second.append(second)


def counting(start: int = 1) -> Any:
    """Predictable random bytes: 01 01..., 02 02..., wrapping after 255."""
    state = {"n": start}

    def draw(size: int) -> bytes:
        value = bytes([state["n"] % 256]) * size
        state["n"] += 1
        return value

    return draw


def binding_request(username: str, key: bytes) -> bytes:
    return encode(
        Method.BINDING,
        MessageClass.REQUEST,
        b"t" * 12,
        [Username(username)],
        integrity_key=key,
        fingerprint=True,
    )


# -- the token table ----------------------------------------------------------


def test_issue_gives_a_fresh_token() -> None:
    """Each token is UDP_TOKEN_SIZE bytes and differs from the others."""
    table = UdpBindings()
    tokens = {table.issue(Owner()) for _ in range(3)}
    assert len(tokens) == 3
    assert {len(token) for token in tokens} == {UDP_TOKEN_SIZE}


def test_lookup_gives_the_token_key() -> None:
    """The USERNAME of a token names it, and its key is the token's second half."""
    table = UdpBindings()
    username, key = udp_credentials(table.issue(Owner()))
    assert len(username) == 32
    assert table.lookup(username) == key


@pytest.mark.parametrize("username", ["", "alice", "00" * 16, "AB" * 16, "0" * 31, "0" * 33])
def test_lookup_of_unknown_username(username: str) -> None:
    """A USERNAME that is not a live token's lower-case hex names nothing."""
    table = UdpBindings()
    table.issue(Owner())
    assert table.lookup(username) is None


def test_observed_tells_the_owner() -> None:
    """observed() hands the source to the owner of the token the USERNAME names."""
    table = UdpBindings()
    owner = Owner()
    username, _ = udp_credentials(table.issue(owner))
    assert table.observed(username, MAPPED)
    assert owner.seen == [MAPPED]
    assert table.stats.observed == 1


def test_revoked_token_names_nothing() -> None:
    """After revoke the USERNAME names nothing and nobody is told."""
    table = UdpBindings()
    owner = Owner()
    token = table.issue(owner)
    username, _ = udp_credentials(token)
    assert table.revoke(token)
    assert table.lookup(username) is None
    assert not table.observed(username, MAPPED)
    assert owner.seen == []
    assert len(table) == 0
    assert not table.revoke(token)


def test_capacity_caps_live_tokens() -> None:
    """Tokens beyond the capacity are refused until one is revoked."""
    table = UdpBindings(capacity=2)
    first = table.issue(Owner())
    table.issue(Owner())
    with pytest.raises(LimitExceeded, match="2 UDP binding tokens"):
        table.issue(Owner())
    table.revoke(first)
    table.issue(Owner())
    assert table.stats.refused == 1


def test_injected_random_makes_the_tokens() -> None:
    """The token's first half comes from the injected source of random bytes."""
    table = UdpBindings(random=counting(7))
    assert table.issue(Owner())[:16] == b"\x07" * 16


def test_repeating_random_is_refused() -> None:
    """A source of random bytes that keeps repeating a live token is an error."""
    table = UdpBindings(random=lambda size: b"\x01" * size)
    table.issue(Owner())
    with pytest.raises(ValueError, match="repeating"):
        table.issue(Owner())


@pytest.mark.parametrize("capacity", [0, -1, True])
def test_bad_capacity(capacity: int) -> None:
    """The capacity must be a whole number of at least 1."""
    with pytest.raises(ValueError, match="capacity"):
        UdpBindings(capacity=capacity)


def test_key_depends_on_the_table_secret() -> None:
    """The same first half gets another key in a table with another secret."""

    def source(secret: int) -> Any:
        draws = iter([b"\x01" * 16, bytes([secret]) * 32])
        return lambda size: next(draws)[:size]

    one = UdpBindings(random=source(2)).issue(Owner())
    two = UdpBindings(random=source(3)).issue(Owner())
    assert one[:16] == two[:16]
    assert one[16:] != two[16:]


# -- the server ---------------------------------------------------------------


class ServerRig:
    """A RendezvousFactory on a Clock, in-memory connections to it, and a STUN responder
    sharing its token table."""

    def __init__(self, udp_bindings: UdpBindings | None = None, stun_second_port: int = 0) -> None:
        self.clock = Clock()
        self.factory = RendezvousFactory(
            self.clock,
            stun_port=3478,
            stun_second_port=stun_second_port,
            udp_bindings=udp_bindings,
        )
        self.stun = BindingResponder(bindings=self.factory.udp_bindings)
        self.pumps: list[iosim.IOPump] = []
        self.hellos: list[dict[str, Any]] = []

    def connect(
        self, host: str
    ) -> tuple[IntroducedPeer, RendezvousServerProtocol, iosim.FakeTransport]:
        address = IPv4Address("TCP", host, 40000 + len(self.pumps))
        server = self.factory.buildProtocol(address)
        assert server is not None
        peer = IntroducedPeer()
        server_address = IPv4Address("TCP", "198.51.100.1", 8478)
        server_io = iosim.FakeTransport(server, True, server_address, address)
        self.pumps.append(
            iosim.connect(
                server,
                server_io,
                peer,
                iosim.FakeTransport(peer, False, address, server_address),
            )
        )
        return peer, server, server_io

    def flush(self) -> None:
        for _ in range(100):
            if not any([pump.flush(advanceClock=False) for pump in self.pumps]):  # noqa: C419
                return
        raise AssertionError("the in-memory network does not settle")

    def call(
        self, conn: IntroducedPeer, command: type[amp.Command], **arguments: Any
    ) -> dict[str, Any]:
        d = conn.callRemote(command, **arguments)  # type: ignore[no-untyped-call]
        out: list[Any] = []
        d.addBoth(out.append)
        self.flush()
        assert out, "no answer"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return cast(dict[str, Any], out[0])

    def authenticated(
        self, identity: Identity, host: str
    ) -> tuple[IntroducedPeer, RendezvousServerProtocol, bytes]:
        """A connection past Hello and Authenticate, and its UDP token."""
        peer, server, _ = self.connect(host)
        hello = self.call(peer, Hello, version=PROTOCOL_VERSION)
        self.hellos.append(hello)
        self.call(
            peer,
            Authenticate,
            public_key=identity.public_key_der,
            signature=identity.sign(hello["challenge"]),
        )
        return peer, server, hello["udp_token"]

    def bind(self, token: bytes, source: Endpoint, *, second: bool = False) -> None:
        """
        An authenticated Binding request with *token* arrives from *source*
        (at the STUN service's second port when *second* is true).
        """
        username, key = udp_credentials(token)
        local = SocketKey(0, 1) if second else SocketKey(0, 0)
        assert self.stun.respond(binding_request(username, key), source, local) is not None


@pytest.fixture
def rig() -> ServerRig:
    return ServerRig()


def test_hello_issues_a_live_token(rig: ServerRig) -> None:
    """Hello's udp_token is a live token of the factory's table, fresh per connection."""
    _, _, first = rig.authenticated(IDENTITIES[0], "192.0.2.10")
    _, _, second = rig.authenticated(IDENTITIES[1], "192.0.2.11")
    assert len(first) == UDP_TOKEN_SIZE
    assert first != second
    username, key = udp_credentials(first)
    assert rig.factory.udp_bindings.lookup(username) == key


def test_token_dies_with_the_connection(rig: ServerRig) -> None:
    """When the connection is lost its token names nothing any more."""
    peer, server, token = rig.authenticated(IDENTITIES[0], "192.0.2.10")
    assert peer.transport is not None
    peer.transport.loseConnection()
    rig.flush()
    assert rig.factory.udp_bindings.lookup(udp_credentials(token)[0]) is None
    assert len(rig.factory.udp_bindings) == 0
    assert server.udp_token is None


def test_binding_records_the_observed_address(rig: ServerRig) -> None:
    """An authenticated Binding request sets the connection's udp_observed; the latest wins."""
    _, server, token = rig.authenticated(IDENTITIES[0], "192.0.2.10")
    before = server.udp_observed
    assert before is None
    rig.bind(token, MAPPED)
    assert server.udp_observed == MAPPED
    rig.bind(token, REBOUND)
    assert server.udp_observed == REBOUND


def test_ipv4_mapped_source_recorded_as_ipv4(rig: ServerRig) -> None:
    """A source seen on a dual-stack socket as IPv4-mapped IPv6 is recorded as IPv4."""
    _, server, token = rig.authenticated(IDENTITIES[0], "192.0.2.10")
    rig.bind(token, Endpoint("::ffff:203.0.113.7", 41000))
    assert server.udp_observed == MAPPED


def test_shared_table_is_used() -> None:
    """A table given as udp_bindings is the one Hello issues tokens from."""
    table = UdpBindings(capacity=8)
    shared = ServerRig(udp_bindings=table)
    assert shared.factory.udp_bindings is table
    shared.authenticated(IDENTITIES[0], "192.0.2.10")
    assert len(table) == 1


def registered(
    rig: ServerRig, **register: Any
) -> tuple[IntroducedPeer, RendezvousServerProtocol, bytes]:
    peer, server, token = rig.authenticated(IDENTITIES[0], "203.0.113.7")
    arguments: dict[str, Any] = {"name": "alice", "listen_port": 8000, "private": []}
    arguments.update(register)
    rig.call(peer, Register, **arguments)
    return peer, server, token


def test_lookup_without_binding(rig: ServerRig) -> None:
    """A peer that bound no UDP socket is looked up with an empty UDP address."""
    registered(rig)
    caller, _, _ = rig.authenticated(IDENTITIES[1], "192.0.2.20")
    found = rig.call(caller, Lookup, peer="alice")
    assert (found["udp_host"], found["udp_port"], found["udp_private"]) == ("", 0, [])


def test_lookup_shows_the_address_at_lookup_time(rig: ServerRig) -> None:
    """Lookup gives the address observed when it is asked, not when the peer registered."""
    _, _, token = registered(rig)
    caller, _, _ = rig.authenticated(IDENTITIES[1], "192.0.2.20")
    rig.bind(token, MAPPED)
    assert rig.call(caller, Lookup, peer="alice")["udp_port"] == MAPPED.port
    rig.bind(token, REBOUND)
    found = rig.call(caller, Lookup, peer="alice")
    assert (found["udp_host"], found["udp_port"]) == REBOUND


def test_lookup_gives_the_second_port_observation(rig: ServerRig) -> None:
    """A binding at the second STUN port is given out as udp_second; the first stays udp."""
    _, server, token = registered(rig)
    caller, _, _ = rig.authenticated(IDENTITIES[1], "192.0.2.20")
    found = rig.call(caller, Lookup, peer="alice")
    assert (found["udp_second_host"], found["udp_second_port"]) == ("", 0)
    rig.bind(token, MAPPED)
    rig.bind(token, SECOND_MAPPED, second=True)
    assert (server.udp_observed, server.udp_second_observed) == (MAPPED, SECOND_MAPPED)
    found = rig.call(caller, Lookup, peer="alice")
    assert (found["udp_host"], found["udp_port"]) == MAPPED
    assert (found["udp_second_host"], found["udp_second_port"]) == SECOND_MAPPED


def test_hello_names_the_second_port() -> None:
    """The factory's stun_second_port is Hello's."""
    rig = ServerRig(stun_second_port=3479)
    rig.authenticated(IDENTITIES[0], "192.0.2.10")
    assert rig.hellos[-1]["stun_second_port"] == 3479


def test_register_keeps_udp_private(rig: ServerRig) -> None:
    """The udp_private hints of Register are given out by Lookup."""
    registered(rig, udp_private=[{"host": "10.0.0.5", "port": 5000}])
    caller, _, _ = rig.authenticated(IDENTITIES[1], "192.0.2.20")
    found = rig.call(caller, Lookup, peer="alice")
    assert found["udp_private"] == [{"host": "10.0.0.5", "port": 5000}]


@pytest.mark.parametrize(
    "udp_private",
    [
        [{"host": "example.org", "port": 5000}],
        [{"host": "10.0.0.5", "port": 0}],
        [{"host": "10.0.0.5", "port": 5000}] * (MAX_CANDIDATES + 1),
    ],
)
def test_register_checks_udp_private(rig: ServerRig, udp_private: list[dict[str, Any]]) -> None:
    """Malformed udp_private hints are refused, naming the field."""
    peer, _, _ = rig.authenticated(IDENTITIES[0], "203.0.113.7")
    with pytest.raises(InvalidRequest, match="udp_private"):
        rig.call(peer, Register, name="alice", listen_port=0, private=[], udp_private=udp_private)


def test_connect_carries_both_udp_addresses(rig: ServerRig) -> None:
    """Connect answers the callee's UDP address; Introduce gives the callee the caller's."""
    callee, _, callee_token = registered(rig)
    caller, _, caller_token = rig.authenticated(IDENTITIES[1], "192.0.2.20")
    rig.bind(callee_token, MAPPED)
    rig.bind(caller_token, Endpoint("192.0.2.20", 6000))
    answer = rig.call(
        caller,
        Connect,
        peer="alice",
        listen_port=0,
        private=[],
        methods=["udp"],
        udp_private=[{"host": "10.1.0.2", "port": 6000}],
    )
    assert (answer["udp_host"], answer["udp_port"]) == MAPPED
    (introduced,) = callee.introduced
    assert (introduced["udp_host"], introduced["udp_port"]) == ("192.0.2.20", 6000)
    assert introduced["udp_private"] == [{"host": "10.1.0.2", "port": 6000}]


def test_connect_without_udp_private(rig: ServerRig) -> None:
    """A Connect without udp_private (an older client) introduces with none."""
    callee, _, _ = registered(rig)
    caller, _, _ = rig.authenticated(IDENTITIES[1], "192.0.2.20")
    rig.call(caller, Connect, peer="alice", listen_port=0, private=[], methods=["direct"])
    (introduced,) = callee.introduced
    assert (introduced["udp_host"], introduced["udp_port"], introduced["udp_private"]) == (
        "",
        0,
        [],
    )


# -- the client: bind_udp -----------------------------------------------------


class StunLoop:
    """
    The peer's UDP socket (a StunDemultiplexer on a FakeDatagramTransport)
    and the rendezvous' STUN service (a BindingResponder with a token
    table), joined by :meth:`deliver` through a NAT that maps the socket to
    :attr:`mapped`.
    """

    def __init__(self, clock: Clock, table: UdpBindings | None) -> None:
        self.demux = StunDemultiplexer(clock)
        self.transport = FakeDatagramTransport()
        self.demux.makeConnection(self.transport)
        self.responder = BindingResponder(bindings=table)
        self.mapped = MAPPED
        self.second_mapped = SECOND_MAPPED
        self.answering = True
        self.second_answers = True
        self.sent: list[bytes] = []
        self.destinations: list[Endpoint] = []

    def deliver(self) -> int:
        """
        Answer every datagram the socket sent (to the STUN port, or to the
        second port through the NAT's next mapping); how many there were.
        """
        written, self.transport.written = self.transport.written, []
        for data, address in written:
            second = tuple(address) == tuple(SECOND)
            assert second or tuple(address) == tuple(STUN)
            self.sent.append(data)
            self.destinations.append(Endpoint(*address))
            reply = self.responder.respond(
                data,
                self.second_mapped if second else self.mapped,
                SocketKey(0, 1) if second else SocketKey(0, 0),
            )
            if reply is not None and self.answering and not (second and not self.second_answers):
                self.demux.datagramReceived(reply.payload, tuple(address))
        return len(written)


@pytest.fixture
def owner() -> Owner:
    return Owner()


@pytest.fixture
def table(network: Network, owner: Owner) -> UdpBindings:
    """The token table of the STUN service; the fake rendezvous hands out its token."""
    table = UdpBindings()
    network.script.hello["udp_token"] = table.issue(owner)
    return table


@pytest.fixture
def loop(clock: Clock, table: UdpBindings) -> Iterator[StunLoop]:
    loop = StunLoop(clock, table)
    yield loop
    loop.demux.client.stop()


@pytest.fixture
def session(
    clock: Clock, network: Network, identity: Identity, handler: Handler, table: UdpBindings
) -> RendezvousSession:
    d = open_session(clock, network.endpoint(), identity, handler=handler)
    network.flush()
    return succeeded(d)


def test_bind_udp_fires_with_the_observed_address(
    session: RendezvousSession, loop: StunLoop, owner: Owner
) -> None:
    """bind_udp fires with the address the STUN service observed; the token's owner is told."""
    d = session.bind_udp(loop.demux)
    assert loop.deliver() == 1
    assert succeeded(d) == MAPPED
    assert owner.seen == [MAPPED]
    assert session.udp_observed == MAPPED


def test_bind_udp_request_is_authenticated(session: RendezvousSession, loop: StunLoop) -> None:
    """The request carries the token's USERNAME, MESSAGE-INTEGRITY and FINGERPRINT."""
    session.bind_udp(loop.demux)
    loop.deliver()
    (data,) = loop.sent
    message = decode(data)
    username, key = udp_credentials(session.hello.udp_token)
    attribute = message.get(Username)
    assert attribute is not None
    assert attribute.value == username
    message.check_integrity(key)
    assert data[-8:-6] == b"\x80\x28"  # FINGERPRINT last


def test_bind_udp_again_is_the_keepalive(
    session: RendezvousSession, loop: StunLoop, owner: Owner
) -> None:
    """A second bind_udp after a NAT rebinding fires with, and records, the new address."""
    session.bind_udp(loop.demux)
    loop.deliver()
    loop.mapped = REBOUND
    d = session.bind_udp(loop.demux)
    loop.deliver()
    assert succeeded(d) == REBOUND
    assert owner.seen == [MAPPED, REBOUND]


def test_bind_udp_without_stun_service(
    clock: Clock, network: Network, identity: Identity, loop: StunLoop
) -> None:
    """With stun_port 0 bind_udp fails at once, saying there is no STUN service; nothing sent."""
    network.script.hello["stun_port"] = 0
    d = open_session(clock, network.endpoint(), identity)
    network.flush()
    error = failed(succeeded(d).bind_udp(loop.demux), RendezvousUnavailable)
    assert "no STUN service" in str(error)
    assert loop.transport.written == []


def test_bind_udp_times_out(session: RendezvousSession, loop: StunLoop, clock: Clock) -> None:
    """Without an answer bind_udp fails after its timeout, naming the port; nothing is left."""
    d = session.bind_udp(loop.demux, timeout=2.0)
    loop.answering = False
    for _ in range(4):
        clock.advance(0.25)
    # A new transaction every 0.25 s (0, 0.25, 0.5, 0.75, 1.0), each
    # retransmitted 0.5 s after it was first sent.
    assert loop.deliver() == 8
    assert not d.called
    for _ in range(4):
        clock.advance(0.25)
    error = failed(d, RendezvousUnavailable)
    assert "within 2 s" in str(error)
    assert "UDP port 3478" in str(error)
    assert clock.getDelayedCalls() == []
    assert loop.demux.client.pending == 0


def test_bind_udp_survives_lost_datagrams(
    session: RendezvousSession, loop: StunLoop, clock: Clock
) -> None:
    """Parallel transactions: when the first request is lost, a later one binds within 0.25 s."""
    d = session.bind_udp(loop.demux, timeout=3.0)
    loop.answering = False
    assert loop.deliver() == 1
    loop.answering = True
    clock.advance(0.25)
    loop.deliver()
    assert succeeded(d) == MAPPED
    assert clock.getDelayedCalls() == []
    assert loop.demux.client.pending == 0


def test_unauthenticated_answer_is_not_accepted(
    session: RendezvousSession, clock: Clock, table: UdpBindings
) -> None:
    """An answer without integrity (a STUN server that knows no token) is dropped: time out."""
    loop = StunLoop(clock, None)
    d = session.bind_udp(loop.demux)
    loop.deliver()
    assert loop.demux.client.stats.integrity_failed == 1
    clock.advance(3.0)
    failed(d, RendezvousUnavailable)
    assert clock.getDelayedCalls() == []


def test_unauthenticated_401_is_not_believed(
    clock: Clock, network: Network, identity: Identity, loop: StunLoop
) -> None:
    """A 401 (which carries no integrity, so anyone could forge it) is dropped: time out."""
    # The right USERNAME with the wrong key: the server's integrity check fails.
    token = network.script.hello["udp_token"]
    network.script.hello["udp_token"] = token[:16] + b"x" * 16
    session = succeeded(call(network, open_session(clock, network.endpoint(), identity)))
    d = session.bind_udp(loop.demux)
    loop.deliver()
    assert loop.responder.stats.errors_by_code == {401: 1}
    clock.advance(3.0)
    failed(d, RendezvousUnavailable)
    assert clock.getDelayedCalls() == []


def test_bind_udp_cancel_leaves_nothing(
    session: RendezvousSession, loop: StunLoop, clock: Clock
) -> None:
    """Cancelling bind_udp stops the retransmissions and the timeout."""
    d = session.bind_udp(loop.demux)
    d.cancel()
    failed(d, CancelledError)
    assert clock.getDelayedCalls() == []
    assert loop.demux.client.pending == 0


def test_bind_udp_on_a_closed_session(session: RendezvousSession, loop: StunLoop) -> None:
    """A closed session cannot bind: it fails at once."""
    session.close()
    failed(session.bind_udp(loop.demux), RendezvousUnavailable)
    assert loop.transport.written == []


def test_bind_udp_without_port(session: RendezvousSession, clock: Clock) -> None:
    """A demultiplexer that is not listening fails bind_udp, saying so."""
    demux = StunDemultiplexer(clock)
    error = failed(session.bind_udp(demux), RendezvousUnavailable)
    assert "cannot send" in str(error)
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("timeout", [0, -1.0, math.inf, math.nan])
def test_bind_udp_checks_timeout(
    session: RendezvousSession, loop: StunLoop, timeout: float
) -> None:
    """The timeout must be a positive number of seconds."""
    failed(session.bind_udp(loop.demux, timeout=timeout), ValueError)


def test_register_sends_udp_private(session: RendezvousSession, network: Network) -> None:
    """register(udp_private=...) sends the hints."""
    call(network, session.register("alice", 0, [], udp_private=[("10.0.0.2", 5000)]))
    assert network.server.named(b"Register")[0]["udp_private"] == [
        {"host": "10.0.0.2", "port": 5000}
    ]


def test_connect_sends_udp_private(session: RendezvousSession, network: Network) -> None:
    """connect(udp_private=...) sends the hints."""
    call(network, session.connect("bob", 0, [], ["udp"], udp_private=[("10.0.0.2", 5000)]))
    assert network.server.named(b"Connect")[0]["udp_private"] == [
        {"host": "10.0.0.2", "port": 5000}
    ]


def test_udp_private_checked_before_sending(session: RendezvousSession, network: Network) -> None:
    """Malformed udp_private fails with InvalidRequest naming it; nothing is sent."""
    d = session.connect("bob", 0, [], ["udp"], udp_private=[("example.org", 5000)])
    assert "udp_private" in str(failed(d, InvalidRequest))
    assert network.server.named(b"Connect") == []


def test_connect_answer_carries_udp(session: RendezvousSession, network: Network) -> None:
    """The callee's observed UDP address and its hints become PeerInfo.udp and udp_private."""
    network.script.connect.update(
        udp_host="198.51.100.9", udp_port=50001, udp_private=[{"host": "10.0.0.9", "port": 5000}]
    )
    introduction = succeeded(call(network, session.connect("bob", 0, [], ["udp"])))
    assert introduction.peer.udp == Endpoint("198.51.100.9", 50001)
    assert introduction.peer.udp_private == (Endpoint("10.0.0.9", 5000),)


def test_lookup_without_udp(session: RendezvousSession, network: Network) -> None:
    """An empty UDP address is None."""
    info = succeeded(call(network, session.lookup("bob")))
    assert (info.udp, info.udp_private) == (None, ())


@pytest.mark.parametrize(
    "fields",
    [
        {"udp_host": "198.51.100.9", "udp_port": 0},
        {"udp_host": "", "udp_port": 5000},
        {"udp_host": "example.org", "udp_port": 5000},
        {"udp_private": [{"host": "10.0.0.9", "port": 0}]},
    ],
)
def test_malformed_udp_fields_refused(
    session: RendezvousSession, network: Network, fields: dict[str, Any]
) -> None:
    """A UDP address or hint that is not an IP address and port fails the answer."""
    network.script.lookup.update(fields)
    assert "udp" in str(failed(call(network, session.lookup("bob")), InvalidRequest))


def test_introduce_carries_the_caller_udp(
    session: RendezvousSession, network: Network, handler: Handler
) -> None:
    """Introduce hands the handler the caller's observed UDP address and hints."""
    args = introduce_args(
        udp_host="198.51.100.9", udp_port=50001, udp_private=[{"host": "10.0.0.9", "port": 5000}]
    )
    succeeded(call(network, network.server.ask(Introduce, **args)))
    (introduction,) = handler.introductions
    assert introduction.peer.udp == Endpoint("198.51.100.9", 50001)
    assert introduction.peer.udp_private == (Endpoint("10.0.0.9", 5000),)


def test_introduce_and_connect_carry_the_second_observation(
    session: RendezvousSession, network: Network, handler: Handler
) -> None:
    """udp_second_host/port become PeerInfo.udp_second, on both sides of an introduction."""
    second = {"udp_second_host": "198.51.100.9", "udp_second_port": 50002}
    args = introduce_args(udp_host="198.51.100.9", udp_port=50001, **second)
    succeeded(call(network, network.server.ask(Introduce, **args)))
    assert handler.introductions[0].peer.udp_second == Endpoint("198.51.100.9", 50002)
    network.script.connect.update(udp_host="198.51.100.9", udp_port=50001, **second)
    introduction = succeeded(call(network, session.connect("bob", 0, [], ["udp"])))
    assert introduction.peer.udp_second == Endpoint("198.51.100.9", 50002)


def test_peer_info_defaults() -> None:
    """PeerInfo made without the UDP fields has none."""
    info = PeerInfo(IDENTITIES[0].peer_id, "bob", ("192.0.2.1", 1), 0, ())
    assert (info.udp, info.udp_private) == (None, ())


def test_hello_token_not_in_repr(session: RendezvousSession) -> None:
    """The token, a credential, does not show in ServerHello's repr."""
    assert session.hello.udp_token.hex() not in repr(session.hello)
    assert str(session.hello.udp_token) not in repr(session.hello)


# -- the registration ---------------------------------------------------------


def timers(clock: Clock) -> list[str]:
    """The names of the functions the clock's pending calls will call."""
    return [
        getattr(cast(DelayedCall, pending).func, "__name__", "?")
        for pending in clock.getDelayedCalls()
    ]


def registering(
    clock: Clock,
    network: Network,
    identity: Identity,
    handler: Handler,
    loop: StunLoop,
    **kwargs: Any,
) -> Registration:
    registration = Registration(
        clock,
        network.endpoint(),
        identity,
        "alice",
        listen_port=0,
        private=[],
        handler=handler,
        retry_policy=lambda attempt: 5.0,
        udp=loop.demux,
        **kwargs,
    )
    registration.startService()
    network.flush()
    return registration


def registers(network: Network) -> list[dict[str, Any]]:
    return [request for server in network.servers for request in server.named(b"Register")]


def stop(registration: Registration, network: Network) -> None:
    stopped = registration.stopService()
    network.flush()
    succeeded(stopped)


@pytest.fixture
def udp_registered(
    clock: Clock, network: Network, identity: Identity, handler: Handler, loop: StunLoop
) -> Iterator[Registration]:
    registration = registering(
        clock, network, identity, handler, loop, udp_private=[("10.0.0.2", 5000)]
    )
    loop.deliver()
    network.flush()
    succeeded(registration.when_registered())
    yield registration
    if registration.running:
        stop(registration, network)


def test_binds_before_register(
    clock: Clock,
    network: Network,
    identity: Identity,
    handler: Handler,
    loop: StunLoop,
    owner: Owner,
) -> None:
    """The UDP socket is bound first; Register follows the binding's answer."""
    registration = registering(clock, network, identity, handler, loop)
    assert registers(network) == []
    assert loop.deliver() == 1
    network.flush()
    assert len(registers(network)) == 1
    assert owner.seen == [MAPPED]
    assert registration.udp_observed == MAPPED
    stop(registration, network)


def test_register_carries_udp_private(udp_registered: Registration, network: Network) -> None:
    """Register carries the socket's host addresses."""
    assert registers(network)[0]["udp_private"] == [{"host": "10.0.0.2", "port": 5000}]


def test_failed_binding_still_registers(
    clock: Clock, network: Network, identity: Identity, handler: Handler, loop: StunLoop
) -> None:
    """Without an answer the registration goes on after the bind timeout, logging a warning."""
    loop.answering = False
    registration = registering(clock, network, identity, handler, loop)
    clock.advance(3.0)
    network.flush()
    succeeded(registration.when_registered())
    assert registration.udp_observed is None
    stop(registration, network)
    assert clock.getDelayedCalls() == []


def test_failed_binding_retried_on_keepalive(
    clock: Clock, network: Network, identity: Identity, handler: Handler, loop: StunLoop
) -> None:
    """After a failed first binding it is tried again after 1 s, not a whole keepalive."""
    loop.answering = False
    registration = registering(clock, network, identity, handler, loop, udp_keepalive=10.0)
    clock.advance(3.0)
    network.flush()
    loop.deliver()
    loop.answering = True
    clock.advance(0.9)
    assert loop.deliver() == 0
    clock.advance(0.1)
    network.flush()
    loop.deliver()
    assert registration.udp_observed == MAPPED
    stop(registration, network)


def test_keepalive_rebinds_on_schedule(
    udp_registered: Registration, loop: StunLoop, clock: Clock, network: Network
) -> None:
    """Every udp_keepalive seconds the socket is bound again."""
    sent = len(loop.sent)
    for _ in range(3):
        clock.advance(udp_registered.udp_keepalive - 0.1)
        assert loop.deliver() == 0
        clock.advance(0.1)
        network.flush()
        assert loop.deliver() == 1
    assert len(loop.sent) == sent + 3


def test_keepalive_follows_a_nat_rebinding(
    udp_registered: Registration, loop: StunLoop, clock: Clock, network: Network, owner: Owner
) -> None:
    """A keepalive after the NAT changed the mapping updates udp_observed, here and there."""
    loop.mapped = REBOUND
    clock.advance(udp_registered.udp_keepalive)
    network.flush()
    loop.deliver()
    assert udp_registered.udp_observed == REBOUND
    assert owner.seen[-1] == REBOUND


def test_stop_leaves_no_timer(
    udp_registered: Registration, network: Network, clock: Clock, loop: StunLoop
) -> None:
    """Stopping cancels the keepalive timer."""
    stop(udp_registered, network)
    assert clock.getDelayedCalls() == []
    clock.advance(60.0)
    assert loop.deliver() == 0


def test_stop_during_keepalive_binding(
    udp_registered: Registration, network: Network, clock: Clock, loop: StunLoop
) -> None:
    """Stopping while a keepalive waits for its answer cancels it and its retransmissions."""
    clock.advance(udp_registered.udp_keepalive)
    assert loop.demux.client.pending == 1
    stop(udp_registered, network)
    assert loop.demux.client.pending == 0
    assert clock.getDelayedCalls() == []


def test_stop_during_first_binding(
    clock: Clock, network: Network, identity: Identity, handler: Handler, loop: StunLoop
) -> None:
    """Stopping while the first binding is pending leaves nothing behind, registers nothing."""
    registration = registering(clock, network, identity, handler, loop)
    assert loop.demux.client.pending == 1
    stop(registration, network)
    assert loop.demux.client.pending == 0
    assert clock.getDelayedCalls() == []
    assert registers(network) == []


def test_connection_loss_stops_the_keepalive(
    udp_registered: Registration, network: Network, clock: Clock, loop: StunLoop
) -> None:
    """When the connection is lost the keepalive and its binding stop with it."""
    clock.advance(udp_registered.udp_keepalive)
    assert loop.demux.client.pending == 1
    network.server.drop()
    network.flush()
    assert loop.demux.client.pending == 0
    assert udp_registered.udp_observed is None
    assert "_keepalive" not in timers(clock)


def test_reconnection_binds_again(
    udp_registered: Registration, network: Network, clock: Clock, loop: StunLoop
) -> None:
    """After a reconnection the socket is bound again before Register."""
    network.server.drop()
    network.flush()
    clock.advance(5.0)
    network.flush()
    assert len(registers(network)) == 1
    assert loop.deliver() == 1
    network.flush()
    assert len(registers(network)) == 2
    assert udp_registered.udp_observed == MAPPED


@pytest.mark.parametrize("keepalive", [0, -1.0, MAX_UDP_KEEPALIVE + 0.5, math.nan, math.inf, True])
def test_keepalive_out_of_range(
    clock: Clock, network: Network, identity: Identity, handler: Handler, keepalive: float
) -> None:
    """A keepalive interval above 25 s or not above 0 is refused."""
    with pytest.raises(ValueError, match="udp_keepalive"):
        Registration(
            clock,
            network.endpoint(),
            identity,
            "alice",
            listen_port=0,
            private=[],
            handler=handler,
            udp_keepalive=keepalive,
        )


def test_bad_udp_private_refused(
    clock: Clock, network: Network, identity: Identity, handler: Handler
) -> None:
    """Malformed udp_private hints are refused at construction."""
    with pytest.raises(InvalidRequest, match="udp_private"):
        Registration(
            clock,
            network.endpoint(),
            identity,
            "alice",
            listen_port=0,
            private=[],
            handler=handler,
            udp_private=[("example.org", 5000)],
        )


def test_without_udp_no_binding(
    clock: Clock, network: Network, identity: Identity, handler: Handler
) -> None:
    """Without a UDP socket nothing is bound and no keepalive runs."""
    registration = Registration(
        clock, network.endpoint(), identity, "alice", listen_port=0, private=[], handler=handler
    )
    registration.startService()
    network.flush()
    succeeded(registration.when_registered())
    assert registration.udp_observed is None
    assert "_keepalive" not in timers(clock)
    stop(registration, network)


# -- twistd natrendezvous -----------------------------------------------------


def test_tap_shares_one_table() -> None:
    """makeService gives the STUN server and the rendezvous the same token table."""
    options = Options()
    options.parseOptions(["--max-connections", "7"])  # type: ignore[no-untyped-call]
    top = makeService(options, MemoryReactorClock())
    stun = top.getServiceNamed("stun")  # type: ignore[attr-defined]
    rendezvous = top.getServiceNamed("rendezvous")  # type: ignore[attr-defined]
    assert isinstance(stun, StunServer)
    assert isinstance(rendezvous, RendezvousService)
    table = rendezvous.factory.udp_bindings
    assert stun.responder.bindings is table
    assert table.capacity == 7


def test_open_session_binds_while_authenticating(
    clock: Clock, network: Network, identity: Identity, table: UdpBindings, loop: StunLoop
) -> None:
    """open_session(udp=...) sends the binding right after Hello; the session knows the address."""
    d = open_session(clock, network.endpoint(), identity, udp=loop.demux)
    network.flush()
    assert not d.called  # authenticated, but the binding is not answered yet
    assert loop.deliver() == 1
    session = succeeded(d)
    assert session.udp_observed == MAPPED
    assert session.udp_error is None
    session.close()


def test_open_session_binds_at_the_second_port_too(
    clock: Clock,
    network: Network,
    identity: Identity,
    table: UdpBindings,
    loop: StunLoop,
    owner: Owner,
) -> None:
    """With a second STUN port in Hello, the socket binds there right after the STUN port."""
    network.script.hello["stun_second_port"] = SECOND.port
    d = open_session(clock, network.endpoint(), identity, udp=loop.demux)
    network.flush()
    assert loop.deliver() == 2
    assert loop.destinations == [STUN, SECOND]  # in that order: the NAT allocates so
    session = succeeded(d)
    assert session.udp_observed == MAPPED
    assert session.udp_second_observed == SECOND_MAPPED
    assert owner.seen == [MAPPED, SECOND_MAPPED]
    assert owner.second == [False, True]
    session.close()


def test_a_silent_second_port_does_not_fail_the_binding(
    clock: Clock, network: Network, identity: Identity, table: UdpBindings, loop: StunLoop
) -> None:
    """No answer from the second port: the session binds, without a second address."""
    network.script.hello["stun_second_port"] = SECOND.port
    loop.second_answers = False
    d = open_session(clock, network.endpoint(), identity, udp=loop.demux, udp_timeout=1.0)
    network.flush()
    for _ in range(8):
        loop.deliver()
        clock.advance(0.25)
    session = succeeded(d)
    assert session.udp_observed == MAPPED
    assert session.udp_second_observed is None
    assert session.udp_error is None
    session.close()
    network.flush()
    assert loop.demux.client.pending == 0


def test_the_keepalive_binds_at_the_stun_port_only(
    session: RendezvousSession, loop: StunLoop
) -> None:
    """bind_udp without second=True sends one request, to the STUN port."""
    session.hello = replace(session.hello, stun_second_port=SECOND.port)
    d = session.bind_udp(loop.demux)
    assert loop.deliver() == 1
    assert loop.destinations == [STUN]
    assert succeeded(d) == MAPPED


def test_open_session_survives_a_failed_binding(
    clock: Clock, network: Network, identity: Identity, table: UdpBindings, loop: StunLoop
) -> None:
    """A binding without an answer does not fail the session: udp_error says why."""
    loop.answering = False
    d = open_session(clock, network.endpoint(), identity, udp=loop.demux, udp_timeout=1.0)
    network.flush()
    for _ in range(4):
        clock.advance(0.25)
    session = succeeded(d)
    assert session.udp_observed is None
    assert isinstance(session.udp_error, RendezvousUnavailable)
    assert "within 1 s" in str(session.udp_error)
    session.close()
    network.flush()
    assert loop.demux.client.pending == 0
