"""
A NAT's mapping table (RFC 4787 sections 4 and 5): which external endpoint
an internal endpoint gets, which inbound packets may use it, and when it
expires.  Pure: the time is passed in, randomness is injected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from random import Random

from nattraverse._types import Endpoint, Filtering, Mapping
from nattraverse.testing._behaviour import Allocation, NatBehaviour

#: Random picks tried before looking for a free port one by one.
_RANDOM_TRIES = 32


@dataclass(slots=True)
class NatStats:
    """
    What a simulated NAT did with the packets it saw.

    :ivar outbound: Packets translated from inside to outside.
    :ivar inbound: Packets let in and translated to an internal endpoint.
    :ivar no_mapping: Inbound packets to an external endpoint with no
        mapping, dropped.
    :ivar filtered: Inbound packets a mapping's filter dropped (RFC 4787
        section 5).
    :ivar hairpinned: Packets from inside to an external endpoint of this
        NAT that were turned back inside (RFC 4787 section 6).
    :ivar hairpin_dropped: The same, dropped because hairpinning is off.
    :ivar blocked: Packets dropped because UDP is blocked.
    :ivar exhausted: Outbound packets dropped for want of a free port.
    :ivar refused: ICMP port unreachable answers sent for dropped inbound
        packets.
    :ivar mappings_created: Mappings made.
    :ivar mappings_expired: Mappings that timed out.
    """

    outbound: int = 0
    inbound: int = 0
    no_mapping: int = 0
    filtered: int = 0
    hairpinned: int = 0
    hairpin_dropped: int = 0
    blocked: int = 0
    exhausted: int = 0
    refused: int = 0
    mappings_created: int = 0
    mappings_expired: int = 0


@dataclass(frozen=True, slots=True)
class NatMapping:
    """
    One mapping of a NAT's table, as it was when asked.

    :ivar internal: The inside endpoint ``X:x``.
    :ivar external: The endpoint outside hosts see, ``X':x'``.
    :ivar remote: What else the mapping is specific to (RFC 4787 section
        4.1): ``None`` for endpoint-independent mapping, the destination
        address (an :class:`~nattraverse._types.Endpoint` with port 0) for
        address-dependent, the destination endpoint for
        address-and-port-dependent.
    :ivar created: Clock time the mapping was made.
    :ivar expires: Clock time it will expire unless refreshed.
    :ivar permitted: Remote endpoints the inside has sent to through this
        mapping and whose permission has not expired: what address- and
        address-and-port-dependent filtering let in (RFC 4787 section 5).
    """

    internal: Endpoint
    external: Endpoint
    remote: Endpoint | None
    created: float
    expires: float
    permitted: frozenset[Endpoint]


class _Entry:
    __slots__ = ("created", "external", "internal", "key", "permissions", "refreshed", "remote")

    def __init__(
        self,
        key: tuple[Endpoint, Endpoint | None],
        external: Endpoint,
        now: float,
    ) -> None:
        self.key = key
        self.internal, self.remote = key
        self.external = external
        self.created = now
        self.refreshed = now
        #: Remote endpoint -> clock time of the last packet sent to it.
        self.permissions: dict[Endpoint, float] = {}


class MappingTable:
    """
    The mappings of one NAT.

    :param behaviour: What the NAT does.
    :param address: The external address; unused when the NAT does not
        translate.
    :param rng: Picks random ports.
    :param stats: Counters to update.
    """

    def __init__(self, behaviour: NatBehaviour, address: str, rng: Random, stats: NatStats) -> None:
        self.behaviour = behaviour
        self.address = address
        self._rng = rng
        self._stats = stats
        self._by_key: dict[tuple[Endpoint, Endpoint | None], _Entry] = {}
        self._by_external: dict[Endpoint, _Entry] = {}
        self._cursor = behaviour.port_range[0]
        self._next_expiry = math.inf

    def _key(self, internal: Endpoint, remote: Endpoint) -> tuple[Endpoint, Endpoint | None]:
        """The key of the mapping a packet from *internal* to *remote* uses
        (RFC 4787 section 4.1)."""
        mapping = self.behaviour.mapping
        if mapping is Mapping.ENDPOINT_INDEPENDENT or not self.behaviour.translate:
            return (internal, None)
        if mapping is Mapping.ADDRESS_DEPENDENT:
            return (internal, Endpoint(remote.host, 0))
        return (internal, remote)

    def outbound(
        self, internal: Endpoint, remote: Endpoint, now: float, *, create: bool = True
    ) -> _Entry | None:
        """
        The mapping for a packet from *internal* to *remote*, made when
        there is none and *create* is true, refreshed and permitting
        *remote* (RFC 4787 section 4.3, REQ-6: outbound packets refresh).

        :returns: ``None`` when there is no mapping and none could be made
            (no free port, or *create* false).
        """
        self._expire(now)
        key = self._key(internal, remote)
        entry = self._by_key.get(key)
        if entry is None:
            if not create:
                return None
            external = self._external_for(internal)
            if external is None:
                return None
            entry = _Entry(key, external, now)
            self._by_key[key] = entry
            self._by_external[external] = entry
            self._stats.mappings_created += 1
            self._next_expiry = min(self._next_expiry, now + self.behaviour.mapping_lifetime)
        entry.refreshed = now
        entry.permissions[remote] = now
        return entry

    def lookup(self, internal: Endpoint, remote: Endpoint, now: float) -> _Entry | None:
        """The live mapping a packet from *internal* to *remote* would use,
        without refreshing or making one."""
        self._expire(now)
        return self._by_key.get(self._key(internal, remote))

    def inbound(self, external: Endpoint, now: float) -> _Entry | None:
        """The live mapping of the external endpoint *external*, if any."""
        self._expire(now)
        return self._by_external.get(external)

    def permits(self, entry: _Entry, remote: Endpoint, now: float) -> bool:
        """
        Whether the filter lets a packet from *remote* through *entry*
        (RFC 4787 section 5).
        """
        filtering = self.behaviour.filtering
        if filtering is Filtering.ENDPOINT_INDEPENDENT:
            return True
        oldest = now - self.behaviour.mapping_lifetime
        if filtering is Filtering.ADDRESS_AND_PORT_DEPENDENT:
            sent = entry.permissions.get(remote)
            return sent is not None and sent > oldest
        return any(
            sent > oldest and where.host == remote.host for where, sent in entry.permissions.items()
        )

    @staticmethod
    def refresh(entry: _Entry, now: float) -> None:
        """Restart *entry*'s timer (inbound refresh, RFC 4787 REQ-6a)."""
        entry.refreshed = now

    def clear(self) -> None:
        """Forget every mapping."""
        self._by_key.clear()
        self._by_external.clear()
        self._next_expiry = math.inf

    def snapshot(self, now: float) -> tuple[NatMapping, ...]:
        """The live mappings, oldest first."""
        self._expire(now)
        lifetime = self.behaviour.mapping_lifetime
        oldest = now - lifetime
        return tuple(
            NatMapping(
                internal=entry.internal,
                external=entry.external,
                remote=entry.remote,
                created=entry.created,
                expires=entry.refreshed + lifetime,
                permitted=frozenset(w for w, sent in entry.permissions.items() if sent > oldest),
            )
            for entry in self._by_key.values()
        )

    def _expire(self, now: float) -> None:
        """Drop the mappings whose lifetime has run out (RFC 4787 section
        4.3); cheap when none has."""
        if now < self._next_expiry:
            return
        lifetime = self.behaviour.mapping_lifetime
        upcoming = math.inf
        for key, entry in list(self._by_key.items()):
            expires = entry.refreshed + lifetime
            if expires <= now:
                del self._by_key[key]
                del self._by_external[entry.external]
                self._stats.mappings_expired += 1
            else:
                upcoming = min(upcoming, expires)
        self._next_expiry = upcoming

    def _external_for(self, internal: Endpoint) -> Endpoint | None:
        """A free external endpoint for a new mapping of *internal*, or
        ``None`` when every port is taken (RFC 4787 section 4.2.1; REQ-3:
        no port overloading)."""
        behaviour = self.behaviour
        if not behaviour.translate:
            return internal
        used = self._by_external
        address = self.address
        if behaviour.port_preservation and Endpoint(address, internal.port) not in used:
            return Endpoint(address, internal.port)
        low, high = behaviour.port_range
        size = high - low + 1
        if behaviour.allocation is Allocation.SEQUENTIAL:
            # Steps that do not divide evenly may skip free ports: look on.
            for _ in range(size):
                port = self._cursor
                self._cursor = low + (port - low + behaviour.step) % size
                if Endpoint(address, port) not in used:
                    return Endpoint(address, port)
            start = low
        else:
            for _ in range(_RANDOM_TRIES):
                port = self._rng.randint(low, high)
                if Endpoint(address, port) not in used:
                    return Endpoint(address, port)
            start = self._rng.randint(low, high)
        for offset in range(size):
            port = low + (start - low + offset) % size
            if Endpoint(address, port) not in used:
                return Endpoint(address, port)
        return None
