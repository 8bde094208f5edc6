"""
One local TCP port shared by a listening socket and outgoing connections,
for TCP hole punching.

TCP hole punching (Ford, Srisuresh, Kegel, "Peer-to-Peer Communication
Across Network Address Translators", section 4; RFC 5382 for the NAT side)
needs each peer to ``connect()`` to the other *from the port* whose public
mapping the rendezvous server observed, while accepting on that port too.
Twisted cannot do that: ``connectTCP`` never sets ``SO_REUSEPORT`` and
``listenTCP`` owns its socket.  :class:`SharedTcpPort` makes the sockets
itself, reuse options set before ``bind()``, and hands them to the reactor
with ``adoptStreamPort`` / ``adoptStreamConnection`` (``IReactorSocket``);
an ``IWriteDescriptor`` waits for each non-blocking ``connect()``.

Linux semantics:

- ``SO_REUSEPORT`` must be set on *every* socket sharing the port, before
  ``bind()``, all owned by the same user; ``SO_REUSEADDR`` lets the port be
  rebound while old connections sit in ``TIME_WAIT``.  A socket without
  ``SO_REUSEPORT`` cannot bind the port while one of ours holds it (nor can
  ours bind a port it holds: :exc:`~twisted.internet.error.CannotListenError`).
- A connecting socket may bind the port of a listening one (both with both
  options); connections are told apart by their 4-tuple.  A second
  connection from the port to the *same* remote would repeat a 4-tuple:
  ``connect()`` fails with ``EADDRNOTAVAIL`` (a ``ConnectError``).
- The reserving socket of :meth:`SharedTcpPort.bind` never listens, so it
  receives no SYNs and never steals connections from the listener.

Simultaneous open: when both peers connect to each other's fixed port at
once and the SYNs cross (RFC 9293 section 3.5, figure 8), the kernel makes
*one* connection of the 4-tuple and ``connect()`` succeeds on both sides; no
listener sees it.  When a SYN instead reaches a listening side that has not
sent its own SYN yet, that listener takes it: the connecting side's
``connect()`` succeeds, the other side gets the connection from
``accept()``, and its own ``connect()`` to the same 4-tuple then fails with
``EADDRNOTAVAIL``.  Either way each side has exactly one connection per
4-tuple, from ``connect()`` or from ``accept()``: a caller counts both.

``connect(..., ttl=n)`` sends the SYN with ``IP_TTL`` *n* (low-TTL priming,
as in STUNT and NATBlaster): enough to open the own NAT's mapping, too
little to reach the peer's NAT.  The SYN leaves inside the ``connect()``
system call, so the default TTL is restored right after it: a retransmitted
SYN, or the SYN-ACK of a simultaneous open, reaches the peer.  Linux ends a
connect whose SYN drew an ICMP Time Exceeded (``EHOSTUNREACH``) at once;
the NAT's mapping stays.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorFDSet,
    IReactorSocket,
    IReactorTime,
    IStreamClientEndpoint,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from nattraverse.punch.isn import IsnPinningUnavailable, pin_isn

__all__ = ["SharedTcpPort"]

_log = Logger()

#: What a non-blocking ``connect_ex`` returns while the handshake goes on.
_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY})

#: The interfaces the injected reactor must provide.
_NEEDED: tuple[type[Interface], ...] = (IReactorSocket, IReactorFDSet, IReactorTime)

Address = tuple[str, int]


def _family(host: str, what: str) -> socket.AddressFamily:
    """The address family of the IP literal *host*; :exc:`ValueError` otherwise."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise ValueError(f"the {what} must be an IP address literal, not {host!r}") from None
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _ttl_option(family: socket.AddressFamily) -> tuple[int, int]:
    """The ``(level, name)`` of the unicast TTL / hop-limit option of *family*."""
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS
    return socket.IPPROTO_IP, socket.IP_TTL


def _connect_error(number: int) -> error.ConnectError:
    """The Twisted error class for the ``connect()`` errno *number*."""
    text = os.strerror(number)
    if number == errno.ECONNREFUSED:
        return error.ConnectionRefusedError(number, text)
    if number in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return error.NoRouteError(number, text)
    if number == errno.ETIMEDOUT:
        return error.TCPTimedOutError(number, text)
    return error.ConnectError(number, text)


