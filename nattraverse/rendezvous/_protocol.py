"""
The client end of a rendezvous connection, for
:mod:`nattraverse.rendezvous.client`: the AMP protocol (requests with
timeouts, the server's requests handed to an :class:`IRendezvousHandler`),
the values the client hands out, and the checks of the server's answers.

Nothing the server sends is believed before it is checked.  This module
imports nothing from :mod:`nattraverse.rendezvous.client`.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import Interface

from nattraverse._thin_stream import mark_thin_stream
from nattraverse._types import Endpoint
from nattraverse.errors import (
    InvalidRequest,
    NatTraverseError,
    PeerAuthenticationFailed,
    RendezvousUnavailable,
    StunError,
    StunTimeout,
)
from nattraverse.identity import PeerId
from nattraverse.rendezvous.commands import (
    SECRET_SIZE,
    SESSION_ID_SIZE,
    TOKEN_SIZE,
    UDP_TOKEN_SIZE,
    DialBack,
    Introduce,
    RelayOffer,
    UdpRelayOffer,
    check_bytes,
    check_candidates,
    check_host,
    check_methods,
    check_name,
    check_port,
    encode_candidates,
    is_peer_id,
    udp_credentials,
)
from nattraverse.stun.attributes import Username

if TYPE_CHECKING:
    from nattraverse.stun.client import StunResponse
    from nattraverse.stun.demux import StunDemultiplexer

__all__ = [
    "RETRY_HINT",
    "IRendezvousHandler",
    "Introduction",
    "PeerInfo",
    "RendezvousProtocol",
    "ServerHello",
    "bind_socket",
    "check_duration",
    "check_peer",
    "check_private",
    "check_udp",
    "peer_info",
    "pinned",
]

_log = Logger()

#: The advice ending a :class:`RendezvousUnavailable` message.
RETRY_HINT = "try again (listening peers reconnect by themselves)"


@dataclass(frozen=True)
class ServerHello:
    """
    What the rendezvous said in ``Hello``.

    :ivar observed: The address and port the server sees this connection
        coming from: this peer's public (server-reflexive) TCP address.
    :ivar stun_port: The STUN port of the rendezvous host, 0 when none.
    :ivar relay: Whether the rendezvous relays.
    :ivar udp_token: The token that binds a UDP socket to this connection
        (:meth:`~nattraverse.rendezvous.client.RendezvousSession.bind_udp`);
        empty when not known.  Not shown by ``repr``.
    :ivar stun_second_port: The STUN service's second port on the same
        address, 0 when none.
    :ivar udp_relay: Whether the rendezvous relays UDP (``UdpRelay``);
        ``False`` for a server from before the UDP relay.
    """

    observed: tuple[str, int]
    stun_port: int
    relay: bool
    udp_token: bytes = field(default=b"", repr=False)
    stun_second_port: int = 0
    udp_relay: bool = False


@dataclass(frozen=True)
class PeerInfo:
    """
    What the rendezvous knows of a peer.

    :ivar peer_id: The peer's id, which its TLS certificate must match.
    :ivar name: Its registered name; empty for a caller that did not
        register.
    :ivar observed: The address and port the server observes it at.
    :ivar listen_port: The TCP port it accepts direct connections on, 0
        when none.
    :ivar private: The private addresses it announced (hints only).
    :ivar udp: Where the rendezvous' STUN service last observed the peer's
        punching UDP socket (its server-reflexive UDP address, as observed,
        never as claimed), ``None`` when it has not bound one.
    :ivar udp_private: The host addresses of that socket it announced
        (hints only).
    :ivar tcp_private: The host addresses of its TCP punching port (the
        local port its rendezvous connection comes from, which it also
        accepts on) it announced (hints only); empty when it does not punch
        TCP.
    :ivar udp_second: Where the STUN service's second port observed that
        same socket (observed too), ``None`` when it did not: with
        :attr:`udp`, it shows whether the peer's NAT maps per destination
        (:func:`nattraverse.punch.mapping.infer_mapping`).
    """

    peer_id: PeerId
    name: str
    observed: tuple[str, int]
    listen_port: int
    private: tuple[tuple[str, int], ...]
    udp: Endpoint | None = None
    udp_private: tuple[Endpoint, ...] = ()
    tcp_private: tuple[Endpoint, ...] = ()
    udp_second: Endpoint | None = None

    @property
    def tcp_candidates(self) -> tuple[Endpoint, ...]:
        """
        The peer's TCP punching candidates: empty when it does not punch TCP
        (:attr:`tcp_private` is empty), else its :attr:`observed` address
        (server-reflexive: its rendezvous connection comes from its TCP
        punching port) first, then :attr:`tcp_private`, without repeats.
        """
        if not self.tcp_private:
            return ()
        return tuple(dict.fromkeys((Endpoint(*self.observed), *self.tcp_private)))


@dataclass(frozen=True)
class Introduction:
    """
    An introduction between two peers: the same *session* and *secret* reach
    both at once, each with the other's details.

    :ivar session: The 16-byte session id that ``Reverse``, ``Relay`` and
        the path preamble name.
    :ivar secret: The 32-byte session secret the path preamble is keyed by.
    :ivar peer: The other peer.
    :ivar methods: The methods the caller will try.
    :ivar relay: Whether the rendezvous offers a relay for this session.
    """

    session: bytes
    secret: bytes
    peer: PeerInfo
    methods: tuple[str, ...]
    relay: bool


class IRendezvousHandler(Interface):
    """
    What the rendezvous asks of a registered peer.  Each method is called
    once per request the server sends, with values already checked; it
    should start its work and return at once.
    """

    def introduced(introduction: Introduction) -> None:
        """
        A caller asked to be introduced to this peer: start accepting and
        trying the paths of *introduction*.
        """

    def dial_back(session: bytes, host: str, port: int) -> None:
        """
        Connection reversal: dial *host*:*port* (the caller's observed
        address) for the introduction *session*.
        """

    def relay_offer(session: bytes, token: bytes, lifetime: float) -> None:
        """
        The caller of *session* asked for a relay: join it with *token*
        (see :func:`~nattraverse.rendezvous.client.join_relay`) within
        *lifetime* seconds.
        """

    def udp_relay_offer(session: bytes, port: int, token: bytes, lifetime: float) -> None:
        """
        The other peer of *session* asked for a UDP relay: latch this
        peer's punching UDP socket onto *port* of the rendezvous' STUN host
        with *token* (a STUN Binding request authenticated with
        :func:`~nattraverse.rendezvous.commands.udp_credentials` of it) soon:
        the relay closes when both sides have not latched within its join
        timeout, and lives *lifetime* seconds at most.
        """


def check_duration(value: float, field: str) -> float:
    """*value*, a duration the server sent in *field*, if positive and finite."""
    if not (math.isfinite(value) and value > 0):
        raise InvalidRequest(f"{field}: {value!r} is not a positive number of seconds")
    return value


def check_peer(peer: str) -> str:
    """A peer asked for: a peer id or a name that could be registered."""
    return peer if is_peer_id(peer) else check_name(peer)


def check_private(
    private: Sequence[tuple[str, int]], field: str = "private"
) -> list[dict[str, Any]]:
    """This peer's private addresses, checked and encoded for the wire."""
    return encode_candidates(check_candidates(encode_candidates(private), field))


