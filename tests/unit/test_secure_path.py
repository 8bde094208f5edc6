"""
The secured path (:mod:`nattraverse.secure`) over in-memory connections
(:mod:`twisted.test.iosim`) with a fake clock: the preamble codec, the
pinned TLS 1.3 handshake in every opening direction, the selection byte,
refusals, timeouts, cancellation, and the transport the application gets.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

from nattraverse._tls import PinnedTLS
from nattraverse.errors import PeerAuthenticationFailed
from nattraverse.identity import Identity
from nattraverse.report import ConnectionReport
from nattraverse.secure import (
    PREAMBLE_MAGIC,
    PREAMBLE_SIZE,
    PathSecrets,
    PunchTransport,
    SecurePath,
    encode_preamble,
    parse_preamble,
    path_tag,
)
from tests.deferreds import failure_of
from tests.deferreds import succeeded as result_of

T = TypeVar("T")

CALLER_ADDRESS = IPv4Address("TCP", "192.0.2.10", 40000)
CALLEE_ADDRESS = IPv4Address("TCP", "198.51.100.20", 8479)
TIMEOUT = 10.0

#: (session hex, secret hex, tag hex): HMAC-SHA256(secret, b"nattraverse path v1" + session)[:16].
TAG_VECTORS = [
    ("00" * 16, "00" * 32, "1a2f4c0f38439fcd5c09cad93aa6ae0b"),
    (bytes(range(16)).hex(), bytes(range(32)).hex(), "a5f84fafd923d97cfc97551a7df00952"),
    ("ff" * 16, "6b", "b3a6001f6808aba88566857fd7a6725e"),
]


# -- helpers ---------------------------------------------------------------------


def has_fired(d: Deferred[Any]) -> bool:
    return bool(d.called)


def recorder(protocol: object) -> Recorder:
    """*protocol*, which must be a :class:`Recorder`."""
    assert isinstance(protocol, Recorder)
    return protocol


def punch(protocol: Protocol) -> PunchTransport:
    """The :class:`PunchTransport` of an application protocol."""
    transport: object = protocol.transport
    assert isinstance(transport, PunchTransport)
    return transport


def authentication_failure(d: Deferred[Any]) -> PeerAuthenticationFailed:
    """The :class:`PeerAuthenticationFailed` *d* failed with."""
    error = failure_of(d).value
    assert isinstance(error, PeerAuthenticationFailed), repr(error)
    return error


class RecordingTransport(iosim.FakeTransport):
    """A fake TCP transport that counts pauses and what was received."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.reading_paused = False
        self.received: list[bytes] = []
        self.aborted = False

    def reading(self) -> bool:
        """Whether the path lets this transport read."""
        return not self.reading_paused

    def pauseProducing(self) -> None:
        self.reading_paused = True

    def resumeProducing(self) -> None:
        self.reading_paused = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()  # type: ignore[no-untyped-call]

    def bufferReceived(self, buf: Any) -> None:
        if isinstance(buf, bytes):
            self.received.append(buf)
        super().bufferReceived(buf)  # type: ignore[no-untyped-call]


class Recorder(Protocol):
    """An application that records what happens to it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.chunks: list[bytes] = []
        self.lost: Failure | None = None
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason or Failure(ConnectionDone())


class RecorderFactory(Factory):
    """Builds :class:`Recorder` s and remembers them and the addresses asked for."""

    def __init__(self, refuse: bool = False) -> None:
        self.built: list[Recorder] = []
        self.addresses: list[Any] = []
        self.refuse = refuse

    def buildProtocol(self, addr: Any) -> Recorder | None:
        self.addresses.append(addr)
        if self.refuse:
            return None
        protocol = Recorder()
        self.built.append(protocol)
        return protocol


@dataclass
class Link:
    """Two paths joined by an in-memory TCP connection."""

    clock: Clock
    caller: SecurePath
    callee: SecurePath
    caller_io: RecordingTransport
    callee_io: RecordingTransport
    pump: iosim.IOPump
    resolved: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass
class Peers:
    """Two identities and the introduction between them."""

    caller: Identity = field(default_factory=Identity.generate)
    callee: Identity = field(default_factory=Identity.generate)
    session: bytes = field(default_factory=lambda: os.urandom(16))
    secret: bytes = field(default_factory=lambda: os.urandom(32))

    def secrets_for(self, role: str, method: str = "direct") -> PathSecrets:
        """What the rendezvous gives *role*: the other peer's id."""
        other = self.callee if role == "caller" else self.caller
        return PathSecrets(self.session, self.secret, other.peer_id, method)


