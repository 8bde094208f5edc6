"""
Rebinding a rendezvous client endpoint so that it connects *from* a
:class:`~nattraverse.punch.tcpport.SharedTcpPort`.

TCP hole punching (Ford, Srisuresh, Kegel, "Peer-to-Peer Communication
Across Network Address Translators", section 4) needs the rendezvous server
to observe the public mapping of the very port the peer later punches from:
the rendezvous connection itself must leave from that port.  The user names
the rendezvous with an ordinary ``IStreamClientEndpoint``;
:func:`from_shared_port` builds the same connection (host, port, timeout,
TLS wrapping and its options) made through :meth:`SharedTcpPort.connect
<nattraverse.punch.tcpport.SharedTcpPort.connect>` instead.

Supported endpoints (Twisted 26):

- ``TCP4ClientEndpoint`` (``clientFromString`` ``"tcp:"``) and
  ``TCP6ClientEndpoint`` (``"tcp6:"``-style constructors);
- ``HostnameEndpoint``;
- Twisted's TLS wrapper (``wrapClientTLS``, ``clientFromString`` ``"tls:"``):
  the wrapped endpoint is rebound, the wrapper and its options are kept.

Twisted exposes none of their settings publicly; each type has one small
function below that reads its private attributes, and the unit tests fail
loudly if Twisted renames them.

Host names are resolved at ``connect()`` time with the endpoint's own
reactor's ``nameResolver`` (``IReactorPluggableNameResolver``), asking for
the shared port's address family only (a port bound to ``0.0.0.0`` reaches
IPv4 hosts, one bound to ``::`` IPv6 hosts).  The addresses are then tried
*one after the other*, in the resolver's order, each with the endpoint's
timeout; the first that connects wins.  Unlike ``HostnameEndpoint`` there is
no staggered race: two attempts from one port to two addresses would work,
but the rendezvous must see exactly one connection from the port.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    _WrapperEndpoint,
)
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from nattraverse.punch.tcpport import SharedTcpPort

__all__ = ["NotFromPort", "from_shared_port"]

_log = Logger()

T = TypeVar("T")

#: At most this many resolved addresses are tried (a bound on the attempts).
MAX_ADDRESSES = 8

_NAMES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
_ADDRESS_TYPES: dict[socket.AddressFamily, type[IPv4Address | IPv6Address]] = {
    socket.AF_INET: IPv4Address,
    socket.AF_INET6: IPv6Address,
}


class NotFromPort(ValueError):
    """The endpoint cannot connect from a shared port (the message says why)."""


@dataclass(frozen=True)
class _TcpSettings:
    """What a TCP-based Twisted client endpoint connects to."""

    reactor: Any
    host: str
    port: int
    timeout: float
    bind_address: object


# One function per Twisted type reads its private attributes (Twisted 26.x,
# twisted/internet/endpoints.py).  tests/unit/punch/test_tcpsource.py checks
# each against real endpoints, so a rename in Twisted fails there first.


def _private(endpoint: object, name: str) -> Any:
    """``endpoint.<name>``; :exc:`RuntimeError` naming it when Twisted renamed it."""
    try:
        return vars(endpoint)[name]
    except (KeyError, TypeError):
        raise RuntimeError(
            f"{type(endpoint).__qualname__} has no attribute {name} in this Twisted: "
            "nattraverse.punch.tcpsource must be updated for it"
        ) from None


def _tcp_settings(endpoint: TCP4ClientEndpoint | TCP6ClientEndpoint) -> _TcpSettings:
    """The settings of a ``TCP4ClientEndpoint`` or ``TCP6ClientEndpoint`` (same names)."""
    host = _private(endpoint, "_host")
    return _TcpSettings(
        reactor=_private(endpoint, "_reactor"),
        host=host.decode("ascii") if isinstance(host, bytes) else str(host),
        port=int(_private(endpoint, "_port")),
        timeout=float(_private(endpoint, "_timeout")),
        bind_address=_private(endpoint, "_bindAddress"),
    )


def _hostname_settings(endpoint: HostnameEndpoint) -> _TcpSettings:
    """The settings of a ``HostnameEndpoint``; :exc:`NotFromPort` for an invalid name."""
    host = str(_private(endpoint, "_hostText"))
    if _private(endpoint, "_badHostname"):
        raise NotFromPort(f"HostnameEndpoint has an invalid host name {host!r}")
    return _TcpSettings(
        reactor=_private(endpoint, "_reactor"),
        host=host,
        port=int(_private(endpoint, "_port")),
        timeout=float(_private(endpoint, "_timeout")),
        bind_address=_private(endpoint, "_bindAddress"),
    )


def _wrapper_parts(
    endpoint: _WrapperEndpoint,
) -> tuple[IStreamClientEndpoint, Callable[[IProtocolFactory], IProtocolFactory]]:
    """The wrapped endpoint and wrapper factory of ``wrapClientTLS``'s endpoint."""
    return _private(endpoint, "_wrappedEndpoint"), _private(endpoint, "_wrapperFactory")


