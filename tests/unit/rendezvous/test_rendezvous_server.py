"""
The rendezvous server protocol over in-memory AMP connections
(twisted.test.iosim) on a task.Clock, with a fake relay hub and an injected
random source.  No sockets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from nattraverse.errors import (
    InvalidRequest,
    LimitExceeded,
    NameTaken,
    NotAuthenticated,
    PeerAuthenticationFailed,
    PeerNotFound,
    RelayRefused,
    ReversalRefused,
)
from nattraverse.identity import Identity, PeerId
from nattraverse.rendezvous.commands import (
    PROTOCOL_VERSION,
    Authenticate,
    Connect,
    DialBack,
    Hello,
    Introduce,
    Lookup,
    Refresh,
    Register,
    Relay,
    RelayJoin,
    RelayOffer,
    Reverse,
    access_proof,
)
from nattraverse.rendezvous.registry import PeerRecord
from nattraverse.rendezvous.server import (
    MAX_BOX_SIZE,
    MAX_REVERSALS,
    MAX_UNANSWERED,
    RendezvousFactory,
    RendezvousLimits,
    RendezvousServerProtocol,
    RendezvousService,
)

T = TypeVar("T")
SERVER = IPv4Address("TCP", "198.51.100.1", 8478)
CALLER_TOKEN = b"C" * 32
CALLEE_TOKEN = b"E" * 32
IDENTITIES = [Identity.generate() for _ in range(3)]


class FakeRandom:
    """Distinct, predictable bytes: 01 01 01..., 02 02 02..."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)

    def __call__(self, size: int) -> bytes:
        return bytes([next(self.counter) % 256]) * size


class Leg(Protocol):
    """What a joined relay connection switches to: records the bytes."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class FakeHub:
    """Records allocations and joins; RelayHub's API."""

    lifetime = 300.0

    def __init__(self) -> None:
        self.allocated: list[tuple[bytes, PeerId, PeerId]] = []
        self.legs: list[tuple[bytes, PeerId, Leg]] = []
        self.closed = False
        self.error: Exception | None = None

    def allocate(self, session: bytes, caller: PeerId, callee: PeerId) -> tuple[bytes, bytes]:
        if self.error is not None:
            raise self.error
        self.allocated.append((session, caller, callee))
        return CALLER_TOKEN, CALLEE_TOKEN

    def join(self, token: bytes, peer: PeerId) -> Protocol:
        if token not in (CALLER_TOKEN, CALLEE_TOKEN):
            raise RelayRefused("unknown, expired or already used relay token")
        leg = Leg()
        self.legs.append((token, peer, leg))
        return leg

    def close(self) -> None:
        self.closed = True


class Peer(amp.AMP):
    """A minimal client: records what the server sends it."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.introduced: list[dict[str, Any]] = []
        self.dial_backs: list[dict[str, Any]] = []
        self.offers: list[dict[str, Any]] = []
        self.lost = False

    @Introduce.responder
    def _introduce(self, **arguments: Any) -> dict[str, Any]:
        self.introduced.append(arguments)
        return {}

    @DialBack.responder
    def _dial_back(self, **arguments: Any) -> dict[str, Any]:
        self.dial_backs.append(arguments)
        return {}

    @RelayOffer.responder
    def _relay_offer(self, **arguments: Any) -> dict[str, Any]:
        self.offers.append(arguments)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class Silent(Peer):
    """A client that never answers the server's requests."""

    @Introduce.responder
    def _introduce(self, **arguments: Any) -> Deferred[dict[str, Any]]:  # type: ignore[override]
        self.introduced.append(arguments)
        return Deferred()


@dataclass
class Conn:
    """One in-memory connection: the client, the server protocol, the pump."""

    peer: Peer
    server: RendezvousServerProtocol
    pump: iosim.IOPump
    server_io: iosim.FakeTransport
    identity: Identity