@pytest.fixture
def peers() -> Peers:
    return Peers()


def checking_resolver(
    known: PathSecrets, calls: list[tuple[bytes, bytes]]
) -> Any:  # a resolver as the endpoints write it
    def resolve(session: bytes, tag: bytes) -> PathSecrets | None:
        calls.append((session, tag))
        if session == known.session and path_tag(known.secret, session) == tag:
            return known
        return None

    return resolve


def link(
    peers: Peers,
    *,
    opener: str = "caller",
    method: str = "direct",
    caller_secrets: PathSecrets | None = None,
    callee_secrets: PathSecrets | None = None,
    callee_identity: Identity | None = None,
    relay: bool = False,
    resolve: Any = None,
) -> Link:
    """
    Join a caller and a callee path.  *opener* opened the TCP connection and
    sends the preamble; the other side resolves it (or, with *relay*, checks
    it against its own secrets).
    """
    clock = Clock()
    caller_secrets = caller_secrets or peers.secrets_for("caller", method)
    callee_secrets = callee_secrets or peers.secrets_for("callee", method)
    calls: list[tuple[bytes, bytes]] = []
    callee_identity = callee_identity or peers.callee
    if opener == "caller":
        caller = SecurePath(
            clock, peers.caller, "caller", secrets=caller_secrets, send_preamble=True
        )
        if relay:
            callee = SecurePath(clock, callee_identity, "callee", secrets=callee_secrets)
        else:
            callee = SecurePath(
                clock,
                callee_identity,
                "callee",
                resolve=resolve or checking_resolver(callee_secrets, calls),
            )
        opening, accepting = caller, callee
    else:
        callee = SecurePath(
            clock, callee_identity, "callee", secrets=callee_secrets, send_preamble=True
        )
        caller = SecurePath(
            clock,
            peers.caller,
            "caller",
            resolve=resolve or checking_resolver(caller_secrets, calls),
        )
        opening, accepting = callee, caller
    opener_address, accepter_address = (
        (CALLER_ADDRESS, CALLEE_ADDRESS) if opener == "caller" else (CALLEE_ADDRESS, CALLER_ADDRESS)
    )
    opening_io = RecordingTransport(opening, False, opener_address, accepter_address)
    accepting_io = RecordingTransport(accepting, True, accepter_address, opener_address)
    pump = iosim.connect(accepting, accepting_io, opening, opening_io, greet=False, clock=clock)
    caller_io, callee_io = (
        (opening_io, accepting_io) if opener == "caller" else (accepting_io, opening_io)
    )
    return Link(clock, caller, callee, caller_io, callee_io, pump, calls)


def connected(peers: Peers, **kwargs: Any) -> tuple[Link, Recorder, Recorder]:
    """A link whose caller selected and whose callee attached a :class:`Recorder`."""
    joined = link(peers, **kwargs)
    joined.pump.flush()
    app_caller = recorder(joined.caller.select(Factory.forProtocol(Recorder)))
    joined.pump.flush()
    app_callee = recorder(joined.callee.attach(Factory.forProtocol(Recorder)))
    return joined, app_caller, app_callee


# -- the preamble codec ----------------------------------------------------------


@pytest.mark.parametrize(("session", "secret", "tag"), TAG_VECTORS)
def test_path_tag_vectors(session: str, secret: str, tag: str) -> None:
    """path_tag is HMAC-SHA256 over the context and session, cut to 16 bytes."""
    assert path_tag(bytes.fromhex(secret), bytes.fromhex(session)).hex() == tag


