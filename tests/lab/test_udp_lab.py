"""
UDP hole punching (the ``udp`` method of ``punch:``) behind real kernel NATs,
driven through ``natcat`` (issue 5, "Tests in the real lab").

Each test builds a lab with our ``twistd natrendezvous`` on a public host,
a callee (``natcat --listen alice``) and a caller (``natcat alice``), and
checks what the caller's and the callee's ``--json-report`` say:

- the 5x5 matrix of the callee's NAT x the caller's NAT with ``--methods
  udp`` on both sides: the 17 pairs plain punching serves, the 3 port
  prediction serves and the 2 birthday-paradox probing serves (port-restricted
  with random symmetric, in either role) connect by UDP and echo 1 MiB
  intact; the other 3 (random symmetric with a symmetric kind) fail within
  the punching budget with a clear error, and nothing reaches the callee's
  application;
- port-restricted with random symmetric, 20 connections in a row in each
  role: birthday-paradox probing's success rate and time to connect;
- the same 25 pairs with every method: all connect, the 17 by hole punching
  (UDP or TCP, whichever wins the race), the 8 through the relay;
- both peers behind one NAT, with and without hairpin: the private pair wins;
  two levels of NAT whose outer NAT hairpins: the hairpin pair wins;
- 20% loss each way on every link of the lab (59% between the peers): still connects, data intact;
- a wrong host at the callee's private address on the caller's LAN,
  answering every datagram: it never gets an application byte.

Test ids of the matrix name the callee's NAT first: ``full-cone-vs-symmetric``
is a callee behind a full-cone NAT called from behind a symmetric one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nattraverse.punch import CheckConfig
from tests.lab.natcheck_support import repo_environment, running, stop
from tests.lab.punch_support import (
    RENDEZVOUS_ADDRESS,
    RENDEZVOUS_PORT,
    STARTUP_TIMEOUT,
    Refused,
    echo_through,
    host_of,
    listener,
    natcat_argv,
    refused_through,
    rendezvous,
    reports,
)
from tests.natlab import Host, Lab, Preset, PublicHost
from tests.natlab._netns import program

pytestmark = [pytest.mark.lab, pytest.mark.slow]

#: natcat's arguments that restrict a side to UDP hole punching.
UDP_ONLY = ("--methods", "udp")

#: The NATs of the matrix.
NATS = (
    Preset.FULL_CONE,
    Preset.RESTRICTED_CONE,
    Preset.PORT_RESTRICTED,
    Preset.SYMMETRIC,
    Preset.SYMMETRIC_SEQUENTIAL,
)
SYMMETRIC_KINDS = frozenset({Preset.SYMMETRIC, Preset.SYMMETRIC_SEQUENTIAL})


def punching_serves(callee: Preset, caller: Preset) -> bool:
    """
    Whether plain hole punching (no port prediction) can connect peers
    behind these NATs: not when both map per destination, nor when one maps
    per destination and the other filters by port (the port-restricted NAT
    drops the symmetric side's checks, which come from ports it never sent
    to).
    """
    kinds = {callee, caller}
    if kinds <= SYMMETRIC_KINDS:
        return False
    return not (Preset.PORT_RESTRICTED in kinds and kinds & SYMMETRIC_KINDS)


def prediction_serves(callee: Preset, caller: Preset) -> bool:
    """
    Whether port prediction connects a pair plain punching cannot: a
    sequential NAT with a port-restricted one or with another sequential
    one (nattraverse.punch.mapping); never a random symmetric NAT.
    """
    return not punching_serves(callee, caller) and Preset.SYMMETRIC not in {callee, caller}


def birthday_serves(callee: Preset, caller: Preset) -> bool:
    """
    Whether birthday-paradox probing connects a pair neither plain punching
    nor prediction can: a random symmetric NAT with one that maps
    independently but filters by port (nattraverse.punch.birthday).
    """
    return {callee, caller} == {Preset.PORT_RESTRICTED, Preset.SYMMETRIC}


def udp_serves(callee: Preset, caller: Preset) -> bool:
    """Whether the udp method connects the pair: plain punching, prediction or birthday probing."""
    return (
        punching_serves(callee, caller)
        or prediction_serves(callee, caller)
        or birthday_serves(callee, caller)
    )


PAIRS = [(callee, caller) for callee in NATS for caller in NATS]
SERVED = [pair for pair in PAIRS if udp_serves(*pair)]
NOT_SERVED = [pair for pair in PAIRS if not udp_serves(*pair)]
PREDICTED = [pair for pair in PAIRS if prediction_serves(*pair)]
BIRTHDAY = [pair for pair in PAIRS if birthday_serves(*pair)]
assert (len(SERVED), len(NOT_SERVED), len(PREDICTED), len(BIRTHDAY)) == (22, 3, 3, 2)
assert sum(punching_serves(*pair) for pair in PAIRS) == 17


def _pair_id(pair: tuple[Preset, Preset]) -> str:
    return f"{pair[0].value}-vs-{pair[1].value}"


#: Seconds a failing caller may take beyond the checks' overall deadline:
#: interpreter start, the rendezvous session and the introduction.
PUNCH_SLACK = 8.0
#: Seconds from the caller's start to its failure, at most.
PUNCH_BUDGET = CheckConfig().deadline + PUNCH_SLACK


def _two_nats(lab: Lab, callee_nat: Preset, caller_nat: Preset) -> tuple[Host, Host]:
    """The rendezvous, and a callee and a caller each behind a NAT of its own."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    callee = lab.host("callee", behind=lab.nat("nata", callee_nat))
    caller = lab.host("caller", behind=lab.nat("natb", caller_nat))
    return callee, caller


