"""
``natcat`` as a user runs it, on loopback and without root: ``twistd
natrendezvous`` in a subprocess, ``natcat --listen alice --echo`` in
another, and ``natcat alice`` with a file on stdin, for each method and
for the default race; plus what a caller prints when no method works.
The NAT lab runs the same commands across real NATs (tests/lab).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.helpers import REPO_ROOT, start_rendezvous

PAYLOAD_SIZE = 256 * 1024
TIMEOUT = 30.0


def _environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def _natcat(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "nattraverse.natcat", *arguments]


@pytest.fixture(scope="module")
def rendezvous(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The client endpoint description of a ``twistd natrendezvous`` on 127.0.0.1."""
    directory = tmp_path_factory.mktemp("natcat")
    with start_rendezvous(
        directory, "--stun-port", "0", "--alt-port", "0", "--stun-interface", "127.0.0.1"
    ) as rv:
        deadline = time.monotonic() + TIMEOUT
        while (
            found := re.search(r"rendezvous on 127\.0\.0\.1:(\d+)", rv.server.log_text())
        ) is None:
            assert time.monotonic() < deadline, rv.server.log_text()
            time.sleep(0.05)
        yield f"tcp:127.0.0.1:{found.group(1)}"


@pytest.fixture(scope="module")
def alice(rendezvous: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``natcat --listen alice --echo --json-report``; the file its stderr goes to."""
    directory = tmp_path_factory.mktemp("alice")
    errors = directory / "stderr"
    with errors.open("wb") as sink:
        process = subprocess.Popen(
            _natcat(
                "--listen", "alice", "--rendezvous", rendezvous, "--echo", "--json-report",
                "--identity", str(directory / "alice.key"),
            ),
            stdin=subprocess.DEVNULL,
            stderr=sink,
            env=_environment(),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while "listening as alice" not in errors.read_text():
            assert process.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, errors.read_text()
            time.sleep(0.05)
        yield errors
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.mark.parametrize("methods", ["direct", "reversal", "tcp", "relay", None])
def test_a_file_echoes_back_intact(
    rendezvous: str, alice: Path, tmp_path: Path, methods: str | None
) -> None:
    """256 KiB through natcat come back byte for byte; the report names the method."""
    payload = os.urandom(PAYLOAD_SIZE)
    extra = ["--methods", methods] if methods else []
    result = subprocess.run(
        _natcat("alice", "--rendezvous", rendezvous, "--json-report", "-q", "1", *extra),
        input=payload,
        capture_output=True,
        env=_environment(),
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == payload
    [line] = [json.loads(x) for x in result.stderr.decode().splitlines() if x.startswith("{")]
    # By default the TCP paths race: on loopback direct and tcp both connect at once.
    assert line["method"] in ((methods,) if methods else ("direct", "tcp"))
    assert line["peer"] in alice.read_text()
    assert line["connect_ms"] > 0


def test_an_unknown_peer_fails_with_status_1(rendezvous: str) -> None:
    """Connecting to a name nobody registered exits 1 and says so."""
    result = subprocess.run(
        _natcat("nobody", "--rendezvous", rendezvous),
        input=b"",
        capture_output=True,
        env=_environment(),
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert "nobody" in result.stderr.decode()


@pytest.mark.parametrize("methods", ["direct", "relay"])
def test_a_lost_connection_exits_1(rendezvous: str, tmp_path: Path, methods: str) -> None:
    """
    A callee that dies (SIGKILL) while connected: the caller does not exit 0
    as after a normal end, but 1, saying the connection was lost.
    """
    name = f"bob-{methods}"  # a killed callee's name stays registered to its key
    errors = tmp_path / "callee.err"
    with errors.open("wb") as sink:
        callee = subprocess.Popen(
            _natcat(
                "--listen", name, "--rendezvous", rendezvous, "--methods", methods,
                "--identity", str(tmp_path / "bob.key"),
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env=_environment(),
        )  # fmt: skip
    caller = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while f"listening as {name}" not in errors.read_text():
            assert callee.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, errors.read_text()
            time.sleep(0.05)
        caller = subprocess.Popen(
            _natcat(name, "--rendezvous", rendezvous, "--methods", methods, "--json-report"),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_environment(),
        )
        assert caller.stderr is not None
        report = caller.stderr.readline()  # the JSON report: connected
        assert report.startswith(b"{"), report
        callee.kill()
        callee.wait(5)
        _, rest = caller.communicate(timeout=TIMEOUT)
        assert caller.returncode == 1, rest.decode()
        assert "natcat: the connection was lost" in rest.decode()
    finally:
        for process in (caller, callee):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(5)


def test_the_tutorials_python_example_runs_twice(rendezvous: str, tmp_path: Path) -> None:
    """docs/examples/punch_echo.py echoes, and runs again at once (its key is kept)."""
    example = REPO_ROOT / "docs" / "examples" / "punch_echo.py"
    environment = dict(_environment(), TMPDIR=str(tmp_path))
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, str(example), rendezvous],
            capture_output=True,
            env=environment,
            timeout=TIMEOUT,
            check=False,
        )
        detail = result.stderr.decode(errors="replace")
        assert result.returncode == 0, detail
        assert b"echoed: hello" in result.stdout, detail
    assert (tmp_path / "nattraverse-example-echo.key").exists()
