"""
Addressing realms of the simulated network, what is attached to them, and
the packets they carry.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from random import Random
from typing import TYPE_CHECKING

from nattraverse._types import Endpoint
from nattraverse.testing._link import PERFECT, Link

if TYPE_CHECKING:
    from nattraverse.testing._nat import SimulatedNAT


@dataclass(frozen=True, slots=True)
class Packet:
    """
    A UDP datagram on the wire, or the ICMP port unreachable that refuses
    one.

    :ivar number: Which datagram this is (copies and translations keep it).
    :ivar source: Where it comes from, as seen where it is now.
    :ivar destination: Where it goes, as seen where it is now.
    :ivar payload: The UDP payload (empty for ICMP).
    :ivar about: For ICMP: the refused datagram's source and destination.
    """

    number: int
    source: Endpoint
    destination: Endpoint
    payload: bytes = field(repr=False)
    about: tuple[Endpoint, Endpoint] | None = None


class Attachment:
    """
    Something with an address in a realm: a host, or a NAT's outside.

    :ivar name: Unique in the network.
    :ivar link: Its link to the realm, crossed by every packet it sends or
        receives there.
    """

    def __init__(self, name: str, link: Link, link_rng: Random) -> None:
        self.name = name
        self.link = link
        self.link_rng = link_rng

    def _arrive(self, packet: Packet) -> None:
        """A packet for one of its addresses has crossed the realm."""
        raise NotImplementedError


def parse_ipv4(text: str, what: str) -> str:
    """
    *text* as a canonical IPv4 address.

    :raises ValueError: naming *what* when it is not one.
    """
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IPv4 address") from None


class AddressPool:
    """Addresses handed out in order, skipping those already taken."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.IPv4Network(n) for n in networks)
        self._candidates: Iterator[ipaddress.IPv4Address] = itertools.chain.from_iterable(
            n.hosts() for n in self.networks
        )

    def take(self, taken: Realm) -> str:
        for candidate in self._candidates:
            address = str(candidate)
            if taken._is_free(address):
                return address
        raise ValueError(f"no free address left in {', '.join(map(str, self.networks))}")


class Realm:
    """
    One addressing realm: the public internet, or the inside of a NAT.

    Packets between addresses of one realm go straight there; anything
    else goes to the realm's gateway NAT, if it has one.  A realm behind a
    NAT that does not translate (a router or firewall) holds public
    addresses: the realms above it route them to that NAT.

    :ivar name: ``"internet"``, or the NAT's name followed by ``".lan"``.
    :ivar gateway: The NAT this realm is the inside of, or ``None``.
    :ivar link: The realm's core, crossed by every packet within it.
    """

    def __init__(
        self,
        name: str,
        link_rng: Random,
        *,
        gateway: SimulatedNAT | None = None,
        pools: dict[str, AddressPool] | None = None,
    ) -> None:
        self.name = name
        self.gateway = gateway
        self.link = PERFECT
        self.link_rng = link_rng
        self._pools = pools or {}
        self._attachments: dict[str, Attachment] = {}
        self._reserved: set[str] = set()

    def __repr__(self) -> str:
        return f"<Realm {self.name}>"

    @property
    def routed(self) -> bool:
        """Whether the realm is behind a NAT that does not translate."""
        return self.gateway is not None and not self.gateway.behaviour.translate

    @property
    def addresses(self) -> dict[str, str]:
        """Each address in use here and the name of what it belongs to."""
        return {address: a.name for address, a in self._attachments.items()}

    def attachment(self, address: str) -> Attachment | None:
        """What a packet to *address* reaches in this realm, if anything."""
        return self._attachments.get(address)

    def _chain(self) -> Iterator[Realm]:
        """This realm, then the realms above it that route its addresses."""
        realm = self
        yield realm
        while realm.gateway is not None and realm.routed:
            realm = realm.gateway.behind
            yield realm

    def _is_free(self, address: str) -> bool:
        """Whether *address* may be claimed here."""
        return all(
            address not in realm._attachments and address not in realm._reserved
            for realm in self._chain()
        )

    def _reserve(self, address: str) -> None:
        """Keep *address* from being handed out (a NAT's inside address)."""
        if not self._is_free(address):
            raise ValueError(f"address {address} is already in use in {self.name}")
        self._reserved.add(address)

    def _allocate(self, kind: str = "host") -> str:
        """The next free address for a host or (``kind="nat"``) a NAT."""
        pool = self._pools.get(kind) or self._pools.get("host")
        if pool is None:
            gateway = self.gateway
            assert gateway is not None, "every realm without a pool is behind a router"
            return gateway.behind._allocate("host")
        return pool.take(self)

    def _claim(self, address: str, attachment: Attachment) -> None:
        """
        Give *address* to *attachment*; realms above a routed realm route
        it to their router.

        :raises ValueError: when the address is in use.
        """
        if not self._is_free(address):
            raise ValueError(f"address {address} is already in use in {self.name}")
        target = attachment
        for realm in self._chain():
            realm._attachments[address] = target
            if realm.gateway is not None:
                target = realm.gateway


def internet_pools() -> dict[str, AddressPool]:
    """Documentation addresses (RFC 5737): hosts from TEST-NET-1 and -2,
    NATs from TEST-NET-3."""
    return {
        "host": AddressPool(["192.0.2.0/24", "198.51.100.0/24"]),
        "nat": AddressPool(["203.0.113.0/24"]),
    }


def lan_pools(subnet: str) -> tuple[str, dict[str, AddressPool]]:
    """
    The NAT's inside address (the subnet's first) and a pool of the rest.

    :raises ValueError: when *subnet* is not an IPv4 network with room.
    """
    try:
        network = ipaddress.IPv4Network(subnet)
    except ValueError as e:
        raise ValueError(f"lan {subnet!r} is not an IPv4 network: {e}") from None
    hosts = network.hosts()
    first = next(hosts, None)
    if first is None or network.num_addresses < 4:
        raise ValueError(f"lan {subnet!r} has no room for a gateway and hosts")
    return str(first), {"host": AddressPool([subnet])}