def _assert_clean_punching_failure(refused: Refused) -> None:
    """The caller failed for the right reason, saying so, within the budget."""
    assert refused.returncode == 1, refused.detail
    # No connection, so the JSON line says why: the race, with the method's failure.
    assert refused.report is not None, refused.detail
    assert refused.report["method"] is None, refused.detail
    (attempt,) = refused.report["race"]["attempts"]
    assert (attempt["method"], attempt["outcome"]) == ("udp", "failed"), refused.detail
    assert "UDP hole punching" in refused.error, refused.detail
    assert "fail" in refused.error.lower(), refused.detail
    assert refused.seconds < PUNCH_BUDGET, refused.detail


# -- the matrix -------------------------------------------------------------------


@pytest.mark.parametrize(("callee_nat", "caller_nat"), SERVED, ids=[_pair_id(p) for p in SERVED])
def test_udp_connects_where_punching_can(
    lab: Lab, tmp_path: Path, callee_nat: Preset, caller_nat: Preset
) -> None:
    """With --methods udp, the pair connects by UDP through the callee's NAT and echoes 1 MiB."""
    callee, caller = _two_nats(lab, callee_nat, caller_nat)
    mine, theirs = echo_through(
        lab, caller, callee, tmp_path, caller_args=UDP_ONLY, callee_args=UDP_ONLY
    )
    assert mine["method"] == "udp"
    assert theirs["method"] == "udp"
    assert host_of(mine["remote"]) == callee.public_address
    assert host_of(theirs["remote"]) == caller.public_address
    assert mine["connect_ms"] > 0


@pytest.mark.parametrize(
    ("callee_nat", "caller_nat"), NOT_SERVED, ids=[_pair_id(p) for p in NOT_SERVED]
)
def test_udp_fails_cleanly_where_punching_cannot(
    lab: Lab, tmp_path: Path, callee_nat: Preset, caller_nat: Preset
) -> None:
    """With --methods udp, the caller fails within the budget, naming punching and the NAT."""
    callee, caller = _two_nats(lab, callee_nat, caller_nat)
    refused = refused_through(
        lab, caller, callee, tmp_path, caller_args=UDP_ONLY, callee_args=UDP_ONLY
    )
    _assert_clean_punching_failure(refused)
    # Every one of these pairs has a NAT that maps per destination.
    assert "symmetric" in refused.error, refused.detail


