"""Time to connect through the NAT lab, against the lower bound the link delays allow.

For each pair of NATs (callee's/caller's), builds a lab (network namespaces,
real kernel NATs) with our ``twistd natrendezvous`` on a public host, a
callee (``natcat --listen alice --echo``) behind one NAT and a caller behind
the other, every NAT's WAN link (and the rendezvous' link) delayed by a known
one-way delay.  Then it runs ``natcat alice --methods M --json-report`` on
the caller *runs* times and takes the ``connect_ms`` of its report: the time
from ``connect()`` to ``connectionMade``.

The median is compared with the lower bound: the introduction reaching both
peers (TCP connect to the rendezvous, ``Hello``, ``Authenticate``,
``Connect``) plus one round trip between the peers.  See README.md for the
formula.  Target: 1.5x the bound or better, with ``--methods udp``.
``--methods tcp`` (TCP hole punching, issue 6) is measured against the same
bound; ``--inbound reject`` makes the NATs answer unsolicited packets (a
punching SYN that arrives first) with a RST instead of dropping them.

Root only (it builds network namespaces); the lab, with every process
started in it, is removed on exit, on Ctrl-C and on SIGTERM.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.lab.natcheck_support import repo_environment, stop  # noqa: E402
from tests.lab.punch_support import (  # noqa: E402 (needs the repository on sys.path)
    CALLEE_NAME,
    RENDEZVOUS,
    RENDEZVOUS_ADDRESS,
    listener,
    moves,
    natcat_argv,
    rendezvous,
    reports,
)
from tests.natlab import Inbound, Lab, LabError, LabUnavailable, Node, Preset  # noqa: E402

#: The target: the median time to connect within this many lower bounds.
TARGET_RATIO = 1.5
DEFAULT_PAIRS = (
    "full-cone/full-cone",
    "port-restricted/port-restricted",
    "full-cone/symmetric",
    "restricted-cone/port-restricted",
)
#: A side that is not behind a NAT: a public host, its own link delayed.
PUBLIC = "public"
DEFAULT_DELAY_MS = 10.0
DEFAULT_RUNS = 5
DEFAULT_WARMUP = 1
DEFAULT_METHODS = "udp"
DEFAULT_INBOUND = Inbound.DROP.value
#: Seconds one caller may run before it is killed (natcat's own timeout is 30 s).
RUN_TIMEOUT = 45.0


class BenchmarkError(Exception):
    """The benchmark cannot run here (not root, no namespaces, no delay)."""


@dataclass(frozen=True)
class Bound:
    """
    The lower bound of a connect() and its parts, in milliseconds.

    :ivar to_rendezvous: One way, caller to rendezvous.
    :ivar callee_to_rendezvous: One way, rendezvous to callee.
    :ivar between_peers: One way, caller to callee.
    :ivar introduction: When the introduction has reached both peers.
    :ivar total: *introduction* plus one round trip between the peers.
    """

    to_rendezvous: float
    callee_to_rendezvous: float
    between_peers: float
    introduction: float
    total: float


def lower_bound(caller_ms: float, callee_ms: float, rendezvous_ms: float) -> Bound:
    """
    The lower bound of the time to connect, from each party's one-way delay
    to the internet (see README.md): the caller spends four round trips with
    the rendezvous (TCP connect, ``Hello``, ``Authenticate``, ``Connect``);
    the server sends ``Introduce`` to the callee when ``Connect`` reaches
    it, seven one-way trips in; then one round trip between the peers.
    """
    a = caller_ms + rendezvous_ms
    b = callee_ms + rendezvous_ms
    p = caller_ms + callee_ms
    introduction = max(8 * a, 7 * a + b)
    return Bound(a, b, p, introduction, introduction + 2 * p)


@dataclass
class PairResult:
    """What was measured for one pair of NATs (milliseconds)."""

    pair: str
    bound: Bound
    connect_ms: list[float] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: natcat's JSON report of each counted run.
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.connect_ms) if self.connect_ms else None

    @property
    def ratio(self) -> float | None:
        median = self.median
        if median is None or self.bound.total <= 0:
            return None
        return median / self.bound.total


def parse_pair(text: str) -> tuple[str, str]:
    """``CALLEE/CALLER``, each a lab preset or ``public``."""
    known = {preset.value for preset in Preset} | {PUBLIC}
    parts = text.split("/")
    if len(parts) != 2 or not set(parts) <= known:
        raise ValueError(f"{text!r} is not CALLEE/CALLER with each of: {', '.join(sorted(known))}")
    return parts[0], parts[1]


def _side(lab: Lab, role: str, kind: str, delay_ms: float, inbound: str) -> Node:
    """
    A public host, or a host behind a NAT of *kind* whose WAN link is
    delayed and which drops or rejects unsolicited packets (*inbound*).
    """
    if kind == PUBLIC:
        return lab.public_host(role, delay_ms=delay_ms)
    nat = lab.nat(f"nat{role}", kind, delay_ms=delay_ms, inbound=inbound)
    return lab.host(role, behind=nat)


def measure_pair(
    pair: tuple[str, str],
    *,
    methods: str,
    runs: int,
    warmup: int,
    delay_ms: float,
    rendezvous_delay_ms: float,
    inbound: str = DEFAULT_INBOUND,
    hold: float = 0.0,
) -> PairResult:
    """
    Build the lab of one pair, time *warmup* + *runs* callers, remove the lab.

    Each caller keeps its connection *hold* seconds (see :func:`run_caller`).
    """
    with Lab() as lab:
        try:
            server = lab.public_host("rendezvous", RENDEZVOUS_ADDRESS, delay_ms=rendezvous_delay_ms)
            callee = _side(lab, "callee", pair[0], delay_ms, inbound)
            caller = _side(lab, "caller", pair[1], delay_ms, inbound)
            lab.build()
        except (LabUnavailable, LabError) as e:
            raise BenchmarkError(f"cannot build the lab here: {e}") from e
        bound = lower_bound(
            caller.delay_to_internet_ms, callee.delay_to_internet_ms, server.delay_to_internet_ms
        )
        result = PairResult("/".join(pair), bound)
        method_args = ("--methods", methods)
        with tempfile.TemporaryDirectory(prefix="time-to-connect-") as name:
            directory = Path(name)
            try:
                with (
                    rendezvous(server, directory),
                    listener(callee, directory, *method_args, verbose=False),
                ):
                    succeeded = False
                    for index in range(warmup + runs):
                        counted = index >= warmup
                        if _run_caller(caller, method_args, result, counted=counted, hold=hold):
                            succeeded = True
                        elif not succeeded:
                            result.failures.append("gave up on this pair: its first run failed")
                            break
            except RuntimeError as e:
                result.failures.append(f"could not start: {str(e)[-800:]}")
    return result


def _run_caller(
    caller: Node,
    method_args: Sequence[str],
    result: PairResult,
    *,
    counted: bool,
    hold: float = 0.0,
) -> bool:
    """
    One ``natcat alice`` that connects and quits after *hold* seconds; its
    connect_ms goes to *result* when *counted*.  Returns whether it connected.
    """
    report, failure = run_caller(caller, method_args, hold=hold)
    if report is None:
        result.failures.append(failure or "no report")
        return False
    if counted:
        result.connect_ms.append(float(report["connect_ms"]))
        result.methods.append(str(report["method"]))
        result.reports.append(report)
    return True


def run_caller(
    caller: Node, method_args: Sequence[str], *, hold: float = 0.0
) -> tuple[dict[str, Any] | None, str | None]:
    """
    Run one ``natcat alice --json-report --quit-after HOLD`` on *caller*: it
    connects, sends nothing and closes *hold* seconds later, time for a
    connection made through the UDP relay to move to a direct path.

    :returns: Its JSON report and ``None`` when it connected; ``None`` and
        why not otherwise.  When the connection moved off the relay, the
        report's ``"move"`` is natcat's ``"moved"`` line.
    """
    argv = natcat_argv(
        CALLEE_NAME, "--rendezvous", RENDEZVOUS, "--json-report", "--quit-after", f"{hold:g}",
        *method_args,
    )  # fmt: skip
    process = caller.popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=repo_environment(),
    )
    try:
        _, err = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, f"killed after {RUN_TIMEOUT:g} s"
    finally:
        stop(process)
    text = err.decode(errors="replace")
    found = reports(text)
    if process.returncode != 0 or not found or found[0].get("connect_ms") is None:
        why = [line for line in text.splitlines() if line.startswith("natcat: ")]
        return None, f"exit status {process.returncode}: {' '.join(why) or text.strip()[-300:]}"
    moved = moves(text)
    return ({**found[0], "move": moved[0]} if moved else found[0]), None


def run_benchmark(
    pairs: Sequence[tuple[str, str]],
    *,
    methods: str,
    runs: int,
    warmup: int,
    delay_ms: float,
    rendezvous_delay_ms: float,
    inbound: str = DEFAULT_INBOUND,
) -> tuple[list[PairResult], str]:
    """Measure every pair, one lab each; return the results and how links are delayed."""
    if sys.platform != "linux":
        raise BenchmarkError("needs Linux: the lab is made of network namespaces")
    if os.geteuid() != 0:
        raise BenchmarkError(
            "needs root: the lab builds network namespaces and nftables NATs "
            f"(run: sudo {sys.executable} {Path(__file__).relative_to(REPO_ROOT)})"
        )
    with Lab() as probe:
        impairment = probe.impairment_method()
    results = [
        measure_pair(
            pair,
            methods=methods,
            runs=runs,
            warmup=warmup,
            delay_ms=delay_ms,
            rendezvous_delay_ms=rendezvous_delay_ms,
            inbound=inbound,
        )
        for pair in pairs
    ]
    return results, impairment


# -- report -------------------------------------------------------------------------


def format_report(
    results: Sequence[PairResult],
    *,
    methods: str,
    delay_ms: float,
    rendezvous_delay_ms: float,
    impairment: str,
    inbound: str = DEFAULT_INBOUND,
) -> str:
    """The figures as a table: median (min-max) over the counted runs."""
    lines = [
        f"time from connect() to connectionMade, natcat --methods {methods}; one-way delay "
        f"{delay_ms:g} ms on each NAT's WAN link, {rendezvous_delay_ms:g} ms on the "
        f"rendezvous' (delay by {impairment}); NATs {inbound} unsolicited packets",
        "bound = introduction at both peers (4 caller-rendezvous round trips) + 1 peer round "
        f"trip; target {TARGET_RATIO:g}x",
        "",
        f"{'pair (callee/caller)':<36}{'method':<9}{'runs':>5}  {'connect ms':<26}"
        f"{'intro ms':>9}{'peer RTT':>9}{'bound ms':>9}{'ratio':>8}  target",
    ]
    for r in results:
        seen = ",".join(sorted(set(r.methods))) or "-"
        median, ratio = r.median, r.ratio
        figure = (
            "-"
            if median is None
            else f"{median:.1f} ({min(r.connect_ms):.1f}-{max(r.connect_ms):.1f})"
        )
        verdict = "-" if ratio is None else ("ok" if ratio <= TARGET_RATIO else "over")
        lines.append(
            f"{r.pair:<36}{seen:<9}{len(r.connect_ms):>5}  {figure:<26}"
            f"{r.bound.introduction:>9.0f}{2 * r.bound.between_peers:>9.0f}"
            f"{r.bound.total:>9.0f}{'-' if ratio is None else f'{ratio:.3f}x':>8}  {verdict}"
        )
    for r in results:
        lines += [f"{r.pair}: {failure}" for failure in r.failures]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time natcat's connect() between NATs in the lab, against the lower "
        "bound of the link delays (root only).",
    )
    parser.add_argument(
        "--pairs",
        default=",".join(DEFAULT_PAIRS),
        help="comma list of CALLEE/CALLER, each a lab preset or 'public' (default: %(default)s)",
    )
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="natcat --methods of both sides, e.g. udp, tcp, relay, direct (default: %(default)s)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=DEFAULT_RUNS,
        help="counted runs per pair (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help="runs per pair before the counted ones, not counted (default: %(default)s)",
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=DEFAULT_DELAY_MS,
        help="one-way delay of each NAT's WAN link, or of a public peer's link "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--rendezvous-delay-ms",
        type=float,
        default=None,
        help="one-way delay of the rendezvous' link (default: --delay-ms)",
    )
    parser.add_argument(
        "--inbound",
        choices=[i.value for i in Inbound],
        default=DEFAULT_INBOUND,
        help="what the NATs do with unsolicited packets, e.g. a punching SYN that arrives "
        "before this side's own has left (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 100 or not 0 <= args.warmup <= 10:
        parser.error("--runs must be from 1 to 100 and --warmup from 0 to 10")
    if args.rendezvous_delay_ms is None:
        args.rendezvous_delay_ms = args.delay_ms
    if not (0 <= args.delay_ms <= 1000 and 0 <= args.rendezvous_delay_ms <= 1000):
        parser.error("delays must be from 0 to 1000 ms")
    try:
        args.pair_list = [parse_pair(p.strip()) for p in args.pairs.split(",") if p.strip()]
    except ValueError as e:
        parser.error(str(e))
    if not args.pair_list:
        parser.error("--pairs names no pair")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        results, impairment = run_benchmark(
            args.pair_list,
            methods=args.methods,
            runs=args.runs,
            warmup=args.warmup,
            delay_ms=args.delay_ms,
            rendezvous_delay_ms=args.rendezvous_delay_ms,
            inbound=args.inbound,
        )
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the lab and every process in it were removed", file=sys.stderr)
        return 130
    if args.json:
        out = {
            "methods": args.methods,
            "delay_ms": args.delay_ms,
            "rendezvous_delay_ms": args.rendezvous_delay_ms,
            "inbound": args.inbound,
            "impairment": impairment,
            "target_ratio": TARGET_RATIO,
            "seconds": time.monotonic() - started,
            "pairs": [asdict(r) | {"median_ms": r.median, "ratio": r.ratio} for r in results],
        }
        print(json.dumps(out, indent=2))
    else:
        print(
            format_report(
                results,
                methods=args.methods,
                delay_ms=args.delay_ms,
                rendezvous_delay_ms=args.rendezvous_delay_ms,
                impairment=impairment,
                inbound=args.inbound,
            )
        )
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
