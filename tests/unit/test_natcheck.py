"""
Tests for the natcheck command line: argument parsing, the report a person
reads, the JSON, and exit statuses, with the check run on the in-memory
network of :mod:`nattraverse.testing`.
"""

from __future__ import annotations

import io
import json
import socket
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from nattraverse._types import Endpoint
from nattraverse.discovery import (
    Allocation,
    AllocationPattern,
    BindingLifetime,
    Filtering,
    Mapping,
    NatReport,
)
from nattraverse.natcheck import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    build_parser,
    format_report,
    main,
    parse_server,
    resolve,
    run,
)
from nattraverse.stun.server import StunServer
from nattraverse.testing import Network, SimulatedHost

SERVER = Endpoint("192.0.2.10", 3478)
OTHER_IP = "192.0.2.11"
JSON_KEYS = {
    "udp",
    "mapping",
    "filtering",
    "hairpin",
    "port_preservation",
    "allocation",
    "external",
    "rfc3489",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 3478)),
        ("192.0.2.1:5000", ("192.0.2.1", 5000)),
        ("stun.example.org", ("stun.example.org", 3478)),
        ("stun.example.org:19302", ("stun.example.org", 19302)),
        ("2001:db8::1", ("2001:db8::1", 3478)),
        ("[2001:db8::1]", ("2001:db8::1", 3478)),
        ("[2001:db8::1]:3479", ("2001:db8::1", 3479)),
    ],
)
def test_parse_server(text: str, expected: tuple[str, int]) -> None:
    """HOST, HOST:PORT, a bare IPv6 address and [IPV6]:PORT; 3478 by default."""
    assert parse_server(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (":3478", "no host"),
        ("host:0", "port"),
        ("host:65536", "port"),
        ("host:http", "port"),
        ("host:", "port"),
        ("[2001:db8::1", "[IPV6]"),
        ("[2001:db8::1]3478", "[IPV6]"),
    ],
)
def test_parse_server_rejects(text: str, message: str) -> None:
    """What is wrong with a server argument is said."""
    with pytest.raises(ValueError, match=message):
        parse_server(text)


def test_resolve_literal() -> None:
    """An address resolves to itself, without a name service."""
    assert resolve("127.0.0.1", 3478) == Endpoint("127.0.0.1", 3478)
    assert resolve("::1", 1) == Endpoint("::1", 1)