@pytest.mark.parametrize(("session", "secret", "tag"), TAG_VECTORS)
def test_encode_preamble_vectors(session: str, secret: str, tag: str) -> None:
    """A preamble is the magic, the session id and the tag: 36 bytes."""
    preamble = encode_preamble(bytes.fromhex(session), bytes.fromhex(secret))
    assert preamble == b"NTP1" + bytes.fromhex(session) + bytes.fromhex(tag)
    assert len(preamble) == PREAMBLE_SIZE == 36


@given(session=st.binary(min_size=16, max_size=16), secret=st.binary(min_size=1, max_size=64))
def test_preamble_round_trip(session: bytes, secret: bytes) -> None:
    """parse_preamble gives back the session and the tag encode_preamble put in."""
    assert parse_preamble(encode_preamble(session, secret)) == (
        session,
        path_tag(secret, session),
    )


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"NTP1",
        b"NTP1" + bytes(31),
        b"NTP1" + bytes(33),
        b"NTP2" + bytes(32),
        b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n"[:36],
        b"\x16\x03\x01" + bytes(33),  # a TLS ClientHello where a preamble belongs
    ],
)
def test_parse_preamble_rejects_garbage(garbage: bytes) -> None:
    """Anything but 36 bytes starting with NTP1 is refused as unauthenticated."""
    with pytest.raises(PeerAuthenticationFailed):
        parse_preamble(garbage)


@given(st.binary(max_size=80))
def test_parse_preamble_fuzz(data: bytes) -> None:
    """Random bytes either parse (36 bytes, right magic) or raise PeerAuthenticationFailed."""
    try:
        session, tag = parse_preamble(data)
    except PeerAuthenticationFailed:
        assert len(data) != PREAMBLE_SIZE or not data.startswith(PREAMBLE_MAGIC)
    else:
        assert data == PREAMBLE_MAGIC + session + tag


def test_encode_preamble_rejects_short_session() -> None:
    """A session id is 16 bytes: anything else is a programming error."""
    with pytest.raises(ValueError, match="16 bytes"):
        encode_preamble(bytes(15), b"secret")


def test_path_secrets_repr_hides_secret(peers: Peers) -> None:
    """PathSecrets never shows its secret."""
    secrets = peers.secrets_for("caller")
    assert peers.secret.hex() not in repr(secrets)
    assert str(peers.callee.peer_id) in repr(secrets)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, TypeError),
        ({"secrets": "both", "resolve": lambda s, t: None}, TypeError),
        ({"resolve": lambda s, t: None, "send_preamble": True}, TypeError),
        ({"resolve": lambda s, t: None, "timeout": 0}, ValueError),
    ],
)
def test_secure_path_checks_arguments(peers: Peers, kwargs: dict[str, Any], error: type) -> None:
    """SecurePath wants exactly one of secrets and resolve, and a positive timeout."""
    if kwargs.get("secrets") == "both":
        kwargs["secrets"] = peers.secrets_for("caller")
    with pytest.raises(error):
        SecurePath(Clock(), peers.caller, "caller", **kwargs)


# -- happy paths -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opener", "relay", "method"),
    [("caller", False, "direct"), ("callee", False, "reversal"), ("caller", True, "relay")],
)
def test_both_sides_authenticate(peers: Peers, opener: str, relay: bool, method: str) -> None:
    """Whichever side opened, both sides authenticate the peer the rendezvous named."""
    joined = link(peers, opener=opener, relay=relay, method=method)
    joined.pump.flush()
    assert result_of(joined.caller.authenticated) is joined.caller
    joined.caller.select(RecorderFactory())
    joined.pump.flush()
    assert result_of(joined.callee.authenticated) is joined.callee
    assert joined.caller.secrets.expected == peers.callee.peer_id
    assert joined.callee.secrets.expected == peers.caller.peer_id
    assert joined.clock.getDelayedCalls() == []


def test_accepter_learns_secrets_from_resolve(peers: Peers) -> None:
    """The accepting side asks resolve with the preamble's session and tag."""
    joined = link(peers)
    with pytest.raises(RuntimeError):
        joined.callee.secrets  # noqa: B018
    joined.pump.flush()
    assert joined.resolved == [(peers.session, path_tag(peers.secret, peers.session))]
    assert joined.callee.secrets == peers.secrets_for("callee")