class Rig:
    """A RendezvousFactory on a Clock, and connections to it."""

    def __init__(
        self,
        limits: RendezvousLimits | None = None,
        hub: FakeHub | None = None,
        access_key: bytes | None = None,
    ) -> None:
        self.clock = Clock()
        self.hub = hub
        self.factory = RendezvousFactory(
            self.clock,
            limits,
            relay_hub=hub,  # type: ignore[arg-type]
            access_key=access_key,
            stun_port=3478,
            random=FakeRandom(),
        )
        self.pumps: list[iosim.IOPump] = []

    def connect(
        self,
        host: str = "192.0.2.10",
        identity: Identity = IDENTITIES[0],
        peer: Peer | None = None,
    ) -> Conn:
        """A new connection from *host*."""
        cls = IPv6Address if ":" in host else IPv4Address
        address = cls("TCP", host, 40000 + len(self.pumps))
        server = self.factory.buildProtocol(address)
        assert server is not None
        client = peer if peer is not None else Peer()
        server_io = iosim.FakeTransport(server, True, SERVER, address)
        pump = iosim.connect(
            server, server_io, client, iosim.FakeTransport(client, False, address, SERVER)
        )
        self.pumps.append(pump)
        return Conn(client, server, pump, server_io, identity)

    def flush(self) -> None:
        """Deliver every byte and disconnection."""
        for _ in range(100):
            if not any([pump.flush(advanceClock=False) for pump in self.pumps]):  # noqa: C419
                return
        raise AssertionError("the in-memory network does not settle")

    def call(self, conn: Conn, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        """Send *command* on *conn* and return the answer (or raise the error)."""
        answer = ask(conn, command, **arguments)
        self.flush()
        return answer.get()  # type: ignore[no-any-return]

    def authenticated(self, identity: Identity = IDENTITIES[0], host: str = "192.0.2.10") -> Conn:
        """A connection past Hello and Authenticate."""
        conn = self.connect(host, identity)
        hello = self.call(conn, Hello, version=PROTOCOL_VERSION)
        signature = identity.sign(hello["challenge"])
        arguments: dict[str, Any] = {"public_key": identity.public_key_der, "signature": signature}
        if self.factory.access_key is not None:
            arguments["access_proof"] = access_proof(self.factory.access_key, hello["challenge"])
        self.call(conn, Authenticate, **arguments)
        return conn

    def registered(
        self, name: str, identity: Identity = IDENTITIES[0], host: str = "192.0.2.10"
    ) -> Conn:
        """An authenticated connection that registered *name*."""
        conn = self.authenticated(identity, host)
        self.call(conn, Register, name=name, listen_port=8000, private=[])
        return conn


class Outcome:
    """Catches a Deferred's result at once (AMP logs failures nobody handles yet)."""

    def __init__(self, deferred: Deferred[Any]) -> None:
        self.outcome: list[Any] = []
        deferred.addBoth(self.outcome.append)

    def get(self) -> Any:
        """The result; the failure is raised."""
        assert self.outcome, "the Deferred has not fired"
        if isinstance(self.outcome[0], Failure):
            self.outcome[0].raiseException()
        return self.outcome[0]


def ask(conn: Conn, command: type[amp.Command], *args: Any, **arguments: Any) -> Outcome:
    """Send *command* on *conn*; the outcome is there once the network is flushed."""
    return Outcome(conn.peer.callRemote(command, *args, **arguments))  # type: ignore[no-untyped-call]


def result(deferred: Deferred[T]) -> T:
    """The result of a Deferred that has fired; its failure is raised."""
    return Outcome(deferred).get()  # type: ignore[no-any-return]


def connect_args(peer: str, **overrides: Any) -> dict[str, Any]:
    """Arguments of a Connect to *peer*."""
    return {"peer": peer, "listen_port": 0, "private": [], "methods": ["direct"], **overrides}


@pytest.fixture
def rig() -> Rig:
    """A rendezvous with a fake relay hub."""
    return Rig(hub=FakeHub())


# -- Hello and Authenticate --------------------------------------------------


def test_hello_answers_challenge_and_observed_address(rig: Rig) -> None:
    """Hello gives a fresh challenge, the observed address, the STUN port and the relay flag."""
    conn = rig.connect("203.0.113.5")
    hello = rig.call(conn, Hello, version=PROTOCOL_VERSION)
    assert hello["version"] == PROTOCOL_VERSION
    assert hello["challenge"] == b"\x01" * 32
    assert (hello["observed_host"], hello["observed_port"]) == ("203.0.113.5", 40000)
    assert (hello["stun_port"], hello["relay"]) == (3478, True)


def test_hello_canonical_ipv6() -> None:
    """An IPv4-mapped IPv6 source is observed as the IPv4 address."""
    rig = Rig()
    hello = rig.call(rig.connect("::ffff:203.0.113.5"), Hello, version=1)
    assert hello["observed_host"] == "203.0.113.5"
    assert hello["relay"] is False


def test_hello_twice_refused(rig: Rig) -> None:
    """A second Hello on one connection is an invalid request."""
    conn = rig.connect()
    rig.call(conn, Hello, version=1)
    with pytest.raises(InvalidRequest, match="already"):
        rig.call(conn, Hello, version=1)


def test_bad_version_refused(rig: Rig) -> None:
    """Version 0 is not a protocol version."""
    with pytest.raises(InvalidRequest, match="version"):
        rig.call(rig.connect(), Hello, version=0)


def test_authenticate_binds_peer_id(rig: Rig) -> None:
    """A valid signature over the challenge binds the connection to the key's peer id."""
    conn = rig.authenticated(IDENTITIES[1])
    assert conn.server.peer_id == IDENTITIES[1].peer_id
    assert rig.clock.getDelayedCalls() == []


def test_authenticate_before_hello(rig: Rig) -> None:
    """Authenticate before Hello is refused: there is no challenge to sign."""
    identity = IDENTITIES[0]
    with pytest.raises(NotAuthenticated, match="Hello first"):
        rig.call(
            rig.connect(),
            Authenticate,
            public_key=identity.public_key_der,
            signature=identity.sign(b"x"),
        )


def test_bad_signature_spends_challenge(rig: Rig) -> None:
    """A wrong signature fails, and the connection cannot try again."""
    conn = rig.connect()
    hello = rig.call(conn, Hello, version=1)
    key = IDENTITIES[0].public_key_der
    with pytest.raises(PeerAuthenticationFailed):
        rig.call(conn, Authenticate, public_key=key, signature=IDENTITIES[1].sign(b"other"))
    with pytest.raises(NotAuthenticated, match="new connection"):
        rig.call(
            conn, Authenticate, public_key=key, signature=IDENTITIES[0].sign(hello["challenge"])
        )


def test_malformed_public_key(rig: Rig) -> None:
    """A public key that is not DER SPKI fails authentication, clearly."""
    conn = rig.connect()
    rig.call(conn, Hello, version=1)
    with pytest.raises(PeerAuthenticationFailed, match="DER"):
        rig.call(conn, Authenticate, public_key=b"junk", signature=b"s" * 64)


def test_handshake_timeout_closes(rig: Rig) -> None:
    """A connection that does not authenticate in time is closed; nothing is left."""
    conn = rig.connect()
    rig.call(conn, Hello, version=1)
    rig.clock.advance(RendezvousLimits().handshake_timeout)
    rig.flush()
    assert conn.peer.lost
    assert rig.factory.stats.handshake_timeouts == 1
    assert rig.factory.connections == set()
    assert rig.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        (Register, {"name": "alice", "listen_port": 0, "private": []}),
        (Refresh, {}),
        (Lookup, {"peer": "alice"}),
        (Connect, connect_args("alice")),
        (Reverse, {"session": b"s" * 16, "port": 1}),
        (Relay, {"session": b"s" * 16}),
    ],
)
def test_commands_before_authenticate(
    rig: Rig, command: type[amp.Command], arguments: dict[str, Any]
) -> None:
    """Every command but Hello and Authenticate needs Authenticate first."""
    conn = rig.connect()
    rig.call(conn, Hello, version=1)
    with pytest.raises(NotAuthenticated, match="before Authenticate"):
        rig.call(conn, command, **arguments)
    assert rig.factory.stats.refusals == {"NotAuthenticated": 1}


