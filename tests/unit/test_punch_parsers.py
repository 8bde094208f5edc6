"""
The ``punch:`` endpoint-string parsers, found through the real plugin file
(``twisted/plugins/nattraverse_punch.py``) by ``clientFromString`` and
``serverFromString``: every key, nesting, the reactor handed over, and the
errors that name the key.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, serverFromString
from twisted.internet.interfaces import (
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from zope.interface.verify import verifyObject

from nattraverse import natcat
from nattraverse._parsers import (
    ACCESS_KEY_ENVIRONMENT,
    PunchClientParser,
    PunchServerParser,
    parse_client,
)
from nattraverse.endpoints import PunchClientEndpoint, PunchServerEndpoint
from nattraverse.identity import Identity, load_or_create
from nattraverse.punch.birthday import BirthdayConfig
from nattraverse.punch.port import PunchingPort
from nattraverse.testing import Network

ROOT = Path(__file__).resolve().parents[2]
RENDEZVOUS = r"rendezvous=tcp\:127.0.0.1\:8478"


@pytest.fixture(autouse=True)
def _no_access_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ACCESS_KEY_ENVIRONMENT, raising=False)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "alice.key"


def _client(reactor: Any, rest: str) -> PunchClientEndpoint:
    endpoint = clientFromString(reactor, f"punch:{rest}")
    assert isinstance(endpoint, PunchClientEndpoint)
    return endpoint


def _server(reactor: Any, rest: str) -> PunchServerEndpoint:
    endpoint = serverFromString(reactor, f"punch:{rest}")
    assert isinstance(endpoint, PunchServerEndpoint)
    return endpoint


# -- plugins ---------------------------------------------------------------------


def test_parsers_are_found_as_plugins() -> None:
    """Both parsers are Twisted plugins with the prefix 'punch'."""
    clients = [p for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
               if p.prefix == "punch"]  # fmt: skip
    servers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "punch"]
    assert [type(p) for p in clients] == [PunchClientParser]
    assert [type(p) for p in servers] == [PunchServerParser]
    verifyObject(IStreamClientEndpointStringParserWithReactor, clients[0])
    verifyObject(IStreamServerEndpointStringParser, servers[0])


def test_parser_plugin_module_is_cheap() -> None:
    """Importing the parsers' plugin file imports no reactor, crypto, TLS or endpoints."""
    probe = (
        "import json, sys\n"
        "import twisted.plugins.nattraverse_punch\n"
        "heavy = ['twisted.internet.reactor', 'cryptography', 'OpenSSL',"
        " 'twisted.internet.endpoints', 'nattraverse.endpoints', 'nattraverse.identity']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
        timeout=60, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert json.loads(output.stdout) == []


# -- client ----------------------------------------------------------------------


def test_client_minimal() -> None:
    """peer and rendezvous are enough; the defaults are all methods and 30 s."""
    reactor = MemoryReactorClock()
    endpoint = _client(reactor, f"peer=alice:{RENDEZVOUS}")
    verifyObject(IStreamClientEndpoint, endpoint)
    assert endpoint.peer == "alice"
    assert endpoint.methods == ("direct", "reversal", "tcp", "udp", "relay")
    assert endpoint.timeout == 30.0


def test_client_uses_the_reactor_for_itself_and_the_rendezvous() -> None:
    """The reactor handed to the parser is the endpoint's and the nested endpoint's."""
    reactor = MemoryReactorClock()
    endpoint = _client(reactor, f"peer=alice:{RENDEZVOUS}")
    assert endpoint._reactor is reactor
    rendezvous = endpoint.rendezvous
    assert isinstance(rendezvous, TCP4ClientEndpoint)
    assert rendezvous._reactor is reactor
    assert (rendezvous._host, rendezvous._port) == ("127.0.0.1", 8478)


def test_client_nested_endpoint_keeps_its_own_keys() -> None:
    """A nested description keeps its own escaped keys (here a TCP timeout)."""
    reactor = MemoryReactorClock()
    endpoint = _client(reactor, r"peer=alice:rendezvous=tcp\:host=127.0.0.1\:port=1\:timeout=7")
    assert endpoint.rendezvous._timeout == 7  # type: ignore[attr-defined]


def test_client_peer_id_is_accepted() -> None:
    """peer may be a peer id, which then pins the identity."""
    peer_id = str(Identity.generate().peer_id)
    endpoint = _client(MemoryReactorClock(), f"peer={peer_id}:{RENDEZVOUS}")
    assert endpoint.peer == peer_id


def test_client_methods_and_timeout() -> None:
    """methods is a comma list, in the order given; timeout is in seconds."""
    endpoint = _client(
        MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:methods=relay, direct:timeout=2.5"
    )
    assert endpoint.methods == ("relay", "direct")
    assert endpoint.timeout == 2.5


def test_check_pacing_and_punch_timeout() -> None:
    """checkInterval and punchTimeout set the UDP checks' pacing and deadline, on both sides."""
    client = _client(
        MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:checkInterval=0.02:punchTimeout=4"
    )
    assert client.checks is not None
    assert (client.checks.ta, client.checks.deadline) == (0.02, 4.0)
    assert _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}").checks is None
    # A short deadline keeps the default budgets.
    assert (client.checks.max_checks_per_pair, client.checks.max_checks) == (15, 150)


