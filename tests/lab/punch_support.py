"""
Helpers of the ``punch:`` lab tests (``tests/lab/test_punch_lab.py``,
``tests/lab/test_udp_lab.py``) and of ``benchmarks/time_to_connect``: our
``twistd natrendezvous`` on a public host, a callee (``natcat --listen
alice``) and a caller (``natcat alice``) in their namespaces.

- :func:`rendezvous` runs the rendezvous at :data:`RENDEZVOUS` on a public
  host named ``"rendezvous"`` (address :data:`RENDEZVOUS_ADDRESS`);
- :func:`listener` runs the callee until it is registered;
- :func:`echo_through` sends a payload from the caller through the callee's
  echo and back, checks it, and returns both sides' ``--json-report``;
- :func:`refused_through` expects the caller to fail: it returns the
  caller's exit status, error and report (a :class:`Refused`) after checking
  that nothing reached the callee's application.

Extra natcat arguments go to either side (``caller_args``, ``callee_args``,
e.g. ``("--methods", "udp")``); every wait has a timeout.  Every process is
started with :meth:`~tests.natlab.lab.Node.popen` (so the lab stops it when
it closes, at the latest) and stopped by its PID as soon as it is no longer
needed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab.natcheck_support import repo_environment, stop
from tests.natlab import Lab, Node, PublicHost

__all__ = [
    "CALLEE_NAME",
    "PAYLOAD_SIZE",
    "QUIT_AFTER",
    "RENDEZVOUS",
    "RENDEZVOUS_ADDRESS",
    "RENDEZVOUS_PORT",
    "STARTUP_TIMEOUT",
    "TRANSFER_TIMEOUT",
    "Listener",
    "Refused",
    "echo_through",
    "host_of",
    "listener",
    "natcat_argv",
    "refused_through",
    "rendezvous",
    "reports",
]

RENDEZVOUS_ADDRESS = "192.0.2.10"
RENDEZVOUS_PORT = 8478
RENDEZVOUS = f"tcp:{RENDEZVOUS_ADDRESS}:{RENDEZVOUS_PORT}"
#: The name the callee registers.
CALLEE_NAME = "alice"
PAYLOAD_SIZE = 1024 * 1024
#: Seconds a side may take, at most, to be ready.
STARTUP_TIMEOUT = 20.0
#: Seconds a caller may take, at most, to connect, echo and finish.
TRANSFER_TIMEOUT = 60.0
#: The caller's ``--quit-after``: once its input is sent, it closes after
#: this many seconds without data from the echo.
QUIT_AFTER = 3.0
#: What natcat --listen says once it is registered.
_ANNOUNCED = re.compile(r"listening as \S+ \(peer id (nt1[a-z2-7]+)\)")
#: How much of each log an assertion message quotes (its end).
_QUOTED = 6000


def natcat_argv(*arguments: str) -> list[str]:
    """``python -m nattraverse.natcat ARGUMENTS`` with this interpreter."""
    return [sys.executable, "-m", "nattraverse.natcat", *arguments]


def reports(text: str) -> list[dict[str, Any]]:
    """The ``--json-report`` objects in a natcat's standard error, one per connection."""
    return [line for line in _json_lines(text) if not line.get("moved")]


def moves(text: str) -> list[dict[str, Any]]:
    """The ``--json-report`` objects of connections that moved off the UDP relay."""
    return [line for line in _json_lines(text) if line.get("moved")]


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def host_of(remote: str) -> str:
    """The host part of a report's ``remote`` (``"10.1.0.10:4000"``, ``"[::1]:4000"``)."""
    host, _, _ = remote.rpartition(":")
    return host.removeprefix("[").removesuffix("]")


def _tail(text: str) -> str:
    return text if len(text) <= _QUOTED else "[...]\n" + text[-_QUOTED:]


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for_tcp(
    node: Node, host: str, port: int, process: subprocess.Popen[Any], timeout: float
) -> None:
    """Wait until *host*:*port* accepts TCP connections, seen from *node*."""

    def accepts() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while not node.call(accepts):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the rendezvous did not start (status {process.poll()})")
        time.sleep(0.1)


@contextmanager
def rendezvous(
    server: PublicHost,
    directory: Path,
    *args: str,
    timeout: float = STARTUP_TIMEOUT,
) -> Iterator[subprocess.Popen[bytes]]:
    """
    ``twistd natrendezvous`` on *server* (which has :data:`RENDEZVOUS_ADDRESS`),
    STUN and rendezvous on that address, logging to *directory*/twistd.log;
    yielded once it accepts connections, stopped afterwards.  *args* are
    further ``natrendezvous`` options.
    """
    log = directory / "twistd.log"
    process = server.popen(
        [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", f"--logfile={log}",
            "natrendezvous",
            "--stun-interface", RENDEZVOUS_ADDRESS,
            "--listen", f"tcp:{RENDEZVOUS_PORT}:interface={RENDEZVOUS_ADDRESS}",
            *args,
        ],
        env=repo_environment(),
        cwd=str(directory),
    )  # fmt: skip
    try:
        _wait_for_tcp(server, RENDEZVOUS_ADDRESS, RENDEZVOUS_PORT, process, timeout)
        yield process
    finally:
        stop(process)