def test_relay_join_before_authenticate(rig: Rig) -> None:
    """RelayJoin needs Authenticate first."""
    conn = rig.connect()
    answer = ask(conn, RelayJoin, _ProtocolFactory(), token=CALLER_TOKEN)
    rig.flush()
    with pytest.raises(NotAuthenticated):
        answer.get()


class _ProtocolFactory:
    """The client side of a protocol switch (never reached here)."""

    def buildProtocol(self, address: object) -> Protocol:
        return Protocol()

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        pass


def test_access_key_missing_proof() -> None:
    """A rendezvous with an access key refuses a client without a proof, saying so."""
    rig = Rig(access_key=b"sesame")
    conn = rig.connect()
    hello = rig.call(conn, Hello, version=1)
    identity = IDENTITIES[0]
    with pytest.raises(NotAuthenticated, match="needs an access key"):
        rig.call(
            conn,
            Authenticate,
            public_key=identity.public_key_der,
            signature=identity.sign(hello["challenge"]),
        )


def test_access_key_wrong_proof() -> None:
    """A proof made with another key is refused."""
    rig = Rig(access_key=b"sesame")
    conn = rig.connect()
    hello = rig.call(conn, Hello, version=1)
    identity = IDENTITIES[0]
    with pytest.raises(NotAuthenticated, match="does not match"):
        rig.call(
            conn,
            Authenticate,
            public_key=identity.public_key_der,
            signature=identity.sign(hello["challenge"]),
            access_proof=access_proof(b"guess", hello["challenge"]),
        )


def test_access_key_right_proof() -> None:
    """The right proof authenticates."""
    rig = Rig(access_key=b"sesame")
    assert rig.authenticated().server.peer_id == IDENTITIES[0].peer_id


# -- Register, Refresh, Lookup -----------------------------------------------