@pytest.mark.parametrize(("callee_nat", "caller_nat"), PAIRS, ids=[_pair_id(p) for p in PAIRS])
def test_every_pair_connects_with_all_methods(
    lab: Lab, tmp_path: Path, callee_nat: Preset, caller_nat: Preset
) -> None:
    """
    With every method, each pair connects and echoes 1 MiB: by UDP where
    punching or port prediction works (the relays start 0.5 s late), by UDP
    (first through the rendezvous' UDP relay, then on the birthday path)
    where birthday probing does, through the UDP relay where none can.
    """
    callee, caller = _two_nats(lab, callee_nat, caller_nat)
    mine, theirs = echo_through(lab, caller, callee, tmp_path)
    assert theirs["method"] == mine["method"]
    if prediction_serves(callee_nat, caller_nat):
        # Port prediction: the predicted checks go out first, before the
        # TCP methods take ports of the sequential NATs, and well within
        # the relay's stagger.  With a port-restricted side, TCP port
        # prediction serves the pair too, and often wins (test_tcp_lab);
        # between two sequential NATs only UDP predicts.
        one_independent = Preset.PORT_RESTRICTED in {callee_nat, caller_nat}
        assert mine["method"] in ({"udp", "tcp"} if one_independent else {"udp"}), mine["race"]
        assert mine["relayed"] is False, mine["race"]
    elif birthday_serves(callee_nat, caller_nat):
        # Birthday probing starts 0.5 s after the checks and takes a second
        # or more: the udp method's relayed leg, 0.5 s behind, often
        # connects first, and the connection moves to the birthday path
        # (test_a_relayed_connection_moves_to_a_direct_path_during_a_transfer).
        assert mine["method"] == "udp", mine["race"]
    elif punching_serves(callee_nat, caller_nat):
        # UDP or TCP hole punching usually wins (the relay starts after its
        # 0.5 s stagger), but a first check lost or a busy CI machine can let
        # the relay, or reversal behind a full-cone caller, finish first: the
        # race takes whichever path authenticates first.  That udp and tcp
        # each connect these pairs is test_udp_connects_where_punching_can's
        # and test_tcp_lab's.
        assert mine["method"] in {"udp", "tcp", "reversal", "relay"}
    else:
        # Direct TCP cannot reach a callee behind a NAT, reversal needs a
        # caller that listens, TCP punching fails where UDP punching does,
        # and random ports cannot be predicted: only a relay remains, the
        # udp method's leg through the rendezvous' UDP relay first.
        assert mine["method"] == "udp"
        assert mine["relayed"] is True
        assert mine["remote"].startswith(f"{RENDEZVOUS_ADDRESS}:")
        # The caller's report says so, and why.
        race = mine["race"]
        assert race["relayed"] is True, race
        assert race["why_relayed"], race
        # Both NATs map per destination, one at random ports: the report
        # says so, and the relayed leg started at once, without the stagger:
        # connected within 1 s of the introduction.
        assert "no direct UDP path can be predicted" in race["why_relayed"], race
        assert "random ports" in race["nats"], race
        assert race["connected_ms"] < 1000, race
        outcomes = {attempt["method"]: attempt["outcome"] for attempt in race["attempts"]}
        assert outcomes["udp"] == "won", race
        assert outcomes["relay"] in {"not started", "cancelled"}, race
    assert mine["race"]["method"] == mine["method"]
    assert "race" not in theirs  # the listening side raced nothing


#: What the rendezvous' relays may carry in this test, per direction: 1 MiB
#: through them takes 4 s, so the move to the direct path comes mid-transfer.
UPGRADE_RELAY_RATE = "256K"


