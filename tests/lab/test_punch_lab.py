"""
``punch:`` endpoints behind real kernel NATs, driven through ``natcat``.

Each test builds a lab with our ``twistd natrendezvous`` on a public host,
a callee (``natcat --listen alice --echo``) and a caller (``natcat alice``
with 1 MiB of random bytes on stdin), placed so that exactly one of the
issue's methods can work:

- callee public, caller behind a NAT: direct TCP to the callee;
- callee behind a NAT, caller public: connection reversal;
- both behind port-restricted NATs: the relay (until hole punching lands).

The bytes must come back intact, and both sides' ``--json-report`` must name
the method that can work.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.lab.natcheck_support import repo_environment, stop
from tests.natlab import Lab, Node, Preset, PublicHost

pytestmark = [pytest.mark.lab, pytest.mark.slow]

RENDEZVOUS_ADDRESS = "192.0.2.10"
RENDEZVOUS_PORT = 8478
RENDEZVOUS = f"tcp:{RENDEZVOUS_ADDRESS}:{RENDEZVOUS_PORT}"
PAYLOAD_SIZE = 1024 * 1024
#: Seconds a side may take, at most, to be ready or to finish.
STARTUP_TIMEOUT = 20.0
TRANSFER_TIMEOUT = 60.0


def _natcat(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "nattraverse.natcat", *arguments]


def _wait_for_tcp(node: Node, host: str, port: int, process: subprocess.Popen[Any]) -> None:
    """Wait until *host*:*port* accepts TCP connections, seen from *node*."""

    def accepts() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not node.call(accepts):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the rendezvous did not start (status {process.poll()})")
        time.sleep(0.1)


@contextmanager
def _rendezvous(server: PublicHost, directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = directory / "twistd.log"
    process = server.popen(
        [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", f"--logfile={log}",
            "natrendezvous",
            "--stun-interface", RENDEZVOUS_ADDRESS,
            "--listen", f"tcp:{RENDEZVOUS_PORT}:interface={RENDEZVOUS_ADDRESS}",
        ],
        env=repo_environment(),
        cwd=str(directory),
    )  # fmt: skip
    try:
        _wait_for_tcp(server, RENDEZVOUS_ADDRESS, RENDEZVOUS_PORT, process)
        yield process
    finally:
        stop(process)


@contextmanager
def _listener(
    callee: Node, directory: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``natcat --listen alice --echo`` on *callee*, once it is registered."""
    report = directory / "callee.err"
    with report.open("wb") as sink:
        process = callee.popen(
            _natcat(
                "--listen", "alice", "--rendezvous", RENDEZVOUS, "--echo", "--json-report",
                "--identity", str(directory / "alice.key"), *extra,
            ),
            stderr=sink,
            env=repo_environment(),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "listening as alice" not in report.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"natcat --listen did not register (status {process.poll()}):\n"
                    + report.read_text(errors="replace")
                )
            time.sleep(0.05)
        yield process, report
    finally:
        stop(process)


