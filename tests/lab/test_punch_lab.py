"""
``punch:`` endpoints behind real kernel NATs, driven through ``natcat``.

Each test builds a lab with our ``twistd natrendezvous`` on a public host,
a callee (``natcat --listen alice --echo``) and a caller (``natcat alice``
with 1 MiB of random bytes on stdin), the methods of issue 4 enabled
(direct, reversal, relay; hole punching has its own tests,
``tests/lab/test_udp_lab.py`` and ``tests/lab/test_tcp_lab.py``, since it
also reaches most of these peers), placed so that exactly one of them can
work:

- callee public, caller behind a NAT that blocks UDP: direct TCP to the callee;
- callee behind a NAT that blocks UDP, caller public: connection reversal;
- callee behind a symmetric NAT, caller behind a port-restricted one: the relay.

The bytes must come back intact, and both sides' ``--json-report`` must name
the method that can work.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.lab.natcheck_support import repo_environment
from tests.lab.punch_support import (
    RENDEZVOUS,
    RENDEZVOUS_ADDRESS,
    RENDEZVOUS_PORT,
    TRANSFER_TIMEOUT,
    echo_through,
    listener,
    natcat_argv,
    rendezvous,
)
from tests.natlab import Lab, Preset, PublicHost

pytestmark = [pytest.mark.lab, pytest.mark.slow]

#: Both sides' natcat arguments: the methods that do not punch.
NOT_PUNCHING = ("--methods", "direct,reversal,relay")


def test_direct_to_a_public_callee(lab: Lab, tmp_path: Path) -> None:
    """A caller behind a NAT reaches a public callee directly, and 1 MiB echoes intact."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    callee = lab.public_host("callee")
    nat = lab.nat("nat", Preset.UDP_BLOCKED)
    caller = lab.host("caller", behind=nat)
    mine, theirs = echo_through(
        lab, caller, callee, tmp_path, caller_args=NOT_PUNCHING, callee_args=NOT_PUNCHING
    )
    assert mine["method"] == "direct"
    assert theirs["method"] == "direct"
    assert mine["remote"].startswith(callee.public_address + ":")
    assert mine["connect_ms"] > 0


def test_reversal_to_a_callee_behind_a_nat(lab: Lab, tmp_path: Path) -> None:
    """A public caller reaches a callee behind a NAT by connection reversal."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    nat = lab.nat("nat", Preset.UDP_BLOCKED)
    callee = lab.host("callee", behind=nat)
    caller = lab.public_host("caller")
    mine, theirs = echo_through(
        lab, caller, callee, tmp_path, caller_args=NOT_PUNCHING, callee_args=NOT_PUNCHING
    )
    assert mine["method"] == "reversal"
    assert theirs["method"] == "reversal"


def test_relay_between_symmetric_and_port_restricted_nats(lab: Lab, tmp_path: Path) -> None:
    """Peers behind a symmetric and a port-restricted NAT (no punching there) meet in the relay."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    callee_nat = lab.nat("nata", Preset.SYMMETRIC)
    caller_nat = lab.nat("natb", Preset.PORT_RESTRICTED)
    callee = lab.host("callee", behind=callee_nat)
    caller = lab.host("caller", behind=caller_nat)
    mine, theirs = echo_through(
        lab, caller, callee, tmp_path, caller_args=NOT_PUNCHING, callee_args=NOT_PUNCHING
    )
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
    with rendezvous(server, tmp_path), listener(callee, tmp_path):
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
            natcat_argv("alice", "--rendezvous", RENDEZVOUS, "--quit-after", "1"),
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
    back over TCP: the caller reaches it, the path fails authentication and
    is dropped, and the relay carries the connection (both NATs block UDP).
    """
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    callee_nat = lab.nat("nata", Preset.UDP_BLOCKED, lan="10.77.0.0/24")
    caller_nat = lab.nat("natb", Preset.UDP_BLOCKED, lan="10.77.0.0/24")
    callee = lab.host("callee", behind=callee_nat, address="10.77.0.20")
    decoy = lab.host("decoy", behind=caller_nat, address="10.77.0.20")
    caller = lab.host("caller", behind=caller_nat, address="10.77.0.30")
    decoy_log = tmp_path / "decoy.out"
    with decoy_log.open("wb") as sink:
        decoy.popen([sys.executable, "-c", _ECHO_SERVER, "7000"], stdout=sink)
    mine, theirs = echo_through(
        lab,
        caller,
        callee,
        tmp_path,
        caller_args=NOT_PUNCHING,
        callee_args=("--port", "7000", *NOT_PUNCHING),
    )
    assert mine["method"] == "relay"
    assert theirs["method"] == "relay"
    # The caller did try the private address, and reached the decoy.
    assert "accepted 10.77.0.30" in decoy_log.read_text()
