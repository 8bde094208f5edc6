"""TCP stream throughput: a punched TCP+TLS path through two NATs against TLS over loopback TCP.

Each run is one bulk one-way transfer of ``--megabytes`` from a caller to a
callee, both ``punch:`` endpoints (the code natcat runs, without its
standard input and output), each a process of its own:

- ``punched``: in the NAT lab (network namespaces, real kernel NATs), the
  callee behind one NAT and the caller behind another (port-restricted both
  by default, no link delay), our ``twistd natrendezvous`` on a public host,
  both sides with ``methods=tcp``: the path is a TCP hole punched through
  both NATs;
- ``loopback``: in one namespace of the same lab, a rendezvous on
  127.0.0.1 and both sides with ``methods=direct``, the callee listening on
  127.0.0.1 only: the path is a TCP connection over loopback.

Both paths are the same :class:`~nattraverse.secure.SecurePath` (preamble,
TLS 1.3 pinned both ways, selection) under a
:class:`~nattraverse._tls.PunchTransport`; the caller writes 64 KiB blocks
through a push producer, the callee counts bytes.  MB/s (10^6 bytes per
second, from the caller's first write to the callee's last byte, both read
from the one monotonic clock of the machine) of each and the ratio
punched/loopback of the medians (and of the best runs) are printed.
Target: 0.9x or better.

Root only (it builds network namespaces).  Every child is bounded by
``--timeout`` and stopped by its PID; the lab, with every process started
in it, is removed on exit, on Ctrl-C and on SIGTERM.  See README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.lab.natcheck_support import repo_environment, stop  # noqa: E402
from tests.lab.punch_support import (  # noqa: E402 (needs the repository on sys.path)
    RENDEZVOUS,
    RENDEZVOUS_ADDRESS,
    RENDEZVOUS_PORT,
    STARTUP_TIMEOUT,
    rendezvous,
)
from tests.natlab import Inbound, Lab, LabError, LabUnavailable, Node, Preset  # noqa: E402

#: The target: the punched path's MB/s at least this share of loopback's.
TARGET_RATIO = 0.9
CHUNK = 64 * 1024
LOOPBACK = "127.0.0.1"
LOOPBACK_RENDEZVOUS = f"tcp:{LOOPBACK}:{RENDEZVOUS_PORT}"
KINDS = ("loopback", "punched")
DEFAULT_MEGABYTES = 512
DEFAULT_RUNS = 5
DEFAULT_TIMEOUT = 60.0
DEFAULT_NATS = "port-restricted/port-restricted"
#: Seconds a child has, beyond ``--timeout``, before it is killed.
KILL_SLACK = 10.0


class BenchmarkError(Exception):
    """The benchmark cannot run here (not root, not Linux, no namespaces)."""


# -- the children: one side of one transfer each -------------------------------------


def _escape(description: str) -> str:
    """A value inside an endpoint description (as natcat escapes it)."""
    return description.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _usage(out: dict[str, Any]) -> None:
    """This process's CPU seconds (user, system) and peak memory (MiB) into *out*."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["user_s"], out["sys_s"] = usage.ru_utime, usage.ru_stime
    out["max_rss_mib"] = usage.ru_maxrss / 1024  # Linux counts KiB


def _finisher(reactor: Any, out: dict[str, Any]) -> Callable[[], None]:
    """What ends a child, once: its CPU time into *out*, *out* printed, the reactor stopped."""

    def finish() -> None:
        if "done" not in out:
            out["done"] = True
            _usage(out)
            _emit(out)
            reactor.callLater(0, reactor.stop)

    return finish