@pytest.mark.parametrize("opener", ["caller", "callee"])
def test_application_bytes_both_directions(peers: Peers, opener: str) -> None:
    """After select and attach, bytes flow both ways, and nothing else reaches the apps."""
    joined, app_caller, app_callee = connected(peers, opener=opener)
    assert app_caller.transport is not None
    assert app_callee.transport is not None
    app_caller.transport.write(b"ping")
    app_callee.transport.writeSequence([b"po", b"ng"])
    joined.pump.flush()
    assert bytes(app_callee.data) == b"ping"
    assert bytes(app_caller.data) == b"pong"


@pytest.mark.parametrize("opener", ["caller", "callee"])
def test_transport_says_how_and_who(peers: Peers, opener: str) -> None:
    """The application's transport carries the method, peer id, session and remote address."""
    method = "direct" if opener == "caller" else "reversal"
    _, app_caller, app_callee = connected(peers, opener=opener, method=method)
    for app, other, address in [
        (app_caller, peers.callee, CALLEE_ADDRESS),
        (app_callee, peers.caller, CALLER_ADDRESS),
    ]:
        transport = punch(app)
        assert transport.method == method
        assert transport.peer_id == other.peer_id
        assert transport.session == peers.session
        assert transport.remote == f"{address.host}:{address.port}"
        assert transport.getPeer() == address
        certificate = transport.getPeerCertificate()
        assert certificate is not None
        assert other.peer_id.matches(certificate.to_cryptography())


def test_connect_ms_counts_from_started(peers: Peers) -> None:
    """select/attach with *started* give the transport connect_ms in reactor time; else None."""
    joined = link(peers)
    joined.pump.flush()
    joined.clock.advance(0.25)
    app_caller = recorder(joined.caller.select(Factory.forProtocol(Recorder), started=0.0))
    joined.pump.flush()
    app_callee = recorder(joined.callee.attach(Factory.forProtocol(Recorder)))
    assert punch(app_caller).connect_ms == pytest.approx(250.0)
    assert punch(app_callee).connect_ms is None


def test_select_puts_the_report_on_the_transport(peers: Peers) -> None:
    """select with *report* makes it the transport's report; attach leaves None."""
    joined = link(peers)
    joined.pump.flush()
    report = ConnectionReport("bob", "nt1bob", "direct", 0.01, 0.02, ())
    app_caller = recorder(joined.caller.select(Factory.forProtocol(Recorder), report=report))
    joined.pump.flush()
    app_callee = recorder(joined.callee.attach(Factory.forProtocol(Recorder)))
    assert punch(app_caller).report is report
    assert punch(app_callee).report is None


def test_factory_gets_peer_address(peers: Peers) -> None:
    """buildProtocol is asked with the raw connection's peer address."""
    joined = link(peers)
    joined.pump.flush()
    factory = RecorderFactory()
    joined.caller.select(factory)
    assert factory.addresses == [CALLEE_ADDRESS]


def test_selection_byte_and_data_in_one_segment(peers: Peers) -> None:
    """Data after the selection byte in the same read reaches the callee's app, in order."""
    joined = link(peers)
    joined.pump.flush()

    class Eager(Recorder):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"first")
            self.transport.write(b"second")

    joined.caller.select(Factory.forProtocol(Eager))
    before = len(joined.callee_io.received)
    joined.pump.pump()
    assert len(joined.callee_io.received) == before + 1  # one segment
    assert has_fired(joined.callee.authenticated)
    app = recorder(joined.callee.attach(Factory.forProtocol(Recorder)))
    assert bytes(app.data) == b"firstsecond"


def test_callee_waits_for_selection(peers: Peers) -> None:
    """After the handshake the callee is not authenticated until the selection byte comes."""
    joined = link(peers)
    joined.pump.flush()
    assert has_fired(joined.caller.authenticated)
    assert not has_fired(joined.callee.authenticated)
    with pytest.raises(RuntimeError, match="authenticated"):
        joined.callee.attach(RecorderFactory())
    assert joined.callee_io.reading()


