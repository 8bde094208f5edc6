"""
Helpers of ``tests/lab/test_natcheck_lab.py`` (and of
``benchmarks/natcheck_time``): one host behind each NAT the tests check,
RFC 5780 STUN servers with two addresses on a public host (ours, Debian's
``stund``, coturn's ``turnserver``), clients run side by side in their
namespaces, and parsers of the third-party clients' verdicts.

Every process is started with :meth:`~tests.natlab.lab.Node.popen`, so the
lab stops it when it closes at the latest; the helpers here stop what they
started by its PID as soon as it is no longer needed.  Every wait is
bounded in time.
"""

from __future__ import annotations

import enum
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from nattraverse._types import Endpoint
from tests.natlab import Host, Lab, Nat, Node, Preset, PublicHost

__all__ = [
    "ALTERNATE",
    "CASES",
    "PRIMARY",
    "REPO_ROOT",
    "SERVER_ENDPOINTS",
    "Behind",
    "Case",
    "Finished",
    "NatDiscoveryVerdict",
    "OnceInLab",
    "StunClientType",
    "StunClientVerdict",
    "behind_each",
    "natcheck_argv",
    "natcheck_report",
    "natdiscovery_argv",
    "parse_natdiscovery",
    "parse_stun_client",
    "repo_environment",
    "run_together",
    "running",
    "start_coturn",
    "start_rendezvous",
    "start_stund",
    "stop",
    "stun_client_argv",
]

T = TypeVar("T")

#: The repository root: on ``PYTHONPATH`` it gives the processes in the
#: namespaces our package and our twistd plugin, not an installed copy.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: The STUN servers' primary and alternate (RFC 5780 OTHER-ADDRESS) endpoints.
PRIMARY = Endpoint("192.0.2.10", 3478)
ALTERNATE = Endpoint("192.0.2.11", 3479)
#: Every endpoint an RFC 5780 server listens on: both addresses, both ports.
SERVER_ENDPOINTS = tuple(
    Endpoint(host, port)
    for host in (PRIMARY.host, ALTERNATE.host)
    for port in (PRIMARY.port, ALTERNATE.port)
)

#: Seconds a server gets to answer on all its endpoints.
STARTUP_TIMEOUT = 20.0
#: Seconds a client may run (natcheck takes about 1 s, 3 s when UDP is
#: blocked; turnutils_natdiscovery waits 3 s for each missing answer).
CLIENT_TIMEOUT = 60.0
#: Seconds a process gets to exit after SIGTERM before SIGKILL.
STOP_GRACE = 5.0


# -- the NATs -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One NAT a host is put behind: a lab preset and its options."""

    name: str
    preset: Preset
    hairpin: bool = False
    port_preservation: bool = True

    def __str__(self) -> str:
        return self.name


#: Every preset with the lab's defaults (no hairpin, port preservation),
#: then cone NATs with hairpinning on and one without port preservation.
CASES: tuple[Case, ...] = (
    *(Case(preset.value, preset) for preset in Preset),
    Case("full-cone-hairpin", Preset.FULL_CONE, hairpin=True),
    Case("port-restricted-hairpin", Preset.PORT_RESTRICTED, hairpin=True),
    Case("port-restricted-no-preservation", Preset.PORT_RESTRICTED, port_preservation=False),
)


@dataclass(frozen=True)
class Behind:
    """A NAT of a :class:`Case` and the one host behind it."""

    case: Case
    nat: Nat
    host: Host


def behind_each(lab: Lab, cases: Sequence[Case] = CASES) -> list[Behind]:
    """Declare, side by side on *lab*'s internet, one NAT per case with a host behind it."""
    out = []
    for i, case in enumerate(cases):
        nat = lab.nat(
            f"nat{i}",
            case.preset,
            hairpin=case.hairpin,
            port_preservation=case.port_preservation,
        )
        out.append(Behind(case, nat, lab.host(f"host{i}", behind=nat)))
    return out


