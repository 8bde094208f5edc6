"""
``natcheck``: what does the NAT in front of this host do?

Asks a STUN server (RFC 5780 with two addresses for the full check) and
prints what :func:`nattraverse.discovery.discover` found, with one line on
what each finding means for peer-to-peer connectivity::

    natcheck stun.example.org
    natcheck --json 192.0.2.1:3478

Exit status: 0 when the check classified the NAT; 1 when it could not (no
answer from the server, which means it is down or UDP is blocked; a host
name that does not resolve; a server that answers with errors); 2 for bad
usage.  See :doc:`/natcheck`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from twisted.internet.task import react

from nattraverse._types import Endpoint
from nattraverse.discovery import (
    AllocationPattern,
    DiscoveryError,
    Filtering,
    Mapping,
    NatReport,
    discover,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "format_report",
    "main",
    "parse_server",
    "resolve",
    "run",
]

#: The check classified the NAT.
EXIT_OK = 0
#: The check could not classify: no answer, unresolvable name, server error.
EXIT_FAILED = 1
#: Bad arguments (argparse's own status).
EXIT_USAGE = 2

DEFAULT_PORT = 3478

_MAPPING = {
    Mapping.ENDPOINT_INDEPENDENT: (
        "one external address for every destination, so peers see what STUN reports"
    ),
    Mapping.ADDRESS_DEPENDENT: (
        "a new external address per destination IP, so peers do not see what STUN reports"
    ),
    Mapping.ADDRESS_AND_PORT_DEPENDENT: (
        "a new external address per destination (symmetric NAT), so peers do not see what "
        "STUN reports; punching needs port prediction or a relay"
    ),
}
_FILTERING = {
    Filtering.ENDPOINT_INDEPENDENT: "anyone may send to an external address once it exists",
    Filtering.ADDRESS_DEPENDENT: (
        "only IP addresses this host has sent to get in: both peers must send first"
    ),
    Filtering.ADDRESS_AND_PORT_DEPENDENT: (
        "only the exact addresses and ports this host has sent to get in: both peers must "
        "send first"
    ),
}


def parse_server(text: str) -> tuple[str, int]:
    """
    Split ``HOST``, ``HOST:PORT``, ``IPV6``, or ``[IPV6]:PORT`` into a host
    (an address or a name) and a port, 3478 by default.

    :raises ValueError: saying what is wrong.
    """
    if not text:
        raise ValueError("the STUN server is empty; give HOST or HOST:PORT")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [IPV6] or [IPV6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        host, port_text = text, None  # a bare IPv6 address
    else:
        host, sep, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if sep else None
    if not host:
        raise ValueError(f"{text!r} has no host")
    if port_text is None:
        return host, DEFAULT_PORT
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"{text!r} has a port that is not a number from 1 to 65535")
    return host, int(port_text)


def resolve(host: str, port: int, interface: str | None = None) -> Endpoint:
    """
    The address of *host* (a name or an address), of the same IP version as
    *interface* when one is given.

    :raises OSError: when the name does not resolve.
    """
    family = socket.AF_UNSPEC
    if interface is not None:
        family = socket.AF_INET if ipaddress.ip_address(interface).version == 4 else socket.AF_INET6
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    # The resolver's order (RFC 6724) already says which to try first.
    address = infos[0][4]
    return Endpoint(str(ipaddress.ip_address(address[0])), port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _server(text: str) -> tuple[str, int]:
    try:
        return parse_server(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``natcheck``."""
    parser = argparse.ArgumentParser(
        prog="natcheck",
        description=(
            "Find out what the NAT in front of this host does (RFC 5780 behaviour discovery): "
            "mapping, filtering, hairpinning, port allocation and, on request, binding "
            "lifetime. Give a STUN server with two addresses for the full check."
        ),
        epilog=(
            "exit status: 0 classified, 1 could not classify (server unreachable or UDP "
            "blocked, name not resolved, server error), 2 bad usage"
        ),
    )
    parser.add_argument(
        "server",
        type=_server,
        metavar="SERVER",
        help=f"STUN server as HOST, HOST:PORT or [IPV6]:PORT (port {DEFAULT_PORT} by default)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the report"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=3.0,
        metavar="SECONDS",
        help="how long to wait for the server's first answer (default: %(default)s)",
    )
    parser.add_argument(
        "--interface",
        type=_address,
        default=None,
        metavar="ADDRESS",
        help="local address to send from (default: all addresses)",
    )
    parser.add_argument(
        "--lifetime",
        action="store_true",
        help="also measure how long an idle mapping lives (takes up to --lifetime-max longer)",
    )
    parser.add_argument(
        "--lifetime-max",
        type=_seconds,
        default=120.0,
        metavar="SECONDS",
        help="longest idle time the lifetime test tries (default: %(default)s)",
    )
    return parser


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def format_report(report: NatReport) -> str:
    """The report as a person reads it: one line per finding, with what it
    means for peer-to-peer connectivity."""
    lines: list[str] = []
    head = f"STUN server {report.server}"
    if report.other_address is not None:
        head += f", other address {report.other_address}"
    if report.rtt is not None:
        head += f"; round trip {report.rtt * 1000:.{0 if report.rtt >= 0.01 else 1}f} ms"
    lines.append(head)
    lines.append("")

    def row(name: str, value: str, meaning: str = "") -> None:
        lines.append(f"{name:<18} {value}" + (f": {meaning}" if meaning else ""))

    row("UDP", report.udp)
    external = report.external[0] if report.external else None
    if report.nat is None:
        row("NAT", "unknown")
    elif report.nat:
        local = report.local
        if local is not None and ipaddress.ip_address(local.host).is_unspecified:
            row("NAT", "yes", f"local port {local.port} is seen as {external}")
        else:
            row("NAT", "yes", f"{local} is seen as {external}")
    else:
        row("NAT", "none", f"the server sees this host's own address {external}")
    if report.mapping is None:
        row("Mapping", "unknown", "needs a server with two addresses that answers from both")
    else:
        row("Mapping", report.mapping.value, _MAPPING[report.mapping])
    if report.filtering is None:
        row("Filtering", "unknown", "needs a server with two addresses that honours CHANGE-REQUEST")
    else:
        row("Filtering", report.filtering.value, _FILTERING[report.filtering])
    hairpin = {
        True: "peers behind this NAT reach each other at their external addresses",
        False: "peers behind this NAT must use each other's private addresses",
        None: "",
    }[report.hairpin]
    row("Hairpinning", _yes_no(report.hairpin), hairpin)
    preservation = {
        True: "the external port is the local port",
        False: "the NAT changes the local port",
        None: "",
    }[report.port_preservation]
    row("Port preservation", _yes_no(report.port_preservation), preservation)
    allocation = report.allocation
    if allocation.pattern is AllocationPattern.PRESERVED:
        row("Port allocation", "preserved", "new mappings keep their local port")
    elif allocation.pattern is AllocationPattern.SEQUENTIAL:
        row(
            "Port allocation",
            f"sequential, step {allocation.step}",
            "the next mapping's port is predictable",
        )
    elif allocation.pattern is AllocationPattern.RANDOM:
        row("Port allocation", "random", "the next mapping's port cannot be predicted")
    else:
        row("Port allocation", "unknown", "too few new mappings were seen")
    if report.lifetime is not None:
        lifetime = report.lifetime
        if lifetime.at_least is None:
            row("Binding lifetime", "unknown")
        elif lifetime.less_than is None:
            row(
                "Binding lifetime",
                f"at least {lifetime.at_least:g} s",
                "the longest idle time tried; keepalives that often are enough",
            )
        else:
            row(
                "Binding lifetime",
                f"{lifetime.at_least:g} s to {lifetime.less_than:g} s",
                f"send keepalives more often than every {lifetime.at_least:g} s",
            )
    row("External", ", ".join(str(e) for e in report.external) or "none seen")
    if report.mapping is None or report.filtering is None:
        caveat = "the classic name; unknown behaviours taken at their most restrictive"
    else:
        caveat = "the classic name, for display only"
    row("RFC 3489 type", report.rfc3489.value, caveat)
    if report.notes:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"- {note}" for note in report.notes)
    return "\n".join(lines)