def check_udp(host: str, port: int, where: str) -> Endpoint | None:
    """
    The server-reflexive UDP address of ``_PEER_FIELDS``: ``None`` for an
    empty host and port 0, else an IP address and a port (1-65535).
    """
    if host == "" and port == 0:
        return None
    return Endpoint(
        check_host(host, f"{where}.udp_host"),
        check_port(port, f"{where}.udp_port", allow_zero=False),
    )


def peer_info(fields: Mapping[str, Any], where: str) -> PeerInfo:
    """The peer described by the ``_PEER_FIELDS`` of an answer or request."""
    try:
        peer_id = PeerId.parse(fields["peer_id"])
    except ValueError as e:
        raise InvalidRequest(f"{where}.peer_id: {e}") from None
    name = fields["name"]
    if name:
        try:
            check_name(name)
        except InvalidRequest as e:
            raise InvalidRequest(f"{where}.{e}") from None
    return PeerInfo(
        peer_id=peer_id,
        name=name,
        observed=(
            check_host(fields["observed_host"], f"{where}.observed_host"),
            check_port(fields["observed_port"], f"{where}.observed_port", allow_zero=False),
        ),
        listen_port=check_port(fields["listen_port"], f"{where}.listen_port"),
        private=tuple(check_candidates(fields["private"], f"{where}.private")),
        udp=check_udp(fields.get("udp_host", ""), fields.get("udp_port", 0), where),
        # Optional on the wire: absent (None) from a server without a second port.
        udp_second=check_udp(
            fields.get("udp_second_host") or "", fields.get("udp_second_port") or 0, where
        ),
        udp_private=tuple(
            Endpoint(host, port)
            for host, port in check_candidates(
                fields.get("udp_private", ()), f"{where}.udp_private"
            )
        ),
        # Optional on the wire: absent (None) from a server that predates it.
        tcp_private=tuple(
            Endpoint(host, port)
            for host, port in check_candidates(
                fields.get("tcp_private") or (), f"{where}.tcp_private"
            )
        ),
    )


