"""
Tests for nattraverse.rendezvous.client: sessions against a fake AMP
rendezvous connected in memory (twisted.test.iosim) on a task.Clock.  No
sockets.

The fake server and the in-memory network are in rendezvous_fakes.py,
shared with test_rendezvous_registration.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock

from nattraverse.errors import (
    InvalidRequest,
    LimitExceeded,
    NameTaken,
    NotAuthenticated,
    PeerAuthenticationFailed,
    PeerNotFound,
    RelayRefused,
    RendezvousUnavailable,
    ReversalRefused,
)
from nattraverse.identity import Identity, verify
from nattraverse.rendezvous.client import (
    Introduction,
    PeerInfo,
    RendezvousSession,
    ServerHello,
    join_relay,
    open_session,
)
from nattraverse.rendezvous.commands import (
    PROTOCOL_VERSION,
    DialBack,
    Introduce,
    RelayOffer,
    access_proof,
)
from tests.deferreds import failed, succeeded
from tests.unit.rendezvous.rendezvous_fakes import (
    CHALLENGE,
    OBSERVED,
    OTHER,
    OTHER_ID,
    SECRET,
    SESSION,
    TOKEN,
    UDP_TOKEN,
    Handler,
    Network,
    RawRecorder,
    call,
    introduce_args,
)

# -- fixtures -----------------------------------------------------------------


Opener = Callable[..., Deferred[RendezvousSession]]


@pytest.fixture
def opening(clock: Clock, network: Network, identity: Identity, handler: Handler) -> Opener:
    """Start open_session on the fake network, without pumping."""

    def start(**kwargs: Any) -> Deferred[RendezvousSession]:
        kwargs.setdefault("handler", handler)
        return open_session(clock, network.endpoint(), identity, **kwargs)

    return start


@pytest.fixture
def session(opening: Opener, network: Network) -> RendezvousSession:
    d = opening()
    network.flush()
    return succeeded(d)


# -- Hello and Authenticate ---------------------------------------------------


def test_open_session_learns_hello(session: RendezvousSession) -> None:
    """The session carries what the server said in Hello."""
    assert session.hello == ServerHello(
        observed=OBSERVED, stun_port=3478, relay=True, udp_token=UDP_TOKEN
    )


def test_open_session_sends_protocol_version(session: RendezvousSession, network: Network) -> None:
    """Hello carries this client's protocol version."""
    assert network.server.named(b"Hello") == [{"version": PROTOCOL_VERSION}]


def test_authenticate_signature_verifies(
    session: RendezvousSession, network: Network, identity: Identity
) -> None:
    """Authenticate sends the key and a signature over the challenge that verify() accepts."""
    (request,) = network.server.named(b"Authenticate")
    assert verify(request["public_key"], CHALLENGE, request["signature"]) == identity.peer_id
    assert session.peer_id == identity.peer_id


def test_no_access_proof_without_access_key(session: RendezvousSession, network: Network) -> None:
    """Without an access key, Authenticate carries no access proof."""
    assert network.server.named(b"Authenticate")[0]["access_proof"] is None


def test_access_proof_with_access_key(opening: Opener, network: Network) -> None:
    """With an access key, Authenticate carries its HMAC over the challenge."""
    network.script.access_key = b"sesame"
    d = opening(access_key=b"sesame")
    network.flush()
    succeeded(d)
    proof = network.server.named(b"Authenticate")[0]["access_proof"]
    assert proof == access_proof(b"sesame", CHALLENGE)


def test_missing_access_key_fails_and_closes(opening: Opener, network: Network) -> None:
    """Without the access key it wants, the rendezvous refuses with NotAuthenticated."""
    network.script.access_key = b"sesame"
    d = opening()
    network.flush()
    failed(d, NotAuthenticated)
    assert network.server.lost


def test_authentication_refused(opening: Opener, network: Network) -> None:
    """A refused proof fails with PeerAuthenticationFailed."""
    network.script.errors[b"Authenticate"] = PeerAuthenticationFailed("bad signature")
    d = opening()
    network.flush()
    assert "bad signature" in str(failed(d, PeerAuthenticationFailed))