def test_long_punch_timeout_grows_the_check_budgets() -> None:
    """A punchTimeout beyond 10 s grows the check budgets in proportion (or they cut it short)."""
    client = _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:punchTimeout=40")
    assert client.checks is not None
    assert client.checks.deadline == 40.0
    assert (client.checks.max_checks_per_pair, client.checks.max_checks) == (60, 600)


def test_client_identity_file_is_loaded_or_created(key_file: Path) -> None:
    """identity= names a key file, created with mode 0600 on first use, loaded after."""
    first = _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:identity={key_file}")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:identity={key_file}")
    assert first.identity.peer_id == second.identity.peer_id == load_or_create(key_file).peer_id


def test_client_without_identity_gets_an_ephemeral_one() -> None:
    """Without identity=, each endpoint has its own fresh key."""
    a = _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}")
    b = _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}")
    assert a.identity.peer_id != b.identity.peer_id


def test_client_access_key_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """accessKeyFile's content, stripped, is the access key, and wins over the environment."""
    monkeypatch.setenv(ACCESS_KEY_ENVIRONMENT, "from-environment")
    path = tmp_path / "access"
    path.write_bytes(b"  s3cret\n")
    path.chmod(0o600)
    endpoint = _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:accessKeyFile={path}")
    assert endpoint._access_key == b"s3cret"