def pinned(info: PeerInfo, asked: str) -> PeerInfo:
    """Refuse an answer about another peer than the peer id asked for."""
    if is_peer_id(asked) and str(info.peer_id) != asked:
        raise PeerAuthenticationFailed(
            f"the rendezvous answered with peer {info.peer_id} when {asked} was asked for",
            asked,
        )
    return info


#: Seconds between the parallel transactions of one UDP binding.
BIND_SPACING = 0.25
#: Most transactions of one UDP binding outstanding at once.
BIND_PARALLEL = 8


def bind_socket(
    reactor: IReactorTime,
    demux: StunDemultiplexer,
    server: Endpoint,
    token: bytes,
    seconds: float,
) -> Deferred[Endpoint]:
    """
    Send, through the STUN client of *demux*, the Binding request that binds
    its socket with the ``Hello`` *token* to the STUN service at *server*,
    and wait up to *seconds* for the authenticated answer.

    :returns: A cancellable Deferred of the XOR-MAPPED-ADDRESS; it fails
        with :class:`RendezvousUnavailable` saying what to check.
    """
    username, key = udp_credentials(token)
    result: Deferred[Endpoint] = Deferred(lambda _: stop())
    attempts: list[Deferred[StunResponse]] = []
    timers: list[IDelayedCall] = []

    def stop() -> None:
        for timer in timers:
            if timer.active():
                timer.cancel()
        pending = list(attempts)
        attempts.clear()
        for attempt in pending:
            attempt.cancel()

    def settle(outcome: Endpoint | Failure) -> None:
        if result.called:
            return
        stop()
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    def answered(response: StunResponse) -> None:
        address = response.mapped_address
        if address is None:
            settle(
                Failure(
                    RendezvousUnavailable(
                        f"the STUN service at {server} answered the UDP binding without "
                        "XOR-MAPPED-ADDRESS; is it the rendezvous' own STUN service?"
                    )
                )
            )
        else:
            settle(address)

    def failed(failure: Failure, attempt: Deferred[StunResponse]) -> None:
        if attempt in attempts:
            attempts.remove(attempt)
        error = failure.value
        if result.called or isinstance(error, CancelledError):
            return
        if isinstance(error, StunTimeout):
            return  # the others, or the deadline, decide
        if isinstance(error, RendezvousUnavailable):
            settle(failure)
        elif isinstance(error, StunError):
            settle(
                Failure(
                    RendezvousUnavailable(
                        f"the STUN service at {server} refused to bind this peer's UDP socket: "
                        f"{error}; check that the rendezvous session is still open "
                        f"({RETRY_HINT})"
                    )
                )
            )
        else:
            settle(
                Failure(
                    RendezvousUnavailable(
                        f"cannot send the UDP binding request to {server}: {error}; check "
                        "that the UDP socket is listening"
                    )
                )
            )

    def send() -> None:
        # One more transaction every BIND_SPACING seconds until an answer:
        # on a lossy path each has its own retransmissions, so one lost
        # datagram does not cost a whole retransmission timeout.
        if result.called:
            return
        if len(attempts) < BIND_PARALLEL:
            attempt = demux.client.binding(
                server, [Username(username)], integrity_key=key, fingerprint=True
            )
            attempts.append(attempt)
            attempt.addCallbacks(answered, failed, errbackArgs=(attempt,))
        if not result.called:
            timers.append(reactor.callLater(BIND_SPACING, send))

    def expired() -> None:
        settle(Failure(_unanswered(server, seconds)))

    timers.append(reactor.callLater(seconds, expired))
    send()
    return result