def test_register_and_lookup(rig: Rig) -> None:
    """A registered peer is found by name and by peer id, at its observed address."""
    callee = rig.authenticated(IDENTITIES[0], "203.0.113.7")
    answer = rig.call(
        callee,
        Register,
        name="alice",
        listen_port=8000,
        private=[{"host": "10.0.0.5", "port": 8000}],
    )
    assert answer == {"ttl": 60.0}
    caller = rig.authenticated(IDENTITIES[1])
    for key in ("alice", str(IDENTITIES[0].peer_id)):
        found = rig.call(caller, Lookup, peer=key)
        assert found == {
            "peer_id": str(IDENTITIES[0].peer_id),
            "name": "alice",
            "observed_host": "203.0.113.7",
            "observed_port": callee.server.observed_port,
            "listen_port": 8000,
            "private": [{"host": "10.0.0.5", "port": 8000}],
            "udp_host": "",
            "udp_port": 0,
            "udp_private": [],
            "tcp_private": [],
            "udp_second_host": "",
            "udp_second_port": 0,
        }


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"name": "bad name", "listen_port": 0, "private": []}, "name"),
        ({"name": "x" * 60000, "listen_port": 0, "private": []}, "name"),
        ({"name": "alice", "listen_port": 70000, "private": []}, "listen_port"),
        ({"name": "alice", "listen_port": 0, "private": [{"host": "a.b", "port": 1}]}, "private"),
        (
            {"name": "alice", "listen_port": 0, "private": [{"host": "10.0.0.1", "port": 1}] * 9},
            "private",
        ),
    ],
)
def test_register_checks_values(rig: Rig, arguments: dict[str, Any], field: str) -> None:
    """Bad or oversized values are refused with InvalidRequest naming the field."""
    conn = rig.authenticated()
    with pytest.raises(InvalidRequest, match=field):
        rig.call(conn, Register, **arguments)
    assert len(rig.factory.registry) == 0


def test_name_taken_by_other_key(rig: Rig) -> None:
    """Registering a name someone else holds is refused with NameTaken."""
    rig.registered("alice", IDENTITIES[0])
    thief = rig.authenticated(IDENTITIES[1])
    with pytest.raises(NameTaken, match="alice"):
        rig.call(thief, Register, name="alice", listen_port=0, private=[])


def test_per_ip_cap() -> None:
    """More registrations from one address than the cap are refused."""
    rig = Rig(RendezvousLimits(max_registrations_per_ip=1))
    rig.registered("alice", IDENTITIES[0], "192.0.2.1")
    conn = rig.authenticated(IDENTITIES[1], "192.0.2.1")
    with pytest.raises(LimitExceeded, match=r"192\.0\.2\.1"):
        rig.call(conn, Register, name="bob", listen_port=0, private=[])


def test_restart_replaces_registration(rig: Rig) -> None:
    """The same key registering from a new connection takes over; the old one cannot refresh."""
    old = rig.registered("alice", IDENTITIES[0])
    new = rig.registered("alice", IDENTITIES[0], "192.0.2.99")
    caller = rig.authenticated(IDENTITIES[1])
    assert rig.call(caller, Lookup, peer="alice")["observed_host"] == "192.0.2.99"
    with pytest.raises(PeerNotFound, match="Register again"):
        rig.call(old, Refresh)
    assert rig.call(new, Refresh) == {"ttl": 60.0}


def test_refresh_keeps_registration(rig: Rig) -> None:
    """Refreshing before the TTL keeps the peer; without it the registration ends."""
    callee = rig.registered("alice")
    caller = rig.authenticated(IDENTITIES[1])
    rig.clock.advance(50)
    rig.call(callee, Refresh)
    rig.clock.advance(50)
    assert rig.call(caller, Lookup, peer="alice")["name"] == "alice"
    rig.clock.advance(60)
    with pytest.raises(PeerNotFound):
        rig.call(caller, Lookup, peer="alice")


def test_disconnected_peer_not_introduced(rig: Rig) -> None:
    """A peer whose connection is lost is not found, but keeps its name until the TTL."""
    callee = rig.registered("alice", IDENTITIES[0])
    callee.server_io.loseConnection()
    rig.flush()
    caller = rig.authenticated(IDENTITIES[1])
    with pytest.raises(PeerNotFound, match="registered but not connected"):
        rig.call(caller, Connect, **connect_args("alice"))
    with pytest.raises(PeerNotFound, match="registered but not connected"):
        rig.call(caller, Lookup, peer="alice")
    with pytest.raises(NameTaken):
        rig.call(caller, Register, name="alice", listen_port=0, private=[])
    rig.clock.advance(60)
    rig.call(caller, Register, name="alice", listen_port=0, private=[])


# -- Connect -----------------------------------------------------------------