def test_a_relayed_connection_moves_to_a_direct_path_during_a_transfer(
    lab: Lab, tmp_path: Path
) -> None:
    """
    A port-restricted caller and a random symmetric callee, every method:
    the connection is made through the rendezvous' UDP relay (birthday
    probing takes longer), moves to the direct path birthday probing finds
    while 1 MiB is echoed, and every byte comes back.
    """
    callee, caller = _two_nats(lab, Preset.SYMMETRIC, Preset.PORT_RESTRICTED)
    moved: list[dict[str, Any]] = []
    mine, theirs = echo_through(
        lab,
        caller,
        callee,
        tmp_path,
        rendezvous_args=("--relay-rate", UPGRADE_RELAY_RATE),
        payload_size=1024 * 1024,
        moved=moved,
    )
    race = mine["race"]
    assert mine["method"] == "udp", race
    assert mine["relayed"] is True, race
    assert mine["remote"].startswith(f"{RENDEZVOUS_ADDRESS}:"), mine
    assert "UDP relay connected first" in race["why_relayed"], race
    assert theirs["relayed"] is True, theirs
    [after] = [line for line in moved if line["peer"] == mine["peer"]]
    assert after["relayed"] is False, after
    assert not after["remote"].startswith(f"{RENDEZVOUS_ADDRESS}:"), after
    [upgrade] = after["race"]["upgrades"]
    assert upgrade["from"] == "udp (relayed)", upgrade
    assert upgrade["to"] == "udp", upgrade
    # Through the capped relay the echo alone would take 4 s and more.
    assert upgrade["at_ms"] < 4000, upgrade
    print(
        f"relayed at {race['connected_ms']:.0f} ms, moved to {after['remote']} "
        f"at {upgrade['at_ms']:.0f} ms after the introduction"
    )


# -- one NAT, two levels of NAT -----------------------------------------------------


@pytest.mark.parametrize("hairpin", [False, True], ids=["no-hairpin", "hairpin"])
def test_peers_behind_one_nat_use_their_private_addresses(
    lab: Lab, tmp_path: Path, hairpin: bool
) -> None:
    """Two peers behind one NAT connect by UDP between their private (LAN) addresses."""
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    nat = lab.nat("nat", Preset.PORT_RESTRICTED, hairpin=hairpin)
    callee = lab.host("callee", behind=nat)
    caller = lab.host("caller", behind=nat)
    mine, theirs = echo_through(
        lab, caller, callee, tmp_path, caller_args=UDP_ONLY, callee_args=UDP_ONLY
    )
    assert mine["method"] == "udp"
    assert theirs["method"] == "udp"
    assert host_of(mine["remote"]) == callee.address
    assert host_of(theirs["remote"]) == caller.address


def test_peers_behind_two_levels_of_nat_meet_through_the_outer_hairpin(
    lab: Lab, tmp_path: Path
) -> None:
    """
    Each peer behind its own home NAT, both homes behind one carrier-grade
    NAT that hairpins: they connect by UDP through the outer NAT's public
    address.
    """
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    outer = lab.nat("cgn", Preset.PORT_RESTRICTED, lan="100.64.0.0/24", hairpin=True)
    callee = lab.host("callee", behind=lab.nat("homea", Preset.PORT_RESTRICTED, wan=outer))
    caller = lab.host("caller", behind=lab.nat("homeb", Preset.PORT_RESTRICTED, wan=outer))
    mine, theirs = echo_through(
        lab, caller, callee, tmp_path, caller_args=UDP_ONLY, callee_args=UDP_ONLY
    )
    assert mine["method"] == "udp"
    assert theirs["method"] == "udp"
    assert host_of(mine["remote"]) == outer.public_address
    assert host_of(theirs["remote"]) == outer.public_address


# -- loss ---------------------------------------------------------------------------


#: Bytes echoed through the lossy links.
LOSSY_PAYLOAD_SIZE = 32 * 1024
#: Loss on each link, each way.
LINK_LOSS = 0.2
#: Both sides' natcat arguments at that loss.
LOSSY_ARGS = (*UDP_ONLY, "--timeout", "300", "--punch-timeout", "60")
#: The rendezvous' arguments at that loss: at 49% of the segments lost each
#: way, the handshake's few round trips can take longer than the default
#: 10 s, and the server would drop the connection that is still saying Hello
#: (an operator on such a network raises it the same way).
LOSSY_RENDEZVOUS_ARGS = ("--handshake-timeout", "90")