def _unanswered(server: Endpoint, seconds: float) -> RendezvousUnavailable:
    return RendezvousUnavailable(
        f"the STUN service of the rendezvous at {server} gave no authenticated answer to the "
        f"UDP binding within {seconds:g} s; check that UDP port {server.port} of {server.host} "
        "is reachable from this host (firewall) and that the rendezvous runs its STUN service"
    )


class _Pending:
    """One request waiting for its answer."""

    __slots__ = ("result", "timer", "what")

    def __init__(self, what: str, result: Deferred[dict[str, Any]], timer: IDelayedCall) -> None:
        self.what = what
        self.result = result
        self.timer = timer


class RendezvousProtocol(amp.AMP):
    """
    The client end of one rendezvous connection: requests with timeouts
    that fail promptly when the connection goes, and the server's requests
    checked and handed to the handler.
    """

    def __init__(
        self, reactor: IReactorTime, handler: IRendezvousHandler | None, where: str
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._reactor = reactor
        self._handler = handler
        self.where = where
        self.hello: ServerHello | None = None
        self._pending: dict[Deferred[dict[str, Any]], _Pending] = {}
        self._closing = False
        self._gone: Failure | None = None
        self._loss_watchers: list[Callable[[Failure], None]] = []

    def connectionMade(self) -> None:
        # A lost request or answer is resent after linear, not exponential,
        # timeouts: the rendezvous connection is a thin stream.
        mark_thin_stream(self.transport)
        super().connectionMade()  # type: ignore[no-untyped-call]

    # -- requests -----------------------------------------------------------

    @property
    def reactor(self) -> IReactorTime:
        """The clock of this connection's timeouts."""
        return self._reactor

    @property
    def gone(self) -> bool:
        """Whether the connection is closed or closing."""
        return self._closing or self._gone is not None

    def server_host(self) -> str | None:
        """
        The rendezvous' IP address as this connection reaches it (IPv4 for
        an IPv4-mapped IPv6 address), ``None`` once the connection is gone.
        """
        transport = self.transport
        if transport is None or self.gone:
            return None
        address = transport.getPeer()
        if not isinstance(address, IPv4Address | IPv6Address):
            return None
        ip = ipaddress.ip_address(address.host.partition("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ip)

    def call(
        self, what: str, command: type[amp.Command], timeout: float, **arguments: Any
    ) -> Deferred[dict[str, Any]]:
        """
        Send *command* and wait up to *timeout* seconds for its answer.

        :param what: What the request does, for messages ("registering
            'alice'").
        :returns: A cancellable Deferred of the answer's fields.  It fails
            with the :mod:`nattraverse.errors` class the server raised, or
            with :class:`RendezvousUnavailable` when the connection is lost
            or closed, or on timeout.
        """
        if self.gone:
            return fail(self._unavailable(what))

        def cancel(result: Deferred[dict[str, Any]]) -> None:
            self._forget(result)

        result: Deferred[dict[str, Any]] = Deferred(cancel)
        timer = self._reactor.callLater(timeout, self._expire, result, timeout)
        self._pending[result] = _Pending(what, result, timer)
        try:
            answer: Deferred[dict[str, Any]] = self.callRemote(  # type: ignore[no-untyped-call]
                command, **arguments
            )
        except Exception as e:
            self._forget(result)
            return fail(RendezvousUnavailable(f"cannot send the request while {what}: {e}"))
        answer.addBoth(self._settle, result)
        return result

    def _forget(self, result: Deferred[dict[str, Any]]) -> _Pending | None:
        pending = self._pending.pop(result, None)
        if pending is not None and pending.timer.active():
            pending.timer.cancel()
        return pending

    def _expire(self, result: Deferred[dict[str, Any]], timeout: float) -> None:
        pending = self._pending.pop(result, None)
        if pending is None:
            return
        result.errback(
            RendezvousUnavailable(
                f"the rendezvous at {self.where} did not answer within {timeout:g} s "
                f"while {pending.what}; {RETRY_HINT}"
            )
        )

    def _settle(self, outcome: object, result: Deferred[dict[str, Any]]) -> None:
        pending = self._forget(result)
        if pending is None or result.called:
            return
        if isinstance(outcome, Failure):
            result.errback(self._translate(outcome, pending.what))
        else:
            assert isinstance(outcome, dict)
            result.callback(outcome)

    def _translate(self, failure: Failure, what: str) -> Failure:
        error = failure.value
        if isinstance(error, NatTraverseError | CancelledError):
            return failure
        if isinstance(error, ConnectionClosed):
            return Failure(self._unavailable(what, failure))
        if isinstance(error, amp.AmpError | amp.RemoteAmpError | amp.ProtocolSwitched):
            return Failure(
                RendezvousUnavailable(
                    f"the rendezvous at {self.where} failed while {what}: {error}; {RETRY_HINT}"
                )
            )
        return Failure(
            InvalidRequest(
                f"the rendezvous at {self.where} sent an answer this client cannot read "
                f"while {what}: {error!r}"
            )
        )

    def _unavailable(self, what: str, reason: Failure | None = None) -> RendezvousUnavailable:
        if self._closing and self._gone is None:
            return RendezvousUnavailable(
                f"the rendezvous session with {self.where} was closed by this peer while {what}"
            )
        reason = reason or self._gone
        detail = f" ({reason.getErrorMessage()})" if reason is not None else ""
        return RendezvousUnavailable(
            f"the rendezvous connection to {self.where} was lost while {what}{detail}; {RETRY_HINT}"
        )

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.timer.active():
                entry.timer.cancel()
            if not entry.result.called:
                entry.result.errback(self._unavailable(entry.what))

    # -- the connection -----------------------------------------------------

    def watch_loss(self, watcher: Callable[[Failure], None]) -> None:
        """Call *watcher* with the reason once the connection is gone."""
        if self._gone is not None:
            watcher(self._gone)
        else:
            self._loss_watchers.append(watcher)

    def close(self) -> None:
        """Close the connection; pending requests fail at once.  Idempotent."""
        if self.gone:
            return
        self._closing = True
        self._fail_pending()
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fail every pending request, then tell the watchers."""
        self._gone = reason
        self._fail_pending()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        watchers, self._loss_watchers = self._loss_watchers, []
        for watcher in watchers:
            try:
                watcher(reason)
            except Exception:
                _log.failure("a rendezvous connection-loss watcher failed")

    # -- the server's requests ----------------------------------------------

    def _require_handler(self, command: str) -> IRendezvousHandler:
        if self._handler is None:
            raise InvalidRequest(f"{command}: this peer has not registered and takes no requests")
        return self._handler

    def _dispatch(self, command: str, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:
            _log.failure("the rendezvous handler failed on {command}", command=command)

    @Introduce.responder
    def _introduce(
        self,
        session: bytes,
        secret: bytes,
        peer_id: str,
        name: str,
        observed_host: str,
        observed_port: int,
        listen_port: int,
        private: list[dict[str, Any]],
        udp_host: str,
        udp_port: int,
        udp_private: list[dict[str, Any]],
        methods: list[str],
        tcp_private: list[dict[str, Any]] | None = None,
        udp_second_host: str | None = None,
        udp_second_port: int | None = None,
    ) -> dict[str, Any]:
        handler = self._require_handler("Introduce")
        introduction = Introduction(
            session=check_bytes(session, SESSION_ID_SIZE, "Introduce.session"),
            secret=check_bytes(secret, SECRET_SIZE, "Introduce.secret"),
            peer=peer_info(
                {
                    "peer_id": peer_id,
                    "name": name,
                    "observed_host": observed_host,
                    "observed_port": observed_port,
                    "listen_port": listen_port,
                    "private": private,
                    "udp_host": udp_host,
                    "udp_port": udp_port,
                    "udp_private": udp_private,
                    "tcp_private": tcp_private,
                    "udp_second_host": udp_second_host,
                    "udp_second_port": udp_second_port,
                },
                "Introduce",
            ),
            methods=tuple(check_methods(methods)),
            relay=self.hello.relay if self.hello is not None else False,
        )
        _log.info(
            "introduced to {peer} at {observed} (session {session})",
            peer=str(introduction.peer.peer_id),
            observed=introduction.peer.observed,
            session=introduction.session.hex(),
        )
        self._dispatch("Introduce", lambda: handler.introduced(introduction))
        return {}

    @DialBack.responder
    def _dial_back(self, session: bytes, host: str, port: int) -> dict[str, Any]:
        handler = self._require_handler("DialBack")
        checked_session = check_bytes(session, SESSION_ID_SIZE, "DialBack.session")
        checked_host = check_host(host, "DialBack.host")
        checked_port = check_port(port, "DialBack.port", allow_zero=False)
        self._dispatch(
            "DialBack", lambda: handler.dial_back(checked_session, checked_host, checked_port)
        )
        return {}

    @RelayOffer.responder
    def _relay_offer(self, session: bytes, token: bytes, lifetime: float) -> dict[str, Any]:
        handler = self._require_handler("RelayOffer")
        checked_session = check_bytes(session, SESSION_ID_SIZE, "RelayOffer.session")
        checked_token = check_bytes(token, TOKEN_SIZE, "RelayOffer.token")
        checked_lifetime = check_duration(lifetime, "RelayOffer.lifetime")
        self._dispatch(
            "RelayOffer",
            lambda: handler.relay_offer(checked_session, checked_token, checked_lifetime),
        )
        return {}

    @UdpRelayOffer.responder
    def _udp_relay_offer(
        self, session: bytes, port: int, token: bytes, lifetime: float
    ) -> dict[str, Any]:
        handler = self._require_handler("UdpRelayOffer")
        checked_session = check_bytes(session, SESSION_ID_SIZE, "UdpRelayOffer.session")
        checked_port = check_port(port, "UdpRelayOffer.port", allow_zero=False)
        checked_token = check_bytes(token, UDP_TOKEN_SIZE, "UdpRelayOffer.token")
        checked_lifetime = check_duration(lifetime, "UdpRelayOffer.lifetime")
        self._dispatch(
            "UdpRelayOffer",
            lambda: handler.udp_relay_offer(
                checked_session, checked_port, checked_token, checked_lifetime
            ),
        )
        return {}
