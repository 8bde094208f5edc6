"""STUN Binding throughput: nattraverse against a minimal Twisted loop and coturn.

Starts each server in turn on a fresh loopback UDP port, pinned to one CPU,
drives it with a batched C load generator (``loadgen.c``, compiled here with
gcc) pinned to another CPU, and reports answered requests per wall second and
per server CPU-second (utime + stime of the whole server process, every
thread included), with ratios against coturn. See README.md.

Linux only. Traffic goes to 127.0.0.1 only. Every process started here is
stopped by its PID when the run ends, fails or is interrupted, and every
child dies with this process (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
HOST = "127.0.0.1"
MAGIC_COOKIE = b"\x21\x12\xa4\x42"

DEFAULT_OURS_CMD = (
    "{twistd} -n natrendezvous --stun-port {port} --stun-interface {host} "
    "--listen tcp:0:interface={host}"
)
SERVER_NAMES = ("ours", "twisted-minimal", "coturn")

_PR_SET_PDEATHSIG = 1


class BenchmarkError(Exception):
    """The benchmark cannot run at all (a tool is missing, the platform is wrong)."""


class ServerUnavailable(Exception):
    """One server could not be started or did not answer; the others still run."""


@dataclass(frozen=True)
class LoadSettings:
    """How hard and how long the load generator pushes each server."""

    duration: float
    warmup: float
    sockets: int
    window: int
    max_requests: int
    loadgen_cpu: int | None
    server_cpu: int | None


@dataclass
class ServerResult:
    """The figures measured for one server, or why there are none."""

    name: str
    available: bool
    reason: str | None = None
    command: list[str] = field(default_factory=list)
    answered: int = 0
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    lost: int = 0
    bad: int = 0
    error_responses: int = 0
    capped: bool = False

    @property
    def per_wall_s(self) -> float | None:
        return self.answered / self.wall_s if self.available and self.wall_s > 0 else None

    @property
    def per_cpu_s(self) -> float | None:
        if not self.available or self.server_cpu_s <= 0:
            return None
        return self.answered / self.server_cpu_s

    @property
    def server_busy(self) -> float | None:
        if not self.available or self.wall_s <= 0 or self.server_cpu_s < 0:
            return None
        return self.server_cpu_s / self.wall_s

    def warnings(self) -> list[str]:
        found = []
        if self.available:
            if self.server_cpu_s < 0:
                found.append("the server's CPU time could not be read from /proc")
            busy = self.server_busy
            if busy is not None and busy < 0.9:
                found.append(
                    f"server busy only {busy:.0%} of the window, so req/s understates its "
                    "capacity (other load, vCPU wake-up latency, drops or a load generator "
                    "bottleneck); req/CPU-s stays comparable"
                )
            if self.lost:
                found.append(f"{self.lost} requests unanswered (dropped; window written off)")
            if self.bad or self.error_responses:
                found.append(
                    f"{self.bad} invalid responses, {self.error_responses} error responses"
                )
            if self.capped:
                found.append("request cap reached before the end of the window")
        return found

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            per_wall_s=self.per_wall_s,
            per_cpu_s=self.per_cpu_s,
            server_busy=self.server_busy,
            warnings=self.warnings(),
        )
        return data


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server on a given port."""

    name: str
    argv: list[str]
    startup_timeout: float
    env: Mapping[str, str] | None = None


# --- processes ---------------------------------------------------------------------------------


