"""
The responders of a rendezvous server connection, for
:mod:`nattraverse.rendezvous.server`: :class:`RendezvousServerProtocol`
answers each command of :mod:`nattraverse.rendezvous.commands`
(``Hello``, ``Authenticate``, ``Register``, ``Refresh``, ``Lookup``,
``Connect``, ``Reverse``, ``Relay``, ``RelayJoin``, ``UdpRelay``), checks
every value it
is sent and keeps the soft state in the factory's
:class:`~nattraverse.rendezvous.registry.Registry`.

The connection itself (handshake timeout, closing, errors, sending) is
:class:`~nattraverse.rendezvous._server_connection.ServerConnection`.
"""

from __future__ import annotations

import hmac
from typing import Any

from twisted.logger import Logger

from nattraverse._types import Endpoint
from nattraverse.errors import (
    InvalidRequest,
    NotAuthenticated,
    PeerNotFound,
    RelayRefused,
    ReversalRefused,
)
from nattraverse.identity import PeerId, verify
from nattraverse.rendezvous import commands
from nattraverse.rendezvous._lean_amp import pushes
from nattraverse.rendezvous._server_connection import (
    ServerConnection,
    ServerState,
    canonical,
    responder,
)
from nattraverse.rendezvous.commands import (
    CHALLENGE_SIZE,
    PROTOCOL_VERSION,
    SECRET_SIZE,
    SESSION_ID_SIZE,
    TOKEN_SIZE,
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
    UdpRelay,
    UdpRelayOffer,
    check_bytes,
    check_candidates,
    check_host,
    check_methods,
    check_name,
    check_port,
    encode_candidates,
    is_peer_id,
)
from nattraverse.rendezvous.registry import Introduction, PeerRecord, Registration

__all__ = ["MAX_PUBLIC_KEY", "MAX_REVERSALS", "RendezvousServerProtocol"]

# The namespace of the module these responders were split from: operators'
# log filters keep working.
_log = Logger(namespace="nattraverse.rendezvous.server")

#: Largest DER public key accepted by ``Authenticate`` (P-256 SPKI: 91 bytes).
MAX_PUBLIC_KEY = 1024
#: ``Reverse`` requests one introduction serves.
MAX_REVERSALS = 4