def _os_error(e: OSError) -> error.ConnectError:
    """The Twisted error for an :exc:`OSError` raised while connecting."""
    return _connect_error(e.errno) if e.errno else error.ConnectError(string=str(e))


def _reuse_socket(family: socket.AddressFamily, isn: int | None = None) -> socket.socket:
    """
    A non-blocking TCP socket with ``SO_REUSEADDR`` and ``SO_REUSEPORT`` set,
    whose ``connect()`` sends its SYN with sequence number *isn* if given
    (:func:`~nattraverse.punch.isn.pin_isn`).
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError(errno.ENOPROTOOPT, "SO_REUSEPORT is not available on this platform")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if isn is not None:
            pin_isn(sock, isn)  # first: leaving repair mode clears SO_REUSEADDR
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IProtocolFactory)
class _Adopting:
    """Wraps the caller's factory to learn the protocol ``adoptStreamConnection`` built."""

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory
        self.protocol: IProtocol | None = None
        self.failure: Failure | None = None

    def buildProtocol(self, addr: Any) -> IProtocol | None:
        try:
            self.protocol = self._factory.buildProtocol(addr)
        except Exception:
            # Returning None makes Twisted close its copy of the socket.
            self.failure = Failure()
            return None
        return self.protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


@implementer(IWriteDescriptor)
class _Attempt:
    """One non-blocking ``connect()`` from the shared port; fires :attr:`deferred` once."""

    def __init__(
        self,
        reactor: Any,
        family: socket.AddressFamily,
        local: Address,
        remote: Address,
        factory: IProtocolFactory,
        timeout: float,
        ttl: int | None,
        isn: int | None,
        forget: Callable[[_Attempt], None],
    ) -> None:
        self._reactor = reactor
        self._family = family
        self._local = local
        self._remote = remote
        self._factory = factory
        self._timeout = timeout
        self._ttl = ttl
        self._isn = isn
        self._forget = forget
        self._sock: socket.socket | None = None
        self._saved_ttl: int | None = None
        self._writing = False
        self._timer: IDelayedCall | None = None
        self.deferred: Deferred[IProtocol] = Deferred(self._cancel)

    def start(self) -> None:
        """Send the SYN; wait for the handshake or settle at once."""
        try:
            self._sock = _reuse_socket(self._family, self._isn)
            self._sock.bind(self._local)
            if self._ttl is not None:
                self._saved_ttl = self._sock.getsockopt(*_ttl_option(self._family))
                self._sock.setsockopt(*_ttl_option(self._family), self._ttl)
            number = self._sock.connect_ex(self._remote)
            if self._saved_ttl is not None:
                # The SYN left inside connect(): every later segment (a
                # retransmitted SYN, the SYN-ACK of a simultaneous open)
                # carries the default TTL and reaches the peer.
                self._sock.setsockopt(*_ttl_option(self._family), self._saved_ttl)
        except IsnPinningUnavailable as e:
            self._fail(e)
            return
        except OSError as e:
            self._fail(_os_error(e))
            return
        if number == 0:
            self._settle(None)
        elif number in _IN_PROGRESS:
            self._writing = True
            self._reactor.addWriter(self)
            self._timer = self._reactor.callLater(self._timeout, self._timed_out)
        else:
            self._fail(_connect_error(number))

    # IWriteDescriptor

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def logPrefix(self) -> str:
        return "SharedTcpPort.connect"

    def doWrite(self) -> None:
        self._settle(None)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor has already stopped watching the descriptor (an epoll
        # error or hang-up, or its shutdown); SO_ERROR says what happened.
        self._writing = False
        self._settle(reason)

    # The outcomes

    def _settle(self, reason: Failure | None) -> None:
        if self._sock is None:
            return
        number = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if number:
            self._fail(_connect_error(number))
        elif reason is not None:
            self._fail(
                error.ConnectError(string=f"the reactor dropped the connect: {reason.value}")
            )
        else:
            self._adopt()

    def _adopt(self) -> None:
        assert self._sock is not None
        adopting = _Adopting(self._factory)
        try:
            self._reactor.adoptStreamConnection(self._sock.fileno(), self._family, adopting)
        except Exception as e:
            transport = getattr(adopting.protocol, "transport", None)
            if transport is not None:  # connectionMade raised after the reactor took it
                transport.abortConnection()
            self._fail(_os_error(e) if isinstance(e, OSError) else Failure())
            return
        # The reactor holds its own duplicate of the descriptor now.
        self._cleanup()
        if adopting.failure is not None:
            self._fail(adopting.failure)
        elif adopting.protocol is None:
            self._fail(error.NoProtocol())
        else:
            self.deferred.callback(adopting.protocol)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(
            error.TimeoutError(
                string=f"connecting from {self._local} to {self._remote} took over {self._timeout}s"
            )
        )

    def _fail(self, reason: BaseException | Failure) -> None:
        self._cleanup()
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        _log.debug(
            "TCP connect from {local} to {remote} failed: {error}",
            local=self._local,
            remote=self._remote,
            error=failure.value,
        )
        if not self.deferred.called:
            self.deferred.errback(failure)

    def _cancel(self, d: Deferred[IProtocol]) -> None:
        _log.debug("TCP connect from {local} to {remote} cancelled", local=self._local,
                   remote=self._remote)  # fmt: skip
        self._cleanup()

    def _cleanup(self) -> None:
        """Stop watching, stop the timer and close our descriptor; idempotent."""
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._forget(self)


@implementer(IStreamClientEndpoint)
class _SharedPortEndpoint:
    """Connects to one remote address from a :class:`SharedTcpPort`."""

    def __init__(self, port: SharedTcpPort, remote: Address, timeout: float) -> None:
        self._port = port
        self._remote = remote
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._port.connect(self._remote, protocolFactory, timeout=self._timeout)


class SharedTcpPort:
    """
    One local TCP port shared (``SO_REUSEADDR`` + ``SO_REUSEPORT``) by a
    listening socket and any number of outgoing connections, as TCP hole
    punching (simultaneous open, RFC 5382 / Ford, Srisuresh, Kegel
    "P2P-NAT") needs.

    :param reactor: provides ``IReactorSocket``, ``IReactorFDSet`` and
        ``IReactorTime`` (the epoll, poll and select reactors do).
    :param interface: the local IP address literal to bind; an IPv6 literal
        makes the port IPv6.
    :param port: the port number, 0 for one the system picks.
    :raises TypeError: when the reactor lacks one of those interfaces.
    :raises ValueError: when *interface* is not an IP address literal.
    """

    def __init__(self, reactor: Any, interface: str = "0.0.0.0", port: int = 0) -> None:
        missing = [i.__name__ for i in _NEEDED if not i.providedBy(reactor)]
        if missing:
            raise TypeError(f"SharedTcpPort needs a reactor providing {', '.join(missing)}")
        self._reactor = reactor
        self._family = _family(interface, "interface")
        self._interface = interface
        self._requested = port
        self._reserve: socket.socket | None = None
        self._address: Address | None = None
        self._listening: IListeningPort | None = None
        self._pending: set[_Attempt] = set()
        self._closed = False

    def bind(self) -> Address:
        """
        Reserve the port with a first socket, bound with the reuse options but
        never listening (port 0 picks one); idempotent.

        :return: the bound ``(host, port)``.
        :raises CannotListenError: when the system refuses the address.
        """
        if self._closed:
            raise RuntimeError("this SharedTcpPort is closed; make a new one")
        if self._address is None:
            self._reserve = self._bound(self._requested)
            host, number = self._reserve.getsockname()[:2]
            self._address = (host, number)
        return self._address

    @property
    def port(self) -> int:
        """The bound port number; :exc:`RuntimeError` before :meth:`bind`."""
        if self._address is None:
            raise RuntimeError("SharedTcpPort.port is known only after bind()")
        return self._address[1]

    @property
    def family(self) -> socket.AddressFamily:
        """``AF_INET`` or ``AF_INET6``: the family of the interface it binds."""
        return self._family

    @property
    def interface(self) -> str:
        """The local address it binds (``"0.0.0.0"``: every IPv4 address)."""
        return self._interface

    def listen(self, factory: IProtocolFactory, backlog: int = 50) -> IListeningPort:
        """
        Listen on the shared port (binding it first if needed).

        :return: the reactor's listening port; :meth:`close` stops it.
        :raises CannotListenError: when the system refuses.
        :raises RuntimeError: when already listening or closed.
        """
        number = self.bind()[1]
        if self._listening is not None:
            raise RuntimeError(f"SharedTcpPort {self._address} is already listening")
        sock = self._bound(number)
        try:
            sock.listen(backlog)
            self._listening = self._reactor.adoptStreamPort(sock.fileno(), self._family, factory)
        except OSError as e:
            raise error.CannotListenError(self._interface, number, e) from e
        finally:
            sock.close()  # the reactor holds its own duplicate
        return self._listening

    def ignore_syns_from(self, addresses: list[Address]) -> bool:
        """
        Have the listening socket ignore SYNs from *addresses* (replacing the
        last list; empty: accept all again); see
        :mod:`~nattraverse.punch.synfilter` for why.

        :returns: Whether the filter is in place (``False`` before
            :meth:`listen`, for IPv6 or without socket filters).
        """
        from nattraverse.punch.synfilter import ignore_syns_from

        if self._listening is None:
            return False
        fileno = getattr(self._listening, "fileno", None)
        if fileno is None:
            return False
        sock = socket.socket(fileno=os.dup(fileno()))
        try:
            return ignore_syns_from(sock, addresses)
        finally:
            sock.close()

    def _bound(self, port: int) -> socket.socket:
        """A new reuse socket bound to *port*; :exc:`CannotListenError` when refused."""
        try:
            sock = _reuse_socket(self._family)
        except OSError as e:
            raise error.CannotListenError(self._interface, port, e) from e
        try:
            sock.bind((self._interface, port))
        except OSError as e:
            sock.close()
            reason = e
            if e.errno == errno.EADDRINUSE:
                hint = "a socket without SO_REUSEPORT, or another user's, holds it"
                reason = OSError(e.errno, f"{e.strerror}: {hint}")
            raise error.CannotListenError(self._interface, port, reason) from e
        return sock

    def connect(
        self,
        remote: Address,
        factory: IProtocolFactory,
        *,
        timeout: float,
        ttl: int | None = None,
        isn: int | None = None,
    ) -> Deferred[IProtocol]:
        """
        Connect from the shared port to *remote* (binding it first if needed).

        :param remote: ``(ip, port)``; an IP literal of the port's family.
        :param timeout: seconds before failing with
            :class:`~twisted.internet.error.TimeoutError`.
        :param ttl: the ``IP_TTL`` (hop limit) of the first SYN, for
            low-TTL priming; every later segment has the default.
        :param isn: the sequence number of the SYN
            (:func:`~nattraverse.punch.isn.pin_isn`, which needs
            ``CAP_NET_ADMIN``); ``None``: the kernel's.
        :return: fires with the protocol *factory* built, after its
            ``makeConnection``; fails with ``ConnectionRefusedError``,
            ``NoRouteError``, ``TimeoutError`` or ``ConnectError`` (naming the
            errno), :class:`~nattraverse.punch.isn.IsnPinningUnavailable`
            when *isn* cannot be set, ``NoProtocol`` when the factory builds
            none.  Cancelling closes the socket.  Never raises.
        """
        try:
            if _family(remote[0], "remote host") != self._family:
                raise ValueError(f"remote {remote[0]} is not of the family of {self._interface}")
            local = self.bind()
        except Exception:
            return fail()
        attempt = _Attempt(
            self._reactor,
            self._family,
            (self._interface, local[1]),
            (remote[0], remote[1]),
            factory,
            timeout,
            ttl,
            isn,
            self._pending.discard,
        )
        self._pending.add(attempt)
        attempt.start()
        return attempt.deferred

    def client_endpoint(self, remote: Address, *, timeout: float = 30.0) -> IStreamClientEndpoint:
        """An endpoint whose ``connect(factory)`` is :meth:`connect` to *remote*."""
        return _SharedPortEndpoint(self, (remote[0], remote[1]), timeout)

    def close(self) -> Deferred[None]:
        """
        Cancel pending connects, close the reserving socket and stop the
        listening port if any; connections already made stay open.

        :return: fires when the port is released.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        for attempt in list(self._pending):
            attempt.deferred.cancel()
        if self._reserve is not None:
            self._reserve.close()
            self._reserve = None
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)
        return maybeDeferred(listening.stopListening).addCallback(lambda _: None)
