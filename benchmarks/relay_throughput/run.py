"""Relay throughput: our relay's two engines against socat and direct TCP, on loopback.

One bulk one-way transfer per path, each bounded by a byte count and a
duration, with a sender and a receiver in this process (plain blocking
sockets, ``sendall`` of 1 MiB buffers and ``recv_into``: C-speed loops that
release the GIL) and whatever sits in the middle in a process of its own:

- ``direct``: sender straight to receiver (the ceiling);
- ``socat``: ``socat TCP-LISTEN:P,reuseaddr,bind=127.0.0.1 TCP:127.0.0.1:Q``;
- ``relay-stream``: :class:`nattraverse.rendezvous.relay.RelayHub` on the real
  reactor, generic producer/consumer engine;
- ``relay-splice``: the same, zero-copy ``os.splice`` engine.

For the relay, this script runs itself with ``--serve-relay``: a hub behind a
small AMP server answering ``RelayJoin`` with the protocol switch, as the
rendezvous does.  Both peers join with plain sockets, read their AMP answer,
then the transfer starts.  MB/s (10^6 bytes per second) of the receiver, the
middle process's CPU seconds, and ratios against socat and direct are
printed.  See README.md.

Linux only.  Traffic goes to 127.0.0.1 only.  Every process started here is
stopped by its PID when its run ends, fails or is interrupted, and dies with
this process (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
HOST = "127.0.0.1"
PATHS = ("direct", "socat", "relay-stream", "relay-splice")
CHUNK = 1024 * 1024
#: Seconds to wait for a helper process to be ready, or a socket to connect.
READY_TIMEOUT = 20.0
#: Seconds a relay process lives at most, whatever happens to this script.
RELAY_MAX_SECONDS = 600.0
_PR_SET_PDEATHSIG = 1


class Unavailable(Exception):
    """A path cannot be measured here (a program is missing, a helper did not start)."""


@dataclass
class Result:
    """What was measured on one path, or why nothing was."""

    path: str
    available: bool = True
    reason: str = ""
    bytes: int = 0
    seconds: float = 0.0
    middle_cpu_s: float | None = None
    engine: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


# -- helper processes -------------------------------------------------------------


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@contextlib.contextmanager
def started(command: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Run *command*; stop it by its PID afterwards (TERM, then KILL)."""
    process = subprocess.Popen(command, preexec_fn=_die_with_parent, **kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for stream in (process.stdout, process.stderr, process.stdin):
            if stream is not None:
                stream.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def connect_retrying(port: int, deadline: float) -> socket.socket:
    """Connect to *port*, retrying while nothing listens yet, until *deadline*."""
    while True:
        try:
            return socket.create_connection((HOST, port), timeout=READY_TIMEOUT)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise Unavailable(f"nothing listens on port {port}") from None
            time.sleep(0.02)


def read_line(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """One JSON line from *process*'s stdout, within *timeout* seconds."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
            raise Unavailable(f"no answer from {process.args!r} within {timeout}s")
        byte = process.stdout.read1(1)  # type: ignore[attr-defined]
        if not byte:
            raise Unavailable(f"{process.args!r} exited with {process.wait()}")
        line += byte
    return dict(json.loads(line))


# -- the transfer -------------------------------------------------------------------


def transfer(sender: socket.socket, receiver: socket.socket, size: int, duration: float) -> Result:
    """Send up to *size* bytes for up to *duration* seconds; what the receiver got, and when."""
    got = [0]
    finished = [0.0]

    def receive() -> None:
        buffer = bytearray(CHUNK)
        total = 0
        while True:
            count = receiver.recv_into(buffer)
            if not count:
                break
            total += count
        got[0] = total
        finished[0] = time.perf_counter()

    receiver.settimeout(duration + READY_TIMEOUT)
    sender.settimeout(duration + READY_TIMEOUT)
    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    payload = memoryview(os.urandom(CHUNK))
    start = time.perf_counter()
    deadline = start + duration
    sent = 0
    while sent < size and time.perf_counter() < deadline:
        sender.sendall(payload)
        sent += CHUNK
    sender.shutdown(socket.SHUT_WR)
    thread.join(duration + READY_TIMEOUT)
    if thread.is_alive():
        raise Unavailable("the receiver did not see the end of the transfer in time")
    if got[0] != sent:
        raise Unavailable(f"sent {sent} bytes but {got[0]} arrived")
    return Result("", bytes=got[0], seconds=finished[0] - start)


@contextlib.contextmanager
def receiving_end() -> Iterator[tuple[socket.socket, Callable[[], socket.socket]]]:
    """A listening socket and a function that accepts its one connection."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(1)
        listener.settimeout(READY_TIMEOUT)
        yield listener, lambda: listener.accept()[0]


def run_direct(size: int, duration: float) -> Result:
    with receiving_end() as (listener, accept):
        sender = socket.create_connection(listener.getsockname(), timeout=READY_TIMEOUT)
        with sender, accept() as receiver:
            return transfer(sender, receiver, size, duration)


def run_socat(size: int, duration: float) -> Result:
    socat = shutil.which("socat")
    if socat is None:
        raise Unavailable("socat is not installed (apt install socat)")
    with receiving_end() as (listener, accept):
        port = free_port()
        target = listener.getsockname()[1]
        command = [socat, f"TCP-LISTEN:{port},reuseaddr,bind={HOST}", f"TCP:{HOST}:{target}"]
        with started(command, stderr=subprocess.DEVNULL) as process:
            sender = connect_retrying(port, time.monotonic() + READY_TIMEOUT)
            with sender, accept() as receiver:
                before = cpu_seconds(process.pid)
                result = transfer(sender, receiver, size, duration)
                result.middle_cpu_s = cpu_seconds(process.pid) - before
                return result


def join_box(token: bytes) -> bytes:
    """``RelayJoin`` as an AMP client sends it."""
    pairs = [(b"_ask", b"1"), (b"_command", b"RelayJoin"), (b"token", token)]
    fields = b"".join(
        struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v for k, v in pairs
    )
    return fields + b"\x00\x00"


def read_answer(sock: socket.socket) -> None:
    """Read one AMP box (and nothing more) from *sock*; fail unless it is an answer."""
    keys = []
    while True:
        (length,) = struct.unpack("!H", recv_exactly(sock, 2))
        if length == 0:
            break
        key = recv_exactly(sock, length)
        (value_length,) = struct.unpack("!H", recv_exactly(sock, 2))
        recv_exactly(sock, value_length)
        keys.append(key)
    if b"_answer" not in keys:
        raise Unavailable(f"RelayJoin was not answered: {keys!r}")


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise Unavailable("the relay closed the connection during the join")
        data += chunk
    return data


def run_relay(engine: str, size: int, duration: float) -> Result:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-relay", engine]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    with started(command, stdout=subprocess.PIPE, env=env) as process:
        ready = read_line(process, READY_TIMEOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        sender = connect_retrying(ready["port"], deadline)
        receiver = connect_retrying(ready["port"], deadline)
        with sender, receiver:
            for sock, token in ((sender, ready["tokens"][0]), (receiver, ready["tokens"][1])):
                sock.settimeout(READY_TIMEOUT)
                sock.sendall(join_box(bytes.fromhex(token)))
            for sock in (sender, receiver):
                read_answer(sock)
            used = read_line(process, READY_TIMEOUT)["engine"]
            before = cpu_seconds(process.pid)
            result = transfer(sender, receiver, size, duration)
            result.middle_cpu_s = cpu_seconds(process.pid) - before
            result.engine = str(used)
            if used != engine.removeprefix("relay-"):
                raise Unavailable(f"asked for the {engine} engine, the relay used {used}")
            return result


def measure(path: str, size: int, duration: float) -> Result:
    try:
        if path == "direct":
            result = run_direct(size, duration)
        elif path == "socat":
            result = run_socat(size, duration)
        else:
            result = run_relay(path.removeprefix("relay-"), size, duration)
    except (Unavailable, OSError) as e:
        return Result(path, available=False, reason=str(e))
    result.path = path
    return result


# -- the relay process --------------------------------------------------------------


def serve_relay(engine: str) -> int:
    """Run a RelayHub with one relay allocated; print its port and tokens, then its engine."""
    from twisted.internet import reactor as installed
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
    from twisted.protocols import amp
    from zope.interface import implementer

    from nattraverse.identity import PeerId
    from nattraverse.rendezvous.commands import RelayJoin
    from nattraverse.rendezvous.relay import RelayHub, RelayLimits

    reactor: Any = installed
    caller, callee = PeerId(b"\x01" * 32), PeerId(b"\x02" * 32)
    limits = RelayLimits(rate=0, max_relays=4, lifetime=RELAY_MAX_SECONDS, join_timeout=60.0)
    hub = RelayHub(reactor, limits, zero_copy=engine == "splice")
    tokens = hub.allocate(b"benchmark-sessio", caller, callee)
    peers = dict(zip(tokens, (caller, callee), strict=True))

    class Locator(amp.CommandLocator):
        @RelayJoin.responder
        def relay_join(self, token: bytes) -> Protocol:
            return hub.join(token, peers.get(token, PeerId(b"\x00" * 32)))

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if "engine" in event:
            print(json.dumps({"engine": event["engine"]}), flush=True)

    globalLogPublisher.addObserver(observe)
    factory = Factory.forProtocol(lambda: amp.AMP(locator=Locator()))
    port = reactor.listenTCP(0, factory, interface=HOST)
    ready = {"port": port.getHost().port, "tokens": [t.hex() for t in tokens]}
    print(json.dumps(ready), flush=True)
    reactor.callLater(RELAY_MAX_SECONDS, reactor.stop)
    reactor.run()
    return 0


# -- report -------------------------------------------------------------------------


def report(results: list[Result]) -> str:
    by_path = {r.path: r for r in results if r.available}

    def ratio(result: Result, base: str) -> str:
        other = by_path.get(base)
        if other is None or not other.mb_per_s or not result.available:
            return "-"
        return f"{result.mb_per_s / other.mb_per_s:.2f}x"

    lines = [
        f"{'path':<14}{'MB/s':>10}{'GB moved':>10}{'middle CPU s/GB':>17}"
        f"{'vs socat':>10}{'vs direct':>11}",
    ]
    for result in results:
        if not result.available:
            lines.append(f"{result.path:<14}  unavailable ({result.reason})")
            continue
        cpu = (
            f"{result.middle_cpu_s / (result.bytes / 1e9):.2f}"
            if result.middle_cpu_s is not None and result.bytes
            else "-"
        )
        lines.append(
            f"{result.path:<14}{result.mb_per_s:>10.0f}{result.bytes / 1e9:>10.2f}{cpu:>17}"
            f"{ratio(result, 'socat'):>10}{ratio(result, 'direct'):>11}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per path (3)")
    parser.add_argument(
        "--size", type=int, default=16 << 30, help="bytes per path at most (16 GiB)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each path; best kept (1)")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="comma list of " + ", ".join(PATHS)
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--serve-relay", choices=("stream", "splice"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_relay:
        return serve_relay(args.serve_relay)
    if not sys.platform.startswith("linux"):
        print("this benchmark needs Linux", file=sys.stderr)
        return 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown paths: {', '.join(unknown)}")
    if not 0 < args.duration <= 60 or not 1 <= args.rounds <= 10:
        parser.error("--duration must be in (0, 60] and --rounds in [1, 10]")
    results = []
    for path in paths:
        runs = [measure(path, args.size, args.duration) for _ in range(args.rounds)]
        good = [r for r in runs if r.available]
        results.append(max(good, key=lambda r: r.mb_per_s) if good else runs[0])
    if args.json:
        print(json.dumps([asdict(r) | {"mb_per_s": r.mb_per_s} for r in results], indent=2))
    else:
        print(report(results))
    return 0 if all(r.available for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