class RendezvousServerProtocol(ServerConnection):
    """
    One connection to the rendezvous.

    :ivar server: What all connections share.
    :ivar peer_id: The peer id this connection proved, once authenticated.
    :ivar observed_host: The address the connection comes from.
    :ivar observed_port: The port it comes from.
    :ivar udp_token: The UDP binding token ``Hello`` issued, until the
        connection is lost.
    :ivar udp_observed: Where the STUN service last observed the UDP socket
        bound with that token, ``None`` until it has.
    :ivar udp_second_observed: Where the STUN service's second port last
        observed it, ``None`` until it has.
    """

    def __init__(self, server: ServerState) -> None:
        # Every attribute a connection ever sets is set in __init__ (see
        # nattraverse.rendezvous._lean_amp).
        super().__init__(server)
        self._challenge: bytes | None = None
        self._greeted = False
        self.udp_token: bytes | None = None
        self.udp_observed: Endpoint | None = None
        self.udp_second_observed: Endpoint | None = None

    def __repr__(self) -> str:
        return f"<RendezvousServerProtocol {self.source} {self.peer_id}>"

    # -- responders --------------------------------------------------------

    @responder(Hello, authenticated=False)
    def hello(self, version: int) -> dict[str, Any]:
        """``Hello``: a fresh challenge and the observed address."""
        if self._greeted:
            raise InvalidRequest("Hello was already sent on this connection")
        if version < 1:
            raise InvalidRequest(f"version: {version} is not a protocol version (1 or more)")
        server = self.server
        self._greeted = True
        self._challenge = check_bytes(server.random(CHALLENGE_SIZE), CHALLENGE_SIZE, "challenge")
        self.udp_token = server.udp_bindings.issue(self)
        return {
            "version": PROTOCOL_VERSION,
            "challenge": self._challenge,
            "observed_host": self.observed_host,
            "observed_port": self.observed_port,
            "stun_port": server.stun_port,
            "relay": server.relay_hub is not None,
            "udp_token": self.udp_token,
            "stun_second_port": server.stun_second_port,
            "udp_relay": server.udp_relay_hub is not None,
        }

    def udp_bound(self, source: Endpoint, *, second: bool = False) -> None:
        """
        The STUN service observed this connection's UDP socket at *source*
        (an authenticated Binding request; the latest wins), at its second
        port when *second* is true.
        """
        observed = Endpoint(canonical(source.host), source.port)
        if second:
            self.udp_second_observed = observed
            return
        if observed != self.udp_observed:
            _log.debug(
                "{source} ({peer}) bound its UDP socket, observed at {udp}",
                source=self.source,
                peer=str(self.peer_id) if self.peer_id is not None else "-",
                udp=str(observed),
            )
        self.udp_observed = observed

    @responder(Authenticate, authenticated=False)
    def authenticate(
        self, public_key: bytes, signature: bytes, access_proof: bytes | None = None
    ) -> dict[str, Any]:
        """``Authenticate``: bind the connection to a proven peer id."""
        if self.peer_id is not None:
            raise InvalidRequest("this connection is already authenticated")
        challenge = self._challenge
        if challenge is None:
            if not self._greeted:
                raise NotAuthenticated("send Hello first: Authenticate signs its challenge")
            raise NotAuthenticated(
                "this connection's challenge was spent by a failed Authenticate; "
                "open a new connection"
            )
        self._challenge = None
        access_key = self.server.access_key
        if access_key is not None:
            if access_proof is None:
                raise NotAuthenticated(
                    "this rendezvous needs an access key: give the client the key its "
                    "operator set (--access-key-file or NATRENDEZVOUS_ACCESS_KEY)"
                )
            expected = commands.access_proof(access_key, challenge)
            if not hmac.compare_digest(access_proof, expected):
                raise NotAuthenticated(
                    "the access proof does not match this rendezvous' access key; "
                    "check the client's access key"
                )
        if len(public_key) > MAX_PUBLIC_KEY:
            raise InvalidRequest(
                f"public_key: {len(public_key)} bytes, at most {MAX_PUBLIC_KEY} are accepted"
            )
        peer_id = verify(public_key, challenge, signature)
        self.peer_id = peer_id
        self._cancel_timer()
        self.server.stats.authentications += 1
        _log.debug("{source} authenticated as {peer}", source=self.source, peer=str(peer_id))
        return {"peer_id": str(peer_id)}

    @responder(Register)
    def register(
        self,
        name: str,
        listen_port: int,
        private: list[dict[str, Any]],
        udp_private: list[dict[str, Any]] | None = None,
        tcp_private: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """``Register``: bind a name to this connection's peer id."""
        assert self.peer_id is not None
        checked = check_name(name)
        record = PeerRecord(
            self.observed_host,
            self.observed_port,
            check_port(listen_port, "listen_port"),
            tuple(check_candidates(private)),
            tuple(check_candidates(udp_private or (), "udp_private")),
            tuple(check_candidates(tcp_private or (), "tcp_private")),
        )
        server = self.server
        registry = server.registry
        registry.register(
            checked, self.peer_id, self.observed_host, record, server.now(), contact=self
        )
        server.stats.registrations += 1
        _log.info(
            "registered {name} for {peer} at {source} ({registrations} registrations)",
            name=checked,
            peer=str(self.peer_id),
            source=self.source,
            registrations=len(registry),
        )
        return {"ttl": registry.ttl}

    @responder(Refresh)
    def refresh(self) -> dict[str, Any]:
        """``Refresh``: renew this connection's registration."""
        assert self.peer_id is not None
        registry = self.server.registry
        registry.refresh(self.peer_id, self.server.now(), contact=self)
        return {"ttl": registry.ttl}

    @responder(Lookup)
    def lookup(self, peer: str) -> dict[str, Any]:
        """``Lookup``: what the server knows of a connected registered peer."""
        registration, contact = self._find(peer)
        return _peer_fields(registration, contact)

    @responder(Connect)
    def connect(
        self,
        peer: str,
        listen_port: int,
        private: list[dict[str, Any]],
        methods: list[str],
        udp_private: list[dict[str, Any]] | None = None,
        tcp_private: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """``Connect``: introduce this peer and the callee to each other."""
        caller = self.peer_id
        assert caller is not None
        port = check_port(listen_port, "listen_port")
        candidates = check_candidates(private)
        udp_candidates = check_candidates(udp_private or (), "udp_private")
        tcp_candidates = check_candidates(tcp_private or (), "tcp_private")
        wanted = check_methods(methods)
        registration, callee = self._find(peer)
        server = self.server
        session = check_bytes(server.random(SESSION_ID_SIZE), SESSION_ID_SIZE, "session")
        secret = check_bytes(server.random(SECRET_SIZE), SECRET_SIZE, "secret")
        server.registry.introduce(
            session,
            caller,
            registration.peer_id,
            self.observed_host,
            self.observed_port,
            server.now(),
            caller_contact=self,
            callee_contact=callee,
        )
        # The callee first: it must know the session before the caller's
        # first connection reaches it.
        udp = self.udp_observed
        second = self.udp_second_observed
        sent = callee.send(
            Introduce,
            session=session,
            secret=secret,
            peer_id=str(caller),
            name="",
            observed_host=self.observed_host,
            observed_port=self.observed_port,
            listen_port=port,
            private=encode_candidates(candidates),
            udp_host=udp.host if udp is not None else "",
            udp_port=udp.port if udp is not None else 0,
            udp_private=encode_candidates(udp_candidates),
            tcp_private=encode_candidates(tcp_candidates),
            udp_second_host=second.host if second is not None else "",
            udp_second_port=second.port if second is not None else 0,
            methods=wanted,
        )
        if not sent:
            server.registry.forget_introduction(session)
            raise PeerNotFound(f"{peer!r} is registered but not connected to the rendezvous now")
        server.stats.introductions += 1
        _log.info(
            "introduced {caller} at {source} to {callee} ({name}), session {session}",
            caller=str(caller),
            source=self.source,
            callee=str(registration.peer_id),
            name=registration.name,
            session=session.hex(),
        )
        return {
            "session": session,
            "secret": secret,
            **_peer_fields(registration, callee),
            "relay": server.relay_hub is not None,
        }

    @responder(Reverse)
    def reverse(self, session: bytes, port: int, host: str | None = None) -> dict[str, Any]:
        """``Reverse``: have the callee dial this caller's observed address."""
        checked = check_bytes(session, SESSION_ID_SIZE, "session")
        checked_port = check_port(port, "port", allow_zero=False)
        introduction = self.server.registry.introduction(checked, self.server.now())
        if introduction is None or introduction.caller != self.peer_id:
            raise ReversalRefused(
                f"session {checked.hex()} is not an introduction this peer asked for "
                "(unknown, expired, or another peer's); send Connect first"
            )
        observed = introduction.caller_host
        if host is not None and _canonical_or_none(host) != observed:
            raise ReversalRefused(
                f"asked to be dialed at {host[:64]!r}, but the rendezvous observes this peer "
                f"at {observed}; the callee dials only the observed address"
            )
        if introduction.reversals >= MAX_REVERSALS:
            raise ReversalRefused(
                f"session {checked.hex()} already asked for {MAX_REVERSALS} reversals"
            )
        callee = introduction.callee_contact
        if not isinstance(callee, RendezvousServerProtocol) or not callee.send(
            DialBack, session=checked, host=observed, port=checked_port
        ):
            raise ReversalRefused("the callee is no longer connected to the rendezvous")
        introduction.reversals += 1
        self.server.stats.reversals += 1
        _log.info(
            "reversal for session {session}: {callee} dials {host}:{port}",
            session=checked.hex(),
            callee=str(introduction.callee),
            host=observed,
            port=checked_port,
        )
        return {}

    @responder(Relay)
    def relay(self, session: bytes) -> dict[str, Any]:
        """``Relay``: allocate a relay between the two peers of a session."""
        checked = check_bytes(session, SESSION_ID_SIZE, "session")
        server = self.server
        hub = server.relay_hub
        if hub is None:
            raise RelayRefused("the relay is off on this rendezvous")
        introduction, is_caller, other = self._relayed_introduction(checked)
        caller_token, callee_token = hub.allocate(checked, introduction.caller, introduction.callee)
        mine, theirs = (caller_token, callee_token) if is_caller else (callee_token, caller_token)
        lifetime = float(hub.lifetime)
        if not other.send(RelayOffer, session=checked, token=theirs, lifetime=lifetime):
            raise RelayRefused("the other peer of this session is no longer connected")
        server.stats.relays += 1
        _log.info(
            "relay allocated for session {session}: {caller} <-> {callee}",
            session=checked.hex(),
            caller=str(introduction.caller),
            callee=str(introduction.callee),
        )
        return {"token": mine, "lifetime": lifetime}

    @responder(UdpRelay)
    def udp_relay(self, session: bytes) -> dict[str, Any]:
        """``UdpRelay``: open a UDP relay port between the two peers of a session."""
        checked = check_bytes(session, SESSION_ID_SIZE, "session")
        server = self.server
        hub = server.udp_relay_hub
        if hub is None:
            raise RelayRefused("the UDP relay is off on this rendezvous")
        introduction, is_caller, other = self._relayed_introduction(checked)
        allocation = hub.allocate(checked, introduction.caller, introduction.callee)
        mine, theirs = (
            (allocation.caller_token, allocation.callee_token)
            if is_caller
            else (allocation.callee_token, allocation.caller_token)
        )
        if not other.send(
            UdpRelayOffer,
            session=checked,
            port=allocation.port,
            token=theirs,
            lifetime=allocation.lifetime,
        ):
            hub.release(checked, "the other peer could not be told")
            raise RelayRefused("the other peer of this session is no longer connected")
        server.stats.udp_relays += 1
        return {"port": allocation.port, "token": mine, "lifetime": allocation.lifetime}

    def _relayed_introduction(
        self, session: bytes
    ) -> tuple[Introduction, bool, RendezvousServerProtocol]:
        """
        The live introduction *session* of this peer, whether this peer is
        its caller, and the other peer's connection.

        :raises RelayRefused: when there is none, or the other peer is no
            longer connected.
        """
        server = self.server
        introduction = server.registry.introduction(session, server.now())
        if introduction is None or self.peer_id not in (introduction.caller, introduction.callee):
            raise RelayRefused(
                f"session {session.hex()} is not an introduction of this peer "
                "(unknown, expired, or between other peers); send Connect first"
            )
        is_caller = self.peer_id == introduction.caller
        other = introduction.callee_contact if is_caller else introduction.caller_contact
        if not isinstance(other, RendezvousServerProtocol) or not other.alive:
            raise RelayRefused("the other peer of this session is no longer connected")
        return introduction, is_caller, other

    @responder(RelayJoin)
    def relay_join(self, token: bytes) -> Any:
        """``RelayJoin``: switch this connection to a relay leg."""
        assert self.peer_id is not None
        checked = check_bytes(token, TOKEN_SIZE, "token")
        server = self.server
        hub = server.relay_hub
        if hub is None:
            raise RelayRefused("the relay is off on this rendezvous")
        registration = server.registry.registration(self.peer_id, server.now())
        if registration is not None and registration.contact is self:
            raise InvalidRequest(
                "RelayJoin needs a fresh connection; this one holds a registration"
            )
        leg = hub.join(checked, self.peer_id)
        transport: Any = self.transport
        if pushes(transport):
            # The relay takes the transport over, flow control included.
            transport.unregisterProducer()
            transport.resumeProducing()
        server.stats.relay_joins += 1
        # ProtocolSwitchCommand responders return the protocol to switch to.
        return leg

    def _find(self, peer: str) -> tuple[Registration, RendezvousServerProtocol]:
        target: str | PeerId = PeerId.parse(peer) if is_peer_id(peer) else check_name(peer)
        registration = self.server.registry.find_connected(target, self.server.now())
        contact = registration.contact
        if not isinstance(contact, RendezvousServerProtocol) or not contact.alive:
            raise PeerNotFound(f"{peer!r} is registered but not connected to the rendezvous now")
        return registration, contact


def _canonical_or_none(host: str) -> str | None:
    try:
        return canonical(check_host(host, "host"))
    except (InvalidRequest, ValueError):
        return None


def _peer_fields(registration: Registration, contact: RendezvousServerProtocol) -> dict[str, Any]:
    """The ``_PEER_FIELDS`` of a registered peer, its UDP address as of now."""
    record = registration.record
    udp = contact.udp_observed
    second = contact.udp_second_observed
    return {
        "peer_id": str(registration.peer_id),
        "name": registration.name,
        "observed_host": record.observed_host,
        "observed_port": record.observed_port,
        "listen_port": record.listen_port,
        "private": encode_candidates(record.private),
        "udp_host": udp.host if udp is not None else "",
        "udp_port": udp.port if udp is not None else 0,
        "udp_private": encode_candidates(record.udp_private),
        "tcp_private": encode_candidates(record.tcp_private),
        "udp_second_host": second.host if second is not None else "",
        "udp_second_port": second.port if second is not None else 0,
    }