class OnceInLab(Generic[T]):
    """
    Work done in a fresh lab the first time a result is asked for, the lab
    removed right after; later calls return the same result, or raise the
    same error (so that every test that needs it fails, or skips, alike).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._result: T | None = None
        self._error: BaseException | None = None
        self._done = False

    def __call__(self, work: Callable[[Lab], T]) -> T:
        """The result of *work*, called with a new lab on the first call only."""
        with self._lock:
            if not self._done:
                try:
                    with Lab() as lab:
                        self._result = work(lab)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as e:  # pytest's skip and fail outcomes too
                    self._error = e
                self._done = True
            if self._error is not None:
                raise self._error
            return self._result  # type: ignore[return-value]


# -- processes ------------------------------------------------------------------


def repo_environment() -> dict[str, str]:
    """This environment with the repository first on ``PYTHONPATH``."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def stop(process: subprocess.Popen[Any], grace: float = STOP_GRACE) -> None:
    """Stop a process started here, by its PID: SIGTERM, then SIGKILL; reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(grace)


@contextmanager
def running(process: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    """*process* while the block runs; stopped when it ends, whatever the reason."""
    try:
        yield process
    finally:
        stop(process)


def _start(
    node: Node,
    argv: Sequence[str],
    directory: Path,
    name: str,
    ready: Callable[[], bool],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = STARTUP_TIMEOUT,
) -> subprocess.Popen[bytes]:
    """
    Start a server in *node*'s namespace, its output in *directory*, and
    wait until *ready* says it serves.

    :raises RuntimeError: quoting its output, when it exits or is not ready
        within *timeout* seconds (it is stopped).
    """
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / f"{name}.out"
    with output.open("wb") as sink:
        process = node.popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=str(directory)
        )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                status = process.poll()
                why = f"exited with status {status}" if status is not None else "is not ready"
                logs = "".join(
                    f"--- {path.name}\n{path.read_text(errors='replace')}\n"
                    for path in sorted(directory.iterdir())
                    if path.is_file() and path.suffix in (".out", ".log")
                )
                raise RuntimeError(f"{name} {why} after {timeout:g} s: {list(argv)}\n{logs}")
            time.sleep(0.05)
    except BaseException:
        stop(process)
        raise
    return process


def _binding_request() -> bytes:
    """A plain 20-byte Binding request (RFC 8489 section 5)."""
    return b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)


def _answers(server: PublicHost, endpoints: Sequence[Endpoint]) -> Callable[[], bool]:
    """A check that every endpoint of *server* answers a Binding request,
    sent from inside its own namespace."""

    def check() -> bool:
        sock = server.udp_socket(0, PRIMARY.host)
        try:
            sock.settimeout(0.1)
            for endpoint in endpoints:
                request = _binding_request()
                sock.sendto(request, endpoint)
                try:
                    while True:
                        data = sock.recv(2048)
                        if data[8:20] == request[8:20] and data[:2] == b"\x01\x01":
                            break
                except (TimeoutError, ConnectionRefusedError):
                    return False
            return True
        finally:
            sock.close()

    return check


def start_rendezvous(server: PublicHost, directory: Path) -> subprocess.Popen[bytes]:
    """
    Our ``twistd natrendezvous`` on *server*'s two addresses
    (:data:`PRIMARY`, :data:`ALTERNATE`), answering on all four endpoints.
    """
    log = directory / "twistd.log"

    def ready() -> bool:
        return log.exists() and "STUN server on" in log.read_text(errors="replace")

    return _start(
        server,
        [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", f"--logfile={log}",
            "natrendezvous",
            "--stun-interface", PRIMARY.host, "--stun-port", str(PRIMARY.port),
            "--alt-address", ALTERNATE.host, "--alt-port", str(ALTERNATE.port),
        ],
        directory,
        "twistd",
        ready,
        env=repo_environment(),
    )  # fmt: skip


def start_stund(server: PublicHost, stund: str, directory: Path) -> subprocess.Popen[bytes]:
    """
    Debian's ``stund`` (Vovida STUN server 0.97, RFC 3489) with *server*'s
    two addresses: ``-h`` primary, ``-a`` alternate, ports 3478 and 3479 by
    default (``-p``, ``-o``), in the foreground.
    """
    argv = [stund, "-h", PRIMARY.host, "-a", ALTERNATE.host]
    argv += ["-p", str(PRIMARY.port), "-o", str(ALTERNATE.port)]
    return _start(server, argv, directory, "stund", _answers(server, SERVER_ENDPOINTS))


def start_coturn(server: PublicHost, turnserver: str, directory: Path) -> subprocess.Popen[bytes]:
    """
    coturn's ``turnserver``, STUN only, on *server*'s two addresses with
    ports 3478 and 3479 (RFC 5780); database, log and PID file in
    *directory*.
    """
    from tests.interop.helpers import coturn_arguments

    argv = coturn_arguments(
        turnserver, directory, (PRIMARY.host, ALTERNATE.host), PRIMARY.port, ALTERNATE.port
    )
    return _start(server, argv, directory, "turnserver", _answers(server, SERVER_ENDPOINTS))


@dataclass(frozen=True)
class Finished:
    """A client process that ran to its end (or was killed at its deadline)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    def describe(self) -> str:
        """Everything about the run, for an assertion message."""
        return (
            f"$ {' '.join(self.argv)}\nexit status {self.returncode} after {self.seconds:.2f} s"
            f"{' (killed: too long)' if self.timed_out else ''}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


def run_together(
    jobs: Mapping[str, tuple[Node, Sequence[str]]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> dict[str, Finished]:
    """
    Start every job (a node and the argv to run in its namespace) at once,
    wait for all, and return what each printed; one that runs longer than
    *timeout* seconds is killed.  Every process is stopped by its PID
    before this returns, whatever happens.
    """
    processes: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    results: dict[str, Finished] = {}
    try:
        for key, (node, argv) in jobs.items():
            process = node.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            processes[key] = (process, time.monotonic())
        deadline = time.monotonic() + timeout

        def finish(key: str, process: subprocess.Popen[bytes], started: float) -> None:
            timed_out = False
            try:
                out, err = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                process.kill()
                out, err = process.communicate(timeout=STOP_GRACE)
            results[key] = Finished(
                tuple(str(a) for a in jobs[key][1]),
                process.returncode,
                out.decode(errors="replace"),
                err.decode(errors="replace"),
                time.monotonic() - started,
                timed_out,
            )

        threads = [
            threading.Thread(target=finish, args=(key, *entry), daemon=True)
            for key, entry in processes.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 2 * STOP_GRACE)
    finally:
        for process, _ in processes.values():
            stop(process)
    missing = set(jobs) - set(results)
    if missing:
        raise RuntimeError(f"no result from {sorted(missing)}")
    return results


# -- natcheck -------------------------------------------------------------------


def natcheck_argv(server: Endpoint = PRIMARY) -> list[str]:
    """``python -m nattraverse.natcheck --json SERVER`` with this interpreter."""
    return [sys.executable, "-m", "nattraverse.natcheck", "--json", str(server)]


def natcheck_report(finished: Finished) -> dict[str, Any]:
    """
    The JSON object natcheck printed (its last line of output).

    :raises AssertionError: quoting the run, when there is none.
    """
    lines = finished.stdout.strip().splitlines()
    assert lines, f"natcheck printed nothing\n{finished.describe()}"
    report = json.loads(lines[-1])
    assert isinstance(report, dict), finished.describe()
    return report


# -- Debian's stun-client -------------------------------------------------------


def stun_client_argv(stun: str, server: Endpoint = PRIMARY) -> list[str]:
    """``stun HOST:PORT -v``: the RFC 3489 tests against *server*, verbose."""
    return [stun, str(server), "-v"]


class StunClientType(enum.Enum):
    """
    The NAT types of stun-client 0.97 (``stunNatType``), by the text it
    prints after ``Primary:`` and the code in the low bits of its "Return
    value" (``client.cxx``).
    """

    OPEN = ("Open", 0x00)
    INDEPENDENT_FILTER = ("Independent Mapping, Independent Filter", 0x02)
    ADDRESS_DEPENDENT_FILTER = ("Independent Mapping, Address Dependent Filter", 0x04)
    PORT_DEPENDENT_FILTER = ("Independent Mapping, Port Dependent Filter", 0x06)
    DEPENDENT_MAPPING = ("Dependent Mapping", 0x08)
    FIREWALL = ("Firewall", 0x0A)
    BLOCKED = ("Blocked or could not reach STUN server", 0x0C)

    def __init__(self, text: str, code: int) -> None:
        self.text = text
        self.code = code


#: The "Return value" bits besides the type: port preserved, no hairpin.
_PRESERVED_BIT = 0x01
_NO_HAIRPIN_BIT = 0x10
_TYPE_BITS = 0x0E

_PRIMARY_LINE = re.compile(r"^Primary: (?P<text>.*?)\s*$", re.MULTILINE)
_RETURN_LINE = re.compile(r"^Return value is 0x(?P<value>[0-9a-fA-F]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class StunClientVerdict:
    """
    What stun-client concluded.

    :ivar kind: The NAT type.
    :ivar port_preserved: Test I's mapped port was its local port.
    :ivar hairpin: A request to its own mapped address came back.
    :ivar text: The whole ``Primary:`` line.
    """

    kind: StunClientType
    port_preserved: bool
    hairpin: bool
    text: str


def parse_stun_client(output: str) -> StunClientVerdict:
    """
    The verdict in stun-client's output: the ``Primary:`` line, checked
    against the code of its ``Return value`` line.

    :raises ValueError: when either line is missing, unknown, or they differ.
    """
    primary = _PRIMARY_LINE.search(output)
    value = _RETURN_LINE.search(output)
    if primary is None or value is None:
        raise ValueError(f"no 'Primary:' and 'Return value' lines in {output!r}")
    text = primary.group("text")
    kinds = [
        kind for kind in StunClientType if text == kind.text or text.startswith(kind.text + ",")
    ]
    if len(kinds) != 1:
        raise ValueError(f"unknown stun-client verdict {text!r}")
    code = int(value.group("value"), 16)
    if code & _TYPE_BITS != kinds[0].code:
        raise ValueError(f"stun-client printed {text!r} but returned {code:#x}")
    return StunClientVerdict(
        kinds[0], bool(code & _PRESERVED_BIT), not code & _NO_HAIRPIN_BIT, text
    )


# -- coturn's turnutils_natdiscovery --------------------------------------------


def natdiscovery_argv(tool: str, host: Node, server: Endpoint = PRIMARY) -> list[str]:
    """
    ``turnutils_natdiscovery -m -f -L ADDRESS -p PORT SERVER``: the RFC 5780
    mapping and filtering tests, bound to *host*'s address (so that it can
    say "No NAT!").
    """
    return [tool, "-m", "-f", "-L", host.address, "-p", str(server.port), server.host]


_BEHAVIOUR_LINE = re.compile(
    r"^NAT with (?P<kind>Endpoint Independent|Address Dependent|Address and Port Dependent) "
    r"(?P<test>Mapping|Filtering)!\s*$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class NatDiscoveryVerdict:
    """
    What turnutils_natdiscovery concluded.

    :ivar answered: The server answered at least one request.
    :ivar no_nat: It printed "No NAT!": its reflexive address was its own.
    :ivar mapping: The mapping it found, as an RFC 5780 name
        (``"endpoint-independent"``...), or ``None``.
    :ivar filtering: The filtering it found, likewise.
    """

    answered: bool
    no_nat: bool
    mapping: str | None
    filtering: str | None


def parse_natdiscovery(output: str) -> NatDiscoveryVerdict:
    """
    The verdicts in turnutils_natdiscovery's output (``natdiscovery.c``:
    ``NAT with ... Mapping!``, ``NAT with ... Filtering!``, ``No NAT!``).

    :raises ValueError: when it printed two different verdicts of one test.
    """
    found: dict[str, set[str]] = {"Mapping": set(), "Filtering": set()}
    for match in _BEHAVIOUR_LINE.finditer(output):
        found[match.group("test")].add(match.group("kind").lower().replace(" ", "-"))
    if any(len(values) > 1 for values in found.values()):
        raise ValueError(f"contradictory verdicts {found} in {output!r}")
    return NatDiscoveryVerdict(
        answered="RFC 5780 response" in output,
        no_nat="No NAT!" in output,
        mapping=next(iter(found["Mapping"]), None),
        filtering=next(iter(found["Filtering"]), None),
    )
