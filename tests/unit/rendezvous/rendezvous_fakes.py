"""
Test support for the rendezvous client and registration tests (not a test
module): a fake AMP rendezvous (:class:`FakeServer`) answering from a
:class:`Script`, an in-memory network of connections to it
(:class:`Network`, twisted.test.iosim) driven by a task.Clock, a recording
:class:`Handler`, and Deferred helpers.  No sockets.

Used by test_rendezvous_client.py and test_rendezvous_registration.py.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from nattraverse.errors import NotAuthenticated
from nattraverse.identity import Identity, PeerId, verify
from nattraverse.rendezvous.client import Introduction, IRendezvousHandler
from nattraverse.rendezvous.commands import (
    PROTOCOL_VERSION,
    Authenticate,
    Connect,
    Hello,
    Introduce,
    Lookup,
    Refresh,
    Register,
    Relay,
    RelayJoin,
    Reverse,
    access_proof,
)

T = TypeVar("T")

CHALLENGE = bytes(range(32))
UDP_TOKEN = bytes(range(100, 132))
SESSION = b"S" * 16
SECRET = b"K" * 32
TOKEN = b"T" * 32
OBSERVED = ("203.0.113.7", 40001)
OTHER = Identity.generate()
OTHER_ID = str(OTHER.peer_id)


# -- Deferred helpers ---------------------------------------------------------


# -- the fake rendezvous ------------------------------------------------------


def peer_fields(**override: Any) -> dict[str, Any]:
    """A valid peer description as the server sends it (OTHER's)."""
    fields: dict[str, Any] = {
        "peer_id": OTHER_ID,
        "name": "bob",
        "observed_host": "198.51.100.9",
        "observed_port": 50000,
        "listen_port": 7000,
        "private": [{"host": "10.0.0.9", "port": 7000}],
        "udp_host": "",
        "udp_port": 0,
        "udp_private": [],
    }
    fields.update(override)
    return fields


@dataclass
class Script:
    """How the fake server answers; tests change it."""

    hello: dict[str, Any] = field(
        default_factory=lambda: {
            "version": PROTOCOL_VERSION,
            "challenge": CHALLENGE,
            "observed_host": OBSERVED[0],
            "observed_port": OBSERVED[1],
            "stun_port": 3478,
            "relay": True,
            "udp_token": UDP_TOKEN,
        }
    )
    access_key: bytes | None = None
    bound_peer_id: str | None = None
    ttl: float = 30.0
    errors: dict[bytes, Exception] = field(default_factory=dict)
    hold: set[bytes] = field(default_factory=set)
    lookup: dict[str, Any] = field(default_factory=peer_fields)
    connect: dict[str, Any] = field(
        default_factory=lambda: {
            "session": SESSION,
            "secret": SECRET,
            **peer_fields(),
            "relay": True,
        }
    )


class FakeServer(amp.AMP):
    """A rendezvous stand-in: answers from a :class:`Script`, records every request."""

    def __init__(self, script: Script) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.script = script
        self.requests: list[tuple[bytes, dict[str, Any]]] = []
        self.held: list[Deferred[dict[str, Any]]] = []
        self.peer_id: PeerId | None = None
        self.relay_protocol: RawRecorder | None = None
        self.lost = False

    def answer(self, command: bytes, answer: object, **request: Any) -> Any:
        self.requests.append((command, request))
        if command in self.script.errors:
            raise self.script.errors[command]
        if command in self.script.hold:
            held: Deferred[dict[str, Any]] = Deferred()
            self.held.append(held)
            return held
        return answer

    def named(self, command: bytes) -> list[dict[str, Any]]:
        return [request for name, request in self.requests if name == command]

    @Hello.responder
    def hello(self, version: int) -> Any:
        return self.answer(b"Hello", dict(self.script.hello), version=version)

    @Authenticate.responder
    def authenticate(
        self, public_key: bytes, signature: bytes, access_proof: bytes | None = None
    ) -> Any:
        request = {"public_key": public_key, "signature": signature, "access_proof": access_proof}
        self.requests.append((b"Authenticate", request))
        key = self.script.access_key
        if key is not None and access_proof is None:
            raise NotAuthenticated("this rendezvous wants an access key")
        if key is not None and not hmac.compare_digest(access_proof or b"", _proof(key, CHALLENGE)):
            raise NotAuthenticated("wrong access key")
        if b"Authenticate" in self.script.errors:
            raise self.script.errors[b"Authenticate"]
        self.peer_id = verify(public_key, CHALLENGE, signature)
        return {"peer_id": self.script.bound_peer_id or str(self.peer_id)}

    @Register.responder
    def register(
        self,
        name: str,
        listen_port: int,
        private: list[dict[str, Any]],
        udp_private: list[dict[str, Any]] | None = None,
        tcp_private: list[dict[str, Any]] | None = None,
    ) -> Any:
        return self.answer(
            b"Register", {"ttl": self.script.ttl}, name=name, listen_port=listen_port,
            private=private, udp_private=udp_private, tcp_private=tcp_private,
        )  # fmt: skip

    @Refresh.responder
    def refresh(self) -> Any:
        return self.answer(b"Refresh", {"ttl": self.script.ttl})

    @Lookup.responder
    def lookup(self, peer: str) -> Any:
        return self.answer(b"Lookup", dict(self.script.lookup), peer=peer)

    @Connect.responder
    def connect(
        self,
        peer: str,
        listen_port: int,
        private: list[dict[str, Any]],
        methods: list[str],
        udp_private: list[dict[str, Any]] | None = None,
        tcp_private: list[dict[str, Any]] | None = None,
    ) -> Any:
        return self.answer(
            b"Connect", dict(self.script.connect), peer=peer, listen_port=listen_port,
            private=private, methods=methods, udp_private=udp_private, tcp_private=tcp_private,
        )  # fmt: skip

    @Reverse.responder
    def reverse(self, session: bytes, port: int, host: str | None = None) -> Any:
        return self.answer(b"Reverse", {}, session=session, host=host, port=port)

    @Relay.responder
    def relay(self, session: bytes) -> Any:
        return self.answer(b"Relay", {"token": TOKEN, "lifetime": 60.0}, session=session)

    @RelayJoin.responder
    def relay_join(self, token: bytes) -> Any:
        self.relay_protocol = RawRecorder()
        return self.answer(b"RelayJoin", self.relay_protocol, token=token)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def drop(self) -> None:
        """Close the connection from the server's side."""
        assert self.transport is not None
        self.transport.loseConnection()

    def ask(self, command: type[amp.Command], **arguments: Any) -> Deferred[dict[str, Any]]:
        """Send the client a command."""
        asked: Deferred[dict[str, Any]] = self.callRemote(  # type: ignore[no-untyped-call]
            command, **arguments
        )
        return asked


def _proof(key: bytes, challenge: bytes) -> bytes:
    return access_proof(key, challenge)


class RawRecorder(Protocol):
    """A raw protocol that records what it receives and whether it was disconnected."""

    def __init__(self) -> None:
        self.received = b""
        self.made = False
        self.lost = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects to a new :class:`FakeServer` on the :class:`Network`."""

    _host = "192.0.2.1"
    _port = 8478

    def __init__(self, network: Network) -> None:
        self.network = network

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self.network.connect(protocolFactory)


class Network:
    """In-memory connections to fake servers, pumped by :meth:`flush`."""

    def __init__(self, clock: Clock, script: Script | None = None) -> None:
        self.clock = clock
        self.script = script or Script()
        self.servers: list[FakeServer] = []
        self.pumps: list[iosim.IOPump] = []
        self.refuse = False
        self.hang = False
        self.hanging: list[Deferred[IProtocol]] = []
        self.cancelled: list[Deferred[IProtocol]] = []
        self.attempts: list[float] = []

    def endpoint(self) -> FakeEndpoint:
        return FakeEndpoint(self)

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self.attempts.append(self.clock.seconds())
        if self.refuse:
            return fail(ConnectionRefusedError("192.0.2.1", 8478))
        if self.hang:
            hanging: Deferred[IProtocol] = Deferred(self.cancelled.append)
            self.hanging.append(hanging)
            return hanging
        client_address = IPv4Address("TCP", "10.0.0.2", 50000 + len(self.servers))
        server_address = IPv4Address("TCP", "192.0.2.1", 8478)
        client = factory.buildProtocol(server_address)
        assert client is not None
        server = FakeServer(self.script)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, True, server_address, client_address),
            client,
            iosim.FakeTransport(client, False, client_address, server_address),
            greet=False,
        )
        self.servers.append(server)
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        """Deliver every byte and disconnection, until nothing moves."""
        for _ in range(100):
            if not any([pump.flush(advanceClock=False) for pump in self.pumps]):  # noqa: C419
                return
        raise AssertionError("the in-memory network does not settle")

    @property
    def server(self) -> FakeServer:
        return self.servers[-1]


@implementer(IRendezvousHandler)
class Handler:
    """Records what the rendezvous asks of the peer."""

    def __init__(self) -> None:
        self.introductions: list[Introduction] = []
        self.dial_backs: list[tuple[bytes, str, int]] = []
        self.relay_offers: list[tuple[bytes, bytes, float]] = []
        self.udp_relay_offers: list[tuple[bytes, int, bytes, float]] = []
        self.fail_with: Exception | None = None

    def introduced(self, introduction: Introduction) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.introductions.append(introduction)

    def dial_back(self, session: bytes, host: str, port: int) -> None:
        self.dial_backs.append((session, host, port))

    def relay_offer(self, session: bytes, token: bytes, lifetime: float) -> None:
        self.relay_offers.append((session, token, lifetime))

    def udp_relay_offer(self, session: bytes, port: int, token: bytes, lifetime: float) -> None:
        self.udp_relay_offers.append((session, port, token, lifetime))


# -- driving requests ---------------------------------------------------------


def call(network: Network, d: Deferred[T]) -> Deferred[T]:
    """
    Pump the network after starting a request; the result, held by a new
    Deferred (AMP drops the connection on an error nobody waits for).
    """
    held: Deferred[T] = Deferred()
    d.chainDeferred(held)
    network.flush()
    return held


def introduce_args(**override: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "session": SESSION,
        "secret": SECRET,
        **peer_fields(name=""),
        "methods": ["direct", "reversal", "relay"],
    }
    args.update(override)
    return args


class IntroducedPeer(amp.AMP):
    """A bare AMP client of the real server: records the introductions it sends."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.introduced: list[dict[str, Any]] = []

    @Introduce.responder
    def _introduce(self, **arguments: Any) -> dict[str, Any]:
        self.introduced.append(arguments)
        return {}