def test_connect_introduces_both_at_once(rig: Rig) -> None:
    """Connect answers the caller and sends the callee Introduce in the same turn."""
    callee = rig.registered("alice", IDENTITIES[0], "203.0.113.7")
    caller = rig.authenticated(IDENTITIES[1], "198.51.100.20")
    answer = ask(
        caller,
        Connect,
        **connect_args(
            "alice",
            listen_port=9000,
            private=[{"host": "10.1.1.1", "port": 9000}],
            methods=["direct", "reversal"],
        ),
    )
    caller.pump.pump(advanceClock=False)
    # The server handled Connect once: the callee's Introduce is already written.
    assert callee.server_io.stream != []
    rig.flush()
    got = answer.get()
    assert len(callee.peer.introduced) == 1
    introduced = callee.peer.introduced[0]
    assert got["session"] == introduced["session"]
    assert got["secret"] == introduced["secret"]
    assert (len(got["session"]), len(got["secret"])) == (16, 32)
    assert got["peer_id"] == str(IDENTITIES[0].peer_id)
    assert (got["observed_host"], got["listen_port"], got["relay"]) == ("203.0.113.7", 8000, True)
    assert introduced["peer_id"] == str(IDENTITIES[1].peer_id)
    assert introduced["name"] == ""
    assert introduced["observed_host"] == "198.51.100.20"
    assert introduced["observed_port"] == caller.server.observed_port
    assert introduced["listen_port"] == 9000
    assert introduced["private"] == [{"host": "10.1.1.1", "port": 9000}]
    assert introduced["methods"] == ["direct", "reversal"]
    assert rig.factory.registry.introductions == 1


def test_connect_fresh_session_each_time(rig: Rig) -> None:
    """Two introductions get different session ids and secrets."""
    rig.registered("alice")
    caller = rig.authenticated(IDENTITIES[1])
    first = rig.call(caller, Connect, **connect_args("alice"))
    second = rig.call(caller, Connect, **connect_args("alice"))
    assert first["session"] != second["session"]
    assert first["secret"] != second["secret"]


def test_connect_unknown_peer(rig: Rig) -> None:
    """Connect to nobody is PeerNotFound."""
    caller = rig.authenticated()
    with pytest.raises(PeerNotFound, match="nobody"):
        rig.call(caller, Connect, **connect_args("nobody"))
    with pytest.raises(PeerNotFound):
        rig.call(caller, Connect, **connect_args(str(IDENTITIES[2].peer_id)))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"peer": "no such/name"}, "no such/name"),
        ({"listen_port": -1}, "listen_port"),
        ({"methods": ["Direct!"]}, "methods"),
        ({"methods": ["m"] * 17}, "methods"),
        ({"private": [{"host": "10.0.0.1", "port": 0}]}, "private"),
    ],
)
def test_connect_checks_values(rig: Rig, overrides: dict[str, Any], field: str) -> None:
    """Bad Connect values are refused naming the field; no introduction is made."""
    rig.registered("alice")
    caller = rig.authenticated(IDENTITIES[1])
    with pytest.raises(InvalidRequest, match=field):
        rig.call(caller, Connect, **{**connect_args("alice"), **overrides})
    assert rig.factory.registry.introductions == 0


def test_introduction_cap() -> None:
    """More pending introductions than the cap are refused with LimitExceeded."""
    rig = Rig(RendezvousLimits(max_introductions=1, introduction_ttl=10.0))
    rig.registered("alice")
    caller = rig.authenticated(IDENTITIES[1])
    rig.call(caller, Connect, **connect_args("alice"))
    with pytest.raises(LimitExceeded, match="introductions"):
        rig.call(caller, Connect, **connect_args("alice"))
    rig.clock.advance(10)
    rig.call(caller, Connect, **connect_args("alice"))


def test_callee_not_answering_is_cut_off(rig: Rig) -> None:
    """A callee that leaves the server's requests unanswered is disconnected."""
    callee = rig.connect(peer=Silent())
    hello = rig.call(callee, Hello, version=1)
    identity = IDENTITIES[0]
    rig.call(
        callee,
        Authenticate,
        public_key=identity.public_key_der,
        signature=identity.sign(hello["challenge"]),
    )
    rig.call(callee, Register, name="alice", listen_port=0, private=[])
    caller = rig.authenticated(IDENTITIES[1])
    for _ in range(MAX_UNANSWERED):
        rig.call(caller, Connect, **connect_args("alice"))
    with pytest.raises(PeerNotFound):
        rig.call(caller, Connect, **connect_args("alice"))
    assert callee.peer.lost
    assert not caller.peer.lost


# -- Reverse -----------------------------------------------------------------


def introduced(rig: Rig) -> tuple[Conn, Conn, bytes]:
    """A callee "alice", a caller from 198.51.100.20, and their session id."""
    callee = rig.registered("alice", IDENTITIES[0], "203.0.113.7")
    caller = rig.authenticated(IDENTITIES[1], "198.51.100.20")
    session = rig.call(caller, Connect, **connect_args("alice"))["session"]
    return callee, caller, session


def test_reverse_sends_dial_back_to_observed_address(rig: Rig) -> None:
    """Reverse makes the callee dial the caller's observed address and the given port."""
    callee, caller, session = introduced(rig)
    assert rig.call(caller, Reverse, session=session, host="198.51.100.20", port=7000) == {}
    assert rig.call(caller, Reverse, session=session, port=7001) == {}
    assert callee.peer.dial_backs == [
        {"session": session, "host": "198.51.100.20", "port": 7000},
        {"session": session, "host": "198.51.100.20", "port": 7001},
    ]


