"""
The nodes of a lab: namespaces in which tests start processes and open
sockets, with the addresses, router settings and link impairments the
:class:`~tests.natlab.lab.Lab` gave them.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, TypeVar

from tests.natlab import _netns
from tests.natlab._segments import Segment, internet_segment
from tests.natlab.presets import Preset
from tests.natlab.ruleset import RouterRules

if TYPE_CHECKING:
    from tests.natlab.lab import Lab

__all__ = ["Host", "Internet", "Nat", "Node", "PublicHost", "Socket"]

T = TypeVar("T")
#: The socket type (``Node.socket`` is a method).
Socket = socket.socket


class _Namespace:
    """A namespace of the lab, in which processes and sockets can be started."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name
        self.namespace = f"{lab.prefix}-{name}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} in {self.namespace}>"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """*argv* prefixed so that it runs in this namespace (``ip netns exec``)."""
        return [_netns.program("ip"), "netns", "exec", self.namespace, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """
        Run *argv* in this namespace and wait, at most *timeout* seconds,
        for it to end; its output is captured as text.

        :raises subprocess.CalledProcessError: when *check* and it fails.
        :raises subprocess.TimeoutExpired: when it runs too long (it is killed).
        """
        self.lab.build()
        return subprocess.run(
            self.exec_argv(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=env,
            cwd=cwd,
        )

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """
        Start *argv* in this namespace.  The lab terminates it (SIGTERM,
        then SIGKILL) when it closes, if it still runs.
        """
        self.lab.build()
        process = subprocess.Popen(
            self.exec_argv(argv), stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd
        )
        self.lab._adopt_process(process)
        return process

    def call(self, function: Callable[[], T]) -> T:
        """Call *function* in a thread inside this namespace and return its result."""
        self.lab.build()
        return _netns.in_namespace(self.namespace, function)

    def socket(
        self, kind: socket.SocketKind = socket.SOCK_DGRAM, family: int = socket.AF_INET
    ) -> Socket:
        """A socket in this namespace; the lab closes it when it closes."""
        sock = self.call(lambda: socket.socket(family, kind))
        self.lab._adopt_socket(sock)
        return sock

    def udp_socket(self, port: int = 0, address: str = "0.0.0.0") -> Socket:
        """A UDP socket in this namespace, bound to *address* and *port*."""
        sock = self.socket(socket.SOCK_DGRAM)
        sock.bind((address, port))
        return sock

    def tcp_socket(self) -> Socket:
        """An unbound TCP socket in this namespace."""
        return self.socket(socket.SOCK_STREAM)


class Internet(_Namespace):
    """
    The public segment: a bridge in its own namespace.  Only documentation
    prefixes live here (192.0.2.0/24 servers, 203.0.113.0/24 routers'
    WAN sides, 198.51.100.0/24 in /28s routed by firewalls and open
    routers), all on-link.
    """

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab, "internet")
        self.segment = internet_segment(self.namespace, f"{lab.prefix}-br")
        #: The internet is where delays are measured to.
        self.delay_to_internet_ms = 0.0


class Node(_Namespace):
    """
    A namespace with an address: a public host, a NAT or a host.

    :ivar address: Its (first) IPv4 address.
    :ivar delay_ms: The one-way delay of its uplink, milliseconds.
    :ivar loss: The loss probability of its uplink, each way.
    :ivar delay_only_to: The destinations to which alone *delay_ms*
        applies, on what the node sends (public hosts only); empty: the
        delay applies to everything, both ways.
    """

    address: str
    delay_ms: float
    loss: float
    delay_only_to: tuple[str, ...] = ()
    upstream: Internet | Nat

    @property
    def public_address(self) -> str:
        """The address the internet sees for this node's traffic."""
        raise NotImplementedError

    @property
    def delay_to_internet_ms(self) -> float:
        """
        One-way delay from this node to the internet bridge, milliseconds
        (with :attr:`delay_only_to`, only towards those addresses).
        """
        return self.delay_ms + self.upstream.delay_to_internet_ms


class PublicHost(Node):
    """A host on the internet with one or more public addresses."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        addresses: Sequence[str],
        delay_ms: float,
        loss: float,
        delay_only_to: Sequence[str] = (),
    ) -> None:
        super().__init__(lab, name)
        self.addresses = tuple(addresses)
        self.address = self.addresses[0]
        self.upstream = lab.internet()
        self.delay_ms = delay_ms
        self.loss = loss
        self.delay_only_to = tuple(delay_only_to)

    @property
    def public_address(self) -> str:
        return self.address


class Nat(Node):
    """
    A router between an upstream segment (the internet or another NAT's
    LAN) and its own LAN, a bridge in its namespace.

    :ivar preset: What kind of NAT it is.
    :ivar wan_address: Its address upstream (also :attr:`address`).
    :ivar lan_address: Its address on its LAN, the hosts' gateway.
    :ivar lan_network: Its LAN prefix.
    :ivar rules: Everything its nftables ruleset depends on.
    """

    def __init__(self, lab: Lab, name: str, preset: Preset, upstream: Internet | Nat) -> None:
        super().__init__(lab, name)
        self.preset = preset
        self.upstream = upstream
        self.segment: Segment
        self.rules: RouterRules

    @property
    def wan_address(self) -> str:
        return self.address

    @property
    def lan_address(self) -> str:
        assert self.segment.gateway is not None
        return str(self.segment.gateway)

    @property
    def lan_network(self) -> str:
        return str(self.segment.networks[0])

    @property
    def public_address(self) -> str:
        return _public_address_behind(self.upstream, self.address)


class Host(Node):
    """A host behind a router, whose default route points at it."""

    def __init__(
        self, lab: Lab, name: str, behind: Nat, address: str, delay_ms: float, loss: float
    ) -> None:
        super().__init__(lab, name)
        self.upstream = behind
        self.behind = behind
        self.address = address
        self.delay_ms = delay_ms
        self.loss = loss

    @property
    def public_address(self) -> str:
        return _public_address_behind(self.behind, self.address)


def _public_address_behind(upstream: Internet | Nat, address: str) -> str:
    """What the internet sees of *address* sending through *upstream*."""
    if isinstance(upstream, Internet):
        return address
    if upstream.preset.translates:
        return upstream.public_address
    return _public_address_behind(upstream.upstream, address)
