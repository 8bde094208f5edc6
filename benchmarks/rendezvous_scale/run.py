"""Rendezvous scale: memory per idle registered peer, and introductions per second.

Starts ``twistd -n natrendezvous`` in a subprocess on 127.0.0.1 with its caps
raised, registers ``--peers`` idle peers from this process (each its own key,
its own TCP connection), and reads the server's RSS (``VmRSS``) before and
after: bytes per peer, against the 2 KiB target and against what the kernel
spends per TCP socket (``Slab`` of ``/proc/meminfo`` over the sockets
``/proc/net/sockstat`` counts).  Then, with every peer still registered, a
few callers send ``Connect`` to random peers (a window of requests in flight
each) for a bounded count and time: introductions per wall second and per
server CPU-second, and round-trip latency.  See README.md.

Clients and server run in separate processes, so each holds about
``--peers`` sockets, under its own RLIMIT_NOFILE (raised here to the hard
limit, which the server inherits).

Linux only.  Traffic goes to 127.0.0.1 only.  The server is stopped by its
PID when the run ends, fails or is interrupted, and dies with this process
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
sys.path.insert(0, str(REPO_ROOT))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.protocols import amp  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from nattraverse.identity import Identity  # noqa: E402
from nattraverse.rendezvous.commands import (  # noqa: E402
    Authenticate,
    Connect,
    DialBack,
    Hello,
    Introduce,
    Register,
    RelayOffer,
)

HOST = "127.0.0.1"
TARGET_BYTES_PER_PEER = 2048
_PR_SET_PDEATHSIG = 1


class BenchmarkError(Exception):
    """The benchmark cannot run (platform, limits, server start)."""


# -- processes and /proc ----------------------------------------------------------------------


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def raise_nofile(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; the server inherits it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchmarkError(f"the open-file hard limit is {hard}; {needed} are needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(hard)


def free_port(*, udp: bool = False) -> int:
    """A TCP port free on 127.0.0.1 (and free for UDP too, for STUN, with *udp*)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dgram:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            if udp:
                try:
                    dgram.bind((HOST, port))
                except OSError:
                    continue
            return int(port)
    raise BenchmarkError("no free port")


