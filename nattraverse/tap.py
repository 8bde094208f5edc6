"""
``twistd natrendezvous``: the public side of nattraverse.

It serves STUN (RFC 8489 over UDP and TCP; RFC 5780 and RFC 3489 behaviour
discovery when given a second address) and, on every ``--listen`` endpoint
(``tcp:8478`` by default), the rendezvous and its relay
(``docs/protocol.rst``).  Options follow ``twisted/web/tap.py``; the
access key comes from a file or the environment, never from the command
line.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from nattraverse._keyfile import MAX_KEY_FILE, read_key_file
from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.server import RendezvousLimits, RendezvousService
from nattraverse.rendezvous.udpbind import UdpBindings
from nattraverse.rendezvous.udprelay import UdpRelayHub, udp_sockets
from nattraverse.stun.server import StunServer

#: Where ``--listen`` listens when it is not given.
DEFAULT_LISTEN = "tcp:8478"
#: The environment variable that may hold the access key.
ACCESS_KEY_VARIABLE = "NATRENDEZVOUS_ACCESS_KEY"
#: Largest access key file read.
MAX_ACCESS_KEY_FILE = MAX_KEY_FILE

_DEFAULT_LIMITS = RendezvousLimits()
_DEFAULT_RELAY = RelayLimits()
_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmg]?)(?:i?b)?(?:/s)?", re.ASCII | re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 <= int(value) <= 65535:
        raise ValueError(f"{value!r} is not a port number (0-65535)")
    return int(value)


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{value!r} must be a number of seconds greater than 0")
    return number


def _count(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ValueError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def _rate(value: str) -> float:
    match = _RATE.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"{value!r} is not a number of bytes per second "
            "(such as 4194304, 512K or 4M; 0: no cap)"
        )
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def _naming(parameters: list[list[Any]]) -> list[list[Any]]:
    """Make each parameter's conversion errors name its option."""

    def named(option: str, coerce: Callable[[str], Any]) -> Callable[[str], Any]:
        def convert(value: str) -> Any:
            try:
                return coerce(value)
            except ValueError as e:
                raise ValueError(f"--{option}: {e}") from None

        return convert

    return [[*p[:4], named(p[0], p[4])] if len(p) > 4 else p for p in parameters]


def read_access_key(path: str) -> bytes:
    """
    The access key in *path*: its content, without surrounding whitespace
    (a trailing newline).

    :raises usage.UsageError: when the file cannot be read, other users may
        read or change it, or it is empty or too large.
    """
    try:
        return read_key_file(path)
    except ValueError as e:
        raise usage.UsageError(f"--access-key-file {path}: {e}") from None


_PARAMETERS: list[list[Any]] = [
    ["stun-port", None, 3478, "UDP and TCP port of the STUN service.", _port],
    [
        "stun-interface",
        None,
        "0.0.0.0",
        "Address the STUN service listens on; a specific address when --alt-address is given.",
    ],
    [
        "alt-address",
        None,
        None,
        "Second IP address of this host: turns on RFC 5780 (OTHER-ADDRESS, "
        "CHANGE-REQUEST) and RFC 3489 CHANGED-ADDRESS.",
    ],
    [
        "alt-port",
        None,
        3479,
        "Second STUN port on --stun-interface (and on --alt-address): a peer's bindings at "
        "both ports show whether its NAT maps per destination.  0: none (with "
        "--alt-address: any free port, not told to peers).",
        _port,
    ],
    [
        "software",
        None,
        None,
        "SOFTWARE attribute text added to every STUN answer (off by default: smaller answers).",
    ],
    [
        "tcp-idle-timeout",
        None,
        10.0,
        "Seconds a STUN/TCP connection may stay without a complete request.",
        _positive,
    ],
    ["max-tcp-connections", None, 1000, "Concurrent STUN/TCP connections at most.", _count],
    [
        "registration-ttl",
        None,
        _DEFAULT_LIMITS.registration_ttl,
        "Seconds a registration lives without Refresh.",
        _positive,
    ],
    [
        "max-registrations",
        None,
        _DEFAULT_LIMITS.max_registrations,
        "Registrations at once.",
        _count,
    ],
    [
        "max-registrations-per-ip",
        None,
        _DEFAULT_LIMITS.max_registrations_per_ip,
        "Registrations at once from one IP address.",
        _count,
    ],
    [
        "introduction-ttl",
        None,
        _DEFAULT_LIMITS.introduction_ttl,
        "Seconds an introduction (usable by Reverse and Relay) lives.",
        _positive,
    ],
    [
        "max-introductions",
        None,
        _DEFAULT_LIMITS.max_introductions,
        "Introductions pending at once.",
        _count,
    ],
    [
        "handshake-timeout",
        None,
        _DEFAULT_LIMITS.handshake_timeout,
        "Seconds a rendezvous connection has to authenticate.",
        _positive,
    ],
    [
        "max-connections",
        None,
        _DEFAULT_LIMITS.max_connections,
        "Rendezvous connections at once (relay connections included).",
        _count,
    ],
    [
        "relay-max",
        None,
        _DEFAULT_RELAY.max_relays,
        "Relays at once; the UDP relay has as many again, each on its own UDP port.",
        _count,
    ],
    [
        "relay-rate",
        None,
        _DEFAULT_RELAY.rate,
        "Bytes per second in each direction of each relay, TCP or UDP (K, M, G: KiB, MiB, "
        "GiB); 0: no cap.",
        _rate,
    ],
    [
        "relay-lifetime",
        None,
        _DEFAULT_RELAY.lifetime,
        "Seconds a relay may run (a UDP relay: from its allocation).",
        _positive,
    ],
    [
        "access-key-file",
        None,
        None,
        "File holding the access key clients must prove they know (mode 0600 or "
        f"stricter). The environment variable {ACCESS_KEY_VARIABLE} may hold it instead.",
    ],
]


