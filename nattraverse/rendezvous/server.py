"""
The rendezvous server (``docs/protocol.rst``): AMP sessions where peers
authenticate, register names, look each other up, are introduced, ask for
connection reversal and for relays.

- :class:`RendezvousServerProtocol` serves one connection: the responders
  check every value (:mod:`nattraverse.rendezvous.commands`) and keep the
  soft state in a :class:`~nattraverse.rendezvous.registry.Registry`.
- :class:`RendezvousFactory` holds what connections share: the registry,
  the limits, the relay hubs (TCP and UDP), the access key, the counters,
  and the UDP binding tokens (:mod:`nattraverse.rendezvous.udpbind`) it
  shares with the STUN server of the same host.
- :class:`RendezvousService` listens on endpoint descriptions
  (``tcp:8478``, ``ssl:8479:privateKey=...``) and sweeps expired state.

Nothing one peer sends can hurt another's service: a malformed box or an
oversized one closes that one connection; a refused request is answered
with the AMP error of its :mod:`nattraverse.errors` class; an unexpected
exception in a responder is logged and closes only the connection that
caused it.  Connections that do not authenticate within the handshake
timeout are closed, and the number of connections at once is capped.

This module holds the limits, the factory and the service; the connection
is built up in private modules, each importing only the ones before it:
:mod:`~nattraverse.rendezvous._lean_amp` (AMP framing in little memory,
box caps), :mod:`~nattraverse.rendezvous._server_connection` (a
connection's life, errors, sending; the counters) and
:mod:`~nattraverse.rendezvous._server_protocol` (the responders).  Their
public names are importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nattraverse.rendezvous._lean_amp import MAX_BOX_KEYS, MAX_BOX_SIZE
from nattraverse.rendezvous._server_connection import MAX_UNANSWERED, RendezvousStats
from nattraverse.rendezvous._server_protocol import MAX_PUBLIC_KEY as MAX_PUBLIC_KEY
from nattraverse.rendezvous._server_protocol import MAX_REVERSALS, RendezvousServerProtocol
from nattraverse.rendezvous.commands import check_port
from nattraverse.rendezvous.registry import Registry
from nattraverse.rendezvous.udpbind import UdpBindings

if TYPE_CHECKING:
    from nattraverse.rendezvous.relay import RelayHub
    from nattraverse.rendezvous.udprelay import UdpRelayHub

__all__ = [
    "MAX_BOX_KEYS",
    "MAX_BOX_SIZE",
    "MAX_REVERSALS",
    "MAX_UNANSWERED",
    "RendezvousFactory",
    "RendezvousLimits",
    "RendezvousServerProtocol",
    "RendezvousService",
    "RendezvousStats",
]

_log = Logger()


@dataclass(frozen=True)
class RendezvousLimits:
    """
    The rendezvous' caps and timers (``twistd natrendezvous --help`` sets
    them).

    :ivar registration_ttl: Seconds a registration lives after ``Register``
        or ``Refresh``.  Default: 60.
    :ivar max_registrations: Registrations at once.  Default: 100000.
    :ivar max_registrations_per_ip: Registrations at once from one address.
        Default: 64.
    :ivar introduction_ttl: Seconds an introduction (a session id usable by
        ``Reverse`` and ``Relay``) lives.  Default: 60.
    :ivar max_introductions: Introductions at once.  Default: 10000.
    :ivar handshake_timeout: Seconds a connection has to authenticate.
        Default: 10.
    :ivar max_connections: Connections at once; more are closed at once.
        Default: 20000.
    """

    registration_ttl: float = 60.0
    max_registrations: int = 100_000
    max_registrations_per_ip: int = 64
    introduction_ttl: float = 60.0
    max_introductions: int = 10_000
    handshake_timeout: float = 10.0
    max_connections: int = 20_000

    def __post_init__(self) -> None:
        for name in ("registration_ttl", "introduction_ttl", "handshake_timeout"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds above 0, not {value!r}")
        for name in (
            "max_registrations",
            "max_registrations_per_ip",
            "max_introductions",
            "max_connections",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")


class RendezvousFactory(ServerFactory):
    """
    What the connections of one rendezvous share.

    :param reactor: For time and timers.
    :param limits: Caps and timers.
    :param relay_hub: The relay, or ``None`` when it is off.
    :param udp_relay_hub: The UDP relay, or ``None`` when it is off.
    :param access_key: When given, clients must prove they know it.
    :param stun_port: The STUN port of this host, told in ``Hello`` (0:
        none).
    :param stun_second_port: The STUN service's second port on the same
        address, told in ``Hello`` (0: none).
    :param random: Source of challenges, session ids and secrets.
    :param udp_bindings: The UDP binding tokens, shared with the STUN
        service; ``None`` makes a table of its own (tokens are issued all
        the same, and bind nothing without a STUN service).

    :ivar udp_bindings: The UDP binding tokens.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        limits: RendezvousLimits | None = None,
        *,
        relay_hub: RelayHub | None = None,
        udp_relay_hub: UdpRelayHub | None = None,
        access_key: bytes | None = None,
        stun_port: int = 0,
        stun_second_port: int = 0,
        random: Callable[[int], bytes] = os.urandom,
        udp_bindings: UdpBindings | None = None,
    ) -> None:
        self.reactor = reactor
        self.limits = limits = limits if limits is not None else RendezvousLimits()
        self.relay_hub = relay_hub
        self.udp_relay_hub = udp_relay_hub
        if access_key is not None and not access_key:
            raise ValueError("the access key is empty")
        self.access_key = access_key
        self.stun_port = check_port(stun_port, "stun_port")
        self.stun_second_port = check_port(stun_second_port, "stun_second_port")
        self.random = random
        self.registry = Registry(
            ttl=limits.registration_ttl,
            max_registrations=limits.max_registrations,
            max_per_ip=limits.max_registrations_per_ip,
            introduction_ttl=limits.introduction_ttl,
            max_introductions=limits.max_introductions,
        )
        if udp_bindings is None:
            udp_bindings = UdpBindings(capacity=limits.max_connections, random=random)
        self.udp_bindings = udp_bindings
        self.connections: set[RendezvousServerProtocol] = set()
        self.stats = RendezvousStats()
        self._emptied: list[defer.Deferred[None]] = []

    def now(self) -> float:
        """The reactor's time."""
        return float(self.reactor.seconds())

    def buildProtocol(self, addr: IAddress) -> RendezvousServerProtocol | None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.stats.connections_refused += 1
            _log.debug(
                "rendezvous connection from {address} refused: {limit} connections already",
                address=addr,
                limit=self.limits.max_connections,
            )
            return None
        return RendezvousServerProtocol(self)

    def disconnected(self, protocol: RendezvousServerProtocol) -> None:
        """*protocol*'s connection is lost: its UDP binding token dies with it."""
        self.connections.discard(protocol)
        token, protocol.udp_token = protocol.udp_token, None
        if token is not None:
            self.udp_bindings.revoke(token)
        if protocol.peer_id is not None and self.registry.detach(protocol.peer_id, protocol):
            _log.info(
                "{peer} disconnected; its registration is kept until it expires",
                peer=str(protocol.peer_id),
            )
        if not self.connections:
            waiting, self._emptied = self._emptied, []
            for waiter in waiting:
                waiter.callback(None)

    def refused(self, protocol: RendezvousServerProtocol, command: str, error: Exception) -> None:
        """Count and log a refused request."""
        kind = type(error).__name__
        self.stats.refusals[kind] = self.stats.refusals.get(kind, 0) + 1
        _log.info(
            "refused {command} from {source} ({peer}): {kind}: {reason}",
            command=command,
            source=protocol.source,
            peer=str(protocol.peer_id) if protocol.peer_id is not None else "-",
            kind=kind,
            reason=str(error),
        )

    def sweep(self) -> None:
        """Drop expired registrations and introductions."""
        registrations, introductions = self.registry.expire(self.now())
        if registrations or introductions:
            _log.debug(
                "expired {registrations} registrations and {introductions} introductions",
                registrations=registrations,
                introductions=introductions,
            )

    def close_connections(self) -> defer.Deferred[None]:
        """
        Abort every connection.

        :returns: A Deferred that fires once all are gone.
        """
        if not self.connections:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._emptied.append(waiter)
        for protocol in list(self.connections):
            protocol._drop("the rendezvous is stopping")
        return waiter