def test_reverse_naming_other_address_refused(rig: Rig) -> None:
    """A reversal request naming another host is refused; the callee is not told."""
    callee, caller, session = introduced(rig)
    for host in ("192.0.2.66", "victim.example.org"):
        with pytest.raises(ReversalRefused, match=r"observes this peer at 198\.51\.100\.20"):
            rig.call(caller, Reverse, session=session, host=host, port=7000)
    assert callee.peer.dial_backs == []


def test_reverse_unknown_session_refused(rig: Rig) -> None:
    """Reverse for a session never introduced is refused."""
    _, caller, _ = introduced(rig)
    with pytest.raises(ReversalRefused, match="Connect first"):
        rig.call(caller, Reverse, session=b"x" * 16, port=7000)


def test_reverse_by_callee_refused(rig: Rig) -> None:
    """Only the caller of a session may ask for its reversal."""
    callee, _, session = introduced(rig)
    with pytest.raises(ReversalRefused):
        rig.call(callee, Reverse, session=session, port=7000)


def test_reverse_after_introduction_expired(rig: Rig) -> None:
    """An expired introduction cannot be reversed."""
    _, caller, session = introduced(rig)
    rig.clock.advance(60)
    with pytest.raises(ReversalRefused):
        rig.call(caller, Reverse, session=session, port=7000)


def test_reverse_bounded_per_session(rig: Rig) -> None:
    """One introduction serves a few reversals only."""
    _, caller, session = introduced(rig)
    for _ in range(MAX_REVERSALS):
        rig.call(caller, Reverse, session=session, port=7000)
    with pytest.raises(ReversalRefused, match="already asked"):
        rig.call(caller, Reverse, session=session, port=7000)


@pytest.mark.parametrize(
    ("arguments", "field"),
    [({"session": b"short", "port": 7000}, "session"), ({"session": b"s" * 16, "port": 0}, "port")],
)
def test_reverse_checks_values(rig: Rig, arguments: dict[str, Any], field: str) -> None:
    """A short session id or port 0 is an invalid request."""
    conn = rig.authenticated()
    with pytest.raises(InvalidRequest, match=field):
        rig.call(conn, Reverse, **arguments)


# -- Relay and RelayJoin -----------------------------------------------------


def test_relay_allocates_and_offers(rig: Rig) -> None:
    """Relay gives the caller its token and offers the callee its own."""
    callee, caller, session = introduced(rig)
    answer = rig.call(caller, Relay, session=session)
    assert answer == {"token": CALLER_TOKEN, "lifetime": 300.0}
    assert callee.peer.offers == [{"session": session, "token": CALLEE_TOKEN, "lifetime": 300.0}]
    assert rig.hub is not None
    assert rig.hub.allocated == [(session, IDENTITIES[1].peer_id, IDENTITIES[0].peer_id)]


def test_relay_asked_by_callee(rig: Rig) -> None:
    """The callee may ask too: it gets the callee token, the caller the offer."""
    callee, caller, session = introduced(rig)
    assert rig.call(callee, Relay, session=session)["token"] == CALLEE_TOKEN
    assert caller.peer.offers[0]["token"] == CALLER_TOKEN


def test_relay_not_introduced_refused(rig: Rig) -> None:
    """Relay for a session that was not introduced is refused."""
    _, caller, _ = introduced(rig)
    with pytest.raises(RelayRefused, match="not an introduction"):
        rig.call(caller, Relay, session=b"z" * 16)


def test_relay_by_third_peer_refused(rig: Rig) -> None:
    """A peer that is not part of the session cannot get a relay for it."""
    _, _, session = introduced(rig)
    stranger = rig.authenticated(IDENTITIES[2])
    with pytest.raises(RelayRefused, match="not an introduction"):
        rig.call(stranger, Relay, session=session)
    assert rig.hub is not None
    assert rig.hub.allocated == []


def test_relay_off_refused() -> None:
    """Without a relay hub, Relay is refused saying the relay is off."""
    rig = Rig()
    _, caller, session = introduced(rig)
    with pytest.raises(RelayRefused, match="relay is off"):
        rig.call(caller, Relay, session=session)


def test_relay_hub_limit(rig: Rig) -> None:
    """The hub's LimitExceeded reaches the client."""
    _, caller, session = introduced(rig)
    assert rig.hub is not None
    rig.hub.error = LimitExceeded("the relay is full")
    with pytest.raises(LimitExceeded, match="full"):
        rig.call(caller, Relay, session=session)