def test_client_access_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without accessKeyFile, NATTRAVERSE_ACCESS_KEY is the access key."""
    monkeypatch.setenv(ACCESS_KEY_ENVIRONMENT, "from-environment")
    endpoint = _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}")
    assert endpoint._access_key == b"from-environment"


def test_client_without_access_key() -> None:
    """Without file or environment there is no access key."""
    assert _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}")._access_key is None


def test_natcat_strings_parse(tmp_path: Path) -> None:
    """The strings natcat builds (escaped '=' and ':' included) parse back."""
    options = natcat.build_parser().parse_args(
        ["alice", "-r", "tcp:host=127.0.0.1:port=8478", "--methods", "direct,relay",
         "--timeout", "5", "--identity", str(tmp_path / "a=b:c.key")]
    )  # fmt: skip
    endpoint = _client(MemoryReactorClock(), natcat.endpoint_string(options).removeprefix("punch:"))
    assert endpoint.methods == ("direct", "relay")
    assert endpoint.timeout == 5.0
    assert (tmp_path / "a=b:c.key").exists()


@pytest.mark.parametrize(
    ("rest", "key"),
    [
        (f"{RENDEZVOUS}", "peer"),
        ("peer=alice", "rendezvous"),
        (f"peer=alice:{RENDEZVOUS}:colour=blue", "colour"),
        (f"peer=alice:{RENDEZVOUS}:name=alice", "name"),
        (f"alice:{RENDEZVOUS}", "alice"),
    ],
)
def test_client_missing_or_unknown_keys_raise_type_error(rest: str, key: str) -> None:
    """Missing required keys, unknown keys and positional values raise TypeError naming them."""
    with pytest.raises(TypeError, match=key):
        clientFromString(MemoryReactorClock(), f"punch:{rest}")


@pytest.mark.parametrize(
    ("rest", "needle"),
    [
        (f"peer=alice:{RENDEZVOUS}:timeout=soon", "timeout='soon'"),
        (f"peer=alice:{RENDEZVOUS}:timeout=0", "timeout='0'"),
        (f"peer=alice:{RENDEZVOUS}:timeout=-3", "timeout='-3'"),
        (f"peer=alice:{RENDEZVOUS}:timeout=inf", "timeout='inf'"),
        (f"peer=alice:{RENDEZVOUS}:timeout=nan", "timeout='nan'"),
        (f"peer=alice:{RENDEZVOUS}:checkInterval=0", "checkInterval='0'"),
        (f"peer=alice:{RENDEZVOUS}:punchTimeout=never", "punchTimeout='never'"),
        (f"peer=alice:{RENDEZVOUS}:methods=direct,pigeon", "'pigeon'"),
        (f"peer=alice:{RENDEZVOUS}:methods=direct,,relay", "methods="),
        (f"peer=alice:{RENDEZVOUS}:methods=relay,relay", "twice"),
        (f"peer=alice:{RENDEZVOUS}:methods=", "methods"),
        (r"peer=alice:rendezvous=nope\:1", "rendezvous='nope:1'"),
        (r"peer=alice:rendezvous=tcp\:127.0.0.1", "rendezvous='tcp:127.0.0.1'"),
        (f"peer=al ice:{RENDEZVOUS}", "peer='al ice'"),
        (f"peer=alice:{RENDEZVOUS}:accessKeyFile=/nonexistent/key", "accessKeyFile="),
    ],
)
def test_client_bad_values_raise_value_error(rest: str, needle: str) -> None:
    """A bad value raises ValueError naming the key and the value."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        clientFromString(MemoryReactorClock(), f"punch:{rest}")


def test_client_empty_access_key_file(tmp_path: Path) -> None:
    """An empty access key file is a bad value."""
    path = tmp_path / "empty"
    path.write_bytes(b"\n")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="accessKeyFile"):
        _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:accessKeyFile={path}")


def test_client_access_key_file_others_may_read(tmp_path: Path) -> None:
    """An access key file readable by others is refused, as the server refuses its own."""
    path = tmp_path / "access"
    path.write_bytes(b"s3cret\n")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:accessKeyFile={path}")


def test_client_insecure_identity_file(key_file: Path) -> None:
    """An identity file others can read is refused, naming the key."""
    load_or_create(key_file)
    os.chmod(key_file, 0o644)
    with pytest.raises(ValueError, match="identity="):
        _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:identity={key_file}")


def test_parse_client_signature_takes_an_environment() -> None:
    """parse_client reads the access key from the environment mapping it is given."""
    endpoint = parse_client(
        MemoryReactorClock(),
        peer="alice",
        rendezvous="tcp:127.0.0.1:1",
        environ={ACCESS_KEY_ENVIRONMENT: "k"},
    )
    assert endpoint._access_key == b"k"


# -- server ----------------------------------------------------------------------


def test_server_keys(key_file: Path, tmp_path: Path) -> None:
    """Every server key reaches the endpoint."""
    access = tmp_path / "access"
    access.write_bytes(b"k\n")
    access.chmod(0o600)
    reactor = MemoryReactorClock()
    endpoint = _server(
        reactor,
        f"name=alice:{RENDEZVOUS}:identity={key_file}:port=8479:interface=127.0.0.1"
        f":methods=direct,relay:timeout=12:accessKeyFile={access}",
    )
    verifyObject(IStreamServerEndpoint, endpoint)
    assert endpoint.name == "alice"
    assert endpoint.port == 8479
    assert endpoint.interface == "127.0.0.1"
    assert endpoint.methods == ("direct", "relay")
    assert endpoint.timeout == 12.0
    assert endpoint._access_key == b"k"
    assert endpoint.identity.peer_id == load_or_create(key_file).peer_id