def _child_receive(options: argparse.Namespace) -> None:
    """
    The callee: register *name*, count the bytes of the first path that
    reaches the application, close it once *total* have arrived.
    """
    from twisted.internet import reactor as _reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol
    from twisted.python.failure import Failure

    reactor: Any = _reactor
    total: int = options.bytes
    out: dict[str, Any] = {"role": "callee", "bytes": 0}

    finish = _finisher(reactor, out)

    class Receiver(Protocol):
        def connectionMade(self) -> None:
            out["method"] = getattr(self.transport, "method", "?")
            out["remote"] = getattr(self.transport, "remote", "?")

        def dataReceived(self, data: bytes) -> None:
            if not out["bytes"]:
                _usage(out)
                out["before"] = (out["user_s"], out["sys_s"])
            out["bytes"] += len(data)
            if out["bytes"] >= total and "end" not in out:
                out["end"] = time.monotonic()
                assert self.transport is not None
                self.transport.loseConnection()

        def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
            finish()

    description = (
        f"punch:name={_escape(options.name)}:rendezvous={_escape(options.rendezvous)}"
        f":identity={_escape(options.identity)}:methods={options.methods}"
        + (f":interface={options.interface}" if options.interface else "")
    )
    endpoint = serverFromString(reactor, description)

    def listening(port: Any) -> None:
        _emit({"ready": True})

    def failed(reason: Failure) -> None:
        out["error"] = reason.getErrorMessage()
        finish()

    endpoint.listen(Factory.forProtocol(Receiver)).addCallbacks(listening, failed)
    reactor.callLater(options.timeout, finish)
    reactor.run()


def _child_send(options: argparse.Namespace) -> None:
    """
    The caller: connect to *name*, write *total* bytes through a push
    producer, wait for the callee to close.
    """
    from twisted.internet import reactor as _reactor
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.interfaces import IPushProducer
    from twisted.internet.protocol import Factory, Protocol
    from twisted.python.failure import Failure
    from zope.interface import implementer

    reactor: Any = _reactor
    total: int = options.bytes
    out: dict[str, Any] = {"role": "caller", "sent": 0}

    finish = _finisher(reactor, out)

    @implementer(IPushProducer)
    class Sender(Protocol):
        paused = False

        def connectionMade(self) -> None:
            assert self.transport is not None
            out["connect_ms"] = (time.monotonic() - started) * 1000
            out["method"] = getattr(self.transport, "method", "?")
            out["remote"] = getattr(self.transport, "remote", "?")
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
            _usage(out)
            out["before"] = (out["user_s"], out["sys_s"])
            out["start"] = time.monotonic()
            self.resumeProducing()

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False
            block = b"\0" * CHUNK
            while not self.paused and out["sent"] < total and self.transport is not None:
                self.transport.write(block[: total - out["sent"]])
                out["sent"] += min(CHUNK, total - out["sent"])
            if out["sent"] >= total and self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]

        def stopProducing(self) -> None:
            pass

        def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
            finish()

    def failed(reason: Failure) -> None:
        out["error"] = reason.getErrorMessage()
        finish()

    description = (
        f"punch:peer={_escape(options.name)}:rendezvous={_escape(options.rendezvous)}"
        f":methods={options.methods}"
    )
    endpoint = clientFromString(reactor, description)
    started = time.monotonic()
    endpoint.connect(Factory.forProtocol(Sender)).addErrback(failed)
    reactor.callLater(options.timeout, finish)
    reactor.run()


# -- the harness ---------------------------------------------------------------------


@dataclass
class Figures:
    """What was measured on one kind of path."""

    kind: str
    mb_per_s: list[float] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)
    #: CPU seconds (user + system) of both ends during the transfer, per 10^9 bytes.
    cpu_s_per_gb: list[float] = field(default_factory=list)
    #: The system (kernel) part of *cpu_s_per_gb*.
    sys_s_per_gb: list[float] = field(default_factory=list)
    #: The sender's peak resident memory, MiB (its producer is paused when TCP is full).
    sender_rss_mib: list[float] = field(default_factory=list)
    remotes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def best(self) -> float | None:
        return max(self.mb_per_s) if self.mb_per_s else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.mb_per_s) if self.mb_per_s else None


def _child_argv(role: str, name: str, rendezvous_: str, methods: str, **extra: Any) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", role, "--name", name]
    argv += ["--rendezvous", rendezvous_, "--methods", methods]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def _records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(errors="replace") if path.exists() else ""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            with suppress(ValueError):
                found.append(json.loads(line))
    return found


