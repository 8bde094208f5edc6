"""
``twistd natrendezvous``: option parsing and the service tree, on a fake
reactor (nothing is started, no port is bound).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from nattraverse.rendezvous.relay import RelayHub, RelayLimits
from nattraverse.rendezvous.server import RendezvousLimits, RendezvousService
from nattraverse.stun.attributes import Software
from nattraverse.stun.server import StunServer
from nattraverse.tap import ACCESS_KEY_VARIABLE, Options, makeService


def parse(*argv: str) -> Options:
    """Options parsed from *argv*."""
    options = Options()
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


# -- rendezvous and relay options -------------------------------------------


@pytest.fixture(autouse=True)
def no_access_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests choose the environment's access key themselves."""
    monkeypatch.delenv(ACCESS_KEY_VARIABLE, raising=False)


def test_rendezvous_defaults() -> None:
    """Rendezvous and relay options default to the documented values."""
    options = parse()
    assert options["listen"] == ["tcp:8478"]
    assert options["no-relay"] == 0
    assert options["relay-max"] == 256
    assert options["relay-rate"] == 4 * 1024 * 1024
    assert options["relay-lifetime"] == 3600.0
    assert options["max-registrations"] == 100_000
    assert options["max-registrations-per-ip"] == 64
    assert options["registration-ttl"] == 60.0
    assert options["max-introductions"] == 10_000
    assert options["introduction-ttl"] == 60.0
    assert options["handshake-timeout"] == 10.0
    assert options["max-connections"] == 20_000
    assert options["access-key"] is None


def test_listen_repeatable() -> None:
    """--listen may be given several times; the default is then not added."""
    options = parse("--listen", "tcp:9000", "--listen", "tcp6:9001:interface=\\:\\:1")
    assert options["listen"] == ["tcp:9000", "tcp6:9001:interface=\\:\\:1"]


@pytest.mark.parametrize("description", ["carrier-pigeon:1", "tcp:http", "ssl:8479:privateKey=/no"])
def test_bad_listen_names_option(description: str) -> None:
    """An endpoint description that does not parse is refused, naming --listen."""
    with pytest.raises(usage.UsageError, match="--listen"):
        parse("--listen", description)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("1000", 1000.0),
        ("512K", 512 * 1024.0),
        ("4M", 4 * 1024.0**2),
        ("1GiB/s", 1024.0**3),
    ],
)
def test_relay_rate_units(value: str, expected: float) -> None:
    """--relay-rate takes bytes per second, with K, M, G suffixes; 0 is no cap."""
    assert parse("--relay-rate", value)["relay-rate"] == expected


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--relay-rate", "fast"),
        ("--relay-max", "0"),
        ("--relay-lifetime", "-1"),
        ("--max-registrations", "none"),
        ("--max-registrations-per-ip", "0"),
        ("--registration-ttl", "0"),
        ("--max-connections", "1.5"),
    ],
)
def test_bad_rendezvous_value_names_option(option: str, value: str) -> None:
    """A bad value is refused with a usage error naming its option."""
    with pytest.raises(usage.UsageError, match=option):
        parse(option, value)


def test_no_option_takes_the_key_itself() -> None:
    """The access key never comes from argv: only a file name does."""
    names = [parameter[0] for parameter in Options.optParameters]
    assert "access-key-file" in names
    assert [name for name in names if "key" in name] == ["access-key-file"]


def key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> str:
    """A key file with *content* and *mode*."""
    path = tmp_path / "access.key"
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


def test_access_key_file_read(tmp_path: Path) -> None:
    """The key file's content, without the trailing newline, is the access key."""
    path = key_file(tmp_path, b"s3cret\n")
    assert parse("--access-key-file", path)["access-key"] == b"s3cret"


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_world_readable_key_file_refused(tmp_path: Path, mode: int) -> None:
    """A key file other users may read or change is refused, saying how to fix it."""
    path = key_file(tmp_path, b"s3cret", mode)
    with pytest.raises(usage.UsageError, match="chmod 600"):
        parse("--access-key-file", path)


def test_missing_key_file(tmp_path: Path) -> None:
    """A key file that does not exist is a usage error naming the option."""
    with pytest.raises(usage.UsageError, match="--access-key-file"):
        parse("--access-key-file", str(tmp_path / "nothing"))


def test_empty_key_file(tmp_path: Path) -> None:
    """An empty key file is refused."""
    with pytest.raises(usage.UsageError, match="empty"):
        parse("--access-key-file", key_file(tmp_path, b"\n"))


def test_access_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """NATRENDEZVOUS_ACCESS_KEY gives the access key."""
    monkeypatch.setenv(ACCESS_KEY_VARIABLE, "from-env")
    assert parse()["access-key"] == b"from-env"


def test_access_key_twice_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A key file and the environment variable together are refused."""
    monkeypatch.setenv(ACCESS_KEY_VARIABLE, "from-env")
    with pytest.raises(usage.UsageError, match="both"):
        parse("--access-key-file", key_file(tmp_path, b"file"))


def rendezvous_service(options: Options, reactor: MemoryReactorClock) -> RendezvousService:
    """The "rendezvous" service of the tree makeService builds."""
    top = makeService(options, reactor)
    assert isinstance(top, MultiService)
    service = top.getServiceNamed("rendezvous")
    assert isinstance(service, RendezvousService)
    return service


def test_make_service_rendezvous_defaults() -> None:
    """makeService adds a RendezvousService named "rendezvous" with a relay, on tcp:8478."""
    reactor = MemoryReactorClock()
    service = rendezvous_service(parse(), reactor)
    factory = service.factory
    assert factory.limits == RendezvousLimits()
    assert factory.access_key is None
    assert factory.stun_port == 3478
    assert isinstance(factory.relay_hub, RelayHub)
    assert factory.relay_hub.limits == RelayLimits()
    service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [(8478, "")]
    service.stopService()


def test_make_service_passes_rendezvous_options(tmp_path: Path) -> None:
    """Every rendezvous and relay option reaches the service."""
    options = parse(
        "--listen", "tcp:9000:interface=127.0.0.1",
        "--listen", "tcp:9001",
        "--stun-port", "5000",
        "--registration-ttl", "30",
        "--max-registrations", "10",
        "--max-registrations-per-ip", "2",
        "--introduction-ttl", "20",
        "--max-introductions", "5",
        "--handshake-timeout", "3",
        "--max-connections", "7",
        "--relay-max", "4",
        "--relay-rate", "1M",
        "--relay-lifetime", "60",
        "--access-key-file", key_file(tmp_path, b"k"),
    )  # fmt: skip
    reactor = MemoryReactorClock()
    service = rendezvous_service(options, reactor)
    factory = service.factory
    assert factory.limits == RendezvousLimits(30.0, 10, 2, 20.0, 5, 3.0, 7)
    assert factory.access_key == b"k"
    assert factory.stun_port == 5000
    assert isinstance(factory.relay_hub, RelayHub)
    assert factory.relay_hub.limits == RelayLimits(max_relays=4, rate=1024.0**2, lifetime=60.0)
    service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (9000, "127.0.0.1"),
        (9001, ""),
    ]
    service.stopService()


def test_no_relay() -> None:
    """--no-relay leaves the rendezvous without a relay hub."""
    service = rendezvous_service(parse("--no-relay"), MemoryReactorClock())
    assert service.factory.relay_hub is None
