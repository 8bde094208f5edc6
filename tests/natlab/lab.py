"""
The lab: a topology of network namespaces with real kernel NATs.

Declare nodes with :class:`Lab` (``internet``, ``public_host``, ``nat``,
``host``); the lab builds whatever is declared on first use of a node (or
on :meth:`Lab.build`), all at once, and removes every namespace carrying
its prefix on :meth:`Lab.close`: on leaving its ``with`` block, whatever
the reason, at interpreter exit, and on SIGTERM (turned into
``KeyboardInterrupt`` while a lab is open, so that ``with`` blocks and
pytest fixtures unwind).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from types import TracebackType

from tests.natlab import _impair, _netns
from tests.natlab._plan import COMMON_SYSCTLS, ROUTER_SYSCTLS, WIRE_SYSCTLS, Plan, execute
from tests.natlab._registry import registry
from tests.natlab._segments import Segment, lan_segment, parse_network
from tests.natlab.errors import LabError
from tests.natlab.nodes import Host, Internet, Nat, Node, PublicHost, Socket
from tests.natlab.presets import Inbound, Preset
from tests.natlab.presets import Mapping as MappingBehaviour
from tests.natlab.ruleset import RouterRules, router_ruleset, wire_ruleset

__all__ = ["Host", "Internet", "Lab", "Nat", "Node", "PublicHost"]

_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")
#: The first ifindex a lab hands out; every interface it creates gets its own.
_FIRST_IFINDEX = 100
_BRIDGE_OPTIONS = "type bridge forward_delay 0 stp_state 0 mcast_snooping 0"
_PROCESS_GRACE = 3.0


class Lab:
    """
    A topology of network namespaces, built on first use and always removed.

    :param prefix: The per-run prefix of every namespace and interface
        (``ntl`` and four hex digits); a fresh one by default.
    :ivar prefix: That prefix.
    :ivar build_seconds: Wall-clock seconds spent building so far.
    """

    def __init__(self, *, prefix: str | None = None) -> None:
        if prefix is not None:
            if not re.fullmatch(rf"{_netns.PREFIX_FAMILY}[0-9a-f]{{4}}", prefix):
                raise ValueError(f"prefix {prefix!r} is not 'ntl' and four hex digits")
            if _netns.lab_namespaces(prefix):
                raise LabError(f"namespaces with the prefix {prefix} exist already")
        self.prefix = prefix or _netns.new_prefix()
        self.owner = _netns.Owner.me()
        self.build_seconds = 0.0
        self.nodes: dict[str, Node] = {}
        self._internet: Internet | None = None
        self._plan = Plan()
        self._ifindex = _FIRST_IFINDEX
        self._lock = threading.RLock()
        self._closed = False
        self._processes: list[subprocess.Popen[bytes]] = []
        self._sockets: list[Socket] = []
        self._delayers: list[_impair.Stoppable] = []
        self._impairment: str | None = None
        registry.add(self)

    def __repr__(self) -> str:
        return f"<Lab {self.prefix}: {', '.join(self.nodes) or 'empty'}>"

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc is None)

    # -- declaring nodes ------------------------------------------------------

    def internet(self) -> Internet:
        """The public segment (created on first call)."""
        with self._lock:
            if self._internet is None:
                self._check_open()
                internet = Internet(self)
                self._new_namespace(internet.namespace, COMMON_SYSCTLS)
                self._plan.ip[internet.namespace].append(
                    f"link add name {internet.segment.bridge} index {self._next_ifindex()} "
                    f"{_BRIDGE_OPTIONS}"
                )
                self._plan.ip[internet.namespace].append(f"link set {internet.segment.bridge} up")
                self._internet = internet
            return self._internet

    def public_host(
        self,
        name: str,
        addresses: Sequence[str] | str | None = None,
        *,
        delay_ms: float = 0.0,
        loss: float = 0.0,
        delay_only_to: Sequence[str] = (),
    ) -> PublicHost:
        """
        A host on the internet.

        :param addresses: Its addresses (documentation prefixes only); the
            first is its primary.  By default one from 192.0.2.10 on.
        :param delay_ms: One-way delay of its link to the internet.
        :param loss: Loss probability of that link, each way.
        :param delay_only_to: IPv4 addresses (e.g. a NAT's WAN address):
            when given, *delay_ms* delays only the IPv4 packets this host
            sends to them; packets to other addresses and packets towards
            it cross undelayed.  *loss* still applies to everything.
        :raises LabError: when *delay_only_to* is given without a positive
            *delay_ms* or holds something other than IPv4 addresses.
        """
        with self._lock:
            internet = self.internet()
            self._check_name(name)
            _check_impairment(delay_ms, loss)
            only_to = _check_delay_only_to(delay_only_to, delay_ms)
            if isinstance(addresses, str):
                addresses = [addresses]
            if addresses is None:
                claimed = [internet.segment.allocate("host")]
            else:
                if not addresses:
                    raise LabError(f"public host {name} needs at least one address")
                claimed = [internet.segment.claim(a) for a in addresses]
            node = PublicHost(self, name, claimed, delay_ms, loss, only_to)
            self._new_namespace(node.namespace, COMMON_SYSCTLS)
            eth = f"{self.prefix}-eth0"
            self._attach(node, eth, internet.segment)
            lines = [
                f"addr add {a}/{internet.segment.network_of(a).prefixlen} dev {eth}"
                for a in claimed
            ]
            lines += [f"link set {eth} up", *internet.segment.member_routes(eth)]
            self._plan.ip[node.namespace] += lines
            self._late_interface_sysctls(node.namespace, [eth])
            self.nodes[name] = node
            return node

    def nat(
        self,
        name: str,
        preset: Preset | str = Preset.PORT_RESTRICTED,
        *,
        wan: Internet | Nat | None = None,
        wan_address: str | None = None,
        lan: str | None = None,
        hairpin: bool = False,
        port_preservation: bool = True,
        inbound: Inbound | str = Inbound.DROP,
        mapping_timeout: float | None = None,
        delay_ms: float = 0.0,
        loss: float = 0.0,
    ) -> Nat:
        """
        A NAT router (or, for the non-translating presets, a firewall or
        plain router).

        :param preset: A :class:`~tests.natlab.presets.Preset` or its name.
        :param wan: Where its WAN side plugs in: the internet (default) or
            another NAT's LAN (carrier-grade style, two levels).
        :param wan_address: Its WAN address; by default the next of
            203.0.113.1 onwards (internet) or of the upstream LAN.
        :param lan: Its LAN prefix, private (e.g. ``"100.64.0.0/24"`` for a
            carrier-grade NAT); by default ``10.N.0.0/24``.  Firewalls and
            open routers route a /28 of their upstream instead (public
            behind the internet) and take no *lan*.
        :param hairpin: Let LAN hosts reach each other's mappings through
            the WAN address, seeing each other's public endpoints.
        :param port_preservation: Keep the inside port as the external
            port when free (EIM presets; Linux's behaviour).  Off, the
            external port is the inside port XOR a constant: still EIM.
        :param inbound: ``"drop"`` or ``"reject"`` unsolicited inbound
            packets (reject: ICMP port unreachable for UDP, RST for TCP).
        :param mapping_timeout: Whole seconds an idle UDP mapping lives
            (conntrack's UDP timeouts in the router's namespace, and the
            learned maps' timeouts); Linux's 30/120 s by default.
        :param delay_ms: One-way delay of its WAN link.
        :param loss: Loss probability of its WAN link, each way.
        """
        with self._lock:
            preset = Preset(preset)
            inbound = Inbound(inbound)
            upstream = self.internet() if wan is None else wan
            if upstream.lab is not self:
                raise LabError(f"{upstream!r} belongs to another lab")
            self._check_name(name)
            _check_impairment(delay_ms, loss)
            if (
                not port_preservation
                and preset.mapping is not MappingBehaviour.ENDPOINT_INDEPENDENT
            ):
                raise LabError(
                    f"port_preservation=False needs an endpoint-independent preset, "
                    f"not {preset.value}: symmetric NATs never preserve ports and "
                    "routers do not translate"
                )
            if mapping_timeout is not None and (
                mapping_timeout < 1 or mapping_timeout != int(mapping_timeout)
            ):
                raise LabError(f"mapping_timeout must be whole seconds >= 1, not {mapping_timeout}")
            up = upstream.segment
            wan_if, lan_if = f"{self.prefix}-wan", f"{self.prefix}-lan"
            node = Nat(self, name, preset, upstream)
            if preset.translates:
                network = parse_network(lan) if lan else self._default_lan()
                node.segment = lan_segment(
                    node.namespace, lan_if, network, private=True, owner=f"NAT {name}"
                )
            elif lan is not None:
                raise LabError(
                    f"a {preset.value} router routes a /28 of its upstream; give it no lan"
                )
            address = up.claim(wan_address) if wan_address else up.allocate("router")
            if not preset.translates:
                network = up.allocate_subnet()
                node.segment = lan_segment(
                    node.namespace, lan_if, network, private=False, owner=f"router {name}"
                )
            node.address = address
            node.delay_ms = delay_ms
            node.loss = loss
            node.rules = RouterRules(
                preset=preset,
                wan=wan_if,
                lan=lan_if,
                wan_address=address,
                lan_network=str(network),
                hairpin=hairpin,
                port_preservation=port_preservation,
                inbound=inbound,
                mapping_timeout=mapping_timeout,
            )
            self._new_namespace(node.namespace, COMMON_SYSCTLS + ROUTER_SYSCTLS)
            self._attach(node, wan_if, up)
            plan = self._plan
            plan.ip[node.namespace] += [
                f"addr add {address}/{up.network_of(address).prefixlen} dev {wan_if}",
                f"link set {wan_if} up",
                *up.member_routes(wan_if),
                f"link add name {lan_if} index {self._next_ifindex()} {_BRIDGE_OPTIONS}",
                f"addr add {node.lan_address}/{network.prefixlen} dev {lan_if}",
                f"link set {lan_if} up",
            ]
            plan.nft[node.namespace] = router_ruleset(node.rules)
            late = plan.late_sysctls[node.namespace]
            self._late_interface_sysctls(node.namespace, [wan_if, lan_if])
            late += [(f"net.ipv4.conf.{i}.send_redirects", "0") for i in (wan_if, lan_if)]
            if not preset.translates:
                # Answer ARP upstream for the routed subnet, at once.
                late += [
                    (f"net.ipv4.conf.{wan_if}.proxy_arp", "1"),
                    (f"net.ipv4.neigh.{wan_if}.proxy_delay", "0"),
                ]
            if mapping_timeout is not None:
                seconds = str(int(mapping_timeout))
                late += [
                    ("net.netfilter.nf_conntrack_udp_timeout", seconds),
                    ("net.netfilter.nf_conntrack_udp_timeout_stream", seconds),
                ]
            self.nodes[name] = node
            return node

    def host(
        self,
        name: str,
        behind: Nat,
        *,
        address: str | None = None,
        delay_ms: float = 0.0,
        loss: float = 0.0,
    ) -> Host:
        """
        A host on the LAN of *behind*, with a default route via it.

        :param address: Its address on that LAN; by default the next free one.
        :param delay_ms: One-way delay of its link to the LAN.
        :param loss: Loss probability of that link, each way.
        """
        with self._lock:
            if not isinstance(behind, Nat):
                raise LabError(
                    f"hosts go behind a NAT or router, not {behind!r}; use public_host on the "
                    "internet"
                )
            if behind.lab is not self:
                raise LabError(f"{behind!r} belongs to another lab")
            self._check_name(name)
            _check_impairment(delay_ms, loss)
            segment = behind.segment
            claimed = segment.claim(address) if address else segment.allocate("host")
            node = Host(self, name, behind, claimed, delay_ms, loss)
            self._new_namespace(node.namespace, COMMON_SYSCTLS)
            eth = f"{self.prefix}-eth0"
            self._attach(node, eth, segment)
            self._plan.ip[node.namespace] += [
                f"addr add {claimed}/{segment.network_of(claimed).prefixlen} dev {eth}",
                f"link set {eth} up",
                *segment.member_routes(eth),
            ]
            self._late_interface_sysctls(node.namespace, [eth])
            self.nodes[name] = node
            return node

    # -- building -------------------------------------------------------------

    def build(self) -> None:
        """
        Build everything declared and not built yet (a no-op otherwise).

        :raises LabError: naming the step that failed; :meth:`close` still
            removes whatever was created.
        """
        with self._lock:
            self._check_open()
            registry.hook()
            plan, self._plan = self._plan, Plan()
            if not plan:
                return
            started = time.monotonic()
            try:
                execute(plan)
                if plan.delayers:
                    self._delayers += _impair.start_delayers(plan.delayers)
            finally:
                self.build_seconds += time.monotonic() - started

    @property
    def namespaces(self) -> list[str]:
        """The namespaces that exist now with this lab's prefix."""
        return _netns.lab_namespaces(self.prefix)

    def impairment_method(self) -> str:
        """How this lab delays links: ``"netem"`` or ``"wire"`` (probed once per process)."""
        if self._impairment is None:
            self._impairment = _impair.impairment_method(f"{self.prefix}-netemprobe")
        return self._impairment

    # -- teardown -------------------------------------------------------------

    def close(self, *, raise_errors: bool = True) -> None:
        """
        Stop every process and delayer the lab started, kill whatever else
        runs in its namespaces, close its sockets, and delete every
        namespace with its prefix (a second call does nothing).

        :raises LabError: when a namespace could not be deleted (only with
            *raise_errors*).
        """
        with self._lock, registry.closing():
            if self._closed:
                return
            problems = self._teardown()
            self._closed = True
            registry.discard(self)
            _netns.release_prefix(self.prefix)
        if problems and raise_errors:
            raise LabError(f"lab {self.prefix} teardown: " + "; ".join(problems))

    def _teardown(self) -> list[str]:
        problems: list[str] = []
        for delayer in self._delayers:
            try:
                delayer.stop(2.0)
            except Exception as e:
                problems.append(f"delayer: {e}")
        _stop_processes(self._processes)
        for sock in self._sockets:
            sock.close()
        names = self.namespaces
        for _attempt in range(3):
            _netns.kill_namespace_processes(names)
            names = _netns.delete_namespaces(names)
            if not names:
                break
        if names:
            problems.append(f"could not delete {', '.join(names)}")
        return problems

    # -- internals ------------------------------------------------------------

    def _adopt_process(self, process: subprocess.Popen[bytes]) -> None:
        """Stop *process* when the lab closes."""
        self._processes.append(process)

    def _adopt_socket(self, sock: Socket) -> None:
        """Close *sock* when the lab closes."""
        self._sockets.append(sock)

    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")

    def _check_name(self, name: str) -> None:
        self._check_open()
        if not _NAME.match(name):
            raise LabError(
                f"node name {name!r}: use a lower-case letter then up to 15 letters or digits"
            )
        if name in self.nodes or name == "internet":
            raise LabError(f"this lab already has a node called {name!r}")

    def _default_lan(self) -> IPv4Network:
        taken = {str(n.segment.networks[0]) for n in self.nodes.values() if isinstance(n, Nat)}
        for index in range(1, 256):
            candidate = f"10.{index}.0.0/24"
            if candidate not in taken:
                return parse_network(candidate)
        raise LabError("no default LAN prefix left; give lan=")

    def _next_ifindex(self) -> int:
        index = self._ifindex
        self._ifindex += 1
        return index

    def _new_namespace(self, namespace: str, sysctls: list[tuple[str, str]]) -> None:
        plan = self._plan
        plan.namespaces.append(namespace)
        plan.sysctls[namespace] += sysctls
        plan.ip[namespace].append(f'link set lo up alias "{self.owner.alias}"')

    def _late_interface_sysctls(self, namespace: str, interfaces: list[str]) -> None:
        self._plan.late_sysctls[namespace] += [
            (f"net.ipv4.conf.{i}.rp_filter", "0") for i in interfaces
        ]

    def _attach(self, node: Node, interface: str, segment: Segment) -> None:
        """Plan the link from *node*'s *interface* to *segment*'s bridge."""
        plan = self._plan
        port = f"{self.prefix}-p{self._ifindex}"
        impaired = node.delay_ms > 0 or node.loss > 0
        method = self.impairment_method() if impaired else None
        if method == _impair.WIRE:
            wire = f"{node.namespace}-wire"
            a, b, bridge = f"{self.prefix}-a", f"{self.prefix}-b", f"{self.prefix}-br"
            plan.links.append(self._veth(interface, node.namespace, a, wire))
            plan.links.append(self._veth(b, wire, port, segment.namespace))
            self._new_namespace(wire, COMMON_SYSCTLS + WIRE_SYSCTLS)
            plan.ip[wire] += [
                f"link add name {bridge} index {self._next_ifindex()} {_BRIDGE_OPTIONS}",
                f"link set {a} master {bridge} up",
                f"link set {b} master {bridge} up",
                f"link set {bridge} up",
            ]
            plan.bridges[wire].add(bridge)
            if node.loss > 0:
                plan.nft[wire] = wire_ruleset(node.loss)
            if node.delay_ms > 0:
                # Port a faces the node: with delay_only_to, only what it
                # sends to those addresses is queued.
                plan.iptables[wire] = _impair.wire_iptables(a, b, node.delay_only_to)
                plan.delayers.append((wire, node.delay_ms))
        else:
            plan.links.append(self._veth(interface, node.namespace, port, segment.namespace))
            if method == _impair.NETEM and node.delay_only_to:
                plan.tc[node.namespace] += _impair.netem_qdisc_to(
                    interface, node.delay_ms, node.loss, node.delay_only_to
                )
                if node.loss > 0:
                    plan.tc[segment.namespace].append(_impair.netem_qdisc(port, 0, node.loss))
            elif method == _impair.NETEM:
                line = _impair.netem_qdisc
                plan.tc[node.namespace].append(line(interface, node.delay_ms, node.loss))
                plan.tc[segment.namespace].append(line(port, node.delay_ms, node.loss))
        plan.ip[segment.namespace].append(f"link set {port} master {segment.bridge} up")
        plan.bridges[segment.namespace].add(segment.bridge)

    def _veth(self, name: str, namespace: str, peer: str, peer_namespace: str) -> str:
        return (
            f"link add {name} netns {namespace} index {self._next_ifindex()} type veth "
            f"peer name {peer} netns {peer_namespace} index {self._next_ifindex()}"
        )


def _check_impairment(delay_ms: float, loss: float) -> None:
    if not 0 <= delay_ms <= 10_000:
        raise LabError(f"delay_ms must be 0-10000, not {delay_ms}")
    if not 0 <= loss < 1:
        raise LabError(f"loss must be at least 0 and below 1, not {loss}")


def _check_delay_only_to(addresses: Sequence[str], delay_ms: float) -> tuple[str, ...]:
    """*addresses* (one string is one address) as IPv4 literals, checked against *delay_ms*."""
    if isinstance(addresses, str):
        addresses = [addresses]
    if not addresses:
        return ()
    if not delay_ms > 0:
        raise LabError(f"delay_only_to needs delay_ms > 0, not {delay_ms}")
    checked: dict[str, None] = {}
    for address in addresses:
        try:
            if not isinstance(address, str):
                raise ValueError(address)
            checked[str(IPv4Address(address))] = None
        except ValueError:
            raise LabError(f"delay_only_to: {address!r} is not an IPv4 address") from None
    return tuple(checked)


def _stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the processes still running, SIGKILL them after a grace period; reap all."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + _PROCESS_GRACE
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)