def test_resolve_in_interface_family() -> None:
    """With an IPv4 interface, an IPv6 server does not resolve."""
    with pytest.raises(socket.gaierror):
        resolve("::1", 3478, "127.0.0.1")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "SERVER"),
        (["host:99999"], "port"),
        (["--timeout", "0", "host"], "above 0"),
        (["--timeout", "soon", "host"], "number of seconds"),
        (["--interface", "eth0", "host"], "not an IP address"),
        (["--lifetime-max", "-5", "host"], "above 0"),
        (["--frobnicate", "host"], "unrecognized"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad arguments exit with status 2 and say what is wrong."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_unresolvable_name_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name that does not resolve: status 1 and the resolver's reason."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr("nattraverse.natcheck.socket.getaddrinfo", fail)
    with pytest.raises(SystemExit) as exited:
        main(["stun.invalid"])
    assert exited.value.code == EXIT_FAILED
    assert "cannot resolve 'stun.invalid'" in capsys.readouterr().err


# -- the report a person reads --------------------------------------------------------


def open_report(**changes: Any) -> NatReport:
    fields: dict[str, Any] = {
        "mapping": Mapping.ENDPOINT_INDEPENDENT,
        "filtering": Filtering.ENDPOINT_INDEPENDENT,
        "hairpin": True,
        "port_preservation": True,
        "allocation": Allocation(AllocationPattern.PRESERVED),
        "external": (Endpoint("192.0.2.1", 40000),),
        "nat": False,
        "server": SERVER,
        "other_address": Endpoint(OTHER_IP, 3479),
        "local": Endpoint("0.0.0.0", 40000),
        "rtt": 0.1,
    }
    fields.update(changes)
    return NatReport("ok", **fields)


def test_format_open() -> None:
    """An open host: every finding on its line, with what it means."""
    text = format_report(open_report())
    assert text.splitlines()[0] == (
        "STUN server 192.0.2.10:3478, other address 192.0.2.11:3479; round trip 100 ms"
    )
    assert "NAT                none: the server sees this host's own address" in text
    assert "Mapping            endpoint-independent: one external address" in text
    assert "Filtering          endpoint-independent: anyone may send" in text
    assert "Hairpinning        yes" in text
    assert "Port preservation  yes" in text
    assert "Port allocation    preserved" in text
    assert "External           192.0.2.1:40000" in text
    assert "RFC 3489 type      open" in text
    assert "Notes" not in text


def test_format_symmetric() -> None:
    """A symmetric NAT: the sequential step and every external address."""
    text = format_report(
        open_report(
            nat=True,
            mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
            filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
            hairpin=False,
            port_preservation=False,
            allocation=Allocation(AllocationPattern.SEQUENTIAL, 2),
            external=(Endpoint("203.0.113.1", 20000), Endpoint("203.0.113.1", 20012)),
        )
    )
    assert "NAT                yes: local port 40000 is seen as 203.0.113.1:20000" in text
    assert "port prediction or a relay" in text
    assert "Port allocation    sequential, step 2" in text
    assert "External           203.0.113.1:20000, 203.0.113.1:20012" in text
    assert "RFC 3489 type      symmetric" in text


def test_format_unknowns_and_notes() -> None:
    """Unknown findings say so, the notes say why, and the RFC 3489 name warns."""
    text = format_report(
        open_report(
            mapping=None,
            filtering=None,
            other_address=None,
            allocation=Allocation(),
            hairpin=None,
            notes=("192.0.2.10:3478 sent no OTHER-ADDRESS",),
        )
    )
    assert "Mapping            unknown" in text
    assert "Filtering          unknown" in text
    assert "Hairpinning        unknown" in text
    assert "Port allocation    unknown" in text
    assert "unknown behaviours taken at their most restrictive" in text
    assert text.endswith("Notes:\n- 192.0.2.10:3478 sent no OTHER-ADDRESS")


@pytest.mark.parametrize(
    ("lifetime", "line"),
    [
        (BindingLifetime(30.0, 45.0), "Binding lifetime   30 s to 45 s"),
        (BindingLifetime(120.0, None), "Binding lifetime   at least 120 s"),
        (BindingLifetime(None, None), "Binding lifetime   unknown"),
    ],
)
def test_format_lifetime(lifetime: BindingLifetime, line: str) -> None:
    """The lifetime line appears when the test ran."""
    assert line in format_report(open_report(lifetime=lifetime))


def test_format_without_lifetime() -> None:
    """No lifetime line when the test was not asked for."""
    assert "lifetime" not in format_report(open_report())


# -- run() on the simulated network ---------------------------------------------------


def stun(network: Network, *, rfc5780: bool = True) -> None:
    host = network.host("stun", address=SERVER.host, aliases=[OTHER_IP])
    StunServer(
        host.reactor,
        interface=SERVER.host,
        port=SERVER.port,
        alt_address=OTHER_IP if rfc5780 else None,
        tcp=False,
    ).startService()


def laptop(network: Network, preset: str = "port-restricted") -> SimulatedHost:
    return network.host("laptop", network.nat("home", preset=preset).lan)


def natcheck(network: Network, host: SimulatedHost, *argv: str) -> tuple[int, str, str]:
    """Run natcheck's check from *host*: status, stdout, stderr."""
    options = build_parser().parse_args([*argv, str(SERVER)])
    out, err = io.StringIO(), io.StringIO()
    code = network.run_until(Deferred.fromCoroutine(run(host.reactor, options, SERVER, out, err)))
    return code, out.getvalue(), err.getvalue()


def test_run_prints_report() -> None:
    """Behind a port-restricted NAT: the report, status 0, nothing on stderr."""
    network = Network(seed=1)
    stun(network)
    code, out, err = natcheck(network, laptop(network))
    assert code == EXIT_OK
    assert "Filtering          address-and-port-dependent" in out
    assert "RFC 3489 type      port-restricted-cone" in out
    assert err == ""


def test_run_json() -> None:
    """--json prints one JSON object with exactly the documented keys."""
    network = Network(seed=1)
    stun(network)
    code, out, err = natcheck(network, laptop(network, "symmetric"), "--json")
    assert code == EXIT_OK
    (line,) = out.splitlines()
    result = json.loads(line)
    assert set(result) == JSON_KEYS
    assert result["mapping"] == "address-and-port-dependent"
    assert result["rfc3489"] == "symmetric"
    assert result["allocation"] == {"pattern": "random", "step": None}
    assert err == ""


def test_run_json_lifetime() -> None:
    """--json --lifetime adds the lifetime key."""
    network = Network(seed=1)
    stun(network)
    code, out, _ = natcheck(
        network, laptop(network), "--json", "--lifetime", "--lifetime-max", "10"
    )
    assert code == EXIT_OK
    result = json.loads(out)
    assert set(result) == JSON_KEYS | {"lifetime"}
    assert result["lifetime"] == {"at_least": 10.0, "less_than": None}


def test_run_one_address_classifies() -> None:
    """A one-address server still gives a report and status 0."""
    network = Network(seed=1)
    stun(network, rfc5780=False)
    code, out, _ = natcheck(network, laptop(network))
    assert code == EXIT_OK
    assert "Mapping            unknown" in out
    assert "sent no OTHER-ADDRESS" in out


def test_run_blocked_exits_1() -> None:
    """UDP blocked: status 1, the reason on stderr, nothing on stdout."""
    network = Network(seed=1)
    stun(network)
    code, out, err = natcheck(network, laptop(network, "udp-blocked"), "--timeout", "1")
    assert code == EXIT_FAILED
    assert out == ""
    assert "no answer from 192.0.2.10:3478 within 1 s" in err


def test_run_blocked_json_exits_1() -> None:
    """UDP blocked with --json: the blocked object on stdout, status 1."""
    network = Network(seed=1)
    stun(network)
    code, out, err = natcheck(network, laptop(network, "udp-blocked"), "--json", "--timeout", "1")
    assert code == EXIT_FAILED
    assert json.loads(out)["udp"] == "blocked"
    assert json.loads(out)["rfc3489"] == "blocked"
    assert "no answer" in err


def test_run_interface_missing_exits_1() -> None:
    """An interface the host lacks: status 1 and a message, not a traceback."""
    network = Network(seed=1)
    stun(network)
    code, out, err = natcheck(network, laptop(network), "--interface", "198.51.100.99")
    assert code == EXIT_FAILED
    assert out == ""
    assert err.startswith("natcheck: cannot open a UDP socket on 198.51.100.99")
