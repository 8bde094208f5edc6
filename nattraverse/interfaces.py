"""
The traversal-method plugin interface (DESIGN section 3, step 5).

A traversal method is one way of getting an authenticated path between
two introduced peers: direct TCP, connection reversal, UDP hole punching
(a QUIC path), the relay, and
whatever a third party adds (UPnP/PCP port mapping, say).  Each is an
object providing :class:`ITraversalMethod` (and
:class:`twisted.plugin.IPlugin`), found with :func:`twisted.plugin.getPlugins`
in ``twisted/plugins/``, so a new method needs no change to nattraverse;
the ``methods=`` key of the ``punch:`` endpoints selects methods by
:attr:`~ITraversalMethod.name`.

- On the **caller** (the side that called ``connect()``), every method
  that :meth:`~ITraversalMethod.applies` is raced against the others with
  :meth:`~ITraversalMethod.attempt`; the first authenticated path wins and
  the others are cancelled.
- On the **callee** (the listening side), the rendezvous' requests for one
  introduction (``Introduce``, ``DialBack``, ``RelayOffer``) are handed to
  every enabled method; a method that opens a path for one of them returns
  the Deferred of that path, and the endpoint hands it to the application
  once the caller selects it.

This module is imported by plugin scans: it imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IProtocol, IProtocolFactory

    from nattraverse.identity import Identity
    from nattraverse.punch.candidates import Candidate
    from nattraverse.punch.port import PunchingPort
    from nattraverse.punch.tcppunch import TcpPunchingPort
    from nattraverse.rendezvous.client import Introduction, RendezvousSession
    from nattraverse.report import ConnectionReport
    from nattraverse.secure import PathSecrets, SecurePath

__all__ = [
    "CalleeContext",
    "CallerContext",
    "ITraversalMethod",
    "Path",
    "TraversalMethod",
    "path_secrets",
]


class Path(Protocol):
    """
    What a traversal method's path offers the endpoints, whatever carries
    it: :class:`~nattraverse.secure.SecurePath` (TLS over TCP) or
    :class:`~nattraverse.quic.QuicPath` (QUIC over UDP).
    """

    @property
    def authenticated(self) -> Deferred[Any]:
        """Fires with the path once the peer proved its identity on it."""

    @property
    def secrets(self) -> PathSecrets:
        """The introduction's session, secret, expected peer and method."""

    def select(
        self,
        factory: IProtocolFactory,
        *,
        started: float | None = None,
        report: ConnectionReport | None = None,
    ) -> IProtocol | None:
        """
        Caller: pick this path and connect the application to it; the
        transport's ``report`` is *report*.
        """

    def attach(
        self, factory: IProtocolFactory, *, started: float | None = None
    ) -> IProtocol | None:
        """Callee: connect the application to the path the caller picked."""

    def abort(self) -> None:
        """Close the path at once."""


def path_secrets(introduction: Introduction, method: str) -> PathSecrets:
    """
    The secrets of a path of *method* for *introduction*: its session id and
    secret, and the other peer's id, which the path's TLS pins.
    """
    from nattraverse.secure import PathSecrets

    return PathSecrets(
        session=introduction.session,
        secret=introduction.secret,
        expected=introduction.peer.peer_id,
        method=method,
    )


