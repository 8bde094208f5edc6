"""
The rendezvous client: AMP sessions with ``twistd natrendezvous`` (see
``docs/protocol.rst``).

:func:`open_session` connects, runs ``Hello`` and ``Authenticate`` and
returns a :class:`RendezvousSession`, on which a peer registers, looks
peers up, asks for introductions, connection reversal and relays.  The
server's own requests to a registered peer (``Introduce``, ``DialBack``,
``RelayOffer``, ``UdpRelayOffer``) are checked and handed to an
:class:`IRendezvousHandler`.
:func:`join_relay` opens the fresh connection a relay leg runs on.  The
self-healing registration of a listening peer is
:class:`nattraverse.rendezvous.registration.Registration`; the AMP protocol
underneath, and the checks of what the server sends, are in
:mod:`nattraverse.rendezvous._protocol`.

Nothing here trusts the server blindly: every peer id, address, port,
session id, secret and token it sends is checked before use, and every
request has a timeout, fails promptly when the connection goes away, and
is cancellable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import (
    InvalidRequest,
    PeerAuthenticationFailed,
    RendezvousUnavailable,
)
from nattraverse.identity import Identity, PeerId
from nattraverse.rendezvous._protocol import (
    RETRY_HINT,
    Introduction,
    IRendezvousHandler,
    PeerInfo,
    RendezvousProtocol,
    ServerHello,
    bind_socket,
    check_duration,
    check_peer,
    check_private,
    peer_info,
    pinned,
)
from nattraverse.rendezvous.commands import (
    CHALLENGE_SIZE,
    PROTOCOL_VERSION,
    SECRET_SIZE,
    SESSION_ID_SIZE,
    TOKEN_SIZE,
    UDP_TOKEN_SIZE,
    Authenticate,
    Connect,
    Hello,
    Lookup,
    Refresh,
    Register,
    Relay,
    RelayJoin,
    Reverse,
    UdpRelay,
    access_proof,
    check_bytes,
    check_host,
    check_methods,
    check_name,
    check_port,
)

if TYPE_CHECKING:
    from nattraverse.stun.demux import StunDemultiplexer

__all__ = [
    "IRendezvousHandler",
    "Introduction",
    "PeerInfo",
    "RendezvousSession",
    "ServerHello",
    "check_timeout",
    "describe_endpoint",
    "join_relay",
    "latch_udp_relay",
    "open_session",
]

_log = Logger()


def describe_endpoint(endpoint: object) -> str:
    """
    A short text naming a client endpoint, for messages: ``host:port`` for
    the TCP and hostname endpoints, ``tls:host:port`` for a TLS wrapper,
    ``repr`` otherwise.
    """
    wrapped = getattr(endpoint, "_wrappedEndpoint", None)
    if wrapped is not None:
        return "tls:" + describe_endpoint(wrapped)
    host = getattr(endpoint, "_hostText", None) or getattr(endpoint, "_host", None)
    port = getattr(endpoint, "_port", None)
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return repr(endpoint)


def check_timeout(timeout: float) -> float:
    """
    Return *timeout* if it is a positive number of seconds.

    :raises ValueError: otherwise.
    """
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout: {timeout!r} is not a positive number of seconds")
    return float(timeout)


class RendezvousSession:
    """
    One authenticated connection to the rendezvous; made by
    :func:`open_session`.

    Every request is cancellable, fails with the :mod:`nattraverse.errors`
    class the server raised, and with :class:`RendezvousUnavailable` when
    the server does not answer within the session's timeout or the
    connection is lost or closed meanwhile.  Values are checked before
    they are sent (:class:`InvalidRequest` otherwise) and answers before
    they are believed.

    :ivar hello: What the server said in ``Hello``.
    :ivar peer_id: The peer id the server bound this connection to (this
        peer's).
    :ivar udp_observed: The address the rendezvous' STUN service observed
        this peer's UDP socket at, as of the last successful
        :meth:`bind_udp` (or binding in :func:`open_session`); ``None`` before.
    :ivar udp_error: Why the binding :func:`open_session` was asked for
        failed; ``None`` otherwise.
    :ivar udp_second_observed: Where the STUN service's second port
        observed that socket, when it was bound there too (``second=True``);
        ``None`` otherwise.
    """

    def __init__(
        self,
        protocol: RendezvousProtocol,
        hello: ServerHello,
        peer_id: PeerId,
        timeout: float,
    ) -> None:
        self._protocol = protocol
        self.hello = hello
        self.peer_id = peer_id
        self._timeout = timeout
        self.udp_observed: Endpoint | None = None
        self.udp_error: RendezvousUnavailable | None = None
        self.udp_second_observed: Endpoint | None = None

    def __repr__(self) -> str:
        return f"<RendezvousSession {self.peer_id} with {self._protocol.where}>"

    @property
    def where(self) -> str:
        """The rendezvous endpoint, for messages."""
        return self._protocol.where

    @property
    def transport(self) -> ITransport | None:
        """The connection's transport, ``None`` once it is gone."""
        return self._protocol.transport

    @property
    def local_address(self) -> IAddress | None:
        """This end's address of the connection, ``None`` once it is gone."""
        transport = self._protocol.transport
        return transport.getHost() if transport is not None else None

    @property
    def closed(self) -> Deferred[None]:
        """A new Deferred that fires (with ``None``) once the connection is gone."""
        waiting: Deferred[None] = Deferred()
        self._protocol.watch_loss(lambda reason: waiting.callback(None))
        return waiting

    @property
    def is_open(self) -> bool:
        """Whether the connection is up and not being closed."""
        return not self._protocol.gone

    def watch_loss(self, watcher: Callable[[Failure], None]) -> None:
        """Call *watcher* with the reason once the connection is gone."""
        self._protocol.watch_loss(watcher)

    def close(self) -> None:
        """
        Close the connection.  Pending requests fail at once with
        :class:`RendezvousUnavailable`; :attr:`closed` fires when the
        connection is gone.  Idempotent.
        """
        self._protocol.close()

    def _call(self, what: str, command: type[amp.Command], **args: Any) -> Deferred[dict[str, Any]]:
        return self._protocol.call(what, command, self._timeout, **args)

    def register(
        self,
        name: str,
        listen_port: int,
        private: Sequence[tuple[str, int]],
        *,
        udp_private: Sequence[tuple[str, int]] = (),
        tcp_private: Sequence[tuple[str, int]] = (),
    ) -> Deferred[float]:
        """
        Bind *name* to this peer's id (``Register``).

        :param listen_port: The TCP port this peer accepts direct
            connections on, 0 when none.
        :param private: This peer's private addresses (at most
            :data:`~nattraverse.rendezvous.commands.MAX_CANDIDATES`).
        :param udp_private: The host addresses of this peer's punching UDP
            socket (as many at most).
        :param tcp_private: The host addresses of this peer's TCP punching
            port (as many at most), the local port this session's connection
            comes from; empty when this peer does not punch TCP.
        :returns: A Deferred of the registration's TTL in seconds; it fails
            with :class:`~nattraverse.errors.NameTaken` when another key
            holds the name.
        """
        try:
            args = {
                "name": check_name(name),
                "listen_port": check_port(listen_port, "listen_port"),
                "private": check_private(private),
                "udp_private": check_private(udp_private, "udp_private"),
                "tcp_private": check_private(tcp_private, "tcp_private"),
            }
        except InvalidRequest as e:
            return fail(e)
        d = self._call(f"registering {name!r}", Register, **args)
        return d.addCallback(lambda answer: check_duration(answer["ttl"], "Register.ttl"))

    def refresh(self) -> Deferred[float]:
        """
        Renew this connection's registration (``Refresh``).

        :returns: A Deferred of the new TTL in seconds; it fails with
            :class:`~nattraverse.errors.PeerNotFound` when the registration
            is gone.
        """
        d = self._call("refreshing the registration", Refresh)
        return d.addCallback(lambda answer: check_duration(answer["ttl"], "Refresh.ttl"))

    def lookup(self, peer: str) -> Deferred[PeerInfo]:
        """
        What the rendezvous knows of *peer*, a name or a peer id
        (``Lookup``).  When *peer* is a peer id, an answer about another
        peer fails with :class:`~nattraverse.errors.PeerAuthenticationFailed`.
        """
        try:
            check_peer(peer)
        except InvalidRequest as e:
            return fail(e)
        d = self._call(f"looking up {peer!r}", Lookup, peer=peer)
        return d.addCallback(lambda answer: pinned(peer_info(answer, "Lookup"), peer))

    def connect(
        self,
        peer: str,
        listen_port: int,
        private: Sequence[tuple[str, int]],
        methods: Sequence[str],
        *,
        udp_private: Sequence[tuple[str, int]] = (),
        tcp_private: Sequence[tuple[str, int]] = (),
    ) -> Deferred[Introduction]:
        """
        Ask to be introduced to *peer*, a name or a peer id (``Connect``);
        the peer gets this peer's details at the same moment (its UDP
        address is the one this session last bound with :meth:`bind_udp`).

        :param listen_port: This peer's TCP port for connection reversal, 0
            when none.
        :param private: This peer's private addresses.
        :param methods: The methods this peer will try.
        :param udp_private: The host addresses of this peer's punching UDP
            socket.
        :param tcp_private: The host addresses of this peer's TCP punching
            port, the local port this session's connection comes from; empty
            when this peer does not punch TCP.
        :returns: A Deferred of the :class:`Introduction`; it fails with
            :class:`~nattraverse.errors.PeerNotFound` when no live
            registration has that name or id.
        """
        try:
            check_peer(peer)
            args: dict[str, Any] = {
                "peer": peer,
                "listen_port": check_port(listen_port, "listen_port"),
                "private": check_private(private),
                "methods": check_methods(methods),
                "udp_private": check_private(udp_private, "udp_private"),
                "tcp_private": check_private(tcp_private, "tcp_private"),
            }
        except InvalidRequest as e:
            return fail(e)

        def introduction(answer: dict[str, Any]) -> Introduction:
            return Introduction(
                session=check_bytes(answer["session"], SESSION_ID_SIZE, "Connect.session"),
                secret=check_bytes(answer["secret"], SECRET_SIZE, "Connect.secret"),
                peer=pinned(peer_info(answer, "Connect"), peer),
                methods=tuple(args["methods"]),
                relay=bool(answer["relay"]),
            )

        return self._call(f"connecting to {peer!r}", Connect, **args).addCallback(introduction)

    def reverse(self, session: bytes, port: int, host: str | None = None) -> Deferred[None]:
        """
        Ask the peer of introduction *session* to dial this peer back at
        *port* of the address the rendezvous observes it at (``Reverse``).
        *host*, when given, must be that address.
        """
        try:
            args: dict[str, Any] = {
                "session": check_bytes(session, SESSION_ID_SIZE, "session"),
                "port": check_port(port, "port", allow_zero=False),
            }
            if host is not None:
                args["host"] = check_host(host, "host")
        except InvalidRequest as e:
            return fail(e)
        d = self._call("asking for connection reversal", Reverse, **args)
        return d.addCallback(lambda answer: None)

    def bind_udp(
        self, demux: StunDemultiplexer, *, timeout: float = 3.0, second: bool = False
    ) -> Deferred[Endpoint]:
        """
        Bind the UDP socket of *demux* to this session: send, through its
        STUN client, a Binding request authenticated with the ``Hello``
        token (:func:`~nattraverse.rendezvous.commands.udp_credentials`) to
        the STUN port of the rendezvous host (the address this session's
        connection reaches).  The rendezvous then tells the peers this one
        is introduced to the address it observed, the latest one: call this
        again, well within 30 s, as the NAT keepalive.

        :param timeout: Seconds to wait for the answer (retransmissions
            included).
        :param second: Bind at the STUN service's second port too, right
            after the first request (when ``Hello`` named one): the
            rendezvous then tells peers both addresses, which show whether
            this side's NAT maps per destination and how it allocates
            ports.  Its answer, if any, is :attr:`udp_second_observed`; its
            failure is not this Deferred's.
        :returns: A Deferred of the address the STUN service observed the
            socket at (this peer's server-reflexive UDP address).  It fails
            with :class:`RendezvousUnavailable` saying what to check when
            the rendezvous has no STUN service (``stun_port`` 0), the
            session is closed, the request cannot be sent, is refused, or
            gets no authenticated answer within *timeout*.  Cancelling it
            stops the retransmissions.
        """
        try:
            seconds = check_timeout(timeout)
        except ValueError as e:
            return fail(e)
        if second:
            return _bind_both(self._protocol, self.hello, demux, seconds).addCallback(
                self._bound_both
            )
        return _start_binding(self._protocol, self.hello, demux, seconds).addCallback(self._bound)

    def _bound_both(self, addresses: tuple[Endpoint, Endpoint | None]) -> Endpoint:
        primary, second = addresses
        if second is not None and second != self.udp_second_observed:
            _log.info(
                "the rendezvous at {where} observes this peer's UDP socket at {udp} from its "
                "second port",
                where=self.where,
                udp=str(second),
            )
        self.udp_second_observed = second
        return self._bound(primary)

    def _bound(self, address: Endpoint) -> Endpoint:
        if address != self.udp_observed:
            _log.info(
                "the rendezvous at {where} observes this peer's UDP socket at {udp}",
                where=self.where,
                udp=str(address),
            )
        self.udp_observed = address
        self.udp_error = None
        return address

    def relay(self, session: bytes) -> Deferred[tuple[bytes, float]]:
        """
        Ask for a relay between the two peers of *session* (``Relay``).

        :returns: A Deferred of this peer's token and the relay's lifetime
            in seconds; join with :func:`join_relay`.
        """
        try:
            checked = check_bytes(session, SESSION_ID_SIZE, "session")
        except InvalidRequest as e:
            return fail(e)

        def token(answer: dict[str, Any]) -> tuple[bytes, float]:
            return (
                check_bytes(answer["token"], TOKEN_SIZE, "Relay.token"),
                check_duration(answer["lifetime"], "Relay.lifetime"),
            )

        return self._call("asking for a relay", Relay, session=checked).addCallback(token)

    @property
    def server_host(self) -> str | None:
        """
        The rendezvous' IP address as this connection reaches it (its STUN
        service and UDP relay listen there too); ``None`` once it is gone.
        """
        return self._protocol.server_host()

    @property
    def udp_relay_available(self) -> bool:
        """Whether the rendezvous relays UDP (``Hello``): :meth:`udp_relay` may work."""
        return self.hello.udp_relay

    def udp_relay(self, session: bytes) -> Deferred[tuple[int, bytes, float]]:
        """
        Ask for a UDP relay between the two peers of *session*
        (``UdpRelay``); the other peer gets its own token in
        :meth:`IRendezvousHandler.udp_relay_offer`.

        :returns: A Deferred of the relay's UDP port on the rendezvous' STUN
            host (send to the address this session's connection reaches, at
            that port), this peer's token (latch with a STUN Binding request
            from the punching socket, authenticated with
            :func:`~nattraverse.rendezvous.commands.udp_credentials` of it,
            FINGERPRINT included) and the relay's lifetime in seconds.  It
            fails with :class:`~nattraverse.errors.RelayRefused` when the UDP
            relay is off, the session is not this peer's or already has a
            UDP relay, or the other peer is gone, and with
            :class:`~nattraverse.errors.LimitExceeded` when the relay is
            full.
        """
        try:
            checked = check_bytes(session, SESSION_ID_SIZE, "session")
        except InvalidRequest as e:
            return fail(e)

        def allocation(answer: dict[str, Any]) -> tuple[int, bytes, float]:
            return (
                check_port(answer["port"], "UdpRelay.port", allow_zero=False),
                check_bytes(answer["token"], UDP_TOKEN_SIZE, "UdpRelay.token"),
                check_duration(answer["lifetime"], "UdpRelay.lifetime"),
            )

        d = self._call("asking for a UDP relay", UdpRelay, session=checked)
        return d.addCallback(allocation)


# -- opening connections ------------------------------------------------------


async def _connect(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    handler: IRendezvousHandler | None,
    where: str,
) -> RendezvousProtocol:
    factory = Factory.forProtocol(lambda: RendezvousProtocol(reactor, handler, where))
    try:
        protocol = await endpoint.connect(factory)
    except CancelledError:
        raise
    except ConnectingCancelledError as e:
        raise CancelledError(f"cancelled while connecting to the rendezvous at {where}") from e
    except Exception as e:
        raise RendezvousUnavailable(
            f"cannot connect to the rendezvous at {where}: {e}; check the rendezvous endpoint "
            "and that twistd natrendezvous runs there"
        ) from e
    assert isinstance(protocol, RendezvousProtocol)
    return protocol


def _start_binding(
    protocol: RendezvousProtocol, hello: ServerHello, demux: StunDemultiplexer, seconds: float
) -> Deferred[Endpoint]:
    """Bind *demux*'s socket to the connection of *protocol* (see ``bind_udp``)."""
    where = protocol.where
    if hello.stun_port == 0:
        return fail(
            RendezvousUnavailable(
                f"the rendezvous at {where} runs no STUN service (its Hello said STUN port "
                "0), so this peer's UDP socket cannot be bound; run twistd natrendezvous "
                "with its STUN service (--stun-port) for UDP hole punching"
            )
        )
    if len(hello.udp_token) != UDP_TOKEN_SIZE:
        return fail(
            RendezvousUnavailable(
                f"the rendezvous at {where} issued no UDP binding token in Hello; "
                "upgrade it for UDP hole punching"
            )
        )
    host = protocol.server_host()
    if host is None:
        return fail(
            RendezvousUnavailable(
                f"the rendezvous session with {where} is closed; cannot bind a UDP socket "
                f"to it; {RETRY_HINT}"
            )
        )
    server = Endpoint(host, hello.stun_port)
    return bind_socket(protocol.reactor, demux, server, hello.udp_token, seconds)


def _bind_both(
    protocol: RendezvousProtocol, hello: ServerHello, demux: StunDemultiplexer, seconds: float
) -> Deferred[tuple[Endpoint, Endpoint | None]]:
    """
    Bind *demux*'s socket at the STUN port and, right after (one socket:
    the NAT sees the two requests in that order), at the second port when
    ``Hello`` named one.

    :returns: A cancellable Deferred of both observed addresses (the second
        ``None`` when there is no second port or it did not answer); it
        fails as the first binding does.
    """
    primary = _start_binding(protocol, hello, demux, seconds)
    host = protocol.server_host()
    second: Deferred[Endpoint] | None = None
    if hello.stun_second_port != 0 and host is not None and not primary.called:
        second = bind_socket(
            protocol.reactor,
            demux,
            Endpoint(host, hello.stun_second_port),
            hello.udp_token,
            seconds,
        )

    async def both() -> tuple[Endpoint, Endpoint | None]:
        try:
            address = await primary
        except BaseException:
            if second is not None:
                second.cancel()
                second.addErrback(lambda failure: None)
            raise
        if second is None:
            return address, None
        try:
            return address, await second
        except RendezvousUnavailable as e:
            _log.info("no binding at the second STUN port: {error}", error=e)
            return address, None

    return Deferred.fromCoroutine(both())


async def _handshake(
    protocol: RendezvousProtocol,
    identity: Identity,
    access_key: bytes | None,
    timeout: float,
    on_hello: Callable[[ServerHello], object] | None = None,
) -> tuple[ServerHello, PeerId]:
    """``Hello`` then ``Authenticate`` on a new connection; *on_hello* between them."""
    where = protocol.where
    answer = await protocol.call("saying Hello", Hello, timeout, version=PROTOCOL_VERSION)
    if answer["version"] != PROTOCOL_VERSION:
        raise RendezvousUnavailable(
            f"the rendezvous at {where} speaks protocol version {answer['version']}, this "
            f"client version {PROTOCOL_VERSION}: upgrade the older side"
        )
    challenge = check_bytes(answer["challenge"], CHALLENGE_SIZE, "Hello.challenge")
    hello = ServerHello(
        observed=(
            check_host(answer["observed_host"], "Hello.observed_host"),
            check_port(answer["observed_port"], "Hello.observed_port", allow_zero=False),
        ),
        stun_port=check_port(answer["stun_port"], "Hello.stun_port"),
        relay=bool(answer["relay"]),
        udp_token=check_bytes(answer["udp_token"], UDP_TOKEN_SIZE, "Hello.udp_token"),
        stun_second_port=check_port(answer.get("stun_second_port") or 0, "Hello.stun_second_port"),
        udp_relay=bool(answer.get("udp_relay") or False),
    )
    protocol.hello = hello
    if on_hello is not None:
        on_hello(hello)
    proof: dict[str, Any] = {
        "public_key": identity.public_key_der,
        "signature": identity.sign(challenge),
    }
    if access_key is not None:
        proof["access_proof"] = access_proof(access_key, challenge)
    answer = await protocol.call("authenticating", Authenticate, timeout, **proof)
    try:
        peer_id = PeerId.parse(answer["peer_id"])
    except ValueError as e:
        raise InvalidRequest(f"Authenticate.peer_id: {e}") from None
    if peer_id != identity.peer_id:
        raise PeerAuthenticationFailed(
            f"the rendezvous at {where} bound the connection to {peer_id}, not to this peer's key",
            identity.peer_id,
        )
    _log.info(
        "connected to the rendezvous at {where} as {peer_id}, observed at {observed}",
        where=where,
        peer_id=str(peer_id),
        observed=hello.observed,
    )
    return hello, peer_id


def _with_deadline(
    d: Deferred[Any], reactor: IReactorTime, timeout: float, what: str
) -> Deferred[Any]:
    def expired(result: object, seconds: float) -> object:
        if isinstance(result, Failure) and result.check(CancelledError):
            return Failure(
                RendezvousUnavailable(f"{what} took more than {seconds:g} s; {RETRY_HINT}")
            )
        return result

    return d.addTimeout(timeout, reactor, onTimeoutCancel=expired)


def open_session(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    identity: Identity,
    *,
    handler: IRendezvousHandler | None = None,
    access_key: bytes | None = None,
    timeout: float = 10.0,
    udp: StunDemultiplexer | None = None,
    udp_timeout: float = 3.0,
) -> Deferred[RendezvousSession]:
    """
    Connect to the rendezvous at *endpoint* and authenticate as *identity*.

    :param handler: Receives the server's requests (``Introduce``,
        ``DialBack``, ``RelayOffer``); a peer that registers needs one.
    :param access_key: The rendezvous' access key, when it wants one.
    :param timeout: Seconds for the connection and handshake together, and
        then for each request on the session.
    :param udp: A punching UDP socket to bind to the session (as
        :meth:`RendezvousSession.bind_udp` does) while it authenticates,
        saving the binding's round trip; the session's
        :attr:`~RendezvousSession.udp_observed` (or
        :attr:`~RendezvousSession.udp_error`) tells how it went.
    :param udp_timeout: Seconds the binding of *udp* may take.
    :returns: A Deferred of the :class:`RendezvousSession`.  It fails with
        :class:`RendezvousUnavailable` naming the endpoint when the
        connection fails, is lost or takes too long, and with the server's
        refusal (:class:`~nattraverse.errors.PeerAuthenticationFailed`,
        :class:`~nattraverse.errors.NotAuthenticated`, ...) otherwise.
        Cancelling it closes the connection.
    """
    try:
        seconds = check_timeout(timeout)
    except ValueError as e:
        return fail(e)
    where = describe_endpoint(endpoint)

    async def run() -> RendezvousSession:
        protocol = await _connect(reactor, endpoint, handler, where)
        binding: list[Deferred[tuple[Endpoint, Endpoint | None]]] = []

        def bind(hello: ServerHello) -> None:
            if udp is not None:
                binding.append(_bind_both(protocol, hello, udp, check_timeout(udp_timeout)))

        try:
            hello, peer_id = await _handshake(protocol, identity, access_key, seconds, bind)
            session = RendezvousSession(protocol, hello, peer_id, seconds)
            if binding:
                try:
                    session._bound_both(await binding[0])
                except RendezvousUnavailable as e:
                    session.udp_error = e
        except BaseException:
            for pending in binding:
                pending.cancel()
            protocol.close()
            raise
        return session

    return _with_deadline(
        Deferred.fromCoroutine(run()),
        reactor,
        seconds,
        f"opening a session with the rendezvous at {where}",
    )


class _SwitchFactory:
    """
    What ``RelayJoin`` switches the connection to: the one protocol, while
    still wanted (a discarding one after a timeout or cancellation).
    """

    def __init__(self, protocol: IProtocol) -> None:
        self.protocol_to_give: IProtocol | None = protocol

    def buildProtocol(self, addr: IAddress) -> IProtocol:
        given, self.protocol_to_give = self.protocol_to_give, None
        return given if given is not None else Protocol()

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        """The switch was refused: nothing to do, the caller's Deferred fails."""

    def clientConnectionLost(self, connector: object, reason: Failure) -> None:
        """The switched connection ended: the protocol itself was told."""


def latch_udp_relay(
    reactor: IReactorTime,
    session: RendezvousSession,
    demux: StunDemultiplexer,
    port: int,
    token: bytes,
    seconds: float,
) -> Deferred[Endpoint]:
    """
    Latch the socket of *demux* (the punching port) to the UDP relay at
    *port* of the rendezvous *session* reaches, with this peer's *token*
    (from :meth:`RendezvousSession.udp_relay` or ``UdpRelayOffer``): the
    STUN Binding request the relay authenticates, retransmitted until it
    answers, at most *seconds*.

    :returns: A cancellable Deferred of the relay's address; it fails with
        :class:`~nattraverse.errors.RendezvousUnavailable` when the relay
        does not answer or the session is gone.
    """
    host = session.server_host
    if host is None:
        return fail(
            RendezvousUnavailable(
                f"the rendezvous session with {session.where} is closed; "
                "cannot latch to its UDP relay"
            )
        )
    relay = Endpoint(host, port)
    return bind_socket(reactor, demux, relay, token, seconds).addCallback(lambda _: relay)


def join_relay(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    identity: Identity,
    token: bytes,
    protocol: IProtocol,
    *,
    access_key: bytes | None = None,
    timeout: float = 10.0,
) -> Deferred[IProtocol]:
    """
    Join a relay: open a fresh connection to the rendezvous, authenticate,
    send ``RelayJoin(token)``, and hand the connection to *protocol*, whose
    transport is then the raw connection to the relay (the bytes it writes
    reach the other peer once it has joined too).

    :param token: This peer's token, from :meth:`RendezvousSession.relay`
        or :meth:`IRendezvousHandler.relay_offer`.
    :param timeout: Seconds for the whole join.
    :returns: A Deferred firing with *protocol* once the connection carries
        raw bytes.  It fails with :class:`~nattraverse.errors.RelayRefused`
        or :class:`RendezvousUnavailable`.  Cancelling it closes the
        connection.
    """
    try:
        seconds = check_timeout(timeout)
        checked = check_bytes(token, TOKEN_SIZE, "token")
    except (ValueError, InvalidRequest) as e:
        return fail(e)
    where = describe_endpoint(endpoint)
    factory = _SwitchFactory(protocol)

    async def run() -> IProtocol:
        amp_protocol = await _connect(reactor, endpoint, None, where)
        try:
            await _handshake(amp_protocol, identity, access_key, seconds)
            await amp_protocol.call(
                "joining a relay",
                RelayJoin,
                seconds,
                _protoToSwitchToFactory=factory,
                token=checked,
            )
        except BaseException:
            factory.protocol_to_give = None
            amp_protocol.close()
            raise
        _log.info("joined a relay at {where}", where=where)
        return protocol

    return _with_deadline(
        Deferred.fromCoroutine(run()), reactor, seconds, f"joining a relay at {where}"
    )