def test_caller_reads_nothing_until_selected(peers: Peers) -> None:
    """Once authenticated, a path stops reading until the application is there."""
    joined = link(peers)
    joined.pump.flush()
    assert not joined.caller_io.reading()
    joined.caller.select(RecorderFactory())
    assert joined.caller_io.reading()


def test_select_and_attach_are_role_bound(peers: Peers) -> None:
    """Only the caller selects, only the callee attaches, and each only once."""
    joined = link(peers)
    joined.pump.flush()
    with pytest.raises(RuntimeError, match="caller"):
        joined.callee.select(RecorderFactory())
    with pytest.raises(RuntimeError, match="callee"):
        joined.caller.attach(RecorderFactory())
    joined.caller.select(RecorderFactory())
    with pytest.raises(RuntimeError, match="already"):
        joined.caller.select(RecorderFactory())


def test_refusing_factory_closes_path(peers: Peers) -> None:
    """A factory that builds no protocol gets None back and the path closes."""
    joined = link(peers)
    joined.pump.flush()
    assert joined.caller.select(RecorderFactory(refuse=True)) is None
    joined.pump.flush()
    assert joined.caller_io.disconnected or joined.caller_io.disconnecting
    assert joined.clock.getDelayedCalls() == []


# -- refusals ----------------------------------------------------------------------


def test_caller_rejects_wrong_callee(peers: Peers) -> None:
    """A callee whose certificate is not the vouched peer id fails the caller's pin check."""
    joined = link(peers, callee_identity=Identity.generate())
    joined.pump.flush()
    error = authentication_failure(joined.caller.authenticated)
    assert error.peer_id == peers.callee.peer_id
    failure_of(joined.callee.authenticated).trap(PeerAuthenticationFailed)
    assert joined.caller_io.disconnected
    assert joined.clock.getDelayedCalls() == []


def test_callee_rejects_wrong_caller(peers: Peers) -> None:
    """A caller that is not the vouched peer id fails the callee, whose app never sees a byte."""
    impostor = PathSecrets(peers.session, peers.secret, Identity.generate().peer_id, "direct")
    joined = link(peers, callee_secrets=impostor)
    callers: list[Recorder] = []

    class Talker(Recorder):
        def connectionMade(self) -> None:
            callers.append(self)
            assert self.transport is not None
            self.transport.write(b"for the callee's eyes only")

    def select(path: SecurePath) -> None:
        # In TLS 1.3 the client finishes before the server has judged its
        # certificate: the caller may select a path the callee then refuses.
        path.select(Factory.forProtocol(Talker))

    joined.caller.authenticated.addCallbacks(select, lambda failure: None)
    joined.pump.flush()
    error = authentication_failure(joined.callee.authenticated)
    assert error.peer_id == impostor.expected
    factory = RecorderFactory()
    with pytest.raises(RuntimeError):
        joined.callee.attach(factory)
    assert factory.addresses == []
    assert not joined.callee._pending
    assert all(app.lost is not None for app in callers)
    assert joined.callee_io.disconnected or joined.callee_io.disconnecting
    assert joined.clock.getDelayedCalls() == []


def test_callee_rejects_data_instead_of_selection(peers: Peers) -> None:
    """A first application byte other than 0x01 fails the callee."""
    joined = link(peers)
    joined.pump.flush()
    tls = joined.caller._tls
    assert tls is not None
    tls.write(b"\x02hello")
    joined.pump.flush()
    failure_of(joined.callee.authenticated).trap(PeerAuthenticationFailed)
    assert joined.callee_io.disconnected or joined.callee_io.disconnecting


def test_unknown_session_closes_quietly(peers: Peers) -> None:
    """resolve returning None closes the connection before any TLS byte is sent."""
    joined = link(peers, resolve=lambda session, tag: None)
    joined.pump.flush()
    failure_of(joined.callee.authenticated).trap(PeerAuthenticationFailed)
    assert joined.caller_io.received == []  # the accepter wrote nothing at all
    assert joined.callee_io.aborted
    assert joined.clock.getDelayedCalls() == []