def _tail(path: Path, size: int = 600) -> str:
    text = path.read_text(errors="replace").strip() if path.exists() else ""
    return text[-size:]


@contextmanager
def _loopback_rendezvous(node: Node, directory: Path) -> Iterator[None]:
    """``twistd natrendezvous`` on 127.0.0.1 in *node*'s namespace, stopped afterwards."""
    process = node.popen(
        [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", f"--logfile={directory / 'loopback-twistd.log'}",
            "natrendezvous", "--stun-interface", LOOPBACK,
            "--listen", f"tcp:{RENDEZVOUS_PORT}:interface={LOOPBACK}",
        ],
        env=repo_environment(),
        cwd=str(directory),
    )  # fmt: skip

    def accepts() -> bool:
        import socket

        try:
            with socket.create_connection((LOOPBACK, RENDEZVOUS_PORT), timeout=0.5):
                return True
        except OSError:
            return False

    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not node.call(accepts):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the loopback rendezvous did not start ({process.poll()})")
            time.sleep(0.1)
        yield
    finally:
        stop(process)


def _transfer(
    callee: Node,
    caller: Node,
    directory: Path,
    *,
    tag: str,
    rendezvous_: str,
    methods: str,
    interface: str | None,
    total: int,
    timeout: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    One transfer: the callee registers *tag*, the caller sends *total* bytes.

    :raises RuntimeError: saying why, when either side failed or overran.
    """
    callee_out, caller_out = directory / f"{tag}.callee", directory / f"{tag}.caller"
    extra: dict[str, Any] = {"identity": directory / f"{tag}.key", "bytes": total}
    extra["timeout"] = timeout
    if interface:
        extra["interface"] = interface
    env = repo_environment()
    with callee_out.open("wb") as sink, (directory / f"{tag}.callee.err").open("wb") as err:
        receiver = callee.popen(
            _child_argv("receive", tag, rendezvous_, methods, **extra),
            stdout=sink,
            stderr=err,
            env=env,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not any(r.get("ready") for r in _records(callee_out)):
            if receiver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the callee did not register within {STARTUP_TIMEOUT:g} s: "
                    f"{_tail(callee_out)} {_tail(directory / f'{tag}.callee.err')}"
                )
            time.sleep(0.05)
        with caller_out.open("wb") as sink, (directory / f"{tag}.caller.err").open("wb") as err:
            sender = caller.popen(
                _child_argv("send", tag, rendezvous_, methods, bytes=total, timeout=timeout),
                stdout=sink,
                stderr=err,
                env=env,
            )
        try:
            sender.wait(timeout + KILL_SLACK)
            receiver.wait(KILL_SLACK)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"overran {timeout + KILL_SLACK:g} s; stopped") from None
        finally:
            stop(sender)
    finally:
        stop(receiver)
    mine = [r for r in _records(caller_out) if r.get("role") == "caller"]
    theirs = [r for r in _records(callee_out) if r.get("role") == "callee"]
    if not mine or not theirs:
        raise RuntimeError(
            f"no result: {_tail(directory / f'{tag}.caller.err')} "
            f"{_tail(directory / f'{tag}.callee.err')}"
        )
    return mine[0], theirs[0]


def _measure(
    figures: Figures,
    callee: Node,
    caller: Node,
    directory: Path,
    *,
    index: int,
    total: int,
    timeout: float,
) -> None:
    """One run of *figures.kind*; its MB/s, or the reason it failed, go to *figures*."""
    if figures.kind == "punched":
        rendezvous_, methods, interface = RENDEZVOUS, "tcp", None
    else:
        rendezvous_, methods, interface = LOOPBACK_RENDEZVOUS, "direct", LOOPBACK
    try:
        sent, got = _transfer(
            callee,
            caller,
            directory,
            tag=f"{figures.kind}{index}",
            rendezvous_=rendezvous_,
            methods=methods,
            interface=interface,
            total=total,
            timeout=timeout,
        )
    except RuntimeError as e:
        figures.failures.append(f"run {index + 1}: {e}")
        return
    error = sent.get("error") or got.get("error")
    if error or got.get("bytes", 0) < total or "end" not in got or "start" not in sent:
        figures.failures.append(
            f"run {index + 1}: {error or 'timed out'}; {got.get('bytes', 0)} of {total} bytes"
        )
        return
    if sent.get("method") != methods:
        figures.failures.append(
            f"run {index + 1}: connected by {sent.get('method')}, not {methods}"
        )
        return
    figures.mb_per_s.append(total / (got["end"] - sent["start"]) / 1e6)
    figures.connect_ms.append(float(sent["connect_ms"]))
    user = sent["user_s"] - sent["before"][0] + got["user_s"] - got["before"][0]
    system = sent["sys_s"] - sent["before"][1] + got["sys_s"] - got["before"][1]
    figures.cpu_s_per_gb.append((user + system) / total * 1e9)
    figures.sys_s_per_gb.append(system / total * 1e9)
    figures.sender_rss_mib.append(float(sent["max_rss_mib"]))
    figures.remotes.append(str(sent.get("remote")))


def run_benchmark(
    nats: tuple[str, str], *, runs: int, total: int, timeout: float, inbound: str
) -> dict[str, Figures]:
    """Build one lab, alternate loopback and punched runs in it, remove it."""
    if sys.platform != "linux":
        raise BenchmarkError("needs Linux: the lab is made of network namespaces")
    if os.geteuid() != 0:
        raise BenchmarkError(
            "needs root: the lab builds network namespaces and nftables NATs "
            f"(run: sudo {sys.executable} {Path(__file__).relative_to(REPO_ROOT)})"
        )
    figures = {kind: Figures(kind) for kind in KINDS}
    with Lab() as lab:
        try:
            server = lab.public_host("rendezvous", RENDEZVOUS_ADDRESS)
            callee = lab.host("callee", behind=lab.nat("natcallee", nats[0], inbound=inbound))
            caller = lab.host("caller", behind=lab.nat("natcaller", nats[1], inbound=inbound))
            alone = lab.public_host("loopback")
            lab.build()
        except (LabUnavailable, LabError) as e:
            raise BenchmarkError(f"cannot build the lab here: {e}") from e
        with tempfile.TemporaryDirectory(prefix="tcp-stream-") as name:
            directory = Path(name)
            try:
                with rendezvous(server, directory), _loopback_rendezvous(alone, directory):
                    for index in range(runs):
                        for kind in KINDS:
                            loop = kind == "loopback"
                            _measure(
                                figures[kind],
                                alone if loop else callee,
                                alone if loop else caller,
                                directory,
                                index=index,
                                total=total,
                                timeout=timeout,
                            )
            except RuntimeError as e:
                for kind in KINDS:
                    figures[kind].failures.append(f"could not start: {str(e)[-800:]}")
    return figures


def ratio_of(figures: dict[str, Figures], *, median: bool = False) -> float | None:
    """Punched MB/s over loopback MB/s: of the best runs, or of the medians (the target's)."""
    if median:
        punched, loopback = figures["punched"].median, figures["loopback"].median
    else:
        punched, loopback = figures["punched"].best, figures["loopback"].best
    return punched / loopback if punched and loopback else None


def format_report(
    figures: dict[str, Figures], *, megabytes: int, nats: tuple[str, str], inbound: str
) -> str:
    lines = [
        f"one TCP+TLS stream, {megabytes} MiB per run, MB/s; punched: methods=tcp through "
        f"{nats[0]}/{nats[1]} NATs (callee/caller, {inbound} unsolicited, no delay); "
        "loopback: methods=direct on 127.0.0.1",
    ]
    lines.append(
        f"  {'path':<10}{'best':>8}{'median':>8}  {'CPU s/GB (sys)':<16}{'remote host':<14}"
        "runs MB/s"
    )
    for kind in KINDS:
        f = figures[kind]
        rates = " ".join(f"{r:.1f}" for r in f.mb_per_s) or "-"
        best = f"{f.best:.1f}" if f.best else "-"
        median = f"{f.median:.1f}" if f.median else "-"
        cpu = (
            f"{statistics.median(f.cpu_s_per_gb):.2f} ({statistics.median(f.sys_s_per_gb):.2f})"
            if f.cpu_s_per_gb
            else "-"
        )
        where = ",".join(sorted({remote.rpartition(":")[0] for remote in f.remotes})) or "-"
        lines.append(f"  {kind:<10}{best:>8}{median:>8}  {cpu:<16}{where:<14}{rates}")
    top, middle = ratio_of(figures), ratio_of(figures, median=True)
    verdict = "-" if middle is None else ("ok" if middle >= TARGET_RATIO else "under")
    lines.append(
        f"  ratio punched/loopback: median {'-' if middle is None else f'{middle:.3f}'}, best "
        f"{'-' if top is None else f'{top:.3f}'}; target {TARGET_RATIO:g}x (median): {verdict}"
    )
    for kind in KINDS:
        lines += [f"{kind}: {failure}" for failure in figures[kind].failures]
    return "\n".join(lines)


def parse_nats(text: str) -> tuple[str, str]:
    """``CALLEE/CALLER``, each a lab preset."""
    known = {preset.value for preset in Preset}
    parts = text.split("/")
    if len(parts) != 2 or not set(parts) <= known:
        raise ValueError(f"{text!r} is not CALLEE/CALLER with each of: {', '.join(sorted(known))}")
    return parts[0], parts[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of a punched TCP+TLS stream through two NATs in the lab, "
        "against TLS over loopback TCP, same code (root only).",
    )
    parser.add_argument(
        "--megabytes",
        type=int,
        default=DEFAULT_MEGABYTES,
        help="MiB per run (default: %(default)s)",
    )
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help="runs of each (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds per run, connect included (default: %(default)s)",
    )
    parser.add_argument(
        "--nats",
        default=DEFAULT_NATS,
        help="the punched path's CALLEE/CALLER NAT presets (default: %(default)s)",
    )
    parser.add_argument(
        "--inbound",
        choices=[i.value for i in Inbound],
        default=Inbound.DROP.value,
        help="what the NATs do with unsolicited packets (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", choices=["send", "receive"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", help=argparse.SUPPRESS)
    parser.add_argument("--methods", help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    parser.add_argument("--interface", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    if not 1 <= args.megabytes <= 4096 or not 1 <= args.runs <= 20:
        parser.error("--megabytes must be from 1 to 4096 and --runs from 1 to 20")
    if not 1 <= args.timeout <= 600:
        parser.error("--timeout must be from 1 to 600 seconds")
    try:
        args.nat_pair = parse_nats(args.nats)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "send":
        _child_send(args)
        return 0
    if args.child == "receive":
        _child_receive(args)
        return 0
    total = args.megabytes * 1024 * 1024
    started = time.monotonic()
    try:
        figures = run_benchmark(
            args.nat_pair, runs=args.runs, total=total, timeout=args.timeout, inbound=args.inbound
        )
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the lab and every process in it were removed", file=sys.stderr)
        return 130
    if args.json:
        out = {
            "megabytes": args.megabytes,
            "nats": args.nats,
            "inbound": args.inbound,
            "target_ratio": TARGET_RATIO,
            "seconds": time.monotonic() - started,
            "ratio": ratio_of(figures),
            "median_ratio": ratio_of(figures, median=True),
            "kinds": {
                kind: asdict(f) | {"best": f.best, "median": f.median}
                for kind, f in figures.items()
            },
        }
        print(json.dumps(out, indent=2))
    else:
        print(
            format_report(
                figures, megabytes=args.megabytes, nats=args.nat_pair, inbound=args.inbound
            )
        )
    return 1 if any(f.failures for f in figures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