def test_bound_to_another_peer_id_fails(opening: Opener, network: Network) -> None:
    """A server that binds the connection to another peer id is not believed."""
    network.script.bound_peer_id = OTHER_ID
    d = opening()
    network.flush()
    failed(d, PeerAuthenticationFailed)
    assert network.server.lost


def test_version_mismatch_fails(opening: Opener, network: Network) -> None:
    """A server speaking another protocol version fails with RendezvousUnavailable."""
    network.script.hello["version"] = PROTOCOL_VERSION + 1
    d = opening()
    network.flush()
    assert "version" in str(failed(d, RendezvousUnavailable))
    assert network.server.lost


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("challenge", b"short"),
        ("observed_host", "not-an-address"),
        ("observed_port", 0),
        ("stun_port", 70000),
    ],
)
def test_malformed_hello_fails(
    opening: Opener, network: Network, field_name: str, value: object
) -> None:
    """A Hello answer with a malformed field fails with InvalidRequest naming it."""
    network.script.hello[field_name] = value
    d = opening()
    network.flush()
    assert field_name in str(failed(d, InvalidRequest))
    assert network.server.lost


def test_connection_refused_names_endpoint(opening: Opener, network: Network) -> None:
    """A failed connection fails with RendezvousUnavailable naming the endpoint and reason."""
    network.refuse = True
    message = str(failed(opening(), RendezvousUnavailable))
    assert "192.0.2.1:8478" in message
    assert "refused" in message.lower()


def test_open_session_times_out(opening: Opener, network: Network, clock: Clock) -> None:
    """A server that never answers Hello fails the session after the timeout, and closes."""
    network.script.hold.add(b"Hello")
    d = opening(timeout=5.0)
    network.flush()
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    network.flush()
    failed(d, RendezvousUnavailable)
    assert network.server.lost
    assert clock.getDelayedCalls() == []


def test_cancel_open_session_while_connecting(
    opening: Opener, network: Network, clock: Clock
) -> None:
    """Cancelling while the endpoint connects cancels the connection attempt."""
    network.hang = True
    d = opening()
    d.cancel()
    failed(d, CancelledError)
    assert network.cancelled == network.hanging
    assert clock.getDelayedCalls() == []


def test_cancel_open_session_during_handshake(
    opening: Opener, network: Network, clock: Clock
) -> None:
    """Cancelling during the handshake closes the connection and leaves no timer."""
    network.script.hold.add(b"Authenticate")
    network.script.hold.add(b"Hello")
    d = opening()
    network.flush()
    d.cancel()
    network.flush()
    failed(d, CancelledError)
    assert network.server.lost
    assert clock.getDelayedCalls() == []


def test_open_session_rejects_bad_timeout(opening: Opener) -> None:
    """A timeout that is not a positive number fails at once."""
    failed(opening(timeout=0), ValueError)


# -- requests -----------------------------------------------------------------


def test_register(session: RendezvousSession, network: Network) -> None:
    """Register sends the name, port and private addresses, and returns the TTL."""
    d = call(network, session.register("alice", 7000, [("10.0.0.2", 7000)]))
    assert succeeded(d) == 30.0
    assert network.server.named(b"Register") == [
        {
            "name": "alice",
            "listen_port": 7000,
            "private": [{"host": "10.0.0.2", "port": 7000}],
            "udp_private": [],
            "tcp_private": [],
        }
    ]


@pytest.mark.parametrize(
    ("name", "port", "private"),
    [
        ("", 7000, []),
        ("a" * 65, 7000, []),
        (OTHER_ID, 7000, []),
        ("alice", 70000, []),
        ("alice", 7000, [("example.org", 7000)]),
        ("alice", 7000, [("10.0.0.1", 7000)] * 9),
    ],
)
def test_register_checks_before_sending(
    session: RendezvousSession,
    network: Network,
    name: str,
    port: int,
    private: list[tuple[str, int]],
) -> None:
    """Register refuses bad values with InvalidRequest without sending anything."""
    failed(session.register(name, port, private), InvalidRequest)
    network.flush()
    assert network.server.named(b"Register") == []


def test_register_rejects_bad_ttl(session: RendezvousSession, network: Network) -> None:
    """A TTL that is not a positive number is not believed."""
    network.script.ttl = -1.0
    failed(call(network, session.register("alice", 0, [])), InvalidRequest)