@dataclass(frozen=True)
class CallerContext:
    """
    What a method needs to reach the callee of one ``connect()``.

    :ivar reactor: Provides ``IReactorTCP`` and ``IReactorTime``.
    :ivar identity: This peer's key; the paths' TLS presents it.
    :ivar introduction: The introduction the rendezvous answered with: the
        callee's id, observed address, listening port and private
        addresses, the session id and secret, whether it relays.
    :ivar session: The caller's rendezvous session (for ``Reverse`` and
        ``Relay`` requests); it is closed when the race is over.
    :ivar rendezvous: The rendezvous' client endpoint (a relay leg opens a
        fresh connection to it).
    :ivar peer: The peer as asked for (a name or a peer id).
    :ivar access_key: The rendezvous' access key, if it wants one.
    :ivar timeout: Seconds left for the whole connection: the longest any
        single wait of the method should take.
    :ivar udp: The punching UDP port of this ``connect()``, bound at the
        rendezvous before the introduction (its server-reflexive address
        went to the callee); ``None`` when no enabled method
        :attr:`~ITraversalMethod.uses_udp`, or when it could not be bound.
    :ivar udp_local: This side's candidates on :attr:`udp`: its host
        addresses, then the server-reflexive address the rendezvous observed.
    :ivar udp_problem: Why :attr:`udp` is ``None`` although a method wanted it.
    :ivar tcp: The TCP punching port of this ``connect()``: the rendezvous
        session connects from it, and it listens; ``None`` when no enabled
        method :attr:`~ITraversalMethod.uses_tcp_port`, or when it could not
        be used.
    :ivar tcp_problem: Why :attr:`tcp` is ``None`` although a method wanted it.
    :ivar relay_delay: Seconds the relays wait after the introduction: the
        direct methods' head start (0 when no direct path can work); the
        ``udp`` method opens its relayed leg after it.
    :ivar udp_relay_leg: Whether the ``udp`` method races with a relayed
        leg through the rendezvous' UDP relay (which it may later move to
        a direct path): the TCP relay then waits
        :data:`~nattraverse.methods.relay.UDP_RELAY_GRACE` more.
    """

    reactor: Any
    identity: Identity
    introduction: Introduction
    session: RendezvousSession
    rendezvous: IStreamClientEndpoint
    peer: str
    access_key: bytes | None = None
    timeout: float = 30.0
    udp: PunchingPort | None = None
    udp_local: Sequence[Candidate] = ()
    udp_problem: str | None = None
    tcp: TcpPunchingPort | None = None
    tcp_problem: str | None = None
    relay_delay: float = 0.5
    udp_relay_leg: bool = False

    def secrets(self, method: str) -> PathSecrets:
        """The secrets of a path of *method* to the callee."""
        return path_secrets(self.introduction, method)

    def opening_path(self, method: str) -> SecurePath:
        """
        A caller path of *method* on a connection this side opens (it sends
        the preamble).
        """
        from nattraverse.secure import SecurePath

        return SecurePath(
            self.reactor,
            self.identity,
            "caller",
            secrets=self.secrets(method),
            send_preamble=True,
            timeout=self.timeout,
        )


@dataclass(frozen=True)
class CalleeContext:
    """
    What a method needs on the listening side; one per ``listen()``.

    :ivar reactor: Provides ``IReactorTCP`` and ``IReactorTime``.
    :ivar identity: This peer's key, the one its name is bound to.
    :ivar name: The name registered.
    :ivar rendezvous: The rendezvous' client endpoint.
    :ivar access_key: The rendezvous' access key, if it wants one.
    :ivar timeout: Seconds a path may take to be opened and secured.
    :ivar udp: The listener's punching UDP port, registered (and kept
        alive) at the rendezvous; ``None`` when no enabled method
        :attr:`~ITraversalMethod.uses_udp`.
    :ivar udp_candidates: This side's candidates on :attr:`udp` now: its
        host addresses, then the server-reflexive address the rendezvous
        last observed.
    :ivar tcp: The listener's TCP punching port: its registration connects
        from it, and connections it accepts are paths like the direct
        port's; ``None`` when no enabled method
        :attr:`~ITraversalMethod.uses_tcp_port`.
    """

    reactor: Any
    identity: Identity
    name: str
    rendezvous: IStreamClientEndpoint
    access_key: bytes | None = None
    timeout: float = 30.0
    udp: PunchingPort | None = None
    udp_candidates: Callable[[], Sequence[Candidate]] | None = None
    tcp: TcpPunchingPort | None = None

    def secrets(self, introduction: Introduction, method: str) -> PathSecrets:
        """The secrets of a path of *method* to the caller of *introduction*."""
        return path_secrets(introduction, method)

    def known_path(
        self, introduction: Introduction, method: str, *, send_preamble: bool
    ) -> SecurePath:
        """
        A callee path of *method* whose session this side already knows: it
        opened the connection (*send_preamble*), or joined the relay.
        """
        from nattraverse.secure import SecurePath

        return SecurePath(
            self.reactor,
            self.identity,
            "callee",
            secrets=self.secrets(introduction, method),
            send_preamble=send_preamble,
            timeout=self.timeout,
        )