def test_wrong_tag_is_refused_even_by_a_careless_resolver(peers: Peers) -> None:
    """The tag is checked again after resolve: a wrong secret fails authentication."""
    wrong = PathSecrets(peers.session, b"another secret", peers.callee.peer_id, "direct")
    joined = link(
        peers, caller_secrets=wrong, resolve=lambda session, tag: peers.secrets_for("callee")
    )
    joined.pump.flush()
    assert "tag" in str(authentication_failure(joined.callee.authenticated))
    assert joined.caller_io.received == []


def test_relay_callee_checks_tag(peers: Peers) -> None:
    """The callee of a relay checks the preamble against its own secrets."""
    wrong = PathSecrets(peers.session, b"another secret", peers.callee.peer_id, "relay")
    joined = link(peers, relay=True, caller_secrets=wrong, method="relay")
    joined.pump.flush()
    failure_of(joined.callee.authenticated).trap(PeerAuthenticationFailed)
    assert joined.caller_io.received == []


def test_garbage_instead_of_preamble(peers: Peers) -> None:
    """A connection that does not start with a preamble fails without TLS."""
    clock = Clock()
    path = SecurePath(clock, peers.callee, "callee", resolve=lambda s, t: None)
    transport = RecordingTransport(path, True, CALLEE_ADDRESS, CALLER_ADDRESS)
    path.makeConnection(transport)  # type: ignore[no-untyped-call]
    path.dataReceived(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
    failure_of(path.authenticated).trap(PeerAuthenticationFailed)
    assert transport.aborted
    assert transport.stream == []
    assert clock.getDelayedCalls() == []


def test_preamble_in_pieces(peers: Peers) -> None:
    """A preamble split over several reads is put together."""
    clock = Clock()
    calls: list[tuple[bytes, bytes]] = []
    path = SecurePath(
        clock,
        peers.callee,
        "callee",
        resolve=checking_resolver(peers.secrets_for("callee"), calls),
    )
    path.makeConnection(  # type: ignore[no-untyped-call]
        RecordingTransport(path, True, CALLEE_ADDRESS, CALLER_ADDRESS)
    )
    preamble = encode_preamble(peers.session, peers.secret)
    for byte in preamble[:-1]:
        path.dataReceived(bytes([byte]))
    assert calls == []
    path.dataReceived(preamble[-1:])
    assert calls == [(peers.session, path_tag(peers.secret, peers.session))]
    assert not has_fired(path.authenticated)
    path.abort()
    failure_of(path.authenticated).trap(CancelledError)


def handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Run a TLS handshake between two memory-BIO connections (bounded)."""
    for _ in range(20):
        done = 0
        for side, other in ((client, server), (server, client)):
            try:
                side.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(side.bio_read(65536))
        if done == 2:
            return
    raise AssertionError("the handshake did not finish")


def plain_client(identity: Identity | None, max_version: int) -> SSL.Connection:
    """A TLS client that checks nothing, with at most *max_version*."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(max_version)
    if identity is not None:
        context.use_certificate(identity.certificate)
        context.use_privatekey(identity.private_key)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    return connection


def test_tls_12_refused(peers: Peers) -> None:
    """The path speaks TLS 1.3 only: a TLS 1.2 client gets no handshake."""
    server = PinnedTLS(peers.callee, peers.caller.peer_id).serverConnectionForTLS(None)  # type: ignore[arg-type]
    with pytest.raises(SSL.Error):
        handshake(plain_client(peers.caller, SSL.TLS1_2_VERSION), server)


def test_client_without_certificate_refused(peers: Peers) -> None:
    """A TLS client that presents no certificate is refused by the callee."""
    server = PinnedTLS(peers.callee, peers.caller.peer_id).serverConnectionForTLS(None)  # type: ignore[arg-type]
    with pytest.raises(SSL.Error):
        handshake(plain_client(None, SSL.TLS1_3_VERSION), server)


def test_pinned_tls_accepts_expected_client(peers: Peers) -> None:
    """The pinned server accepts the expected client over TLS 1.3 and checks it again."""
    pins = PinnedTLS(peers.callee, peers.caller.peer_id)
    server = pins.serverConnectionForTLS(None)  # type: ignore[arg-type]
    handshake(plain_client(peers.caller, SSL.TLS1_3_VERSION), server)
    pins.check(server)
    assert server.get_protocol_version_name() == "TLSv1.3"
    assert pins.mismatch is None


def test_negotiated_version_is_tls13(peers: Peers) -> None:
    """Both ends of a path run TLS 1.3."""
    joined, _, _ = connected(peers)
    for path in (joined.caller, joined.callee):
        assert path._tls is not None
        assert path._tls.getHandle().get_protocol_version_name() == "TLSv1.3"


# -- time, cancellation, loss --------------------------------------------------------


def test_timeout_waiting_for_preamble(peers: Peers) -> None:
    """A silent opener makes the accepter fail with TimeoutError, leaving nothing behind."""
    clock = Clock()
    path = SecurePath(clock, peers.callee, "callee", resolve=lambda s, t: None, timeout=TIMEOUT)
    transport = RecordingTransport(path, True, CALLEE_ADDRESS, CALLER_ADDRESS)
    path.makeConnection(transport)  # type: ignore[no-untyped-call]
    clock.advance(TIMEOUT - 0.001)
    assert not has_fired(path.authenticated)
    clock.advance(0.001)
    failure_of(path.authenticated).trap(TimeoutError)
    assert transport.aborted
    assert clock.getDelayedCalls() == []


def test_timeout_waiting_for_selection(peers: Peers) -> None:
    """A callee the caller never selects times out and drops the connection."""
    joined = link(peers)
    joined.pump.flush()
    joined.clock.advance(TIMEOUT)
    failure_of(joined.callee.authenticated).trap(TimeoutError)
    assert joined.callee_io.aborted
    joined.pump.flush()
    assert joined.clock.getDelayedCalls() == []


def test_no_timer_after_success(peers: Peers) -> None:
    """Once authenticated, no DelayedCall is left and later time changes nothing."""
    joined, app_caller, app_callee = connected(peers)
    assert joined.clock.getDelayedCalls() == []
    joined.clock.advance(TIMEOUT * 10)
    joined.pump.flush()
    assert app_caller.lost is None
    assert app_callee.lost is None


def test_cancel_during_handshake(peers: Peers) -> None:
    """Cancelling authenticated aborts the connection and fails with CancelledError."""
    joined = link(peers)
    joined.pump.pump()  # preamble and ClientHello are out; the handshake is under way
    joined.callee.authenticated.cancel()
    failure_of(joined.callee.authenticated).trap(CancelledError)
    assert joined.callee_io.aborted
    joined.pump.flush()
    assert joined.caller_io.disconnecting  # the peer saw the connection go
    assert joined.clock.getDelayedCalls() == []


def test_abort_before_connection(peers: Peers) -> None:
    """A path aborted before its connection fails at once and drops the connection on arrival."""
    clock = Clock()
    path = SecurePath(
        clock, peers.caller, "caller", secrets=peers.secrets_for("caller"), send_preamble=True
    )
    path.abort()
    failure_of(path.authenticated).trap(CancelledError)
    transport = RecordingTransport(path, False, CALLER_ADDRESS, CALLEE_ADDRESS)
    path.makeConnection(transport)  # type: ignore[no-untyped-call]
    assert transport.aborted
    assert transport.stream == []
    assert clock.getDelayedCalls() == []


def test_abort_after_attach_reaches_application(peers: Peers) -> None:
    """Aborting a path in use ends the application's connection."""
    joined, app_caller, app_callee = connected(peers)
    joined.caller.abort()
    joined.pump.flush()
    assert app_caller.lost is not None
    assert app_callee.lost is not None
    assert result_of(joined.caller.authenticated) is joined.caller  # fired once, unchanged


def test_connection_lost_before_authentication(peers: Peers) -> None:
    """A connection that ends during the handshake fails with the loss."""
    joined = link(peers)
    joined.pump.pump()
    joined.caller.connectionLost(Failure(ConnectionLost("gone")))
    failure_of(joined.caller.authenticated).trap(ConnectionLost)
    assert joined.clock.getDelayedCalls() != []  # the callee's own timer still runs
    joined.callee.abort()
    failure_of(joined.callee.authenticated).trap(CancelledError)
    assert joined.clock.getDelayedCalls() == []


def test_application_gets_tls_loss_reason(peers: Peers) -> None:
    """The application's connectionLost carries the reason the connection ended with."""
    joined, app_caller, _ = connected(peers)
    joined.caller.connectionLost(Failure(ConnectionLost("cable cut")))
    assert app_caller.lost is not None
    assert app_caller.lost.check(ConnectionLost)


def test_loss_before_attach_is_delivered_after_data(peers: Peers) -> None:
    """Data and a loss that came before attach reach the application, in that order."""
    joined = link(peers)
    joined.pump.flush()

    class SayAndGo(Recorder):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"last words")
            self.transport.loseConnection()

    joined.caller.select(Factory.forProtocol(SayAndGo))
    joined.pump.flush()
    app = recorder(joined.callee.attach(Factory.forProtocol(Recorder)))
    assert bytes(app.data) == b"last words"
    assert app.lost is not None
    assert app.lost.check(ConnectionDone)