def test_relay_join_switches_protocol(rig: Rig) -> None:
    """After RelayJoin, the connection's bytes go to the hub's protocol."""
    conn = rig.authenticated(IDENTITIES[1])
    answer = ask(conn, RelayJoin, _ProtocolFactory(), token=CALLER_TOKEN)
    rig.flush()
    assert answer.get() == {}
    conn.peer.transport.write(b"raw bytes")  # type: ignore[union-attr]
    rig.flush()
    assert rig.hub is not None
    [(token, peer, leg)] = rig.hub.legs
    assert (token, peer, leg.received) == (CALLER_TOKEN, IDENTITIES[1].peer_id, b"raw bytes")
    assert not conn.server.alive


def test_relay_join_unknown_token(rig: Rig) -> None:
    """A token the hub does not know is refused, and the connection stays AMP."""
    conn = rig.authenticated()
    answer = ask(conn, RelayJoin, _ProtocolFactory(), token=b"?" * 32)
    rig.flush()
    with pytest.raises(RelayRefused, match="token"):
        answer.get()
    assert conn.server.alive


def test_relay_join_on_registered_connection(rig: Rig) -> None:
    """A connection holding a registration cannot become a relay leg."""
    conn = rig.registered("alice")
    answer = ask(conn, RelayJoin, _ProtocolFactory(), token=CALLER_TOKEN)
    rig.flush()
    with pytest.raises(InvalidRequest, match="fresh connection"):
        answer.get()


# -- abuse -------------------------------------------------------------------


def raw_connection(rig: Rig) -> Conn:
    """A connection whose client writes raw bytes."""
    return rig.connect(peer=Peer())


def test_oversized_box_closes_only_that_connection(rig: Rig) -> None:
    """A box larger than MAX_BOX_SIZE closes its connection; others are served."""
    bystander = rig.registered("alice")
    conn = raw_connection(rig)
    box = amp.AmpBox(_command=b"Hello", _ask=b"1", a=b"x" * 60000, b=b"y" * 60000)
    assert len(box.serialize()) > MAX_BOX_SIZE
    conn.peer.transport.write(box.serialize())  # type: ignore[union-attr]
    rig.flush()
    assert conn.peer.lost
    assert rig.factory.stats.malformed == 1
    assert rig.call(bystander, Refresh) == {"ttl": 60.0}


def test_box_without_command_closes(rig: Rig) -> None:
    """A box that is neither a command nor an answer closes the connection."""
    conn = raw_connection(rig)
    conn.peer.transport.write(amp.AmpBox(hello=b"world").serialize())  # type: ignore[union-attr]
    rig.flush()
    assert conn.peer.lost
    assert rig.factory.connections == set()


def test_answer_to_nothing_closes(rig: Rig) -> None:
    """An answer to a request never sent closes the connection."""
    conn = raw_connection(rig)
    conn.peer.transport.write(amp.AmpBox(_answer=b"99").serialize())  # type: ignore[union-attr]
    rig.flush()
    assert conn.peer.lost


def test_too_many_keys_closes(rig: Rig) -> None:
    """A box with very many keys closes the connection."""
    conn = raw_connection(rig)
    box = amp.AmpBox({f"k{i}".encode(): b"" for i in range(100)})
    conn.peer.transport.write(box.serialize())  # type: ignore[union-attr]
    rig.flush()
    assert conn.peer.lost


def test_missing_argument_is_invalid_request(rig: Rig) -> None:
    """A command box missing an argument gets INVALID_REQUEST, and the connection stays."""
    conn = rig.connect()
    errors: list[amp.AmpBox] = []
    conn.peer.ampBoxReceived = errors.append  # type: ignore[method-assign]
    box = amp.AmpBox(_command=b"Hello", _ask=b"x1")
    conn.peer.transport.write(box.serialize())  # type: ignore[union-attr]
    rig.flush()
    [error] = errors
    assert error[b"_error_code"] == b"INVALID_REQUEST"
    assert b"version" in error[b"_error_description"]
    assert not conn.peer.lost
    assert rig.factory.stats.malformed == 1


def test_not_a_number_is_invalid_request(rig: Rig) -> None:
    """A value that does not parse gets INVALID_REQUEST naming the command."""
    conn = rig.connect()
    errors: list[amp.AmpBox] = []
    conn.peer.ampBoxReceived = errors.append  # type: ignore[method-assign]
    box = amp.AmpBox(_command=b"Hello", _ask=b"x1", version=b"one")
    conn.peer.transport.write(box.serialize())  # type: ignore[union-attr]
    rig.flush()
    [error] = errors
    assert error[b"_error_code"] == b"INVALID_REQUEST"
    assert b"malformed Hello request" in error[b"_error_description"]
    assert not conn.peer.lost


def test_unknown_command(rig: Rig) -> None:
    """An unknown command is answered with AMP's UNHANDLED error."""
    conn = rig.connect()
    answer = Outcome(conn.peer.callRemoteString(b"Nope"))  # type: ignore[no-untyped-call]
    rig.flush()
    with pytest.raises(amp.UnhandledCommand):
        answer.get()


