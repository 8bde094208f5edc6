"""
natcat's command line: which options go together, the ``punch:`` string
they make, and the JSON report line.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from twisted.internet.endpoints import _parse

from nattraverse import natcat


def _options(*argv: str) -> argparse.Namespace:
    parser = natcat.build_parser()
    options = parser.parse_args(list(argv))
    natcat._check(parser, options)
    return options


def test_connect_string_nests_the_rendezvous() -> None:
    """The rendezvous description is escaped so that Twisted's parser gives it back whole."""
    options = _options("alice", "--rendezvous", "tls:rv.example.org:8478:trustRoots=/etc/ca")
    args, kwargs = _parse(natcat.endpoint_string(options))
    assert args == ["punch"]
    assert kwargs == {"peer": "alice", "rendezvous": "tls:rv.example.org:8478:trustRoots=/etc/ca"}


def test_connect_string_carries_methods_timeout_and_identity(tmp_path: Path) -> None:
    """--methods, --timeout and --identity become the endpoint's keys."""
    key = tmp_path / "a:b.key"
    options = _options(
        "bob", "-r", "tcp:127.0.0.1:8478", "--methods", "direct,relay", "--timeout", "5",
        "--identity", str(key),
    )  # fmt: skip
    _, kwargs = _parse(natcat.endpoint_string(options))
    assert kwargs["methods"] == "direct,relay"
    assert float(kwargs["timeout"]) == 5.0
    assert kwargs["identity"] == str(key)


def test_timeouts_go_to_both_roles() -> None:
    """--timeout and --punch-timeout become timeout= and punchTimeout=, listening too."""
    for role in (["bob"], ["--listen", "bob"]):
        options = _options(
            *role, "-r", "tcp:h:1", "--identity", "k", "--timeout", "90", "--punch-timeout", "30"
        )
        _, kwargs = _parse(natcat.endpoint_string(options))
        assert float(kwargs["timeout"]) == 90.0
        assert float(kwargs["punchTimeout"]) == 30.0


def test_listen_string_has_a_default_identity(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A listener without --identity keeps its key under $XDG_CONFIG_HOME/nattraverse."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    options = _options("--listen", "alice", "-r", "tcp:127.0.0.1:8478", "--port", "9000")
    _, kwargs = _parse(natcat.endpoint_string(options))
    assert kwargs["name"] == "alice"
    assert kwargs["identity"] == str(tmp_path / "nattraverse" / "natcat-alice.key")
    assert kwargs["port"] == "9000"
    assert "peer" not in kwargs


@pytest.mark.parametrize(
    "argv",
    [
        ["-r", "tcp:h:1"],
        ["alice", "--listen", "bob", "-r", "tcp:h:1"],
        ["alice", "-r", "tcp:h:1", "--echo"],
        ["alice", "-r", "tcp:h:1", "--port", "5"],
        ["alice", "-r", "tcp:h:1", "--punch-timeout", "0"],
        ["--listen", "bob", "-r", "tcp:h:1", "--quit-after", "3"],
        ["alice", "-r", "tcp:h:1", "--timeout", "soon"],
        ["alice", "-r", "tcp:h:1", "--timeout", "-1"],
        ["alice", "-r", "tcp:h:1", "--birthday-probes", "0"],
        ["alice", "-r", "tcp:h:1", "--birthday-probes", "lots"],
        ["alice", "-r", "tcp:h:1", "--birthday-probes", "70000"],
        ["alice", "-r", "tcp:h:1", "--birthday-rate", "0"],
        ["alice", "-r", "tcp:h:1", "--birthday-rate", "inf"],
        ["--listen", "bob", "-r", "tcp:h:1", "--birthday-sockets", "2.5"],
        ["--listen", "bob", "-r", "tcp:h:1", "--port", "70000"],
        ["alice"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Options that do not go together, or bad values, are a usage error (status 2)."""
    with pytest.raises(SystemExit) as raised:
        _options(*argv)
    assert raised.value.code == natcat.EXIT_USAGE
    assert "natcat" in capsys.readouterr().err


def test_birthday_options_go_to_both_roles() -> None:
    """--birthday-probes, --birthday-rate and --birthday-sockets become the birthday keys."""
    for role in (["bob"], ["--listen", "bob"]):
        options = _options(
            *role, "-r", "tcp:h:1", "--identity", "k", "--birthday-probes", "3000",
            "--birthday-rate", "75.5", "--birthday-sockets", "512",
        )  # fmt: skip
        _, kwargs = _parse(natcat.endpoint_string(options))
        assert kwargs["birthdayProbes"] == "3000"
        assert float(kwargs["birthdayRate"]) == 75.5
        assert kwargs["birthdaySockets"] == "512"


def test_birthday_keys_absent_without_the_options() -> None:
    """Without the options the endpoint string has no birthday keys (the defaults apply)."""
    _, kwargs = _parse(natcat.endpoint_string(_options("bob", "-r", "tcp:h:1")))
    assert not [key for key in kwargs if key.startswith("birthday")]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--birthday-probes", "0"], "argument --birthday-probes: '0' is not a whole number"),
        (["--birthday-probes", "70000"], "'70000' is more probes than there are ports"),
        (["--birthday-rate", "-2"], "argument --birthday-rate: '-2' is not a number of probes"),
        (["--birthday-sockets", "x"], "argument --birthday-sockets: 'x' is not a whole number"),
    ],
)
def test_bad_birthday_values_say_why(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --birthday-* value is refused with a message naming the option and the value."""
    with pytest.raises(SystemExit):
        _options("alice", "-r", "tcp:h:1", *argv)
    assert needle in capsys.readouterr().err


def test_report_is_one_json_line() -> None:
    """--json-report writes the peer, method, remote and connect_ms keys, one object a line."""

    class Transport:
        peer_id = "nt1example"
        method = "relay"
        remote = "192.0.2.10:8478"

    stream = io.StringIO()
    natcat.report(stream, Transport(), 12.5)  # type: ignore[arg-type]
    line = stream.getvalue()
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert json.loads(line) == {
        "peer": "nt1example",
        "method": "relay",
        "remote": "192.0.2.10:8478",
        "relayed": True,
        "connect_ms": 12.5,
    }


def test_prefer_tcp_is_for_connecting() -> None:
    """--prefer-tcp becomes preferTcp=; a listener refuses it."""
    options = _options("bob", "-r", "tcp:h:1", "--identity", "k", "--prefer-tcp", "0.25")
    _, kwargs = _parse(natcat.endpoint_string(options))
    assert float(kwargs["preferTcp"]) == 0.25
    with pytest.raises(SystemExit):
        _options("--listen", "bob", "-r", "tcp:h:1", "--prefer-tcp", "0.25")


def test_a_moved_connection_gets_a_second_line() -> None:
    """report_move writes the path as it is now, relayed no more, with "moved": true."""

    class Transport:
        peer_id = "nt1example"
        method = "udp"
        remote = "203.0.113.5:20001"
        relayed = False

    stream = io.StringIO()
    natcat.report_move(stream, Transport())  # type: ignore[arg-type]
    assert json.loads(stream.getvalue()) == {
        "peer": "nt1example",
        "method": "udp",
        "remote": "203.0.113.5:20001",
        "relayed": False,
        "moved": True,
    }
