"""
Our STUN server (``twistd natrendezvous``, RFC 5780 with two addresses) on
a public host of the lab, and our STUN client behind a real NAT: the
client learns the NAT's WAN address, and CHANGE-REQUEST answers reach it
only through a NAT that does not filter them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nattraverse._types import Endpoint
from tests.natlab import Lab, Node, Preset, PublicHost

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("stun_client.py")
PRIMARY = Endpoint("192.0.2.10", 3478)
ALTERNATE = Endpoint("192.0.2.11", 3479)

#: Seconds twistd gets to start listening.
STARTUP_TIMEOUT = 20.0


def _environment() -> dict[str, str]:
    """Our package and twistd plugin from the repository, not an installed copy."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


@pytest.fixture
def rendezvous(server: PublicHost, tmp_path: Path) -> Endpoint:
    """``twistd natrendezvous`` on the server's two addresses; stopped with the lab."""
    log = tmp_path / "twistd.log"
    with (tmp_path / "output.txt").open("wb") as output:
        process = server.popen(
            [
                sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "--nodaemon", "--pidfile=", f"--logfile={log}",
                "natrendezvous",
                "--stun-interface", PRIMARY.host, "--stun-port", str(PRIMARY.port),
                "--alt-address", ALTERNATE.host, "--alt-port", str(ALTERNATE.port),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_environment(),
            cwd=str(tmp_path),
        )  # fmt: skip
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while "STUN server on" not in (log.read_text(errors="replace") if log.exists() else ""):
        if process.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(f"twistd natrendezvous did not start in the lab:\n{text}")
        time.sleep(0.05)
    return PRIMARY


def stun_query(host: Node, server: Endpoint, *, change: bool = False) -> dict[str, Any]:
    """Run tests/lab/stun_client.py in *host*'s namespace and return its JSON."""
    argv = [sys.executable, str(CLIENT), server.host, str(server.port)]
    if change:
        argv.append("--change")
    done = host.run(argv, timeout=60, env=_environment(), check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.lab
def test_mapped_address_is_nat_wan(lab: Lab, rendezvous: Endpoint) -> None:
    """Behind a NAT, our client's mapped address is the NAT's WAN address and kept port."""
    nat = lab.nat("nat", Preset.PORT_RESTRICTED)
    host = lab.host("a", behind=nat)
    result = stun_query(host, rendezvous)
    assert result["mapped"] == [nat.wan_address, result["local"][1]]
    assert result["other"] == list(ALTERNATE)


@pytest.mark.lab
@pytest.mark.parametrize(
    ("preset", "answered"),
    [(Preset.FULL_CONE, True), (Preset.RESTRICTED_CONE, False), (Preset.PORT_RESTRICTED, False)],
    ids=str,
)
def test_change_request_through_nat(
    lab: Lab, rendezvous: Endpoint, preset: Preset, answered: bool
) -> None:
    """An answer from the other address and port passes a full cone NAT only."""
    host = lab.host("a", behind=lab.nat("nat", preset))
    result = stun_query(host, rendezvous, change=True)
    assert result["changed"] == (list(ALTERNATE) if answered else None)
