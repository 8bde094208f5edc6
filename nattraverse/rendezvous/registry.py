"""
The rendezvous' soft state: who is registered under which name, and which
introductions are pending.  Pure: no reactor, no sockets; every call that
depends on time takes ``now`` (seconds, as ``reactor.seconds()`` gives).

A registration binds a name to the peer id that proved possession of its
key (``docs/protocol.rst``).  It lives for the registration TTL from its
last ``Register`` or ``Refresh``; nobody else can take the name meanwhile.
The same peer id registering again (a restart, from a new connection)
replaces its old registration, whatever name that one had.  When the
connection that registered is lost the registration is *detached*: the name
stays reserved for its key until the TTL runs out, but the peer cannot be
introduced.

Introductions map a session id to the two peers of a ``Connect`` and the
address the server observed the caller at; ``Reverse`` and ``Relay`` name
them.  They live for the introduction TTL.

Both tables are capped (:class:`~nattraverse.errors.LimitExceeded`).  With
one TTL per table, expiry order is refresh order, so each table is an
ordered dict kept in that order and :meth:`Registry.expire` only looks at
entries that are due.  Entries are small (``__slots__``, tuples): the
server's target is at most 2 KiB per idle registered peer, connection
included.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from nattraverse.errors import LimitExceeded, NameTaken, PeerNotFound
from nattraverse.identity import PeerId

__all__ = ["Introduction", "PeerRecord", "Registration", "Registry"]


class PeerRecord(NamedTuple):
    """
    How to reach a registered peer.

    :ivar observed_host: The address the server observes its connection
        coming from (never one it claimed).
    :ivar observed_port: The port of that connection.
    :ivar listen_port: The TCP port it accepts direct connections on (0:
        none).
    :ivar private: The private addresses it claims, as ``(host, port)``;
        hints only.
    :ivar udp_private: The host addresses of its punching UDP socket it
        claims, as ``(host, port)``; hints only.  (Its server-reflexive UDP
        address is not recorded here: it is whatever the STUN service last
        observed for the connection, read when it is asked for.)
    :ivar tcp_private: The host addresses of its TCP punching port it
        claims, as ``(host, port)``; hints only.  Not empty means it punches
        TCP from the port its connection comes from, so *observed_host* and
        *observed_port* are that port's server-reflexive address.
    """

    observed_host: str
    observed_port: int
    listen_port: int
    private: tuple[tuple[str, int], ...]
    udp_private: tuple[tuple[str, int], ...] = ()
    tcp_private: tuple[tuple[str, int], ...] = ()


class Registration:
    """
    One registered peer.

    :ivar name: The registered name.
    :ivar peer_id: The peer id the name is bound to.
    :ivar source_ip: The address counted against the per-address cap.
    :ivar record: How to reach the peer.
    :ivar expires: When the registration ends unless refreshed.
    :ivar contact: An opaque handle on the connection that registered (the
        server's protocol), or ``None`` once that connection is lost.
    """

    __slots__ = ("contact", "expires", "name", "peer_id", "record", "source_ip")

    def __init__(
        self,
        name: str,
        peer_id: PeerId,
        source_ip: str,
        record: PeerRecord,
        expires: float,
        contact: object | None,
    ) -> None:
        self.name = name
        self.peer_id = peer_id
        self.source_ip = source_ip
        self.record = record
        self.expires = expires
        self.contact = contact

    def __repr__(self) -> str:
        return f"<Registration {self.name!r} {self.peer_id} expires={self.expires}>"


class Introduction:
    """
    One introduction made by ``Connect``.

    :ivar session: The 16-byte session id.
    :ivar caller: The peer id that asked.
    :ivar callee: The peer id it was introduced to.
    :ivar caller_host: The address the server observed the caller at.
    :ivar caller_port: The port of the caller's connection.
    :ivar caller_contact: The caller's connection (opaque).
    :ivar callee_contact: The callee's connection (opaque).
    :ivar expires: When the introduction is forgotten.
    :ivar reversals: How many ``Reverse`` requests it served.
    """

    __slots__ = (
        "callee",
        "callee_contact",
        "caller",
        "caller_contact",
        "caller_host",
        "caller_port",
        "expires",
        "reversals",
        "session",
    )

    def __init__(
        self,
        session: bytes,
        caller: PeerId,
        callee: PeerId,
        caller_host: str,
        caller_port: int,
        expires: float,
        caller_contact: object | None = None,
        callee_contact: object | None = None,
    ) -> None:
        self.session = session
        self.caller = caller
        self.callee = callee
        self.caller_host = caller_host
        self.caller_port = caller_port
        self.expires = expires
        self.caller_contact = caller_contact
        self.callee_contact = callee_contact
        self.reversals = 0

    def __repr__(self) -> str:
        return f"<Introduction {self.session.hex()} {self.caller} -> {self.callee}>"


class Registry:
    """
    Registrations and introductions with TTLs and caps.

    :param ttl: Seconds a registration lives after ``Register`` or
        ``Refresh``.
    :param max_registrations: Registrations at once, in total.
    :param max_per_ip: Registrations at once from one source address.
    :param introduction_ttl: Seconds an introduction lives.
    :param max_introductions: Introductions at once.
    """

    def __init__(
        self,
        *,
        ttl: float = 60.0,
        max_registrations: int = 100_000,
        max_per_ip: int = 64,
        introduction_ttl: float = 60.0,
        max_introductions: int = 10_000,
    ) -> None:
        for field, value in (("ttl", ttl), ("introduction_ttl", introduction_ttl)):
            if not 0 < value < float("inf"):
                raise ValueError(f"{field} must be a number of seconds above 0, not {value!r}")
        for field, count in (
            ("max_registrations", max_registrations),
            ("max_per_ip", max_per_ip),
            ("max_introductions", max_introductions),
        ):
            if count < 1:
                raise ValueError(f"{field} must be at least 1, not {count!r}")
        self.ttl = float(ttl)
        self.max_registrations = max_registrations
        self.max_per_ip = max_per_ip
        self.introduction_ttl = float(introduction_ttl)
        self.max_introductions = max_introductions
        # By peer id, in expiry order (least recently refreshed first).
        self._by_peer: OrderedDict[PeerId, Registration] = OrderedDict()
        self._by_name: dict[str, Registration] = {}
        self._per_ip: dict[str, int] = {}
        # By session id, in expiry order.
        self._introductions: OrderedDict[bytes, Introduction] = OrderedDict()

    def __len__(self) -> int:
        """Registrations held (including expired ones not swept yet)."""
        return len(self._by_peer)

    @property
    def introductions(self) -> int:
        """Introductions held (including expired ones not swept yet)."""
        return len(self._introductions)

    def count_from(self, source_ip: str) -> int:
        """Registrations held from *source_ip*."""
        return self._per_ip.get(source_ip, 0)

    # -- registrations ---------------------------------------------------

    def register(
        self,
        name: str,
        peer_id: PeerId,
        source_ip: str,
        record: PeerRecord,
        now: float,
        *,
        contact: object | None = None,
    ) -> Registration:
        """
        Bind *name* to *peer_id* until ``now + ttl``.  An earlier
        registration of *peer_id* (under any name) is replaced.

        :raises NameTaken: when a live registration holds *name* for another
            peer id.
        :raises LimitExceeded: when the total cap, or the cap for
            *source_ip*, is reached.
        """
        self._expire_registrations(now)
        holder = self._by_name.get(name)
        if holder is not None and holder.expires <= now:
            self._remove(holder)
            holder = None
        if holder is not None and holder.peer_id != peer_id:
            raise NameTaken(
                f"the name {name!r} is registered to another peer ({holder.peer_id}); "
                "choose another name or use the key that registered it"
            )
        old = self._live(peer_id, now)
        replacing = old is not None
        if len(self._by_peer) - replacing >= self.max_registrations:
            raise LimitExceeded(
                f"the rendezvous holds {self.max_registrations} registrations, its cap; "
                "try again later"
            )
        same_ip = old is not None and old.source_ip == source_ip
        if self.count_from(source_ip) - same_ip >= self.max_per_ip:
            raise LimitExceeded(
                f"{self.max_per_ip} registrations from {source_ip} already, the cap per "
                "address; try again later"
            )
        if old is not None:
            self._remove(old)
        registration = Registration(name, peer_id, source_ip, record, now + self.ttl, contact)
        self._by_peer[peer_id] = registration
        self._by_name[name] = registration
        self._per_ip[source_ip] = self._per_ip.get(source_ip, 0) + 1
        return registration

    def refresh(self, peer_id: PeerId, now: float, *, contact: object | None = None) -> float:
        """
        Renew *peer_id*'s registration for another TTL.

        :param contact: When given, the registration must have been made
            from this connection.
        :returns: The new expiry time.
        :raises PeerNotFound: when *peer_id* has no live registration (made
            from *contact*).
        """
        registration = self._live(peer_id, now)
        if registration is None or (contact is not None and registration.contact is not contact):
            raise PeerNotFound(
                "this connection holds no live registration (it expired, or the peer "
                "registered again elsewhere); send Register again"
            )
        registration.expires = now + self.ttl
        self._by_peer.move_to_end(peer_id)
        return registration.expires

    def registration(self, peer_id: PeerId, now: float) -> Registration | None:
        """*peer_id*'s live registration, attached or not, or ``None``."""
        return self._live(peer_id, now)

    def find(self, peer: str | PeerId, now: float) -> Registration:
        """
        The live registration of *peer*: a :class:`PeerId`, the text of
        one, or a name.  Detached registrations are found too.

        :raises PeerNotFound: when there is none.
        """
        if isinstance(peer, PeerId):
            registration = self._live(peer, now)
        else:
            try:
                registration = self._live(PeerId.parse(peer), now)
            except ValueError:
                registration = self._by_name.get(peer)
                if registration is not None and registration.expires <= now:
                    self._remove(registration)
                    registration = None
        if registration is None:
            raise PeerNotFound(f"no peer is registered as {str(peer)!r}")
        return registration

    def find_connected(self, peer: str | PeerId, now: float) -> Registration:
        """
        Like :meth:`find`, for a peer that can be introduced now.

        :raises PeerNotFound: also when the peer is registered but its
            connection to the rendezvous was lost.
        """
        registration = self.find(peer, now)
        if registration.contact is None:
            raise PeerNotFound(
                f"{str(peer)!r} is registered but not connected to the rendezvous now"
            )
        return registration

    def detach(self, peer_id: PeerId, contact: object) -> bool:
        """
        The connection *contact* is lost: if *peer_id*'s registration was
        made from it, it can no longer be introduced (its name stays
        reserved until it expires).

        :returns: Whether a registration was detached.
        """
        registration = self._by_peer.get(peer_id)
        if registration is None or registration.contact is not contact:
            return False
        registration.contact = None
        return True

    def unregister(self, peer_id: PeerId) -> bool:
        """
        Drop *peer_id*'s registration now.

        :returns: Whether there was one.
        """
        registration = self._by_peer.get(peer_id)
        if registration is None:
            return False
        self._remove(registration)
        return True

    def _live(self, peer_id: PeerId, now: float) -> Registration | None:
        registration = self._by_peer.get(peer_id)
        if registration is not None and registration.expires <= now:
            self._remove(registration)
            return None
        return registration

    def _remove(self, registration: Registration) -> None:
        del self._by_peer[registration.peer_id]
        if self._by_name.get(registration.name) is registration:
            del self._by_name[registration.name]
        left = self._per_ip[registration.source_ip] - 1
        if left:
            self._per_ip[registration.source_ip] = left
        else:
            del self._per_ip[registration.source_ip]

    def _expire_registrations(self, now: float) -> int:
        swept = 0
        by_peer = self._by_peer
        while by_peer:
            registration = by_peer[next(iter(by_peer))]
            if registration.expires > now:
                break
            self._remove(registration)
            swept += 1
        return swept

    # -- introductions ---------------------------------------------------

    def introduce(
        self,
        session: bytes,
        caller: PeerId,
        callee: PeerId,
        caller_host: str,
        caller_port: int,
        now: float,
        *,
        caller_contact: object | None = None,
        callee_contact: object | None = None,
    ) -> Introduction:
        """
        Record an introduction until ``now + introduction_ttl``.

        :raises LimitExceeded: when the cap of introductions is reached.
        :raises ValueError: when *session* is already in use.
        """
        self._expire_introductions(now)
        if len(self._introductions) >= self.max_introductions:
            raise LimitExceeded(
                f"{self.max_introductions} introductions are pending, the cap; try again later"
            )
        if session in self._introductions:
            raise ValueError(f"session {session.hex()} is already in use")
        introduction = Introduction(
            session,
            caller,
            callee,
            caller_host,
            caller_port,
            now + self.introduction_ttl,
            caller_contact,
            callee_contact,
        )
        self._introductions[session] = introduction
        return introduction

    def introduction(self, session: bytes, now: float) -> Introduction | None:
        """The live introduction of *session*, or ``None``."""
        introduction = self._introductions.get(session)
        if introduction is not None and introduction.expires <= now:
            del self._introductions[session]
            return None
        return introduction

    def forget_introduction(self, session: bytes) -> bool:
        """
        Drop the introduction of *session*.

        :returns: Whether there was one.
        """
        return self._introductions.pop(session, None) is not None

    def _expire_introductions(self, now: float) -> int:
        swept = 0
        table = self._introductions
        while table:
            session = next(iter(table))
            if table[session].expires > now:
                break
            del table[session]
            swept += 1
        return swept

    # -- sweeping --------------------------------------------------------

    def expire(self, now: float) -> tuple[int, int]:
        """
        Drop every registration and introduction whose time is over.

        :returns: How many registrations and introductions were dropped.
        """
        return self._expire_registrations(now), self._expire_introductions(now)