def test_internal_error_closes_only_that_connection(rig: Rig) -> None:
    """An unexpected exception is logged, closes its connection, and spares the others."""
    callee, caller, session = introduced(rig)
    assert rig.hub is not None
    rig.hub.error = RuntimeError("bug")
    answer = ask(caller, Relay, session=session)
    rig.flush()
    with pytest.raises(amp.UnknownRemoteError):
        answer.get()
    assert caller.peer.lost
    assert rig.factory.stats.internal_errors == 1
    assert rig.call(callee, Refresh) == {"ttl": 60.0}


def test_whole_number_ttl_answered_as_float() -> None:
    """Limits given as whole numbers still make valid answers."""
    rig = Rig(RendezvousLimits(registration_ttl=30))
    assert rig.call(rig.registered("alice"), Refresh) == {"ttl": 30.0}


def test_unencodable_answer_is_internal_error(rig: Rig) -> None:
    """An answer the schema cannot encode is our bug: logged, that connection closed."""
    callee = rig.registered("alice")
    registration = rig.factory.registry.find("alice", rig.clock.seconds())
    registration.record = PeerRecord("192.0.2.1", "many", 0, ())  # type: ignore[arg-type]
    caller = rig.authenticated(IDENTITIES[1])
    answer = ask(caller, Lookup, peer="alice")
    rig.flush()
    with pytest.raises(amp.UnknownRemoteError):
        answer.get()
    assert rig.factory.stats.internal_errors == 1
    assert rig.factory.stats.malformed == 0
    assert caller.peer.lost
    assert not callee.peer.lost


def test_connection_cap() -> None:
    """Beyond max_connections, buildProtocol refuses."""
    rig = Rig(RendezvousLimits(max_connections=1))
    rig.connect()
    assert rig.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)) is None
    assert rig.factory.stats.connections_refused == 1


# -- the service ---------------------------------------------------------------


def test_service_listens_and_stops_cleanly() -> None:
    """The service listens on every endpoint, sweeps, and leaves nothing when stopped."""
    reactor = MemoryReactorClock()
    hub = FakeHub()
    service = RendezvousService(
        reactor,
        ["tcp:8478:interface=127.0.0.1", "tcp:8479"],
        relay_hub=hub,  # type: ignore[arg-type]
    )
    service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (8478, "127.0.0.1"),
        (8479, ""),
    ]
    assert len(service.ports) == 2
    assert len(reactor.getDelayedCalls()) == 1
    result(service.stopService())
    assert reactor.getDelayedCalls() == []
    assert service.ports == []
    assert hub.closed


def test_service_sweeps_expired_state() -> None:
    """The service's sweeper drops expired registrations."""
    reactor = MemoryReactorClock()
    service = RendezvousService(reactor, ["tcp:0"], RendezvousLimits(registration_ttl=4.0))
    record = PeerRecord("192.0.2.1", 1, 0, ())
    service.factory.registry.register("alice", IDENTITIES[0].peer_id, "192.0.2.1", record, 0.0)
    service.startService()
    reactor.advance(4.0)
    assert len(service.factory.registry) == 0
    result(service.stopService())


def test_service_stop_closes_connections() -> None:
    """Stopping closes every connection; the Deferred fires when they are gone."""
    reactor = MemoryReactorClock()
    service = RendezvousService(reactor, ["tcp:0"])
    service.startService()
    factory = service.factory
    server = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
    assert server is not None
    client = Peer()
    pump = iosim.connect(
        server,
        iosim.FakeTransport(server, True, SERVER, IPv4Address("TCP", "192.0.2.1", 1)),
        client,
        iosim.FakeTransport(client, False),
    )
    stopped: list[None] = []
    service.stopService().addCallback(stopped.append)
    assert stopped == []
    pump.flush(advanceClock=False)
    assert stopped == [None]
    assert client.lost
    assert factory.connections == set()


def test_service_needs_endpoints() -> None:
    """A service with nothing to listen on is an error."""
    with pytest.raises(ValueError, match="endpoint"):
        RendezvousService(MemoryReactorClock(), [])


@pytest.mark.parametrize(
    "limits",
    [{"registration_ttl": 0.0}, {"max_connections": 0}, {"handshake_timeout": float("inf")}],
)
def test_bad_limits(limits: dict[str, float]) -> None:
    """Limits must be positive and finite."""
    with pytest.raises(ValueError, match=next(iter(limits))):
        RendezvousLimits(**limits)  # type: ignore[arg-type]


def test_limits_defaults() -> None:
    """The documented defaults."""
    assert RendezvousLimits() == RendezvousLimits(60.0, 100_000, 64, 60.0, 10_000, 10.0, 20_000)