def _port_family(port: SharedTcpPort) -> socket.AddressFamily:
    """The address family of *port*."""
    return port.family


def _literal_family(host: str) -> socket.AddressFamily | None:
    """The family of the IP literal *host*, or ``None`` for a host name."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _exactly(obj: object, cls: type[T]) -> TypeGuard[T]:
    """Whether *obj* is a *cls* itself, not a subclass."""
    return type(obj) is cls


def from_shared_port(endpoint: IStreamClientEndpoint, port: SharedTcpPort) -> IStreamClientEndpoint:
    """
    An endpoint making the connection *endpoint* makes, but from *port*.

    :param endpoint: a ``TCP4ClientEndpoint``, ``TCP6ClientEndpoint``,
        ``HostnameEndpoint`` or a TLS wrapper (``wrapClientTLS``,
        ``clientFromString`` ``"tls:"``) around one of them.
    :param port: the shared port to connect from; its family (IPv4 or IPv6)
        must be the remote host's.
    :return: an endpoint whose ``connect()`` goes through ``port.connect``
        (see the module docstring for host names); it never raises, and
        cancelling it closes whatever socket or resolution is pending.
    :raises NotFromPort: for any other endpoint type, an endpoint with its
        own ``bindAddress``, or one whose host cannot be of *port*'s family.
    """
    # Exact types: a subclass may connect differently, and would be rebound wrongly.
    given: object = endpoint
    kind = type(given)
    if _exactly(given, _WrapperEndpoint):
        wrapped, wrapper = _wrapper_parts(given)
        try:
            inner = from_shared_port(wrapped, port)
        except NotFromPort as e:
            raise NotFromPort(f"inside the TLS wrapper endpoint: {e}") from None
        wrapping: IStreamClientEndpoint = _WrapperEndpoint(inner, wrapper)
        return wrapping
    family = _port_family(port)
    if _exactly(given, TCP4ClientEndpoint) or _exactly(given, TCP6ClientEndpoint):
        settings = _tcp_settings(given)
        # Twisted resolves names for these with one family only.
        name_family = socket.AF_INET if kind is TCP4ClientEndpoint else socket.AF_INET6
    elif _exactly(given, HostnameEndpoint):
        settings = _hostname_settings(given)
        name_family = family
    else:
        hint = " (use 'tls:' instead of 'ssl:')" if kind.__name__ == "SSL4ClientEndpoint" else ""
        raise NotFromPort(
            f"{kind.__module__}.{kind.__qualname__} cannot connect from a shared port: "
            "TCP hole punching needs a TCP (or TLS-over-TCP) rendezvous endpoint, such as "
            f"clientFromString 'tcp:' or 'tls:', or a HostnameEndpoint{hint}"
        )
    where = f"{kind.__qualname__} to {settings.host!r}"
    if settings.bind_address is not None:
        raise NotFromPort(
            f"{where} binds to {settings.bind_address!r}, but the shared port decides the "
            "local address: drop bindAddress"
        )
    host_family = _literal_family(settings.host) or name_family
    if host_family != family:
        raise NotFromPort(
            f"{where} connects over {_NAMES[host_family]}, but the shared port is "
            f"{_NAMES[family]}: make the SharedTcpPort with an {_NAMES[host_family]} interface"
        )
    return _FromSharedPort(port, family, settings)


@implementer(IStreamClientEndpoint)
class _FromSharedPort:
    """Connects to a host (resolved at connect time) and port from a shared port."""

    def __init__(
        self, port: SharedTcpPort, family: socket.AddressFamily, settings: _TcpSettings
    ) -> None:
        self._port = port
        self._family = family
        self._settings = settings

    def __repr__(self) -> str:
        return f"<from_shared_port {self._settings.host}:{self._settings.port}>"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        settings = self._settings
        if _literal_family(settings.host) is not None:
            hosts = [settings.host]
        else:
            hosts = await _resolve(settings, self._family)
        if not hosts:
            raise error.DNSLookupError(
                f"{settings.host!r} has no {_NAMES[self._family]} address, and the shared "
                f"port connects over {_NAMES[self._family]} only"
            )
        last: error.ConnectError | None = None
        for host in hosts:
            try:
                return await self._port.connect(
                    (host, settings.port), factory, timeout=settings.timeout
                )
            except error.ConnectError as e:  # TimeoutError and refusals too: try the next
                _log.debug(
                    "connect from the shared port to {host} port {port} failed: {error}",
                    host=host,
                    port=settings.port,
                    error=e,
                )
                last = e
        assert last is not None
        raise last


def _resolve(settings: _TcpSettings, family: socket.AddressFamily) -> Deferred[list[str]]:
    """The *family* addresses of ``settings.host``, deduplicated, in the resolver's order."""
    reactor = settings.reactor
    d: Deferred[list[str]]
    if not IReactorPluggableNameResolver.providedBy(reactor):
        d = Deferred()
        d.errback(
            error.DNSLookupError(
                f"cannot resolve {settings.host!r}: the endpoint's reactor {reactor!r} "
                "provides no nameResolver (IReactorPluggableNameResolver)"
            )
        )
        return d
    receiver = _Receiver(reactor, settings, family)
    try:
        reactor.nameResolver.resolveHostName(
            receiver,
            settings.host,
            portNumber=settings.port,
            addressTypes=[_ADDRESS_TYPES[family]],
            transportSemantics="TCP",
        )
    except Exception as e:
        receiver.fail(error.DNSLookupError(f"resolving {settings.host!r} failed: {e}"))
    return receiver.deferred