#: Why the lossy test is an expected failure for now (not a pass when it fails).
LOSSY_STALL = (
    "known defect: at 49% loss per round trip the TCP connection to the rendezvous can deliver "
    "the introduction tens of seconds late, after the caller's checks spent their budget "
    "(1 of 10 runs); see docs/status.rst"
)


@pytest.mark.xfail(reason=LOSSY_STALL, strict=False)
def test_udp_connects_through_loss_on_every_link(lab: Lab, tmp_path: Path) -> None:
    """
    With 20% loss each way on every link of the lab (the rendezvous', both
    NATs' WAN links and both hosts' LAN links: 59% of the datagrams lost
    each way between the peers, 49% of the segments to the rendezvous),
    cone NATs still connect by UDP and the data echoes intact.
    """
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS, loss=LINK_LOSS)
    nata = lab.nat("nata", Preset.PORT_RESTRICTED, loss=LINK_LOSS)
    natb = lab.nat("natb", Preset.RESTRICTED_CONE, loss=LINK_LOSS)
    callee = lab.host("callee", behind=nata, loss=LINK_LOSS)
    caller = lab.host("caller", behind=natb, loss=LINK_LOSS)
    mine, theirs = echo_through(
        lab,
        caller,
        callee,
        tmp_path,
        # TCP to the rendezvous alone may take minutes of SYN and segment
        # retransmissions: at 49% loss each way a round trip succeeds 1 time
        # in 4, and after six linear (thin-stream) timeouts each retry waits
        # twice as long.  A CI run saw one registration still waiting at
        # 150 s, so both sides get 300 s for it; and at 17% of the round
        # trips answered, the checks get 60 s.
        caller_args=LOSSY_ARGS,
        callee_args=LOSSY_ARGS,
        rendezvous_args=LOSSY_RENDEZVOUS_ARGS,
        payload_size=LOSSY_PAYLOAD_SIZE,
        # The longest pause of the echo: QUIC's probe timeout backs off
        # exponentially, and at 83% of the round trips lost a few probes
        # lost in a row stop it for tens of seconds.
        quit_after=90.0,
        startup_timeout=300.0,
        timeout=600.0,
    )
    assert mine["method"] == "udp"
    assert theirs["method"] == "udp"


# -- a wrong host at the callee's private address ------------------------------------

#: The port every UDP datagram to the impostor is redirected to.
IMPOSTOR_PORT = 9999

#: An unrelated host's UDP service on every port (nftables redirects them all
#: to one socket; replies leave from the port the datagram was sent to).  It
#: prints one JSON line per datagram received, and answers it: ``echo`` sends
#: it back, ``stun`` answers a Binding request as a plain STUN server would
#: (a success with XOR-MAPPED-ADDRESS, no MESSAGE-INTEGRITY).
_IMPOSTOR = """
import json, socket, struct, sys
COOKIE = b"\\x21\\x12\\xa4\\x42"
mode = sys.argv[2]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = sock.recvfrom(65536)
    stun = len(data) >= 20 and data[0] & 0xC0 == 0 and data[4:8] == COOKIE
    print(json.dumps({"from": peer[0], "length": len(data), "stun": stun,
                      "head": data[:8].hex()}), flush=True)
    if mode == "echo":
        sock.sendto(data, peer)
    elif stun and data[:2] == b"\\x00\\x01":
        address = bytes(a ^ b for a, b in zip(socket.inet_aton(peer[0]), COOKIE))
        mapped = struct.pack("!HHBBH", 0x0020, 8, 0, 1, peer[1] ^ 0x2112) + address
        sock.sendto(struct.pack("!HH", 0x0101, len(mapped)) + data[4:20] + mapped, peer)
"""


@contextmanager
def _impostor(host: Host, mode: str, directory: Path) -> Iterator[Path]:
    """
    The impostor on *host*, catching UDP to every port of its address, while
    the block runs; yields the file it logs each datagram to.
    """
    ruleset = (
        "table ip impostor {\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        f"        ip daddr {host.address} udp dport != {IMPOSTOR_PORT} "
        f"redirect to :{IMPOSTOR_PORT}\n"
        "    }\n"
        "}\n"
    )
    host.run([program("nft"), "-f", "-"], input=ruleset)
    log = directory / "impostor.out"
    with log.open("wb") as sink:
        process = host.popen(
            [sys.executable, "-c", _IMPOSTOR, str(IMPOSTOR_PORT), mode], stdout=sink
        )
    with running(process):
        _wait_for_impostor(host, process)
        yield log