@dataclass(frozen=True)
class Listener:
    """
    A running ``natcat --listen``.

    :ivar process: The natcat process.
    :ivar stderr: The file its standard error goes to (reports, messages).
    :ivar stdout: The file its standard output goes to (what peers sent,
        without ``--echo``).
    :ivar peer_id: The peer id it announced.
    """

    process: subprocess.Popen[bytes]
    stderr: Path
    stdout: Path
    peer_id: str

    def text(self) -> str:
        """Its standard error so far."""
        return _read(self.stderr)

    def reports(self) -> list[dict[str, Any]]:
        """Its ``--json-report`` objects so far: one per connection it accepted."""
        return reports(self.text())


@contextmanager
def listener(
    callee: Node,
    directory: Path,
    *extra: str,
    echo: bool = True,
    verbose: bool = True,
    timeout: float = STARTUP_TIMEOUT,
) -> Iterator[Listener]:
    """
    ``natcat --listen alice [--echo] --json-report EXTRA`` on *callee* (key in
    *directory*/alice.key), yielded once it is registered, stopped afterwards.

    :raises RuntimeError: quoting its output, when it exits or has not
        registered within *timeout* seconds.
    """
    errors, output = directory / "callee.err", directory / "callee.out"
    argv = natcat_argv(
        "--listen", CALLEE_NAME, "--rendezvous", RENDEZVOUS, "--json-report",
        "--identity", str(directory / f"{CALLEE_NAME}.key"),
        *(["--echo"] if echo else []), *(["--verbose"] if verbose else []), *extra,
    )  # fmt: skip
    with errors.open("wb") as err_sink, output.open("wb") as out_sink:
        process = callee.popen(argv, stdout=out_sink, stderr=err_sink, env=repo_environment())
    try:
        deadline = time.monotonic() + timeout
        while (found := _ANNOUNCED.search(_read(errors))) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"natcat --listen did not register within {timeout:g} s "
                    f"(status {process.poll()}):\n{_tail(_read(errors))}"
                )
            time.sleep(0.05)
        yield Listener(process, errors, output, found.group(1))
    finally:
        stop(process)


@dataclass(frozen=True)
class _Run:
    """One caller run, and everything an assertion message may quote."""

    returncode: int | None
    stdout: bytes
    stderr: str
    seconds: float
    timed_out: bool
    detail: str


def _call(
    lab: Lab,
    caller: Node,
    callee: Node,
    directory: Path,
    payload: bytes,
    *,
    caller_args: Sequence[str],
    callee_args: Sequence[str],
    rendezvous_args: Sequence[str] = (),
    echo: bool,
    verbose: bool,
    quit_after: float,
    startup_timeout: float,
    timeout: float,
) -> tuple[_Run, Listener]:
    """Run the rendezvous, the callee, and one caller with *payload* on its stdin."""
    source = directory / "payload"
    source.write_bytes(payload)
    server = lab.nodes["rendezvous"]
    assert isinstance(server, PublicHost)
    argv = natcat_argv(
        CALLEE_NAME, "--rendezvous", RENDEZVOUS, "--json-report", "--quit-after", f"{quit_after:g}",
        *(["--verbose"] if verbose else []), *caller_args,
    )  # fmt: skip
    with (
        rendezvous(server, directory, *rendezvous_args, timeout=startup_timeout),
        listener(
            callee, directory, *callee_args, echo=echo, verbose=verbose, timeout=startup_timeout
        ) as callee_side,
        source.open("rb") as stdin,
    ):
        started = time.monotonic()
        process = caller.popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=repo_environment(),
        )
        timed_out = False
        try:
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                stop(process)
                out, err = process.communicate()
        finally:
            stop(process)
        seconds = time.monotonic() - started
        stderr = err.decode(errors="replace")
        detail = (
            f"caller: $ {' '.join(argv)}\nexit status {process.returncode} after {seconds:.2f} s"
            f"{f' (killed: still running after {timeout:g} s)' if timed_out else ''}\n"
            f"--- caller stderr\n{_tail(stderr)}\n--- callee stderr\n{_tail(callee_side.text())}"
            f"\n--- rendezvous log\n{_tail(_read(directory / 'twistd.log'))}"
        )
    return _Run(process.returncode, out, stderr, seconds, timed_out, detail), callee_side


