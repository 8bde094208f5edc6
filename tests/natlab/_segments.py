"""
Layer-2 segments of the lab and their addresses.

A segment is a bridge in some namespace that nodes plug into: the
"internet" (documentation prefixes only, RFC 5737) or a router's LAN
(private prefixes, RFC 1918 and the RFC 6598 carrier-grade range, behind
a NAT; or a small public subnet routed by a firewall or open router).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network

from tests.natlab.errors import LabError

__all__ = [
    "DOCUMENTATION_NETWORKS",
    "PRIVATE_NETWORKS",
    "Segment",
    "internet_segment",
    "lan_segment",
    "parse_network",
]

#: RFC 5737: the only addresses the lab's public side uses.
DOCUMENTATION_NETWORKS = tuple(
    IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)
#: RFC 1918 and RFC 6598 (carrier-grade NAT): addresses only behind a NAT.
PRIVATE_NETWORKS = tuple(
    IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)

#: Size of the public subnets routed by firewalls and open routers.
ROUTED_PREFIXLEN = 28


class Segment:
    """
    A bridge that nodes plug into, with the addresses it hands out.

    :ivar namespace: Where the bridge is.
    :ivar bridge: The bridge's interface name.
    :ivar networks: The prefixes that are on-link on this segment.
    :ivar gateway: The router's address on it (``None`` on the internet,
        where every prefix is on-link).
    """

    def __init__(
        self,
        namespace: str,
        bridge: str,
        networks: Sequence[IPv4Network],
        *,
        gateway: IPv4Address | None,
        host_pools: dict[str, Iterator[IPv4Address]],
        subnets: Iterator[IPv4Network],
        description: str,
    ) -> None:
        self.namespace = namespace
        self.bridge = bridge
        self.networks = tuple(networks)
        self.gateway = gateway
        self.description = description
        self._pools = host_pools
        self._subnets = subnets
        self._used: set[IPv4Address] = set()
        self._routed: list[IPv4Network] = []
        if gateway is not None:
            self._used.add(gateway)

    def network_of(self, address: str) -> IPv4Network:
        """The on-link prefix that holds *address*."""
        ip = IPv4Address(address)
        for network in self.networks:
            if ip in network:
                return network
        raise LabError(f"{address} is not on {self.description}")

    def claim(self, address: str) -> str:
        """
        Reserve *address* for a node.

        :raises LabError: when it is not on this segment, is a network or
            broadcast address, lies in a routed subnet, or is taken.
        """
        try:
            ip = IPv4Address(address)
        except ValueError:
            raise LabError(f"{address!r} is not an IPv4 address") from None
        network = self.network_of(address)
        if ip in (network.network_address, network.broadcast_address):
            raise LabError(f"{address} is the network or broadcast address of {network}")
        if any(ip in routed for routed in self._routed):
            raise LabError(f"{address} lies in a subnet routed behind a router on it")
        if ip in self._used:
            raise LabError(f"{address} is already used on {self.description}")
        self._used.add(ip)
        return str(ip)

    def allocate(self, kind: str = "host") -> str:
        """The next free address of the pool *kind* (``"host"`` or ``"router"``)."""
        for ip in self._pools[kind]:
            if ip not in self._used and not any(ip in r for r in self._routed):
                self._used.add(ip)
                return str(ip)
        raise LabError(f"{_pool_description(kind)} of {self.description} has no address left")

    def allocate_subnet(self) -> IPv4Network:
        """A free /28 for a router that routes public (or upstream) addresses."""
        for subnet in self._subnets:
            if not any(ip in subnet for ip in self._used):
                self._routed.append(subnet)
                return subnet
        raise LabError(
            f"{self.description} has no /{ROUTED_PREFIXLEN} left for a routed "
            "(non-translating) router; give its upstream a bigger LAN"
        )

    def member_routes(self, interface: str) -> list[str]:
        """``ip`` batch lines that give a member its default route."""
        if self.gateway is None:
            return [f"route add default dev {interface}"]
        return [f"route add default via {self.gateway} dev {interface}"]


def _pool_description(kind: str) -> str:
    return {"host": "the host pool", "router": "the router pool"}.get(kind, kind)


def _hosts(network: IPv4Network, first: int, last: int) -> Iterator[IPv4Address]:
    for offset in range(first, last + 1):
        yield network.network_address + offset


def internet_segment(namespace: str, bridge: str) -> Segment:
    """
    The public segment: servers get 192.0.2.10 onwards, routers' WAN sides
    203.0.113.1 onwards, routed subnets are /28s of 198.51.100.0/24.
    """
    servers, public_subnets, wans = DOCUMENTATION_NETWORKS
    return Segment(
        namespace,
        bridge,
        DOCUMENTATION_NETWORKS,
        gateway=None,
        host_pools={"host": _hosts(servers, 10, 254), "router": _hosts(wans, 1, 254)},
        subnets=(
            s
            for s in public_subnets.subnets(new_prefix=ROUTED_PREFIXLEN)
            if s.network_address != public_subnets.network_address
        ),
        description="the internet",
    )


def lan_segment(
    namespace: str, bridge: str, network: IPv4Network, *, private: bool, owner: str
) -> Segment:
    """
    A router's LAN on *network*: the router is its first address; hosts
    and routers behind it get addresses from the lower half (from .10 on a
    /24), routed subnets are /28s of the upper half.

    :param private: Whether *network* must be private (a NAT's LAN) or is
        a routed public subnet.
    """
    if private and not any(network.subnet_of(p) for p in PRIVATE_NETWORKS):
        raise LabError(
            f"the LAN {network} of {owner} is not private: use 10.0.0.0/8, 172.16.0.0/12, "
            "192.168.0.0/16 or, carrier-grade, 100.64.0.0/10"
        )
    size = network.num_addresses
    if size < 8:
        raise LabError(f"the LAN {network} of {owner} is too small (at least a /29)")
    if network.prefixlen <= ROUTED_PREFIXLEN - 1:
        half = size // 2
        first = 10 if size >= 256 else 2
        hosts = (first, half - 1)
        upper = list(network.subnets(prefixlen_diff=1))[1]
        subnets: Iterator[IPv4Network] = iter(upper.subnets(new_prefix=ROUTED_PREFIXLEN))
    else:
        hosts = (2, size - 2)
        subnets = iter(())
    return Segment(
        namespace,
        bridge,
        [network],
        gateway=network.network_address + 1,
        host_pools={"host": _hosts(network, *hosts), "router": _hosts(network, *hosts)},
        subnets=subnets,
        description=f"the LAN {network} of {owner}",
    )


def parse_network(text: str) -> IPv4Network:
    """*text* as an IPv4 network, with a helpful error."""
    try:
        return ipaddress.IPv4Network(text)
    except ValueError as e:
        raise LabError(f"{text!r} is not an IPv4 network such as 10.1.0.0/24: {e}") from None