async def run(
    reactor: Any,
    options: argparse.Namespace,
    server: Endpoint,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    """
    Run the check against *server* (already resolved) and print the
    result as *options* asks.

    :returns: The exit status.
    """
    try:
        report = await discover(
            reactor,
            server,
            local_interface=options.interface,
            timeout=options.timeout,
            lifetime=options.lifetime,
            lifetime_max=options.lifetime_max,
        )
    except (DiscoveryError, ValueError) as e:
        print(f"natcheck: {e}", file=stderr)
        return EXIT_FAILED
    if options.json:
        print(json.dumps(report.to_json()), file=stdout)
    elif report.udp == "ok":
        print(format_report(report), file=stdout)
    if report.udp == "blocked":
        for note in report.notes:
            print(f"natcheck: {note}", file=stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``natcheck`` console script."""
    parser = build_parser()
    options = parser.parse_args(argv)
    host, port = options.server
    try:
        server = resolve(host, port, options.interface)
    except OSError as e:
        family = "" if options.interface is None else f" for --interface {options.interface}"
        print(f"natcheck: cannot resolve {host!r}{family}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None

    async def check(reactor: Any) -> None:
        code = await run(reactor, options, server, sys.stdout, sys.stderr)
        if code:
            raise SystemExit(code)

    react(check)


if __name__ == "__main__":
    main()