def echo_through(
    lab: Lab,
    caller: Node,
    callee: Node,
    directory: Path,
    *,
    caller_args: Sequence[str] = (),
    callee_args: Sequence[str] = (),
    rendezvous_args: Sequence[str] = (),
    payload_size: int = PAYLOAD_SIZE,
    verbose: bool = True,
    quit_after: float = QUIT_AFTER,
    startup_timeout: float = STARTUP_TIMEOUT,
    timeout: float = TRANSFER_TIMEOUT,
    moved: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    Send *payload_size* random bytes from *caller* through *callee*'s echo
    and back, with the rendezvous on the lab's public host ``"rendezvous"``;
    check that they came back intact and that each side names the other.

    :param caller_args: Extra arguments of the caller's natcat.
    :param callee_args: Extra arguments of the callee's natcat.
    :param rendezvous_args: Extra arguments of ``twistd natrendezvous``.
    :param quit_after: The caller's ``--quit-after``: seconds without data
        after which it closes, once its standard input is at its end (more
        than the longest stall of the path, or the echo is cut short).
    :param timeout: Seconds the caller may take, connecting included.
    :param moved: When given, gets the caller's, then the callee's,
        reports of a connection that moved off the UDP relay.
    :returns: Both sides' JSON reports (the caller's, the callee's).
    """
    payload = os.urandom(payload_size)
    run, callee_side = _call(
        lab,
        caller,
        callee,
        directory,
        payload,
        caller_args=caller_args,
        callee_args=callee_args,
        rendezvous_args=rendezvous_args,
        echo=True,
        verbose=verbose,
        quit_after=quit_after,
        startup_timeout=startup_timeout,
        timeout=timeout,
    )
    detail = run.detail
    assert not run.timed_out, detail
    assert run.returncode == 0, detail
    assert len(run.stdout) == len(payload), f"{len(run.stdout)} bytes came back\n{detail}"
    assert run.stdout == payload, f"the bytes that came back differ\n{detail}"
    caller_reports, callee_reports = reports(run.stderr), callee_side.reports()
    if moved is not None:
        moved.extend(moves(run.stderr))
        moved.extend(moves(callee_side.text()))
    assert len(caller_reports) == 1, detail
    assert len(callee_reports) == 1, detail
    # Each side names the other: the caller the callee's pinned id, the
    # callee the caller's (ephemeral) one.
    assert caller_reports[0]["peer"] == callee_side.peer_id, detail
    assert callee_reports[0]["peer"].startswith("nt1"), detail
    assert callee_reports[0]["peer"] != callee_side.peer_id, detail
    return caller_reports[0], callee_reports[0]


@dataclass(frozen=True)
class Refused:
    """
    A caller that could not connect.

    :ivar returncode: Its exit status.
    :ivar error: Its ``natcat: ...`` message lines (not the verbose log).
    :ivar stderr: Its whole standard error.
    :ivar report: Its ``--json-report`` object, ``None`` when it printed
        none (it never connected).
    :ivar seconds: Wall time from its start to its exit (interpreter start
        included).
    :ivar detail: Both sides' output and the rendezvous log, for assertion
        messages.
    """

    returncode: int
    error: str
    stderr: str
    report: dict[str, Any] | None
    seconds: float
    detail: str


def refused_through(
    lab: Lab,
    caller: Node,
    callee: Node,
    directory: Path,
    *,
    caller_args: Sequence[str] = (),
    callee_args: Sequence[str] = (),
    payload_size: int = 64 * 1024,
    verbose: bool = True,
    startup_timeout: float = STARTUP_TIMEOUT,
    timeout: float = TRANSFER_TIMEOUT,
) -> Refused:
    """
    Run a caller that is expected to fail to reach *callee* (which runs
    without ``--echo``, its standard output to a file); check that it ends
    by itself within *timeout* seconds with a non-zero status, wrote nothing
    to its standard output, and that the callee's application got no
    connection and no byte of the *payload_size* bytes on the caller's
    standard input.
    """
    run, callee_side = _call(
        lab,
        caller,
        callee,
        directory,
        os.urandom(payload_size),
        caller_args=caller_args,
        callee_args=callee_args,
        echo=False,
        verbose=verbose,
        quit_after=QUIT_AFTER,
        startup_timeout=startup_timeout,
        timeout=timeout,
    )
    detail = run.detail
    assert not run.timed_out, detail
    assert run.returncode is not None, detail
    assert run.returncode != 0, detail
    assert run.stdout == b"", detail
    assert callee_side.reports() == [], f"the callee's application got a connection\n{detail}"
    received = callee_side.stdout.read_bytes()
    assert received == b"", f"the callee's application got {len(received)} bytes\n{detail}"
    caller_reports = reports(run.stderr)
    error = "\n".join(line for line in run.stderr.splitlines() if line.startswith("natcat: "))
    return Refused(
        run.returncode,
        error,
        run.stderr,
        caller_reports[0] if caller_reports else None,
        run.seconds,
        detail,
    )