def test_lose_connection_flushes(peers: Peers) -> None:
    """Everything written before loseConnection arrives, then a clean close."""
    joined, app_caller, app_callee = connected(peers)
    payload = os.urandom(300_000)
    assert app_caller.transport is not None
    app_caller.transport.write(payload)
    app_caller.transport.loseConnection()
    app_caller.transport.write(b"after the close")  # dropped, as by TLS transports
    joined.pump.flush()
    assert bytes(app_callee.data) == payload
    assert app_callee.lost is not None
    assert app_callee.lost.check(ConnectionDone)
    assert app_caller.lost is not None


# -- the application's transport -----------------------------------------------------


@pytest.mark.parametrize(
    "interface", [ITransport, ITCPTransport, ISSLTransport, IPushProducer, IConsumer]
)
def test_punch_transport_provides(peers: Peers, interface: Any) -> None:
    """PunchTransport provides, completely, every interface it declares."""
    _, app_caller, _ = connected(peers)
    assert verifyObject(interface, app_caller.transport)


def test_pause_holds_data_and_stops_reading(peers: Peers) -> None:
    """pauseProducing stops reading from the connection and holds data back until resumed."""
    joined, app_caller, app_callee = connected(peers)
    punch(app_callee).pauseProducing()
    assert not joined.callee_io.reading()
    punch(app_caller).write(b"held")
    joined.pump.flush()  # the fake transport delivers even when paused: the path holds it
    assert bytes(app_callee.data) == b""
    punch(app_callee).resumeProducing()
    assert joined.callee_io.reading()
    assert bytes(app_callee.data) == b"held"