class RendezvousService(Service):
    """
    The rendezvous on one or more listening endpoints.

    :param reactor: The reactor: listening, time and timers.
    :param endpoints: Where to listen: endpoint descriptions
        (``"tcp:8478"``, ``"ssl:8479:privateKey=key.pem"``) or
        :class:`IStreamServerEndpoint` providers.
    :param limits: Caps and timers.
    :param relay_hub: The relay (closed when the service stops), or
        ``None`` to turn it off.
    :param udp_relay_hub: The UDP relay (closed when the service stops),
        or ``None`` to turn it off.
    :param access_key: When given, clients must prove they know it.
    :param stun_port: The STUN port of this host, told to clients.
    :param stun_second_port: The STUN service's second port, told to
        clients (0: none).
    :param random: Source of challenges, session ids and secrets.
    :param udp_bindings: The UDP binding tokens, shared with the
        :class:`~nattraverse.stun.server.StunServer` of this host (its
        ``bindings``); ``None`` makes a table of its own.

    :ivar factory: The :class:`RendezvousFactory` the endpoints serve.
    :ivar ports: The listening ports, once listening (the real port numbers
        for endpoints asking for port 0).
    """

    def __init__(
        self,
        reactor: Any,
        endpoints: Sequence[str | IStreamServerEndpoint],
        limits: RendezvousLimits | None = None,
        *,
        relay_hub: RelayHub | None = None,
        udp_relay_hub: UdpRelayHub | None = None,
        access_key: bytes | None = None,
        stun_port: int = 0,
        stun_second_port: int = 0,
        random: Callable[[int], bytes] = os.urandom,
        udp_bindings: UdpBindings | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("the rendezvous needs at least one endpoint to listen on")
        self.reactor = reactor
        self.endpoints: list[IStreamServerEndpoint] = [
            serverFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
            for endpoint in endpoints
        ]
        self.factory = RendezvousFactory(
            reactor,
            limits,
            relay_hub=relay_hub,
            udp_relay_hub=udp_relay_hub,
            access_key=access_key,
            stun_port=stun_port,
            stun_second_port=stun_second_port,
            random=random,
            udp_bindings=udp_bindings,
        )
        self.ports: list[IListeningPort] = []
        self._sweeper: LoopingCall | None = None
        self._failures: list[Failure] | None = None

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps of expired state."""
        limits = self.factory.limits
        return max(1.0, min(limits.registration_ttl, limits.introduction_ttl) / 4)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._failures = []
        for endpoint in self.endpoints:
            listening = endpoint.listen(self.factory)
            listening.addCallbacks(self._listening, self._listen_failed, errbackArgs=(endpoint,))
        failures, self._failures = self._failures, None
        if failures:
            self.running = False
            self._stop()
            failures[0].raiseException()
        sweeper = self._sweeper = LoopingCall(self.factory.sweep)
        sweeper.clock = self.reactor
        sweeper.start(self.sweep_interval, now=False).addErrback(
            lambda failure: _log.failure("the rendezvous sweeper failed", failure)
        )
        _log.info(
            "rendezvous on {ports} (relay: {relay}, UDP relay: {udp_relay}, access key: {access})",
            ports=", ".join(_address_text(port.getHost()) for port in self.ports) or "(pending)",
            relay="on" if self.factory.relay_hub is not None else "off",
            udp_relay="on" if self.factory.udp_relay_hub is not None else "off",
            access="on" if self.factory.access_key is not None else "off",
        )

    def _listening(self, port: IListeningPort) -> None:
        if self.running:
            self.ports.append(port)
        else:
            port.stopListening()

    def _listen_failed(self, failure: Failure, endpoint: IStreamServerEndpoint) -> None:
        if self._failures is not None:
            self._failures.append(failure)
        else:
            _log.failure("the rendezvous cannot listen on {endpoint}", failure, endpoint=endpoint)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self._stop()

    def _stop(self) -> defer.Deferred[None]:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        ports, self.ports = self.ports, []
        waits: list[defer.Deferred[Any]] = [defer.maybeDeferred(p.stopListening) for p in ports]
        waits.append(self.factory.close_connections())
        if self.factory.relay_hub is not None:
            self.factory.relay_hub.close()
        if self.factory.udp_relay_hub is not None:
            waits.append(self.factory.udp_relay_hub.close())
        return defer.gatherResults(waits).addCallback(lambda _: None)


def _address_text(address: object) -> str:
    """``host:port`` for an IP address, else what the address says of itself."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
