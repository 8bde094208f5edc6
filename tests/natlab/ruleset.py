"""
nftables rulesets of the lab's routers and wires: pure functions from
options to ``nft -f`` text, so that what a preset does can be read in one
place (see ``/work/shared/NATLAB.md`` for how each was verified).

Every router gets one ``table ip natlab``:

- ``prerouting`` (nat): inbound DNAT through learned maps (full cone,
  restricted cone) and hairpin DNAT of LAN packets to the WAN address;
- ``postrouting`` (nat): the SNAT that makes the mapping behaviour;
- ``learn`` (filter, after SNAT): fills the maps from conntrack, so a map
  entry is exactly an existing mapping: ``proto . external port ->
  inside address . inside port``;
- ``forward``/``input`` (filter): ``ct state invalid drop`` (otherwise
  Linux forwards INVALID packets un-NATed, leaking private addresses),
  replies in, LAN out, unsolicited inbound dropped or rejected.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tests.natlab.presets import Inbound, Preset

__all__ = [
    "NO_PRESERVATION_KEY",
    "SEQUENTIAL_BASE",
    "SEQUENTIAL_PORTS",
    "RouterRules",
    "router_ruleset",
    "wire_ruleset",
]

#: Without port preservation, the external port is the inside port XOR this:
#: still endpoint-independent, never the inside port, and below 1024 so that
#: a port of 1024 or more stays there.
NO_PRESERVATION_KEY = 0x2A5

#: The first external port of a symmetric-sequential NAT.
SEQUENTIAL_BASE = 20000
#: How many ports it counts through before wrapping around.
SEQUENTIAL_PORTS = 256

#: How long a learned mapping lives without traffic, when the router keeps
#: Linux's conntrack timeouts (the UDP "stream" timeout, 120 s).
DEFAULT_MAP_TIMEOUT = 120.0

_L4 = "meta l4proto { tcp, udp }"


@dataclass(frozen=True)
class RouterRules:
    """
    What a router's ruleset depends on.

    :ivar preset: The kind of NAT.
    :ivar wan: The WAN interface name.
    :ivar lan: The LAN interface name (a bridge).
    :ivar wan_address: The WAN address, to which a NAT translates.
    :ivar lan_network: The LAN's network, e.g. ``"10.1.0.0/24"``.
    :ivar hairpin: Whether LAN hosts reach each other through the WAN address.
    :ivar port_preservation: Whether the external port equals the inside
        port when it is free (cone presets only).
    :ivar inbound: What unsolicited inbound packets get.
    :ivar mapping_timeout: Seconds an idle mapping lives, or ``None`` for
        Linux's defaults.
    """

    preset: Preset
    wan: str
    lan: str
    wan_address: str
    lan_network: str
    hairpin: bool = False
    port_preservation: bool = True
    inbound: Inbound = Inbound.DROP
    mapping_timeout: float | None = None


def _port_expression(rules: RouterRules) -> str:
    """The ``snat`` target of TCP and UDP flows: address, and port or flags."""
    address = rules.wan_address
    if rules.preset is Preset.SYMMETRIC:
        return f"{address} fully-random"
    if rules.preset is Preset.SYMMETRIC_SEQUENTIAL:
        # numgen yields host byte order: translate through a map, never add.
        ports = ", ".join(f"{i} : {SEQUENTIAL_BASE + i}" for i in range(SEQUENTIAL_PORTS))
        return f"{address} : numgen inc mod {SEQUENTIAL_PORTS} map {{ {ports} }}"
    if not rules.port_preservation:
        return f"{address} : th sport ^ {NO_PRESERVATION_KEY:#x}"
    return address


def _unsolicited(rules: RouterRules) -> list[str]:
    """The verdict for unsolicited packets arriving on the WAN side."""
    wan = f'iifname "{rules.wan}"'
    if rules.inbound is Inbound.REJECT:
        return [
            f"{wan} meta l4proto tcp reject with tcp reset",
            f"{wan} reject with icmp type port-unreachable",
        ]
    return [f"{wan} drop"]


def _timeout(rules: RouterRules) -> str:
    seconds = DEFAULT_MAP_TIMEOUT if rules.mapping_timeout is None else rules.mapping_timeout
    return f"{max(1, round(seconds * 1000))}ms"


def router_ruleset(rules: RouterRules) -> str:
    """The ``nft -f`` text of a router built from *rules*."""
    if not rules.preset.translates:
        return _routed_ruleset(rules)
    return _nat_ruleset(rules)


def _nat_ruleset(rules: RouterRules) -> str:
    preset = rules.preset
    wan, lan, address = f'"{rules.wan}"', f'"{rules.lan}"', rules.wan_address
    lan_network = ipaddress.ip_network(rules.lan_network)
    full_cone = preset is Preset.FULL_CONE
    restricted = preset is Preset.RESTRICTED_CONE
    learn = full_cone or rules.hairpin
    target = _port_expression(rules)

    maps: list[str] = []
    prerouting: list[str] = []
    postrouting: list[str] = []
    learning: list[str] = []
    if learn:
        maps.append(
            "map endpoints { type inet_proto . inet_service : ipv4_addr . inet_service; "
            f"flags dynamic, timeout; timeout {_timeout(rules)}; }}"
        )
        # Outbound flows: the external port is the reply's destination port.
        learning.append(
            f"{_L4} ct status snat update @endpoints "
            "{ meta l4proto . ct reply proto-dst : ct original ip saddr . ct original proto-src }"
        )
        # Flows let in through the map keep their mapping alive too.
        learning.append(
            f"{_L4} ct status dnat update @endpoints "
            "{ meta l4proto . ct original proto-dst : ct reply ip saddr . ct reply proto-src }"
        )
    if full_cone:
        prerouting.append(f"iifname {wan} {_L4} dnat ip to meta l4proto . th dport map @endpoints")
    if restricted:
        maps.append(
            "map restricted { type ipv4_addr . inet_proto . inet_service : "
            "ipv4_addr . inet_service; "
            f"flags dynamic, timeout; timeout {_timeout(rules)}; }}"
        )
        learning.append(
            f"{_L4} ct status snat update @restricted {{ ct original ip daddr . meta l4proto . "
            "ct reply proto-dst : ct original ip saddr . ct original proto-src }"
        )
        learning.append(
            f"{_L4} ct status dnat update @restricted {{ ct original ip saddr . meta l4proto . "
            "ct original proto-dst : ct reply ip saddr . ct reply proto-src }"
        )
        prerouting.append(
            f"iifname {wan} {_L4} dnat ip to ip saddr . meta l4proto . th dport map @restricted"
        )
    if rules.hairpin:
        prerouting.append(
            f"iifname {lan} ip daddr {address} {_L4} "
            "dnat ip to meta l4proto . th dport map @endpoints"
        )
        # The peer must see the sender's public endpoint, not its private one.
        postrouting.append(
            f"oifname {lan} ip saddr {lan_network} ct status dnat {_L4} snat ip to {target}"
        )
        postrouting.append(
            f"oifname {lan} ip saddr {lan_network} ct status dnat snat ip to {address}"
        )
    postrouting.append(f"oifname {wan} {_L4} snat ip to {target}")
    postrouting.append(f"oifname {wan} snat ip to {address}")

    forward = []
    if preset is Preset.UDP_BLOCKED:
        forward.append("meta l4proto udp drop")
    forward += [
        "ct state invalid drop",
        "ct state established,related accept",
        f"iifname {lan} accept",
        "ct status dnat accept",
        *_unsolicited(rules),
    ]
    return _table(
        maps,
        {
            "prerouting": ("type nat hook prerouting priority dstnat; policy accept;", prerouting),
            "postrouting": (
                "type nat hook postrouting priority srcnat; policy accept;",
                postrouting,
            ),
            "learn": (
                "type filter hook postrouting priority srcnat + 10; policy accept;",
                learning,
            ),
            "forward": ("type filter hook forward priority filter; policy drop;", forward),
            "input": ("type filter hook input priority filter; policy accept;", _input(rules)),
            "output": ("type filter hook output priority filter; policy accept;", _OUTPUT),
        },
    )


def _input(rules: RouterRules) -> list[str]:
    wan = f'iifname "{rules.wan}"'
    return [
        "ct state invalid drop",
        f"{wan} ct state established,related accept",
        f"{wan} icmp type echo-request accept",
        *_unsolicited(rules),
    ]


#: Routers send no IGMP, so that conntrack counts stay what tests make them.
_OUTPUT = ["ip protocol igmp drop"]


def _routed_ruleset(rules: RouterRules) -> str:
    if rules.preset is Preset.OPEN:
        return _table([], {"output": ("type filter hook output priority filter;", _OUTPUT)})
    forward = [
        "ct state invalid drop",
        "ct state established,related accept",
        f'iifname "{rules.lan}" accept',
        *_unsolicited(rules),
    ]
    return _table(
        [],
        {
            "forward": ("type filter hook forward priority filter; policy drop;", forward),
            "input": ("type filter hook input priority filter; policy accept;", _input(rules)),
            "output": ("type filter hook output priority filter; policy accept;", _OUTPUT),
        },
    )


def _table(maps: list[str], chains: dict[str, tuple[str, list[str]]]) -> str:
    lines = ["table ip natlab {"]
    lines += [f"    {m}" for m in maps]
    for name, (header, rules) in chains.items():
        lines.append(f"    chain {name} {{")
        lines.append(f"        {header}")
        lines += [f"        {rule}" for rule in rules]
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def wire_ruleset(loss: float) -> str:
    """
    The ``nft -f`` text of a wire namespace that drops a fraction *loss* of
    the IPv4 packets crossing its bridge (br_netfilter on), before any delay.
    """
    per_mille = round(loss * 1000)
    rules = [f"numgen random mod 1000 < {per_mille} drop"] if per_mille > 0 else []
    return _table([], {"loss": ("type filter hook forward priority filter - 10;", rules)})