def test_producer_paused_by_full_connection(peers: Peers) -> None:
    """A producer registered by the application is paused when the connection pauses it."""

    @implementer(IPushProducer)
    class Producer:
        paused = 0
        resumed = 0

        def pauseProducing(self) -> None:
            self.paused += 1

        def resumeProducing(self) -> None:
            self.resumed += 1

        def stopProducing(self) -> None:
            pass

    joined, app_caller, _ = connected(peers)
    producer = Producer()
    punch(app_caller).registerProducer(producer, True)
    raw_producer = joined.caller_io.producer
    assert raw_producer is not None
    raw_producer.pauseProducing()  # what a TCP transport does when its buffer is full
    assert producer.paused == 1
    raw_producer.resumeProducing()
    assert producer.resumed == 1
    punch(app_caller).unregisterProducer()
    assert joined.caller_io.producer is None


def test_tcp_options_pass_through(peers: Peers) -> None:
    """TCP options are the raw connection's, when it has them."""
    _, app_caller, _ = connected(peers)
    transport = punch(app_caller)
    transport.setTcpNoDelay(True)
    transport.setTcpKeepAlive(True)
    assert transport.getTcpNoDelay() in (True, False)
    assert transport.getTcpKeepAlive() in (True, False)
    assert transport.connected
    assert not transport.disconnecting
    transport.loseWriteConnection()
    assert transport.disconnecting