@implementer(IResolutionReceiver)
class _Receiver:
    """Collects one resolution's addresses; times out after the endpoint's timeout."""

    def __init__(self, reactor: Any, settings: _TcpSettings, family: socket.AddressFamily) -> None:
        self._host = settings.host
        self._family = family
        self._addresses: list[str] = []
        self.deferred: Deferred[list[str]] = Deferred(self._cancel)
        self._timer: IDelayedCall | None = None
        if IReactorTime.providedBy(reactor):
            self._timer = reactor.callLater(settings.timeout, self._timed_out, settings.timeout)

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        if not isinstance(address, IPv4Address | IPv6Address):
            return
        if _literal_family(address.host) != self._family:
            return
        if address.host not in self._addresses and len(self._addresses) < MAX_ADDRESSES:
            self._addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self._stop_timer()
        if not self.deferred.called:
            self.deferred.callback(list(self._addresses))

    def fail(self, reason: Exception) -> None:
        self._stop_timer()
        if not self.deferred.called:
            self.deferred.errback(reason)

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self.fail(error.DNSLookupError(f"resolving {self._host!r} took over {timeout}s"))

    def _cancel(self, d: Deferred[list[str]]) -> None:
        # A GAIResolver resolution cannot be stopped; its late result is ignored.
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