def test_refresh(session: RendezvousSession, network: Network) -> None:
    """Refresh returns the new TTL."""
    network.script.ttl = 45.0
    assert succeeded(call(network, session.refresh())) == 45.0


def test_lookup(session: RendezvousSession, network: Network) -> None:
    """Lookup returns the peer's details, checked."""
    info = succeeded(call(network, session.lookup("bob")))
    assert info == PeerInfo(
        peer_id=OTHER.peer_id,
        name="bob",
        observed=("198.51.100.9", 50000),
        listen_port=7000,
        private=(("10.0.0.9", 7000),),
    )
    assert network.server.named(b"Lookup") == [{"peer": "bob"}]


def test_lookup_by_peer_id_pins_it(
    session: RendezvousSession, network: Network, identity: Identity
) -> None:
    """Looking up a peer id and getting another peer fails with PeerAuthenticationFailed."""
    failed(call(network, session.lookup(str(identity.peer_id))), PeerAuthenticationFailed)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("peer_id", "nt1notapeerid"),
        ("observed_host", "host.example"),
        ("observed_port", 0),
        ("listen_port", -1),
        ("private", [{"host": "10.0.0.1", "port": 0}]),
        ("name", "bad name"),
    ],
)
def test_lookup_rejects_malformed_answer(
    session: RendezvousSession, network: Network, field_name: str, value: object
) -> None:
    """A Lookup answer with a malformed field fails with InvalidRequest naming it."""
    network.script.lookup[field_name] = value
    error = failed(call(network, session.lookup("bob")), InvalidRequest)
    assert field_name in str(error)


def test_lookup_rejects_bad_peer_before_sending(
    session: RendezvousSession, network: Network
) -> None:
    """A peer that is neither a name nor a peer id is refused without a request."""
    failed(session.lookup("no spaces allowed"), InvalidRequest)
    network.flush()
    assert network.server.named(b"Lookup") == []


def test_connect(session: RendezvousSession, network: Network) -> None:
    """Connect returns the introduction: session, secret, the callee, methods and relay."""
    d = session.connect("bob", 6000, [("10.0.0.2", 6000)], ["direct", "relay"])
    introduction = succeeded(call(network, d))
    assert introduction == Introduction(
        session=SESSION,
        secret=SECRET,
        peer=PeerInfo(
            peer_id=OTHER.peer_id,
            name="bob",
            observed=("198.51.100.9", 50000),
            listen_port=7000,
            private=(("10.0.0.9", 7000),),
        ),
        methods=("direct", "relay"),
        relay=True,
    )
    assert network.server.named(b"Connect") == [
        {
            "peer": "bob",
            "listen_port": 6000,
            "private": [{"host": "10.0.0.2", "port": 6000}],
            "methods": ["direct", "relay"],
            "udp_private": [],
            "tcp_private": [],
        }
    ]


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("session", b"short"), ("secret", b"x" * 31), ("peer_id", "bob")],
)
def test_connect_rejects_malformed_answer(
    session: RendezvousSession, network: Network, field_name: str, value: object
) -> None:
    """A Connect answer with a malformed session, secret or peer id fails with InvalidRequest."""
    network.script.connect[field_name] = value
    failed(call(network, session.connect("bob", 0, [], ["relay"])), InvalidRequest)


def test_connect_rejects_bad_method_before_sending(
    session: RendezvousSession, network: Network
) -> None:
    """A method name that is not one is refused without a request."""
    failed(session.connect("bob", 0, [], ["Direct TCP"]), InvalidRequest)


def test_reverse(session: RendezvousSession, network: Network) -> None:
    """Reverse sends the session, host and port."""
    d = session.reverse(SESSION, 6000, OBSERVED[0])
    assert succeeded(call(network, d)) is None
    assert network.server.named(b"Reverse") == [
        {"session": SESSION, "host": OBSERVED[0], "port": 6000}
    ]


def test_reverse_without_host(session: RendezvousSession, network: Network) -> None:
    """Reverse without a host leaves it out: the server uses the observed address."""
    succeeded(call(network, session.reverse(SESSION, 6000)))
    assert network.server.named(b"Reverse")[0]["host"] is None