def test_server_defaults_and_reactor(key_file: Path) -> None:
    """Defaults: any port on every interface, all methods; the reactor is the one handed over."""
    reactor = MemoryReactorClock()
    endpoint = _server(reactor, f"name=alice:{RENDEZVOUS}:identity={key_file}")
    assert (endpoint.port, endpoint.interface) == (0, "0.0.0.0")
    assert endpoint.methods == ("direct", "reversal", "tcp", "udp", "relay")
    assert endpoint._reactor is reactor
    assert endpoint.rendezvous._reactor is reactor  # type: ignore[attr-defined]


def test_server_needs_an_identity() -> None:
    """Without identity= the server refuses, saying the name is bound to the key."""
    with pytest.raises(TypeError, match="identity=") as raised:
        serverFromString(MemoryReactorClock(), f"punch:name=alice:{RENDEZVOUS}")
    assert "bound" in str(raised.value)


@pytest.mark.parametrize(
    ("rest", "key"),
    [
        (f"{RENDEZVOUS}:identity=KEY", "name"),
        ("name=alice:identity=KEY", "rendezvous"),
        (f"name=alice:{RENDEZVOUS}:identity=KEY:peer=bob", "peer"),
        (f"name=alice:{RENDEZVOUS}:identity=KEY:backlog=5", "backlog"),
    ],
)
def test_server_missing_or_unknown_keys(rest: str, key: str, key_file: Path) -> None:
    """Missing required keys and unknown keys raise TypeError naming them."""
    with pytest.raises(TypeError, match=key):
        serverFromString(MemoryReactorClock(), "punch:" + rest.replace("KEY", str(key_file)))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("port=http", "port='http'"),
        ("port=70000", "port='70000'"),
        ("port=-1", "port='-1'"),
        ("interface=localhost", "interface='localhost'"),
        ("methods=teleport", "'teleport'"),
        ("timeout=never", "timeout='never'"),
    ],
)
def test_server_bad_values(extra: str, needle: str, key_file: Path) -> None:
    """A bad server value raises ValueError naming the key and the value."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        serverFromString(
            MemoryReactorClock(), f"punch:name=alice:{RENDEZVOUS}:identity={key_file}:{extra}"
        )


def test_server_bad_name(key_file: Path) -> None:
    """A name that cannot be registered is refused, naming it."""
    with pytest.raises(ValueError, match="name='a b'"):
        serverFromString(MemoryReactorClock(), f"punch:name=a b:{RENDEZVOUS}:identity={key_file}")


def test_server_errors_come_before_creating_the_key_file(key_file: Path) -> None:
    """A bad value elsewhere leaves no new key file behind."""
    with pytest.raises(ValueError, match="port='x'"):
        serverFromString(
            MemoryReactorClock(), f"punch:name=alice:{RENDEZVOUS}:identity={key_file}:port=x"
        )
    assert not key_file.exists()


def test_prefer_tcp_is_a_grace_in_seconds() -> None:
    """preferTcp gives direct TCP paths that many seconds to beat another; absent or 0: none."""
    assert _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:preferTcp=0.3").prefer_tcp == 0.3
    assert _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}").prefer_tcp == 0.0
    assert _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:preferTcp=0").prefer_tcp == 0.0
    with pytest.raises(ValueError, match="preferTcp='soon'"):
        _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:preferTcp=soon")


# -- birthday-paradox probing -------------------------------------------------------

BIRTHDAY = "birthdayProbes=900:birthdayRate=50.5:birthdaySockets=64"


def test_birthday_keys_on_the_client() -> None:
    """birthdayProbes, birthdayRate and birthdaySockets set the client's BirthdayConfig."""
    endpoint = _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:{BIRTHDAY}")
    assert endpoint.birthday == BirthdayConfig(probes=900, rate=50.5, sockets=64)


def test_birthday_keys_on_the_server(key_file: Path) -> None:
    """The same keys set the server's BirthdayConfig."""
    endpoint = _server(
        MemoryReactorClock(), f"name=alice:{RENDEZVOUS}:identity={key_file}:{BIRTHDAY}"
    )
    assert endpoint.birthday == BirthdayConfig(probes=900, rate=50.5, sockets=64)