class ITraversalMethod(Interface):
    """
    One way of reaching an introduced peer.  Register a provider (which must
    also provide :class:`twisted.plugin.IPlugin`) in a module under
    ``twisted/plugins/``; keep that module, and the method's own module,
    cheap to import: import heavy modules inside the methods.

    Every Deferred returned is cancellable; cancelling it must close every
    socket, listening port and timer the attempt opened.  A path is a
    :class:`Path` (a :class:`~nattraverse.secure.SecurePath` over TCP, a
    :class:`~nattraverse.quic.QuicPath` over UDP) whose
    :attr:`~Path.authenticated` has fired: the caller's path is then
    :meth:`~Path.select`\\ ed or aborted by the race; the callee's is
    attached to the application.
    """

    name = Attribute(
        "The method's name: lower-case letters, digits and dashes, at most 32; what the "
        "``methods=`` key and ``transport.method`` say."
    )
    last_resort = Attribute(
        "Whether the caller starts this method only after the endpoint's stagger delay "
        "(unless every other method has already failed), as the relay does."
    )
    callee_listens = Attribute(
        "Whether the callee accepts this method's paths on its listening TCP port (which "
        "the server endpoint opens, and announces, only when an enabled method says so)."
    )
    uses_udp = Attribute(
        "Whether this method punches through the endpoints' UDP port (which both endpoints "
        "open, bind at the rendezvous and announce only when an enabled method says so)."
    )
    uses_tcp_port = Attribute(
        "Whether this method punches through the endpoints' TCP punching port (which both "
        "endpoints open, connect to the rendezvous from and announce only when an enabled "
        "method says so)."
    )

    def applies(context: CallerContext) -> str | None:
        """
        Whether this method can be tried for *context*'s introduction.

        :returns: ``None`` when it applies, else the reason it does not
            (reported in :class:`~nattraverse.errors.PunchFailed` as a
            :class:`~nattraverse.errors.MethodNotApplicable`).
        """

    def attempt(context: CallerContext) -> Deferred[Any]:
        """
        Caller side: try to open an authenticated path to the callee.

        :returns: A cancellable Deferred of the path, authenticated but not
            yet selected; it fails with the reason the method failed.
        """

    def introduced(context: CalleeContext, introduction: Introduction) -> Deferred[Any] | None:
        """
        Callee side: a caller was introduced (``Introduce``).

        :returns: The Deferred of a path this method opens for it (selected
            by the caller), or ``None`` when it opens none.
        """

    def dial_back(
        context: CalleeContext, introduction: Introduction, host: str, port: int
    ) -> Deferred[Any] | None:
        """
        Callee side: the caller of *introduction* asked to be dialled back
        at *host*:*port*, its observed address (``DialBack``).

        :returns: As for :meth:`introduced`.
        """

    def relay_offer(
        context: CalleeContext, introduction: Introduction, token: bytes, lifetime: float
    ) -> Deferred[Any] | None:
        """
        Callee side: the caller of *introduction* allocated a relay; this
        peer's token is *token* (``RelayOffer``).

        :returns: As for :meth:`introduced`.
        """


class TraversalMethod:
    """
    A convenient base for :class:`ITraversalMethod` providers: a caller-only
    method, not a last resort, whose callee hooks do nothing.  Subclasses
    set :attr:`name` and implement :meth:`attempt` (and :meth:`applies`
    when the method does not always apply).
    """

    name: str = ""
    last_resort: bool = False
    callee_listens: bool = False
    uses_udp: bool = False
    uses_tcp_port: bool = False

    def __repr__(self) -> str:
        return f"<traversal method {self.name!r}>"

    def applies(self, context: CallerContext) -> str | None:
        """Always applies."""
        return None

    def attempt(self, context: CallerContext) -> Deferred[Any]:
        """Subclasses open their path here."""
        raise NotImplementedError(f"{type(self).__name__} has no caller side")

    def introduced(
        self, context: CalleeContext, introduction: Introduction
    ) -> Deferred[Any] | None:
        """Nothing to do."""
        return None

    def dial_back(
        self, context: CalleeContext, introduction: Introduction, host: str, port: int
    ) -> Deferred[Any] | None:
        """Nothing to do."""
        return None

    def relay_offer(
        self, context: CalleeContext, introduction: Introduction, token: bytes, lifetime: float
    ) -> Deferred[Any] | None:
        """Nothing to do."""
        return None