def test_relay(session: RendezvousSession, network: Network) -> None:
    """Relay returns this peer's token and the lifetime."""
    assert succeeded(call(network, session.relay(SESSION))) == (TOKEN, 60.0)
    assert network.server.named(b"Relay") == [{"session": SESSION}]


# -- server errors --------------------------------------------------------------

ERROR_CASES: list[tuple[bytes, Exception, Callable[[RendezvousSession], Deferred[Any]]]] = [
    (b"Register", NameTaken("alice is taken"), lambda s: s.register("alice", 0, [])),
    (b"Register", LimitExceeded("too many"), lambda s: s.register("alice", 0, [])),
    (b"Refresh", PeerNotFound("expired"), lambda s: s.refresh()),
    (b"Lookup", PeerNotFound("no bob"), lambda s: s.lookup("bob")),
    (b"Connect", PeerNotFound("no bob"), lambda s: s.connect("bob", 0, [], [])),
    (b"Connect", RendezvousUnavailable("busy"), lambda s: s.connect("bob", 0, [], [])),
    (b"Reverse", ReversalRefused("not yours"), lambda s: s.reverse(SESSION, 1)),
    (b"Relay", RelayRefused("relay off"), lambda s: s.relay(SESSION)),
    (b"Lookup", InvalidRequest("bad"), lambda s: s.lookup("bob")),
    (b"Lookup", NotAuthenticated("who?"), lambda s: s.lookup("bob")),
]


@pytest.mark.parametrize(("command", "error", "request_"), ERROR_CASES)
def test_server_errors_arrive_as_their_class(
    session: RendezvousSession,
    network: Network,
    command: bytes,
    error: Exception,
    request_: Callable[[RendezvousSession], Deferred[Any]],
) -> None:
    """A refusal arrives as the same nattraverse.errors class, with the server's message."""
    network.script.errors[command] = error
    received = failed(call(network, request_(session)), type(error))
    assert str(error) in str(received)
    assert session.is_open


def test_unknown_server_error_is_unavailable(session: RendezvousSession, network: Network) -> None:
    """An error the schema does not declare arrives as RendezvousUnavailable."""
    network.script.errors[b"Lookup"] = ZeroDivisionError("oops")
    failed(call(network, session.lookup("bob")), RendezvousUnavailable)


# -- connection loss, timeouts, cancellation, close ---------------------------


def test_pending_request_fails_when_connection_lost(
    session: RendezvousSession, network: Network, clock: Clock
) -> None:
    """A request pending when the server goes away fails at once with RendezvousUnavailable."""
    network.script.hold.add(b"Connect")
    d = call(network, session.connect("bob", 0, [], ["relay"]))
    assert not d.called
    network.server.drop()
    network.flush()
    error = failed(d, RendezvousUnavailable)
    assert "lost while connecting to 'bob'" in str(error)
    assert clock.getDelayedCalls() == []


def test_abrupt_loss_says_why(session: RendezvousSession, network: Network) -> None:
    """The loss message carries the reason the connection ended."""
    network.script.hold.add(b"Lookup")
    d = call(network, session.lookup("bob"))
    client_transport = network.pumps[-1].clientIO
    client_transport.disconnectReason = ConnectionLost("cable cut")
    network.server.drop()
    network.flush()
    assert "cable cut" in str(failed(d, RendezvousUnavailable))


def test_request_after_loss_fails_at_once(session: RendezvousSession, network: Network) -> None:
    """A request on a lost session fails at once, naming what it was for."""
    network.server.drop()
    network.flush()
    assert "refreshing" in str(failed(session.refresh(), RendezvousUnavailable))


def test_request_times_out(session: RendezvousSession, network: Network, clock: Clock) -> None:
    """A request without an answer fails after the session's timeout."""
    network.script.hold.add(b"Lookup")
    d = call(network, session.lookup("bob"))
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.1)
    assert "did not answer" in str(failed(d, RendezvousUnavailable))
    assert clock.getDelayedCalls() == []


def test_late_answer_after_timeout_is_ignored(
    session: RendezvousSession, network: Network, clock: Clock
) -> None:
    """An answer arriving after the timeout changes nothing and keeps the session open."""
    network.script.hold.add(b"Refresh")
    d = call(network, session.refresh())
    clock.advance(10)
    failed(d, RendezvousUnavailable)
    network.server.held[0].callback({"ttl": 30.0})
    network.flush()
    assert session.is_open


