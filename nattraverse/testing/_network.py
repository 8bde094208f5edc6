"""
The simulated network: realms, hosts and NATs on one shared clock, and the
carrying of packets between them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from random import Random
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from nattraverse._types import Endpoint, Filtering, Mapping
from nattraverse.testing._behaviour import Allocation, NatBehaviour, behaviour_for
from nattraverse.testing._host import SimulatedHost
from nattraverse.testing._link import PERFECT, Link, cross
from nattraverse.testing._nat import SimulatedNAT
from nattraverse.testing._realm import (
    Attachment,
    Packet,
    Realm,
    internet_pools,
    lan_pools,
    parse_ipv4,
)

__all__ = ["Network", "NetworkStats", "TraceEntry"]

_T = TypeVar("_T")


@dataclass(slots=True)
class NetworkStats:
    """
    What happened to the packets of a :class:`Network`.

    :ivar sent: Datagrams written by hosts.
    :ivar delivered: Datagrams handed to a protocol.
    :ivar lost: Packet copies dropped by a lossy link.
    :ivar duplicated: Packets a link duplicated.
    :ivar reordered: Packet copies a link held back.
    :ivar no_route: Packets to an address nothing has.
    :ivar unreachable: Datagrams to a port nothing listens on (answered with
        ICMP port unreachable).
    :ivar refusals_reported: ICMP port unreachable reported to a connected
        port as ``connectionRefused()``.
    :ivar protocol_errors: Exceptions raised by protocols receiving a
        datagram (logged, as Twisted does).
    """

    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    no_route: int = 0
    unreachable: int = 0
    refusals_reported: int = 0
    protocol_errors: int = 0


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """
    One event in a packet's life, recorded when the network is made with
    ``trace=True``.

    :ivar time: Clock time.
    :ivar event: ``"send"``, ``"deliver"``, ``"lost"``, ``"no-route"``,
        ``"unreachable"``, ``"closed"``, ``"not-connected"``, ``"out"`` and
        ``"in"`` (translated by a NAT), ``"no-mapping"``, ``"filtered"``,
        ``"hairpin"``, ``"hairpin-dropped"``, ``"blocked"``,
        ``"exhausted"``, ``"refused"`` (ICMP sent), ``"icmp"`` (ICMP
        reported to a protocol) or ``"icmp-ignored"``.
    :ivar where: The host, NAT or realm where it happened.
    :ivar number: The packet's number: a datagram keeps it all the way.
    :ivar source: The packet's source there.
    :ivar destination: The packet's destination there.
    :ivar payload: The datagram (empty for ICMP).
    :ivar icmp: Whether the packet is an ICMP port unreachable.
    """

    time: float
    event: str
    where: str
    number: int
    source: Endpoint
    destination: Endpoint
    payload: bytes = field(repr=False)
    icmp: bool = False

    def __str__(self) -> str:
        kind = "ICMP unreachable" if self.icmp else f"{len(self.payload)} bytes"
        return (
            f"{self.time:10.4f} {self.where:>16} {self.event:<15} #{self.number} "
            f"{self.source} -> {self.destination} {kind}"
        )


class Network:
    """
    A deterministic in-memory network of hosts and NATs.

    Every host's reactor, every link and every NAT timer run on one
    :class:`~twisted.internet.task.Clock`; nothing happens unless the clock
    is advanced (:meth:`run`, :meth:`pump`, :meth:`run_until`).  All
    randomness comes from generators seeded with *seed* and the name of the
    NAT, host or realm that uses it, so a run is reproducible and adding a
    host does not change what happens to the others.

    :param clock: The clock to share; a new one by default.
    :param seed: Seeds every random choice (ports, loss, jitter).
    :param trace: Record every packet event in :attr:`trace`.
    :ivar internet: The public realm.
    :ivar stats: Packet counters.
    :ivar trace: The recorded events, or ``None`` when not tracing.
    """

    def __init__(
        self, clock: Clock | None = None, seed: int | str = 0, *, trace: bool = False
    ) -> None:
        self.clock = Clock() if clock is None else clock
        self.seed = seed
        self.stats = NetworkStats()
        self.trace: list[TraceEntry] | None = [] if trace else None
        self.hosts: dict[str, SimulatedHost] = {}
        self.nats: dict[str, SimulatedNAT] = {}
        self.internet = Realm("internet", self.random("realm", "internet"), pools=internet_pools())
        self._numbers = itertools.count(1)
        self._in_flight = 0
        self._lans = 0

    def random(self, kind: str, name: str) -> Random:
        """
        A generator seeded with the network's seed, *kind* and *name*: the
        same for the same three, unrelated to every other.

        The network uses the kinds ``"link"``, ``"ports"``, ``"nat"`` and
        ``"realm"``; use others for the randomness of code under test, so
        that it is reproducible too::

            StunDemultiplexer(host.reactor, random_bytes=network.random("stun", "alice").randbytes)
        """
        return Random(f"{self.seed}/{kind}/{name}")

    # -- building ---------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"a name must be a non-empty string, not {name!r}")
        if name in self.hosts or name in self.nats:
            raise ValueError(f"the network already has a host or NAT named {name!r}")

    def nat(
        self,
        name: str,
        behind: Realm | None = None,
        *,
        preset: str | NatBehaviour | None = None,
        public_address: str | None = None,
        lan: str | None = None,
        uplink: Link = PERFECT,
        mapping: Mapping | None = None,
        filtering: Filtering | None = None,
        port_preservation: bool | None = None,
        allocation: Allocation | None = None,
        step: int | None = None,
        port_range: tuple[int, int] | None = None,
        hairpin: bool | None = None,
        mapping_lifetime: float | None = None,
        inbound_refresh: bool | None = None,
        inbound_refused: bool | None = None,
        translate: bool | None = None,
        block_udp: bool | None = None,
    ) -> SimulatedNAT:
        """
        Add a NAT whose outside is in *behind* (the internet by default);
        hosts go in its :attr:`~SimulatedNAT.lan`.

        The behaviour is *preset* (a name from :data:`PRESETS` or a
        :class:`NatBehaviour`; ``"port-restricted"``, what Linux masquerade
        does, by default), with every other keyword given here changed: see
        :class:`NatBehaviour` for each.

        :param name: Unique among the network's hosts and NATs.
        :param public_address: Its address in *behind*; the next free one
            (``203.0.113.1``, ``.2``, ... on the internet) by default.
        :param lan: The inside network, like ``"192.168.1.0/24"``; the NAT
            takes its first address.  By default ``10.0.N.0/24`` for the Nth
            translating NAT; a NAT that does not translate hands out
            addresses of the realm it is in.
        :param uplink: The link between the NAT and *behind*.
        :raises ValueError: for an unknown preset, a used name or address.
        """
        self._check_name(name)
        changes = {
            key: value
            for key, value in (
                ("mapping", mapping),
                ("filtering", filtering),
                ("port_preservation", port_preservation),
                ("allocation", allocation),
                ("step", step),
                ("port_range", port_range),
                ("hairpin", hairpin),
                ("mapping_lifetime", mapping_lifetime),
                ("inbound_refresh", inbound_refresh),
                ("inbound_refused", inbound_refused),
                ("translate", translate),
                ("block_udp", block_udp),
            )
            if value is not None
        }
        if isinstance(preset, NatBehaviour):
            behaviour = preset.replace(**changes)
        else:
            behaviour = behaviour_for(preset, changes)
        behind = self.internet if behind is None else behind
        self._check_realm(behind)
        if public_address is None:
            address = behind._allocate("nat")
        else:
            address = parse_ipv4(public_address, "public_address")
        pools = None
        inside = None
        if behaviour.translate or lan is not None:
            if lan is None:
                self._lans += 1
                lan = f"10.{self._lans // 256}.{self._lans % 256}.0/24"
            inside, pools = lan_pools(lan)
        nat = SimulatedNAT(self, name, behind, behaviour, address, uplink, inside, pools)
        behind._claim(address, nat)
        if inside is not None:
            nat.lan._reserve(inside)
        self.nats[name] = nat
        return nat

    def host(
        self,
        name: str,
        realm: Realm | None = None,
        address: str | None = None,
        *,
        aliases: Iterable[str] = (),
        link: Link = PERFECT,
    ) -> SimulatedHost:
        """
        Add a host to *realm* (the internet by default).

        :param name: Unique among the network's hosts and NATs.
        :param address: Its primary address; the realm's next free one by
            default.  Ports bound to ``"0.0.0.0"`` send from it.
        :param aliases: More addresses of the host, as for an RFC 5780
            STUN server with two.
        :param link: The link between the host and its realm.
        :raises ValueError: for a used name or address.
        """
        self._check_name(name)
        realm = self.internet if realm is None else realm
        self._check_realm(realm)
        primary = realm._allocate() if address is None else parse_ipv4(address, "address")
        addresses = (primary, *(parse_ipv4(a, "alias") for a in aliases))
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"host {name!r} has an address twice: {addresses}")
        for candidate in addresses:
            if not realm._is_free(candidate):
                raise ValueError(f"address {candidate} is already in use in {realm.name}")
        host = SimulatedHost(self, name, realm, addresses, link)
        for candidate in addresses:
            realm._claim(candidate, host)
        self.hosts[name] = host
        return host

    def _check_realm(self, realm: Realm) -> None:
        if realm is not self.internet and (
            realm.gateway is None or self.nats.get(realm.gateway.name) is not realm.gateway
        ):
            raise ValueError(f"{realm!r} is not a realm of this network")

    # -- carrying packets ---------------------------------------------------------

    def _new_packet(
        self,
        source: Endpoint,
        destination: Endpoint,
        payload: bytes,
        about: tuple[Endpoint, Endpoint] | None = None,
    ) -> Packet:
        """A packet with a fresh number."""
        return Packet(next(self._numbers), source, destination, payload, about)

    def _record(self, event: str, where: str, packet: Packet) -> None:
        """Add an event to the trace, when tracing."""
        if self.trace is not None:
            self.trace.append(
                TraceEntry(
                    self.clock.seconds(),
                    event,
                    where,
                    packet.number,
                    packet.source,
                    packet.destination,
                    packet.payload,
                    packet.about is not None,
                )
            )

    def _later(self, delay: float, receive: Callable[[Packet], None], packet: Packet) -> None:
        """Hand *packet* to *receive* after *delay* seconds, through the
        clock (never at once, even for no delay)."""
        self._in_flight += 1
        self.clock.callLater(delay, self._land, receive, packet)

    def _land(self, receive: Callable[[Packet], None], packet: Packet) -> None:
        self._in_flight -= 1
        receive(packet)

    def _transmit(self, packet: Packet, realm: Realm, sender: Attachment | None) -> None:
        """
        Carry *packet* across *realm* from *sender* (``None``: a NAT's
        inside) to what has its destination address there, or else to the
        realm's gateway.  The packet crosses the sender's link, the realm's
        and the receiver's (none for a gateway's inside), each of which may
        delay, drop or duplicate it.
        """
        target = realm.attachment(packet.destination.host)
        hops: list[tuple[Link, Random, str]] = []
        if sender is not None:
            hops.append((sender.link, sender.link_rng, sender.name))
        hops.append((realm.link, realm.link_rng, realm.name))
        receive: Callable[[Packet], None]
        if target is not None:
            hops.append((target.link, target.link_rng, target.name))
            receive = target._arrive
        elif realm.gateway is not None:
            receive = realm.gateway._from_inside
        else:
            self.stats.no_route += 1
            self._record("no-route", realm.name, packet)
            return
        delays = [0.0]
        for link, rng, where in hops:
            after: list[float] = []
            for delay in delays:
                extras = cross(link, rng, self.stats)
                if not extras:
                    self._record("lost", where, packet)
                after.extend(delay + extra for extra in extras)
            delays = after
        for delay in delays:
            self._later(delay, receive, packet)

    # -- time -------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Packets on their way somewhere."""
        return self._in_flight

    def _next_call(self) -> float | None:
        calls = self.clock.getDelayedCalls()
        return min((c.getTime() for c in calls), default=None)

    def _step_to(self, when: float) -> None:
        """Move the clock to *when* and run what is due, each call at its
        own time (``Clock.advance`` alone runs them all at the end)."""
        clock = self.clock
        clock.rightNow = max(clock.rightNow, when)
        clock.advance(0)

    def run(self, seconds: float) -> None:
        """
        Let *seconds* pass: every timer and packet due fires at its own
        time, in order.
        """
        if not seconds >= 0:
            raise ValueError(f"cannot run for {seconds!r} seconds")
        end = self.clock.seconds() + seconds
        while (upcoming := self._next_call()) is not None and upcoming <= end:
            self._step_to(upcoming)
        self._step_to(end)

    def pump(self, timeout: float = 60.0) -> float:
        """
        Run the clock until no packet is in flight: every datagram sent has
        arrived or been dropped.  Timers due meanwhile fire too.

        :returns: The seconds that passed.
        :raises RuntimeError: when packets are still in flight after
            *timeout* seconds (something keeps sending).
        """
        start = self.clock.seconds()
        deadline = start + timeout
        self._step_to(start)
        while self._in_flight:
            upcoming = self._next_call()
            if upcoming is None or upcoming > deadline:
                raise RuntimeError(
                    f"{self._in_flight} packets are still in flight after {timeout} seconds"
                )
            self._step_to(upcoming)
        return self.clock.seconds() - start

    def run_until(self, deferred: Deferred[_T], timeout: float = 60.0) -> _T:
        """
        Run the clock until *deferred* fires, and return its result.

        :raises: The failure's exception when it fails.
        :raises TimeoutError: when it has not fired after *timeout* seconds.
        :raises RuntimeError: when nothing is scheduled that could fire it.
        """
        outcome: list[Any] = []
        deferred.addBoth(outcome.append)
        deadline = self.clock.seconds() + timeout
        self._step_to(self.clock.seconds())
        while not outcome:
            upcoming = self._next_call()
            if upcoming is None:
                raise RuntimeError(f"{deferred!r} has not fired and nothing is scheduled")
            if upcoming > deadline:
                self._step_to(deadline)
                raise TimeoutError(f"{deferred!r} has not fired after {timeout} seconds")
            self._step_to(upcoming)
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]
