"""
``twistd natrendezvous``: option parsing and the service tree, on a fake
reactor (nothing is started, no port is bound).
"""

from __future__ import annotations

import pytest
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from nattraverse.stun.attributes import Software
from nattraverse.stun.server import StunServer
from nattraverse.tap import Options, makeService


def parse(*argv: str) -> Options:
    """Options parsed from *argv*."""
    options = Options()  # type: ignore[no-untyped-call]
    options.parseOptions(list(argv))  # type: ignore[no-untyped-call]
    return options


def test_defaults() -> None:
    """With no arguments: port 3478 on all addresses, alt port 3479, no SOFTWARE, 10 s, 1000."""
    options = parse()
    assert options["stun-port"] == 3478
    assert options["stun-interface"] == "0.0.0.0"
    assert options["alt-address"] is None
    assert options["alt-port"] == 3479
    assert options["software"] is None
    assert options["tcp-idle-timeout"] == 10.0
    assert options["max-tcp-connections"] == 1000


def test_values_converted() -> None:
    """Numbers given on the command line become numbers."""
    options = parse(
        "--stun-port", "5000", "--tcp-idle-timeout", "2.5", "--max-tcp-connections", "7"
    )
    assert options["stun-port"] == 5000
    assert options["tcp-idle-timeout"] == 2.5
    assert options["max-tcp-connections"] == 7


def test_rfc5780_options_accepted() -> None:
    """A second address with a specific primary address is accepted."""
    options = parse(
        "--stun-interface", "192.0.2.1", "--alt-address", "192.0.2.2", "--alt-port", "4000"
    )
    assert options["alt-address"] == "192.0.2.2"
    assert options["alt-port"] == 4000


@pytest.mark.parametrize(
    ("interface", "alternate"),
    [(None, "192.0.2.2"), ("0.0.0.0", "192.0.2.2"), ("::", "2001:db8::2"), ("0::0", "::2")],
)
def test_alt_address_needs_interface(interface: str | None, alternate: str) -> None:
    """--alt-address with a wildcard primary address is refused, naming --stun-interface."""
    argv = ["--alt-address", alternate]
    if interface is not None:
        argv += ["--stun-interface", interface]
    with pytest.raises(usage.UsageError, match="give --stun-interface a specific address"):
        parse(*argv)


@pytest.mark.parametrize("option", ["--stun-interface", "--alt-address"])
@pytest.mark.parametrize("value", ["stun.example.org", "192.0.2", "300.1.1.1"])
def test_bad_ip_names_option(option: str, value: str) -> None:
    """An address that is not an IP address is refused, naming the option."""
    argv = ["--stun-interface", "192.0.2.1", option, value]
    with pytest.raises(usage.UsageError, match=option):
        parse(*argv)


@pytest.mark.parametrize("option", ["--stun-port", "--alt-port"])
@pytest.mark.parametrize("value", ["65536", "-1", "http"])
def test_bad_port(option: str, value: str) -> None:
    """A port outside 0-65535, or not a number, is refused."""
    with pytest.raises(usage.UsageError):
        parse(option, value)


@pytest.mark.parametrize(("primary", "alternate"), [("192.0.2.1", "192.0.2.1"), ("::1", "0::1")])
def test_same_alt_address_refused(primary: str, alternate: str) -> None:
    """A second address equal to the primary one is refused."""
    with pytest.raises(usage.UsageError, match="--alt-address"):
        parse("--stun-interface", primary, "--alt-address", alternate)


def test_mixed_ip_versions_refused() -> None:
    """The two addresses must be of the same IP version."""
    with pytest.raises(usage.UsageError, match="IP version"):
        parse("--stun-interface", "192.0.2.1", "--alt-address", "2001:db8::2")


def test_same_ports_refused() -> None:
    """With a second address, the two ports must differ."""
    argv = ["--stun-interface", "192.0.2.1", "--alt-address", "192.0.2.2"]
    with pytest.raises(usage.UsageError, match="--alt-port"):
        parse(*argv, "--stun-port", "4000", "--alt-port", "4000")


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_idle_timeout(value: str) -> None:
    """The idle timeout must be a number of seconds above zero."""
    with pytest.raises(usage.UsageError):
        parse("--tcp-idle-timeout", value)


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_bad_connection_cap(value: str) -> None:
    """The connection cap must be a whole number, at least 1."""
    with pytest.raises(usage.UsageError):
        parse("--max-tcp-connections", value)


def stun_service(options: Options, reactor: MemoryReactorClock) -> StunServer:
    """The "stun" service of the tree makeService builds."""
    top = makeService(options, reactor)
    assert isinstance(top, MultiService)
    stun = top.getServiceNamed("stun")
    assert isinstance(stun, StunServer)
    return stun


def test_make_service_defaults() -> None:
    """makeService builds a MultiService holding a StunServer named "stun" with the defaults."""
    reactor = MemoryReactorClock()
    stun = stun_service(parse(), reactor)
    assert stun.reactor is reactor
    assert (stun.interface, stun.port) == ("0.0.0.0", 3478)
    assert (stun.alt_address, stun.alt_port) == (None, 3479)
    assert stun.responder.software is None
    assert stun.tcp_idle_timeout == 10.0
    assert stun.max_tcp_connections == 1000
    assert not stun.running
    assert reactor.tcpServers == []


def test_make_service_passes_options() -> None:
    """Every option reaches the StunServer."""
    options = parse(
        "--stun-interface", "192.0.2.1",
        "--stun-port", "5000",
        "--alt-address", "192.0.2.2",
        "--alt-port", "5001",
        "--software", "rv 1",
        "--tcp-idle-timeout", "3",
        "--max-tcp-connections", "9",
    )  # fmt: skip
    stun = stun_service(options, MemoryReactorClock())
    assert (stun.interface, stun.port) == ("192.0.2.1", 5000)
    assert (stun.alt_address, stun.alt_port) == ("192.0.2.2", 5001)
    assert stun.responder.software == Software("rv 1")
    assert stun.tcp_idle_timeout == 3.0
    assert stun.max_tcp_connections == 9