def test_cancel_request_cancels_its_timer(
    session: RendezvousSession, network: Network, clock: Clock
) -> None:
    """Cancelling a request fails it with CancelledError and leaves no timer."""
    network.script.hold.add(b"Lookup")
    d = session.lookup("bob")
    network.flush()
    d.cancel()
    failed(d, CancelledError)
    assert clock.getDelayedCalls() == []


def test_close_fails_pending_at_once(session: RendezvousSession, network: Network) -> None:
    """close() fails pending requests at once, before the connection is gone."""
    network.script.hold.add(b"Lookup")
    d = call(network, session.lookup("bob"))
    session.close()
    assert "closed" in str(failed(d, RendezvousUnavailable))


def test_close_is_idempotent_and_fires_closed(session: RendezvousSession, network: Network) -> None:
    """close() twice is fine; closed fires once the connection is gone."""
    closed = session.closed
    session.close()
    session.close()
    assert not closed.called
    network.flush()
    assert succeeded(closed) is None
    assert network.server.lost
    assert succeeded(session.closed) is None


def test_closed_fires_when_server_goes(session: RendezvousSession, network: Network) -> None:
    """closed fires for every watcher when the server drops the connection."""
    first, second = session.closed, session.closed
    network.server.drop()
    network.flush()
    assert succeeded(first) is None
    assert succeeded(second) is None
    assert not session.is_open


# -- the server's requests ----------------------------------------------------


def test_introduce_calls_handler(
    session: RendezvousSession, network: Network, handler: Handler
) -> None:
    """Introduce hands the checked introduction to the handler."""
    d = call(network, network.server.ask(Introduce, **introduce_args()))
    assert succeeded(d) == {}
    assert handler.introductions == [
        Introduction(
            session=SESSION,
            secret=SECRET,
            peer=PeerInfo(
                peer_id=OTHER.peer_id,
                name="",
                observed=("198.51.100.9", 50000),
                listen_port=7000,
                private=(("10.0.0.9", 7000),),
            ),
            methods=("direct", "reversal", "relay"),
            relay=True,
        )
    ]


@pytest.mark.parametrize(
    "override",
    [
        {"peer_id": "nt1" + "a" * 51 + "b"},
        {"peer_id": "bob"},
        {"session": b"short"},
        {"secret": b""},
        {"observed_host": "localhost"},
        {"observed_port": 0},
        {"listen_port": 65536},
        {"private": [{"host": "10.0.0.1", "port": 1}] * 9},
        {"methods": ["UDP!"]},
        {"name": "a b"},
    ],
)
def test_malformed_introduce_is_rejected(
    session: RendezvousSession, network: Network, handler: Handler, override: dict[str, Any]
) -> None:
    """A malformed Introduce is answered with InvalidRequest and never reaches the handler."""
    d = call(network, network.server.ask(Introduce, **introduce_args(**override)))
    failed(d, InvalidRequest)
    assert handler.introductions == []
    assert session.is_open


def test_introduce_without_handler_is_refused(opening: Opener, network: Network) -> None:
    """A session opened without a handler refuses Introduce."""
    d = opening(handler=None)
    network.flush()
    succeeded(d)
    reply = call(network, network.server.ask(Introduce, **introduce_args()))
    failed(reply, InvalidRequest)


def test_handler_failure_is_contained(
    session: RendezvousSession, network: Network, handler: Handler
) -> None:
    """A handler that raises is logged; the session stays open."""
    handler.fail_with = RuntimeError("handler bug")
    d = call(network, network.server.ask(Introduce, **introduce_args()))
    assert succeeded(d) == {}
    assert session.is_open


def test_dial_back_calls_handler(
    session: RendezvousSession, network: Network, handler: Handler
) -> None:
    """DialBack hands the session, host and port to the handler."""
    d = network.server.ask(DialBack, session=SESSION, host="198.51.100.9", port=6000)
    succeeded(call(network, d))
    assert handler.dial_backs == [(SESSION, "198.51.100.9", 6000)]


