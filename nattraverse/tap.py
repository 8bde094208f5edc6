"""
``twistd natrendezvous``: the public side of nattraverse.

For now it serves STUN (RFC 8489 over UDP and TCP; RFC 5780 and RFC 3489
behaviour discovery when given a second address).  Rendezvous and relay
options join it in later releases.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from nattraverse.stun.server import StunServer


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


class Options(usage.Options):
    """
    Options of ``twistd natrendezvous``.
    """

    synopsis = "[natrendezvous options]"
    longdesc = (
        "Run the public side of nattraverse: a STUN server on UDP and TCP "
        "(default port 3478). Give --alt-address, a second IP address of this "
        "host, to enable RFC 5780 NAT behaviour discovery and the RFC 3489 tests "
        "classic clients run."
    )

    optParameters = [
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
        ["alt-port", None, 3479, "Second port, used with --alt-address.", _port],
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
    ]

    def postOptions(self) -> None:
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
    stun = StunServer(
        reactor,
        interface=options["stun-interface"],
        port=options["stun-port"],
        alt_address=options["alt-address"],
        alt_port=options["alt-port"],
        software=options["software"],
        tcp_idle_timeout=options["tcp-idle-timeout"],
        max_tcp_connections=options["max-tcp-connections"],
    )
    stun.setName("stun")  # type: ignore[no-untyped-call]
    stun.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