def test_birthday_keys_absent_or_one_given(key_file: Path) -> None:
    """Without the keys there is no BirthdayConfig; with one, the others keep their defaults."""
    assert _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}").birthday is None
    server = _server(MemoryReactorClock(), f"name=alice:{RENDEZVOUS}:identity={key_file}")
    assert server.birthday is None
    client = _client(MemoryReactorClock(), f"peer=alice:{RENDEZVOUS}:birthdayRate=20")
    assert client.birthday == BirthdayConfig(rate=20.0)
    assert (client.birthday.probes, client.birthday.sockets) == (1500, 256)


def test_client_punching_port_gets_the_birthday_config() -> None:
    """The client's punching UDP port probes with the BirthdayConfig of the keys."""
    host = Network(seed="birthday-client").host("caller")
    endpoint = _client(host.reactor, f"peer=alice:{RENDEZVOUS}:{BIRTHDAY}")
    port, problem = endpoint._open_udp()
    assert problem is None
    assert isinstance(port, PunchingPort)
    assert port.birthday == BirthdayConfig(probes=900, rate=50.5, sockets=64)
    port.close()
    default, _ = _client(host.reactor, f"peer=alice:{RENDEZVOUS}")._open_udp()
    assert default.birthday == BirthdayConfig()
    default.close()


def test_server_punching_port_gets_the_birthday_config(key_file: Path) -> None:
    """listen() opens the server's punching UDP port with the BirthdayConfig of the keys."""
    network = Network(seed="birthday-server")
    host = network.host("callee")
    endpoint = _server(
        host.reactor,
        rf"name=alice:rendezvous=tcp\:192.0.2.1\:8478:identity={key_file}:methods=udp:{BIRTHDAY}",
    )
    listening = endpoint.listen(Factory())
    (socket,) = host.ports
    # The punching port routes its socket's datagrams to itself.
    port = socket.protocol.intercept.__self__  # type: ignore[attr-defined]
    assert isinstance(port, PunchingPort)
    assert port.birthday == BirthdayConfig(probes=900, rate=50.5, sockets=64)
    listening.cancel()
    listening.addErrback(lambda _: None)
    network.run(1)
    assert host.ports == ()
    assert host.reactor.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("birthdayProbes=x", "punch: birthdayProbes='x' is not a whole number of at least 1"),
        ("birthdayProbes=0", "birthdayProbes='0'"),
        ("birthdayProbes=-5", "birthdayProbes='-5'"),
        ("birthdayProbes=2.5", "birthdayProbes='2.5'"),
        ("birthdayProbes=70000", "punch: birthdayProbes='70000': ports"),
        ("birthdayRate=fast", "punch: birthdayRate='fast' is not a positive number"),
        ("birthdayRate=0", "birthdayRate='0'"),
        ("birthdayRate=-1", "birthdayRate='-1'"),
        ("birthdayRate=inf", "birthdayRate='inf'"),
        ("birthdayRate=nan", "birthdayRate='nan'"),
        ("birthdaySockets=0", "punch: birthdaySockets='0' is not a whole number of at least 1"),
        ("birthdaySockets=1e3", "birthdaySockets='1e3'"),
        ("birthdaySockets=" + "9" * 5000, "birthdaySockets='999"),
    ],
)
def test_bad_birthday_values_on_both_sides(extra: str, needle: str, key_file: Path) -> None:
    """A bad birthday value raises ValueError naming the key and value, on either side."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        clientFromString(MemoryReactorClock(), f"punch:peer=alice:{RENDEZVOUS}:{extra}")
    with pytest.raises(ValueError, match=re.escape(needle)):
        serverFromString(
            MemoryReactorClock(), f"punch:name=alice:{RENDEZVOUS}:identity={key_file}:{extra}"
        )
    assert not key_file.exists()


def test_natcat_birthday_options_parse(tmp_path: Path) -> None:
    """natcat's --birthday-* options give the endpoint their BirthdayConfig."""
    options = natcat.build_parser().parse_args(
        ["alice", "-r", "tcp:127.0.0.1:8478", "--birthday-probes", "3000",
         "--birthday-rate", "400", "--birthday-sockets", "128"]
    )  # fmt: skip
    endpoint = _client(MemoryReactorClock(), natcat.endpoint_string(options).removeprefix("punch:"))
    assert endpoint.birthday == BirthdayConfig(probes=3000, rate=400.0, sockets=128)