@pytest.mark.parametrize(
    "args",
    [
        {"session": b"x", "host": "198.51.100.9", "port": 6000},
        {"session": SESSION, "host": "example.org", "port": 6000},
        {"session": SESSION, "host": "198.51.100.9", "port": 0},
    ],
)
def test_malformed_dial_back_is_rejected(
    session: RendezvousSession, network: Network, handler: Handler, args: dict[str, Any]
) -> None:
    """A malformed DialBack is answered with InvalidRequest and never reaches the handler."""
    failed(call(network, network.server.ask(DialBack, **args)), InvalidRequest)
    assert handler.dial_backs == []


def test_relay_offer_calls_handler(
    session: RendezvousSession, network: Network, handler: Handler
) -> None:
    """RelayOffer hands the session, token and lifetime to the handler."""
    d = network.server.ask(RelayOffer, session=SESSION, token=TOKEN, lifetime=60.0)
    succeeded(call(network, d))
    assert handler.relay_offers == [(SESSION, TOKEN, 60.0)]


@pytest.mark.parametrize(
    "args",
    [
        {"session": SESSION, "token": b"short", "lifetime": 60.0},
        {"session": SESSION, "token": TOKEN, "lifetime": 0.0},
        {"session": SESSION, "token": TOKEN, "lifetime": float("inf")},
    ],
)
def test_malformed_relay_offer_is_rejected(
    session: RendezvousSession, network: Network, handler: Handler, args: dict[str, Any]
) -> None:
    """A malformed RelayOffer is answered with InvalidRequest and never reaches the handler."""
    failed(call(network, network.server.ask(RelayOffer, **args)), InvalidRequest)
    assert handler.relay_offers == []


# -- join_relay ---------------------------------------------------------------


def test_join_relay_switches_to_protocol(
    clock: Clock, network: Network, identity: Identity
) -> None:
    """join_relay authenticates, sends RelayJoin, then the connection carries raw bytes."""
    mine = RawRecorder()
    d = join_relay(clock, network.endpoint(), identity, TOKEN, mine)
    network.flush()
    joined: object = succeeded(d)
    assert joined is mine
    server = network.server
    assert server.named(b"RelayJoin") == [{"token": TOKEN}]
    assert server.peer_id == identity.peer_id
    assert mine.made
    assert mine.transport is not None
    mine.transport.write(b"hello through the relay")
    assert server.relay_protocol is not None
    assert server.relay_protocol.transport is not None
    server.relay_protocol.transport.write(b"and back")
    network.flush()
    assert server.relay_protocol.received == b"hello through the relay"
    assert mine.received == b"and back"
    assert clock.getDelayedCalls() == []


def test_join_relay_refused(clock: Clock, network: Network, identity: Identity) -> None:
    """A refused RelayJoin fails with RelayRefused, closes the connection, never connects."""
    network.script.errors[b"RelayJoin"] = RelayRefused("unknown token")
    mine = RawRecorder()
    d = join_relay(clock, network.endpoint(), identity, TOKEN, mine)
    network.flush()
    failed(d, RelayRefused)
    assert network.server.lost
    assert not mine.made
    assert clock.getDelayedCalls() == []


def test_join_relay_cancel(clock: Clock, network: Network, identity: Identity) -> None:
    """Cancelling join_relay closes the connection and leaves no timer."""
    network.script.hold.add(b"RelayJoin")
    mine = RawRecorder()
    d = join_relay(clock, network.endpoint(), identity, TOKEN, mine)
    network.flush()
    d.cancel()
    network.flush()
    failed(d, CancelledError)
    assert network.server.lost
    assert not mine.made
    assert clock.getDelayedCalls() == []


def test_join_relay_rejects_bad_token(clock: Clock, network: Network, identity: Identity) -> None:
    """A token of the wrong size fails at once, without connecting."""
    failed(join_relay(clock, network.endpoint(), identity, b"x", RawRecorder()), InvalidRequest)
    assert network.attempts == []


def test_join_relay_unreachable(clock: Clock, network: Network, identity: Identity) -> None:
    """An unreachable rendezvous fails join_relay with RendezvousUnavailable."""
    network.refuse = True
    d = join_relay(clock, network.endpoint(), identity, TOKEN, RawRecorder())
    failed(d, RendezvousUnavailable)