def rss(pid: int) -> int:
    """Resident set size of *pid*, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchmarkError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* (every thread), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kernel_snapshot() -> tuple[int, int]:
    """(TCP sockets in use on this host, kernel slab bytes)."""
    inuse = 0
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()
            inuse = int(words[words.index("inuse") + 1])
    slab = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            slab = int(line.split()[1]) * 1024
    return inuse, slab


@contextlib.contextmanager
def server_process(port: int, peers: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``twistd -n natrendezvous`` on TCP *port* with caps above *peers*; stopped by PID."""
    twistd = Path(sys.executable).with_name("twistd")
    command = (
        [str(twistd)]
        if twistd.exists()
        else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    )
    caps = str(peers + 1000)
    argv = [
        *command,
        "-n",
        "--pidfile=",
        f"--logfile={log}",
        "natrendezvous",
        f"--stun-interface={HOST}",
        f"--stun-port={free_port(udp=True)}",
        f"--listen=tcp:{port}:interface={HOST}:backlog=1024",
        f"--max-registrations={caps}",
        f"--max-registrations-per-ip={caps}",
        f"--max-connections={caps}",
        "--registration-ttl=3600",
        "--max-introductions=1000000",
    ]
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    env.pop("NATRENDEZVOUS_ACCESS_KEY", None)
    proc = subprocess.Popen(
        argv,
        cwd=tempfile.gettempdir(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=_die_with_parent,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise BenchmarkError(f"the server exited ({proc.returncode}); see {log}")
            with socket.socket() as probe:
                if probe.connect_ex((HOST, port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the server did not listen within 15 s; see {log}")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# -- clients --------------------------------------------------------------------------------------


class Peer(amp.AMP):
    """A bare rendezvous client that answers the server's requests and counts them."""

    introduced = 0

    def call(self, command: type[amp.Command], **arguments: Any) -> defer.Deferred[Any]:
        """callRemote, typed."""
        return self.callRemote(command, **arguments)  # type: ignore[no-any-return,no-untyped-call]

    @Introduce.responder
    def _introduce(self, **arguments: Any) -> dict[str, Any]:
        Peer.introduced += 1
        return {}

    @DialBack.responder
    def _dial_back(self, **arguments: Any) -> dict[str, Any]:
        return {}

    @RelayOffer.responder
    def _relay_offer(self, **arguments: Any) -> dict[str, Any]:
        return {}


async def open_peer(reactor: Any, port: int, name: str | None) -> Peer:
    """A connection authenticated with a fresh key; registered as *name* when given."""
    identity = Identity.generate()
    endpoint = TCP4ClientEndpoint(reactor, HOST, port, timeout=10)
    peer: Peer = await connectProtocol(endpoint, Peer())  # type: ignore[no-untyped-call]
    hello = await peer.call(Hello, version=1)
    await peer.call(
        Authenticate,
        public_key=identity.public_key_der,
        signature=identity.sign(hello["challenge"]),
    )
    if name is not None:
        await peer.call(Register, name=name, listen_port=0, private=[])
    return peer


async def open_many(reactor: Any, port: int, names: list[str], parallel: int) -> list[Peer]:
    """Register *names*, *parallel* at a time."""
    gate = defer.DeferredSemaphore(parallel)
    return list(
        await defer.gatherResults(
            [gate.run(open_peer, reactor, port, name) for name in names],
            consumeErrors=True,
        )
    )


async def settle(reactor: Any, seconds: float) -> None:
    """Let the server finish what it was doing."""
    await task.deferLater(reactor, seconds, lambda: None)


async def introductions(
    reactor: Any, callers: list[Peer], names: list[str], count: int, seconds: float, window: int
) -> tuple[int, float, list[float]]:
    """Connect to random *names* until *count* answers or *seconds*; (done, elapsed, RTTs)."""
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    budget = [count]

    async def run(caller: Peer) -> None:
        rng = random.Random(id(caller))
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            sent = time.perf_counter()
            await caller.call(
                Connect, peer=rng.choice(names), listen_port=0, private=[], methods=["direct"]
            )
            latencies.append(time.perf_counter() - sent)

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(run(caller)) for caller in callers for _ in range(window)],
        consumeErrors=True,
    )
    return len(latencies), time.perf_counter() - started, latencies


async def measure(
    reactor: Any, args: argparse.Namespace, server_pid: int, port: int
) -> dict[str, Any]:
    warmup = [f"warm{i}" for i in range(args.warmup)]
    peers = await open_many(reactor, port, warmup, args.parallel)
    await settle(reactor, 1.0)
    gc.collect()
    rss_before = rss(server_pid)
    kernel_before = kernel_snapshot()
    names = [f"peer{i}" for i in range(args.peers)]
    started = time.perf_counter()
    peers += await open_many(reactor, port, names, args.parallel)
    register_seconds = time.perf_counter() - started
    await settle(reactor, 2.0)
    rss_after = rss(server_pid)
    kernel_after = kernel_snapshot()
    sockets = kernel_after[0] - kernel_before[0]
    kernel_per_socket = (kernel_after[1] - kernel_before[1]) / sockets if sockets > 0 else 0.0
    per_peer = (rss_after - rss_before) / args.peers

    callers = await open_many(reactor, port, [f"caller{i}" for i in range(args.callers)], 8)
    cpu_before = cpu_seconds(server_pid)
    introduced_before = Peer.introduced
    done, elapsed, latencies = await introductions(
        reactor, callers, names, args.introductions, args.seconds, args.window
    )
    cpu = cpu_seconds(server_pid) - cpu_before
    await settle(reactor, 0.5)
    delivered = Peer.introduced - introduced_before
    rss_final = rss(server_pid)
    for peer in peers + callers:
        if peer.transport is not None:
            peer.transport.abortConnection()  # type: ignore[attr-defined]
    await settle(reactor, 0.5)
    latencies.sort()
    return {
        "peers": args.peers,
        "register_seconds": register_seconds,
        "registrations_per_second": args.peers / register_seconds,
        "server_rss_before": rss_before,
        "server_rss_after": rss_after,
        "server_bytes_per_peer": per_peer,
        "target_bytes_per_peer": TARGET_BYTES_PER_PEER,
        "kernel_tcp_sockets_added": sockets,
        "kernel_slab_bytes_per_socket": kernel_per_socket,
        "introductions": done,
        "introduce_delivered": delivered,
        "introduction_seconds": elapsed,
        "introductions_per_second": done / elapsed if elapsed else 0.0,
        "server_cpu_seconds": cpu,
        "introductions_per_server_cpu_second": done / cpu if cpu else 0.0,
        "latency_ms_median": 1000 * statistics.median(latencies) if latencies else 0.0,
        "latency_ms_p99": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0,
        "server_rss_final": rss_final,
    }


def report(figures: dict[str, Any]) -> str:
    per_peer = figures["server_bytes_per_peer"]
    kernel = figures["kernel_slab_bytes_per_socket"]
    mib = 1024 * 1024
    lines = [
        f"registered {figures['peers']} idle peers in {figures['register_seconds']:.1f} s "
        f"({figures['registrations_per_second']:.0f}/s)",
        f"server RSS {figures['server_rss_before'] / mib:.1f} MiB -> "
        f"{figures['server_rss_after'] / mib:.1f} MiB",
        f"server memory per idle peer: {per_peer:.0f} B  "
        f"(target {TARGET_BYTES_PER_PEER} B: {per_peer / TARGET_BYTES_PER_PEER:.2f}x the target)",
        f"kernel slab per TCP socket: {kernel:.0f} B over {figures['kernel_tcp_sockets_added']} "
        f"sockets  (server per peer / kernel per socket: "
        f"{per_peer / kernel if kernel > 0 else float('nan'):.2f})",
        f"introductions: {figures['introductions']} in {figures['introduction_seconds']:.1f} s = "
        f"{figures['introductions_per_second']:.0f}/s; "
        f"{figures['introductions_per_server_cpu_second']:.0f} per server CPU-second "
        f"({figures['server_cpu_seconds']:.1f} CPU-s); Introduce delivered: "
        f"{figures['introduce_delivered']}",
        f"Connect round trip: median {figures['latency_ms_median']:.2f} ms, "
        f"p99 {figures['latency_ms_p99']:.2f} ms",
    ]
    return "\n".join(lines)


def run_reactor(args: argparse.Namespace, server_pid: int, port: int) -> dict[str, Any]:
    """Run :func:`measure` on the reactor, bounded by ``--timeout``."""
    from twisted.internet import reactor

    outcome: list[Any] = []

    def finished(result: Any) -> None:
        outcome.append(result)
        reactor.stop()

    def start() -> None:
        work = defer.Deferred.fromCoroutine(measure(reactor, args, server_pid, port))
        work.addTimeout(args.timeout, reactor).addBoth(finished)

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise BenchmarkError("interrupted")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=10_000, help="idle peers to register")
    parser.add_argument("--warmup", type=int, default=200, help="peers registered before RSS")
    parser.add_argument("--parallel", type=int, default=64, help="registrations in flight")
    parser.add_argument("--callers", type=int, default=4, help="connections sending Connect")
    parser.add_argument("--window", type=int, default=16, help="Connects in flight per caller")
    parser.add_argument("--introductions", type=int, default=30_000, help="most Connects")
    parser.add_argument("--seconds", type=float, default=10.0, help="most seconds of Connects")
    parser.add_argument("--timeout", type=float, default=170.0, help="abort the run after this")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise BenchmarkError("Linux only (/proc)")
    if args.peers < 1:
        parser.error("--peers must be at least 1")
    limit = raise_nofile(args.peers + args.warmup + args.callers + 200)
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="rendezvous_scale.")) / "server.log"
    with server_process(port, args.peers + args.warmup + args.callers, log) as server:
        result = run_reactor(args, server.pid, port)
    result["open_file_limit"] = limit
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as e:
        print(f"rendezvous_scale: {e}", file=sys.stderr)
        sys.exit(2)
