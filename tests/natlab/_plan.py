"""
What a lab still has to build: namespaces, links, and per namespace the
sysctls, ``ip``/``tc`` batch lines, nftables and iptables rules, then the
delayers.  :func:`execute` carries a plan out: one ``ip -batch`` in the
root namespace that only creates namespaces and the links inside them,
then every namespace configured at once, each from a thread that has
entered it (no ``ip netns exec`` per step), then the delayers.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

from tests.natlab._netns import run_in_namespaces, run_tool, write_sysctls
from tests.natlab.errors import LabError

__all__ = ["Plan", "execute"]

#: Every namespace: no IPv6 (no DAD, MLD or router solicitations), no
#: reverse-path filtering, no redirects, and bridged traffic kept out of
#: iptables/nftables (br_netfilter is on by default in new namespaces).
COMMON_SYSCTLS = [
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
    ("net.bridge.bridge-nf-call-iptables", "0"),
    ("net.bridge.bridge-nf-call-ip6tables", "0"),
    ("net.bridge.bridge-nf-call-arptables", "0"),
]
#: Routers forward and never send redirects (hairpinned packets leave the
#: way they came in).
ROUTER_SYSCTLS = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
]
#: Seconds a new bridge port may take to start forwarding.
FORWARDING_TIMEOUT = 10.0

#: A wire's bridge hands IPv4 packets to nftables and iptables (loss, NFQUEUE).
WIRE_SYSCTLS = [("net.bridge.bridge-nf-call-iptables", "1")]


@dataclass
class Plan:
    """The steps of one build, grouped by namespace; see :func:`execute`."""

    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    sysctls: defaultdict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    ip: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    tc: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    nft: dict[str, str] = field(default_factory=dict)
    iptables: dict[str, str] = field(default_factory=dict)
    late_sysctls: defaultdict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    #: ``(wire namespace, delay_ms)`` of the delayers to start last.
    delayers: list[tuple[str, float]] = field(default_factory=list)
    #: The bridges that get new ports, by namespace: the build waits until
    #: those ports forward.
    bridges: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.links or self.touched())

    def touched(self) -> list[str]:
        """Every namespace that has something to configure, in creation order."""
        names = dict.fromkeys(self.namespaces)
        for table in (self.sysctls, self.ip, self.tc, self.nft, self.iptables, self.late_sysctls):
            names.update(dict.fromkeys(table))
        return list(names)


def execute(plan: Plan) -> None:
    """
    Carry out *plan* but its delayers (the caller starts those).

    :raises LabError: naming the namespace and the step that failed.
    """
    creation = [f"netns add {name}" for name in plan.namespaces] + plan.links
    if creation:
        run_tool(
            ["ip", "-batch", "-"],
            input="\n".join(creation) + "\n",
            what="creating namespaces and links",
        )
    run_in_namespaces({ns: _Configure(plan, ns) for ns in plan.touched()})
    # A bridge port starts forwarding only once the kernel's linkwatch work
    # has seen its carrier, which can lag (it needs the RTNL lock, which
    # namespaces being deleted hold): wait for it, so a built lab is ready.
    run_in_namespaces({ns: _WaitForwarding(ns, bridges) for ns, bridges in plan.bridges.items()})


class _WaitForwarding:
    """Wait, in a thread inside the namespace, until the bridges' ports all forward."""

    def __init__(self, namespace: str, bridges: set[str]) -> None:
        self.namespace = namespace
        self.bridges = sorted(bridges)

    def __call__(self) -> None:
        deadline = time.monotonic() + FORWARDING_TIMEOUT
        for bridge in self.bridges:
            while True:
                states = _port_states(bridge, self.namespace)
                if states and all(state == "forwarding" for state in states.values()):
                    break
                if time.monotonic() > deadline:
                    raise LabError(
                        f"ports of bridge {bridge} in {self.namespace} not forwarding after "
                        f"{FORWARDING_TIMEOUT} s: {states}"
                    )
                time.sleep(0.005)


def _port_states(bridge: str, namespace: str) -> dict[str, str]:
    output = run_tool(
        ["ip", "-j", "-d", "link", "show", "master", bridge], what=f"bridge {bridge} in {namespace}"
    )
    return {
        port["ifname"]: port.get("linkinfo", {}).get("info_slave_data", {}).get("state", "?")
        for port in json.loads(output or "[]")
    }


class _Configure:
    """The configuration of one namespace, run in a thread inside it."""

    def __init__(self, plan: Plan, namespace: str) -> None:
        self.namespace = namespace
        self.sysctls = plan.sysctls.get(namespace, [])
        self.ip = plan.ip.get(namespace, [])
        self.tc = plan.tc.get(namespace, [])
        self.nft = plan.nft.get(namespace)
        self.iptables = plan.iptables.get(namespace)
        self.late_sysctls = plan.late_sysctls.get(namespace, [])

    def __call__(self) -> None:
        ns = self.namespace
        write_sysctls(self.sysctls, ns)
        if self.ip:
            run_tool(["ip", "-batch", "-"], input="\n".join(self.ip) + "\n", what=f"ip in {ns}")
        if self.tc:
            run_tool(["tc", "-batch", "-"], input="\n".join(self.tc) + "\n", what=f"tc in {ns}")
        if self.nft:
            run_tool(["nft", "-f", "-"], input=self.nft, what=f"nftables in {ns}")
        if self.iptables:
            run_tool(
                ["iptables-restore", "-w", "5"],
                input=self.iptables,
                what=f"iptables in {ns}",
            )
        write_sysctls(self.late_sysctls, ns)