def _wait_for_impostor(host: Host, process: subprocess.Popen[bytes]) -> None:
    """Wait until the impostor answers a Binding request on the loopback (not logged)."""
    probe = host.udp_socket(0, "127.0.0.1")
    probe.settimeout(0.2)
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        probe.sendto(request, ("127.0.0.1", IMPOSTOR_PORT))
        try:
            probe.recv(2048)
            return
        except (TimeoutError, ConnectionRefusedError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the impostor did not start (status {process.poll()})"
                ) from None


def _received(log: Path) -> list[dict[str, Any]]:
    """What the impostor received, besides the readiness probes."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [d for d in lines if d["from"] != "127.0.0.1"]


def _wrong_host_lab(
    lab: Lab, callee_nat: Preset, caller_nat: Preset = Preset.PORT_RESTRICTED
) -> tuple[Host, Host, Host]:
    """
    A callee behind *callee_nat* at 10.77.0.20, and a caller behind a
    *caller_nat* (port-restricted by default) whose LAN (the same prefix) has an unrelated host,
    the impostor, at 10.77.0.20: the callee's private address, seen from
    the caller.  Returns the callee, the caller and the impostor.
    """
    lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
    callee_side = lab.nat("nata", callee_nat, lan="10.77.0.0/24")
    caller_side = lab.nat("natb", caller_nat, lan="10.77.0.0/24")
    callee = lab.host("callee", behind=callee_side, address="10.77.0.20")
    impostor = lab.host("impostor", behind=caller_side, address="10.77.0.20")
    caller = lab.host("caller", behind=caller_side, address="10.77.0.30")
    return callee, caller, impostor


@pytest.mark.parametrize("mode", ["echo", "stun"])
def test_a_wrong_host_at_the_private_address_gets_no_application_byte(
    lab: Lab, tmp_path: Path, mode: str
) -> None:
    """
    The callee is behind a random symmetric NAT and the caller behind a
    sequential one (no punching, prediction or birthday probing serves that
    pair), so the private pair, which reaches an unrelated host answering
    UDP, is the only one that answers at all: its answers fail
    authentication, the caller fails cleanly, and the impostor saw nothing
    but connectivity checks.
    """
    callee, caller, impostor = _wrong_host_lab(lab, Preset.SYMMETRIC, Preset.SYMMETRIC_SEQUENTIAL)
    with _impostor(impostor, mode, tmp_path) as log:
        refused = refused_through(
            lab, caller, callee, tmp_path, caller_args=UDP_ONLY, callee_args=UDP_ONLY
        )
    _assert_clean_punching_failure(refused)
    received = _received(log)
    # The caller did check the private pair, and reached the impostor...
    assert received, refused.detail
    assert {d["from"] for d in received} == {caller.address}, received
    # ... with checks only: no QUIC packet, no application byte.
    assert all(d["stun"] for d in received), received


def test_a_wrong_host_at_the_private_address_is_passed_over(lab: Lab, tmp_path: Path) -> None:
    """
    Between two port-restricted NATs the public pair works: the connection
    goes through the callee's NAT, never to the host at its private address,
    which gets nothing but connectivity checks.
    """
    callee, caller, impostor = _wrong_host_lab(lab, Preset.PORT_RESTRICTED)
    with _impostor(impostor, "echo", tmp_path) as log:
        mine, theirs = echo_through(
            lab, caller, callee, tmp_path, caller_args=UDP_ONLY, callee_args=UDP_ONLY
        )
    assert mine["method"] == "udp"
    assert theirs["method"] == "udp"
    assert host_of(mine["remote"]) == callee.public_address
    assert all(d["stun"] for d in _received(log)), _received(log)


# -- birthday-paradox probing, again and again ---------------------------------------

#: Connections in a row per role.
BIRTHDAY_ATTEMPTS = 20
#: Of those, how many must connect by UDP at least (the budget's own odds are 99.7 %).
BIRTHDAY_FLOOR = 17
#: Seconds one caller may take, at most: startup, the rendezvous, the probing, the echo.
BIRTHDAY_CALLER_TIMEOUT = 40.0


def _one_call(lab: Lab, caller: Host, directory: Path, attempt: int) -> tuple[bool, str, float]:
    """
    One ``natcat --methods udp`` caller echoing 64 KiB through the running
    callee: whether it connected by UDP with the bytes intact, why not, and
    its time to connect in seconds.
    """
    payload = os.urandom(64 * 1024)
    source = directory / f"payload-{attempt}"
    source.write_bytes(payload)
    argv = natcat_argv(
        "alice", "--rendezvous", f"tcp:{RENDEZVOUS_ADDRESS}:{RENDEZVOUS_PORT}", "--json-report",
        "--quit-after", "1", "--verbose", *UDP_ONLY,
    )  # fmt: skip
    with source.open("rb") as stdin:
        process = caller.popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=repo_environment(),
        )
    try:
        out, err = process.communicate(timeout=BIRTHDAY_CALLER_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(process)
        return False, "still running after the timeout", 0.0
    finally:
        stop(process)
    text = err.decode(errors="replace")
    (directory / f"caller-{attempt}.err").write_text(text)
    found = reports(text)
    if process.returncode != 0 or not found:
        errors = [line for line in text.splitlines() if line.startswith("natcat: ")]
        return False, f"exit {process.returncode}: {' '.join(errors)[-400:]}", 0.0
    report = found[0]
    if report["method"] != "udp" or out != payload:
        return False, f"method {report['method']}, {len(out)} bytes back", 0.0
    return True, "", report["connect_ms"] / 1000


@pytest.mark.parametrize("hard_calls", [True, False], ids=["symmetric-calls", "prc-calls"])
def test_birthday_probing_success_rate(lab: Lab, tmp_path: Path, hard_calls: bool) -> None:
    """
    A caller and a callee behind a port-restricted and a random symmetric
    NAT (either way round) connect by UDP in at least 17 of 20 attempts;
    the rate and the times to connect are printed.
    """
    hard_nat, easy_nat = Preset.SYMMETRIC, Preset.PORT_RESTRICTED
    callee_nat, caller_nat = (easy_nat, hard_nat) if hard_calls else (hard_nat, easy_nat)
    callee, caller = _two_nats(lab, callee_nat, caller_nat)
    server = lab.nodes["rendezvous"]
    assert isinstance(server, PublicHost)
    outcomes: list[tuple[bool, str, float]] = []
    started = time.monotonic()
    callee_text = ""
    with rendezvous(server, tmp_path):
        for attempt in range(BIRTHDAY_ATTEMPTS):
            # A new callee each time, on a new punching port: the port-restricted
            # NAT still lets in, for 30 s, the ports the last attempt probed
            # from the same port, which would make the next attempt easier.
            with listener(callee, tmp_path, *UDP_ONLY) as callee_side:
                outcomes.append(_one_call(lab, caller, tmp_path, attempt))
                callee_text = callee_side.text()
    times = sorted(seconds for ok, _, seconds in outcomes if ok)
    failures = [why for ok, why, _ in outcomes if not ok]
    summary = (
        f"birthday probing, {caller_nat.value} caller -> {callee_nat.value} callee: "
        f"{len(times)}/{len(outcomes)} connected by UDP in {time.monotonic() - started:.0f} s"
    )
    if times:
        summary += (
            f"; connect median {statistics.median(times):.2f} s, "
            f"min {times[0]:.2f} s, max {times[-1]:.2f} s"
        )
    print(summary)
    for why in failures:
        print(f"  failed: {why}")
    assert len(times) >= BIRTHDAY_FLOOR, f"{summary}\n{failures}\n{callee_text[-4000:]}"
