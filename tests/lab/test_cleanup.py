"""
A lab leaves nothing behind: its namespaces and processes are gone after
its ``with`` block however it ends (normally, by an exception, by SIGTERM
or SIGINT); after SIGKILL the sweeper removes them, and only them.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.natlab import Lab, LabError, Preset, sweep_stale_labs
from tests.natlab._netns import namespace_pids

REPO_ROOT = Path(__file__).resolve().parents[2]

#: A lab in a child process: prints its prefix once built, then waits.
_CHILD = """
import signal
import time
from tests.natlab import Lab
# A shell's background job starts with SIGINT ignored: take it back.
signal.signal(signal.SIGINT, signal.default_int_handler)
with Lab() as lab:
    nat = lab.nat("nat", "port-restricted")
    host = lab.host("a", behind=nat)
    host.popen(["sleep", "300"])
    print(lab.prefix, flush=True)
    time.sleep(300)
"""


def ip_netns_list() -> list[str]:
    """The namespace names ``ip netns list`` shows."""
    output = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def with_prefix(prefix: str) -> list[str]:
    """The namespaces ``ip netns list`` shows with *prefix*."""
    return [name for name in ip_netns_list() if name.startswith(prefix + "-")]


def build_small(lab: Lab) -> None:
    nat = lab.nat("nat", Preset.PORT_RESTRICTED)
    lab.host("a", behind=nat)
    lab.build()


@pytest.mark.lab
def test_exit_removes_namespaces(require_lab: None) -> None:
    """After a lab's ``with`` block, no namespace carries its prefix."""
    with Lab() as lab:
        build_small(lab)
        assert len(with_prefix(lab.prefix)) == 3
    assert with_prefix(lab.prefix) == []


@pytest.mark.lab
def test_exception_removes_namespaces(require_lab: None) -> None:
    """A lab left by an exception is removed too."""
    prefixes = []

    def fail() -> None:
        with Lab() as lab:
            prefixes.append(lab.prefix)
            build_small(lab)
            raise RuntimeError("test failure")

    with pytest.raises(RuntimeError, match="test failure"):
        fail()
    assert with_prefix(prefixes[0]) == []


@pytest.mark.lab
def test_close_stops_processes(require_lab: None) -> None:
    """Closing a lab ends the processes it started and those that escaped it."""
    with Lab() as lab:
        build_small(lab)
        host = lab.nodes["a"]
        started = host.popen(["sleep", "300"])
        escaped = int(host.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"]).stdout)
        assert set(namespace_pids([host.namespace])) == {started.pid, escaped}
    assert started.poll() is not None
    assert not _running(escaped)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _start_child() -> tuple[subprocess.Popen[str], str]:
    """Start :data:`_CHILD`; return it and its lab's prefix once built."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], 20)
    if not ready:
        child.kill()
        child.wait(10)
        pytest.fail("the child lab did not build within 20 s")
    prefix = child.stdout.readline().strip()
    if not prefix:
        child.wait(10)
        pytest.fail(f"the child lab failed: {child.stderr.read() if child.stderr else ''}")
    return child, prefix


@pytest.mark.lab
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_removes_namespaces(require_lab: None, signum: signal.Signals) -> None:
    """A process whose lab is interrupted by SIGTERM or SIGINT removes it before exiting."""
    child, prefix = _start_child()
    try:
        assert len(with_prefix(prefix)) == 3
        child.send_signal(signum)
        child.wait(20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
            sweep_stale_labs(max_age=0)
    assert with_prefix(prefix) == []


@pytest.mark.lab
def test_sweeper_removes_dead_owners_only(require_lab: None) -> None:
    """The sweeper removes a SIGKILLed run's lab once old enough, never a live lab's."""
    child, prefix = _start_child()
    child.kill()
    child.wait(10)
    try:
        with Lab() as live:
            build_small(live)
            assert len(with_prefix(prefix)) == 3
            report = sweep_stale_labs(max_age=3600)
            assert set(with_prefix(prefix)) <= set(report.young)
            assert len(with_prefix(prefix)) == 3
            report = sweep_stale_labs(max_age=0)
            assert set(report.removed) >= {f"{prefix}-nat", f"{prefix}-a", f"{prefix}-internet"}
            assert set(with_prefix(live.prefix)) <= set(report.live)
            assert len(with_prefix(live.prefix)) == 3
            assert with_prefix(prefix) == []
    finally:
        # Whatever happened above, leave nothing of the killed child behind.
        sweep_stale_labs(max_age=0)


@pytest.mark.lab
def test_public_side_uses_documentation_prefixes() -> None:
    """Public addresses outside RFC 5737 and public LAN prefixes are refused."""
    with Lab() as lab:
        with pytest.raises(LabError, match="not on the internet"):
            lab.public_host("server", ["8.8.8.8"])
        with pytest.raises(LabError, match="not on the internet"):
            lab.nat("nat", wan_address="10.0.0.1")
        with pytest.raises(LabError, match="not private"):
            lab.nat("nat2", lan="198.51.100.0/24")
        assert lab.namespaces == []