def _child_setup(cpu: int | None) -> Callable[[], None]:
    """Return a ``preexec_fn``: die with the parent, and run on ``cpu``."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return setup


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Processes:
    """Every process this benchmark starts, stopped by PID on ``close``."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        cpu: int | None,
        cwd: Path,
        stdout: int | Any,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            preexec_fn=_child_setup(cpu),
            start_new_session=True,  # its own process group, so that stop() reaches forks
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
        """Stop ``proc`` and whatever it forked, and reap it.

        SIGTERM to its process group (the child's own PID, see ``start``), SIGKILL to the group
        after ``grace`` seconds, and SIGKILL to the group once the child is gone, for a fork that
        outlived it.
        """
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(grace)
        # PIDs are handed out in sequence (pid_max is in the millions), so the group id
        # cannot have been reused since the child was reaped moments ago.
        _signal_group(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in list(self._procs):
            self.stop(proc)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into ``SystemExit`` so that cleanup code runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- helpers -----------------------------------------------------------------------------------


def free_udp_port() -> int:
    """A UDP port on the loopback that the kernel just handed out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def compile_loadgen(workdir: Path) -> Path:
    """Build ``loadgen.c`` into ``workdir`` and return the executable's path."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BenchmarkError(
            "gcc not found on PATH: it builds the load generator (apt install gcc)"
        )
    exe = workdir / "loadgen"
    result = subprocess.run(
        [gcc, "-O2", "-Wall", "-o", str(exe), str(HERE / "loadgen.c")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise BenchmarkError(f"compiling loadgen.c failed:\n{result.stderr.strip()}")
    return exe


def binding_answered(port: int, timeout: float) -> bool:
    """Whether a STUN Binding request to ``port`` gets a success response."""
    tid = os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"\x00\x01\x00\x00" + MAGIC_COOKIE + tid, (HOST, port))
        try:
            data = sock.recv(2048)
        except (TimeoutError, ConnectionRefusedError):
            return False
    return len(data) >= 20 and data[:2] == b"\x01\x01" and data[8:20] == tid


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for entry in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(entry)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def owns_udp_port(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the UDP socket bound to ``port``.

    Guards against measuring somebody else's server on a recycled port.
    """
    wanted = f":{port:04X}"
    inodes = _socket_inodes(pid)
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(wanted) and fields[9] in inodes:
            return True
    return False


def _log_tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail)


# --- the servers -------------------------------------------------------------------------------


def ours_spec(template: str, port: int) -> ServerSpec:
    twistd = Path(sys.executable).with_name("twistd")
    twistd_cmd = (
        shlex.quote(str(twistd))
        if twistd.exists()
        else shlex.join([sys.executable, "-c", "from twisted.scripts.twistd import run; run()"])
    )
    try:
        argv = shlex.split(template.format(twistd=twistd_cmd, port=port, host=HOST))
    except (KeyError, IndexError, ValueError) as e:
        raise ServerUnavailable(f"bad --ours-cmd {template!r}: {e!r}") from None
    if not argv:
        raise ServerUnavailable("empty --ours-cmd")
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return ServerSpec("ours", argv, 8.0, {**os.environ, "PYTHONPATH": pythonpath})


def minimal_spec(port: int) -> ServerSpec:
    argv = [sys.executable, str(HERE / "minimal_server.py"), "--port", str(port)]
    return ServerSpec("twisted-minimal", [*argv, "--interface", HOST], 5.0)


def coturn_spec(port: int, workdir: Path) -> ServerSpec:
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        raise ServerUnavailable("turnserver not found on PATH (apt install coturn)")
    argv = [
        turnserver,
        "-n",  # no configuration file: only these options
        "--stun-only",
        "--listening-ip", HOST,
        "--listening-port", str(port),
        "--relay-threads", "1",
        "--no-tcp", "--no-tls", "--no-dtls", "--no-cli", "--no-rfc5780",
        "--log-file", str(workdir / "turnserver.log"), "--simple-log", "--no-stdout-log",
        "--pidfile", str(workdir / "turnserver.pid"),
        "--userdb", str(workdir / "turndb"),
    ]  # fmt: skip
    return ServerSpec("coturn", argv, 5.0)


def measure(
    spec: ServerSpec,
    port: int,
    loadgen: Path,
    settings: LoadSettings,
    procs: Processes,
    workdir: Path,
) -> ServerResult:
    """Start the server of ``spec``, load it, stop it; raise ServerUnavailable if it fails."""
    log_path = workdir / f"{spec.name}.log"
    with log_path.open("wb") as log:
        server = procs.start(
            spec.argv, cpu=settings.server_cpu, cwd=workdir, stdout=log, env=spec.env
        )
    try:
        deadline = time.monotonic() + spec.startup_timeout
        while not binding_answered(port, 0.1):
            if server.poll() is not None:
                detail = _log_tail(log_path) or "no output"
                raise ServerUnavailable(f"exited with status {server.returncode}: {detail}")
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"no Binding response on {HOST}:{port} within {spec.startup_timeout:g} s"
                )
            time.sleep(0.05)
        if not owns_udp_port(server.pid, port):
            raise ServerUnavailable(
                f"{HOST}:{port} answers but is not held by the started process "
                f"(PID {server.pid}): another server took the port, or the command forks; "
                "it must exec the server itself so that its CPU time can be read"
            )
        argv = [
            str(loadgen),
            "--host", HOST,
            "--port", str(port),
            "--duration", str(settings.duration),
            "--warmup", str(settings.warmup),
            "--max-requests", str(settings.max_requests),
            "--sockets", str(settings.sockets),
            "--window", str(settings.window),
            "--server-pid", str(server.pid),
        ]  # fmt: skip
        gen = procs.start(argv, cpu=settings.loadgen_cpu, cwd=workdir, stdout=subprocess.PIPE)
        try:
            out, _ = gen.communicate(timeout=settings.warmup + settings.duration + 6)
        except subprocess.TimeoutExpired:
            raise BenchmarkError("loadgen did not finish in time") from None
        finally:
            procs.stop(gen)
        if gen.returncode != 0:
            raise BenchmarkError(f"loadgen failed ({gen.returncode}): {out.decode().strip()}")
        if server.poll() is not None:
            raise ServerUnavailable(f"died under load: {_log_tail(log_path) or 'no output'}")
        figures = json.loads(out)
        return ServerResult(
            name=spec.name,
            available=True,
            command=list(spec.argv),
            answered=int(figures["answered"]),
            wall_s=float(figures["wall_s"]),
            server_cpu_s=float(figures["server_cpu_s"]),
            loadgen_cpu_s=float(figures["loadgen_cpu_s"]),
            lost=int(figures["lost"]),
            bad=int(figures["bad"]),
            error_responses=int(figures["error_responses"]),
            capped=bool(figures["capped"]),
        )
    finally:
        procs.stop(server)


def run_benchmark(ours_cmd: str, settings: LoadSettings) -> list[ServerResult]:
    """Measure the three servers one after the other and return their results."""
    if not sys.platform.startswith("linux"):
        raise BenchmarkError("this benchmark needs Linux (/proc, sendmmsg/recvmmsg)")
    results = []
    procs = Processes()
    with _terminate_as_exit(), tempfile.TemporaryDirectory(prefix="stun-bench-") as tmp:
        workdir = Path(tmp)
        try:
            loadgen = compile_loadgen(workdir)
            for name in SERVER_NAMES:
                port = free_udp_port()
                spec: ServerSpec | None = None
                try:
                    if name == "ours":
                        spec = ours_spec(ours_cmd, port)
                    elif name == "twisted-minimal":
                        spec = minimal_spec(port)
                    else:
                        spec = coturn_spec(port, workdir)
                    results.append(measure(spec, port, loadgen, settings, procs, workdir))
                except ServerUnavailable as e:
                    command = list(spec.argv) if spec is not None else []
                    results.append(ServerResult(name, False, str(e), command))
                except OSError as e:
                    command = list(spec.argv) if spec is not None else []
                    results.append(ServerResult(name, False, f"cannot start: {e}", command))
        finally:
            procs.close()
    return results


# --- reporting ---------------------------------------------------------------------------------


def ratios(results: Sequence[ServerResult]) -> dict[str, dict[str, float | None]]:
    by_name = {r.name: r for r in results}
    base = by_name.get("coturn")
    out: dict[str, dict[str, float | None]] = {}
    for name, label in (("ours", "ours/coturn"), ("twisted-minimal", "minimal/coturn")):
        result = by_name.get(name)
        entry: dict[str, float | None] = {"per_cpu_s": None, "per_wall_s": None}
        if result is not None and base is not None:
            for key in entry:
                mine, theirs = getattr(result, key), getattr(base, key)
                entry[key] = mine / theirs if mine is not None and theirs else None
        out[label] = entry
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def format_report(results: Sequence[ServerResult], settings: LoadSettings) -> str:
    pin = (
        f"loadgen on CPU {settings.loadgen_cpu}, servers on CPU {settings.server_cpu}"
        if settings.server_cpu is not None
        else "no CPU pinning (fewer than 2 CPUs available)"
    )
    lines = [
        f"STUN Binding throughput on {HOST}: {settings.duration:g} s per server after "
        f"{settings.warmup:g} s warm-up, {settings.sockets} sockets x {settings.window} "
        f"outstanding; {pin}",
        "",
        f"{'server':<16}{'answered':>12}{'req/s':>12}{'server CPU s':>14}"
        f"{'req/CPU-s':>12}{'busy':>7}",
    ]
    notes: list[str] = []
    for r in results:
        if not r.available:
            lines.append(f"{r.name:<16}unavailable ({r.reason})")
            continue
        lines.append(
            f"{r.name:<16}{r.answered:>12,}{_fmt(r.per_wall_s, ',.0f'):>12}"
            f"{_fmt(r.server_cpu_s if r.server_cpu_s >= 0 else None, '.2f'):>14}"
            f"{_fmt(r.per_cpu_s, ',.0f'):>12}"
            f"{_fmt(r.server_busy, '.0%'):>7}"
        )
        notes.extend(f"warning: {r.name}: {w}" for w in r.warnings())
    lines += ["", f"{'ratio':<16}{'per CPU-second':>16}{'per wall-second':>17}"]
    for label, entry in ratios(results).items():
        lines.append(
            f"{label:<16}{_fmt(entry['per_cpu_s'], '.2f', 'x'):>16}"
            f"{_fmt(entry['per_wall_s'], '.2f', 'x'):>17}"
        )
    return "\n".join(lines + (["", *notes] if notes else []))


def report_json(results: Sequence[ServerResult], settings: LoadSettings) -> str:
    return json.dumps(
        {
            "host": HOST,
            "settings": asdict(settings),
            "servers": {r.name: r.as_json() for r in results},
            "ratios": ratios(results),
        },
        indent=2,
    )


# --- command line ------------------------------------------------------------------------------


def _cpus() -> tuple[int | None, int | None]:
    """(loadgen CPU, server CPU): two distinct CPUs when there are two."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="STUN Binding requests per second and per server CPU-second: "
        "nattraverse, a minimal Twisted loop and coturn."
    )
    parser.add_argument(
        "--duration", type=float, default=4.0, help="measured seconds per server (default 4)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="seconds of load before measuring (default 0.5)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--ours-cmd",
        default=DEFAULT_OURS_CMD,
        help="command that starts our server; {port}, {host} and {twistd} are substituted "
        f"(default: {DEFAULT_OURS_CMD!r})",
    )
    parser.add_argument(
        "--sockets", type=int, default=8, help="client sockets (default 8, at most 64)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=16,
        help="outstanding requests per socket (default 16); sockets x window must fit the "
        "server's receive buffer or requests are dropped",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=20_000_000,
        help="hard cap on requests sent per server (default 20,000,000)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 30:
        parser.error("--duration must be in (0, 30] seconds")
    if not 0 <= args.warmup <= 5:
        parser.error("--warmup must be in [0, 5] seconds")
    if not 1 <= args.sockets <= 64 or not 1 <= args.window <= 1024:
        parser.error("--sockets must be in [1, 64] and --window in [1, 1024]")
    if args.max_requests < 1:
        parser.error("--max-requests must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loadgen_cpu, server_cpu = _cpus()
    settings = LoadSettings(
        duration=args.duration,
        warmup=args.warmup,
        sockets=args.sockets,
        window=args.window,
        max_requests=args.max_requests,
        loadgen_cpu=loadgen_cpu,
        server_cpu=server_cpu,
    )
    try:
        results = run_benchmark(args.ours_cmd, settings)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    print(report_json(results, settings) if args.json else format_report(results, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