class Options(usage.Options):
    """
    Options of ``twistd natrendezvous``.
    """

    synopsis = "[natrendezvous options]"
    longdesc = (
        "Run the public side of nattraverse: a STUN server on UDP and TCP "
        "(default port 3478), and the rendezvous and relay on every --listen "
        f"endpoint (default {DEFAULT_LISTEN}), with a UDP relay on fresh ports of "
        "--stun-interface. Give --alt-address, a second IP "
        "address of this host, to enable RFC 5780 NAT behaviour discovery and the "
        "RFC 3489 tests classic clients run. The access key, if any, comes from "
        f"--access-key-file or the environment variable {ACCESS_KEY_VARIABLE}."
    )

    optFlags = [
        [
            "no-relay",
            None,
            "Turn the relay off (Relay and UdpRelay requests are refused).",
        ],
        [
            "no-udp-relay",
            None,
            "Turn the UDP relay off (UdpRelay requests are refused); it is on with the relay, "
            "one UDP port of --stun-interface per relayed session, and shares the --relay-max, "
            "--relay-rate and --relay-lifetime values.",
        ],
    ]

    optParameters = _naming(_PARAMETERS)

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        self["listen"].append(description)

    opt_listen.__doc__ = (
        "Endpoint description the rendezvous listens on; repeatable "
        "(tcp:8478, tcp6:8478, ssl:8479:privateKey=key.pem:certKey=cert.pem). "
        f"[default: {DEFAULT_LISTEN}]"
    )

    def postOptions(self) -> None:
        self._check_stun()
        self._check_rendezvous()

    def _check_rendezvous(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for description in self["listen"]:
            try:
                # Parse only: the endpoint is built again, with the reactor,
                # by makeService.  TLS key files are read here, so mistakes
                # show up as usage errors.
                serverFromString(None, description)
            except Exception as e:
                raise usage.UsageError(f"--listen {description!r}: {e}") from None
        path = self["access-key-file"]
        from_environment = os.environ.get(ACCESS_KEY_VARIABLE, "").strip()
        if path is not None and from_environment:
            raise usage.UsageError(
                f"--access-key-file and {ACCESS_KEY_VARIABLE} are both given; give the key once"
            )
        if path is not None:
            self["access-key"] = read_access_key(path)
        elif from_environment:
            self["access-key"] = from_environment.encode("utf-8")
        else:
            self["access-key"] = None

    def _check_stun(self) -> None:
        for name in ("stun-interface", "alt-address"):
            value = self[name]
            if value is None:
                continue
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise usage.UsageError(f"--{name}: {value!r} is not an IP address") from None
        if self["alt-address"] is not None:
            if ipaddress.ip_address(self["stun-interface"]).is_unspecified:
                raise usage.UsageError(
                    "--alt-address needs the primary address too: give --stun-interface "
                    "a specific address of this host (not 0.0.0.0 or ::)"
                )
            if ipaddress.ip_address(self["alt-address"]) == ipaddress.ip_address(
                self["stun-interface"]
            ):
                raise usage.UsageError("--alt-address must differ from --stun-interface")
            primary = ipaddress.ip_address(self["stun-interface"])
            if ipaddress.ip_address(self["alt-address"]).version != primary.version:
                raise usage.UsageError(
                    "--alt-address and --stun-interface must be of the same IP version"
                )
        if self["alt-port"] == self["stun-port"] and self["stun-port"] != 0:
            raise usage.UsageError("--alt-port must differ from --stun-port")


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the ``natrendezvous`` service tree from parsed options.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = MultiService()
    limits = RendezvousLimits(
        registration_ttl=options["registration-ttl"],
        max_registrations=options["max-registrations"],
        max_registrations_per_ip=options["max-registrations-per-ip"],
        introduction_ttl=options["introduction-ttl"],
        max_introductions=options["max-introductions"],
        handshake_timeout=options["handshake-timeout"],
        max_connections=options["max-connections"],
    )
    # One table of UDP binding tokens: the rendezvous issues them, the STUN
    # service observes the sockets that use them.
    bindings = UdpBindings(capacity=limits.max_connections)
    stun = StunServer(
        reactor,
        interface=options["stun-interface"],
        port=options["stun-port"],
        alt_address=options["alt-address"],
        alt_port=options["alt-port"],
        second_port=options["alt-port"] != 0,
        software=options["software"],
        tcp_idle_timeout=options["tcp-idle-timeout"],
        max_tcp_connections=options["max-tcp-connections"],
        bindings=bindings,
    )
    stun.setName("stun")  # type: ignore[no-untyped-call]
    stun.setServiceParent(top)  # type: ignore[no-untyped-call]
    hub = udp_hub = None
    if not options["no-relay"]:
        relay_limits = RelayLimits(
            max_relays=options["relay-max"],
            rate=options["relay-rate"],
            lifetime=options["relay-lifetime"],
        )
        hub = RelayHub(reactor, relay_limits)
        if not options["no-udp-relay"]:
            # Its ports are on the STUN service's primary address: peers
            # send to the host they reach the STUN service at.
            udp_hub = UdpRelayHub(
                reactor, relay_limits, udp_sockets(reactor, options["stun-interface"])
            )
    rendezvous = RendezvousService(
        reactor,
        options["listen"],
        limits,
        relay_hub=hub,
        udp_relay_hub=udp_hub,
        access_key=options["access-key"],
        stun_port=options["stun-port"],
        stun_second_port=options["alt-port"],
        udp_bindings=bindings,
    )
    rendezvous.setName("rendezvous")  # type: ignore[no-untyped-call]
    rendezvous.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