def _reports(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _echo_through(
    lab: Lab, caller: Node, callee: Node, tmp_path: Path, *listen: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    Send 1 MiB from *caller* to *callee*'s echo and back; return both sides'
    JSON reports (caller's, callee's) after checking the bytes.
    """
    payload = os.urandom(PAYLOAD_SIZE)
    source = tmp_path / "payload"
    source.write_bytes(payload)
    server = lab.nodes["rendezvous"]
    assert isinstance(server, PublicHost)
    with _rendezvous(server, tmp_path), _listener(callee, tmp_path, *listen) as (_, callee_report):
        with source.open("rb") as stdin:
            process = caller.popen(
                _natcat("alice", "--rendezvous", RENDEZVOUS, "--json-report", "--quit-after", "3"),
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=repo_environment(),
            )
            try:
                out, err = process.communicate(timeout=TRANSFER_TIMEOUT)
            finally:
                stop(process)
        detail = f"caller stderr:\n{err.decode(errors='replace')}\ncallee stderr:\n" + (
            callee_report.read_text(errors="replace")
        )
        assert process.returncode == 0, detail
        assert len(out) == len(payload), detail
        assert out == payload, detail
        callee_text = callee_report.read_text(errors="replace")
        caller_reports = _reports(err.decode(errors="replace"))
        callee_reports = _reports(callee_text)
    assert len(caller_reports) == 1, detail
    assert len(callee_reports) == 1, detail
    callee_id = re.search(r"peer id (nt1[a-z2-7]+)", callee_text)
    assert callee_id is not None, detail
    # Each side names the other: the caller the callee's pinned id, the
    # callee the caller's (ephemeral) one.
    assert caller_reports[0]["peer"] == callee_id.group(1), detail
    assert callee_reports[0]["peer"].startswith("nt1"), detail
    assert callee_reports[0]["peer"] != callee_id.group(1), detail
    return caller_reports[0], callee_reports[0]


def test_direct_to_a_public_callee(lab: Lab, tmp_path: Path) -> None:
    """A caller behind a NAT reaches a public callee directly, and 1 MiB echoes intact."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    callee = lab.public_host("callee")
    nat = lab.nat("nat", Preset.PORT_RESTRICTED)
    caller = lab.host("caller", behind=nat)
    mine, theirs = _echo_through(lab, caller, callee, tmp_path)
    assert mine["method"] == "direct"
    assert theirs["method"] == "direct"
    assert mine["remote"].startswith(callee.public_address + ":")
    assert mine["connect_ms"] > 0


def test_reversal_to_a_callee_behind_a_nat(lab: Lab, tmp_path: Path) -> None:
    """A public caller reaches a callee behind a NAT by connection reversal."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    nat = lab.nat("nat", Preset.PORT_RESTRICTED)
    callee = lab.host("callee", behind=nat)
    caller = lab.public_host("caller")
    mine, theirs = _echo_through(lab, caller, callee, tmp_path)
    assert mine["method"] == "reversal"
    assert theirs["method"] == "reversal"


def test_relay_between_two_port_restricted_nats(lab: Lab, tmp_path: Path) -> None:
    """Two peers behind port-restricted NATs meet in the relay."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    callee_nat = lab.nat("nata", Preset.PORT_RESTRICTED)
    caller_nat = lab.nat("natb", Preset.PORT_RESTRICTED)
    callee = lab.host("callee", behind=callee_nat)
    caller = lab.host("caller", behind=caller_nat)
    mine, theirs = _echo_through(lab, caller, callee, tmp_path)
    assert mine["method"] == "relay"
    assert theirs["method"] == "relay"
    assert mine["remote"] == f"{RENDEZVOUS_ADDRESS}:{RENDEZVOUS_PORT}"


def test_abuse_is_refused_and_everyone_else_is_served(lab: Lab, tmp_path: Path) -> None:
    """
    A peer behind a NAT that asks for unknown peers, steals a name, asks for
    a relay without an introduction, asks to be called back at its private
    address and sends garbage gets a clear refusal for each; a well-behaved
    caller is served right after.
    """
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    callee = lab.public_host("callee")
    nat = lab.nat("nat", Preset.PORT_RESTRICTED)
    mallory = lab.host("mallory", behind=nat)
    caller = lab.public_host("caller")
    server = lab.nodes["rendezvous"]
    assert isinstance(server, PublicHost)
    with _rendezvous(server, tmp_path), _listener(callee, tmp_path):
        abuse = mallory.run(
            [
                sys.executable, "-m", "tests.lab.rendezvous_abuse_client",
                RENDEZVOUS_ADDRESS, str(RENDEZVOUS_PORT), "alice", mallory.address,
            ],
            env=repo_environment(),
            timeout=TRANSFER_TIMEOUT,
            check=False,
        )  # fmt: skip
        assert abuse.returncode == 0, abuse.stderr
        outcome = json.loads(abuse.stdout.strip().splitlines()[-1])
        assert outcome == {
            "unknown_peer": "PeerNotFound",
            "stolen_name": "NameTaken",
            "relay_without_introduction": "RelayRefused",
            "introduced": "accepted",
            "reversal_elsewhere": "ReversalRefused",
            "garbage": "closed",
        }
        served = caller.run(
            _natcat("alice", "--rendezvous", RENDEZVOUS, "--quit-after", "1"),
            input="still served\n",
            env=repo_environment(),
            timeout=TRANSFER_TIMEOUT,
            check=False,
        )
        assert served.returncode == 0, served.stderr
        assert served.stdout == "still served\n"


#: A TCP echo server: what an unrelated host at the callee's private
#: address might run.  It prints a line for each connection it accepts.
_ECHO_SERVER = """
import socket, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen()
def echo(connection):
    with connection:
        for data in iter(lambda: connection.recv(65536), b""):
            connection.sendall(data)
while True:
    connection, peer = server.accept()
    print("accepted", peer[0], flush=True)
    threading.Thread(target=echo, args=(connection,), daemon=True).start()
"""


def test_a_private_address_that_reaches_another_host_is_rejected(lab: Lab, tmp_path: Path) -> None:
    """
    The callee's private address, seen from the caller's own LAN, is an
    unrelated host (same prefix behind both NATs) that echoes everything
    back: the caller reaches it, the path fails authentication and is
    dropped, and the relay carries the connection.
    """
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    callee_nat = lab.nat("nata", Preset.PORT_RESTRICTED, lan="10.77.0.0/24")
    caller_nat = lab.nat("natb", Preset.PORT_RESTRICTED, lan="10.77.0.0/24")
    callee = lab.host("callee", behind=callee_nat, address="10.77.0.20")
    decoy = lab.host("decoy", behind=caller_nat, address="10.77.0.20")
    caller = lab.host("caller", behind=caller_nat, address="10.77.0.30")
    decoy_log = tmp_path / "decoy.out"
    with decoy_log.open("wb") as sink:
        decoy.popen([sys.executable, "-c", _ECHO_SERVER, "7000"], stdout=sink)
    mine, theirs = _echo_through(lab, caller, callee, tmp_path, "--port", "7000")
    assert mine["method"] == "relay"
    assert theirs["method"] == "relay"
    # The caller did try the private address, and reached the decoy.
    assert "accepted 10.77.0.30" in decoy_log.read_text()
