"""The whole NAT matrix with every method: who connects, how, and how fast.

For each of the 25 pairs of the lab's five NAT kinds (callee's/caller's),
builds a lab (network namespaces, real kernel NATs) with our ``twistd
natrendezvous`` on a public host, a callee (``natcat --listen alice --echo``)
behind one NAT and a caller behind the other, every WAN link delayed by a
known one-way delay, and runs ``natcat alice --json-report`` on the caller
with every method (``direct,reversal,tcp,udp,relay``) *runs* times.  For
each pair it prints the winning method, the median time from ``connect()``
to ``connectionMade`` against the lower bound the delays allow (the same
bound as ``benchmarks/time_to_connect``: the introduction at both peers
plus one peer round trip), and, when the relay won, why (the connection
report's ``why_relayed``); then how many pairs connected and how many
directly.  The issue's goal: 25/25 connected, 22/25 direct.

Each caller keeps its connection ``--hold`` seconds (natcat's
``--quit-after``) before it closes, so that a connection made through the
rendezvous' UDP relay has time to move to a direct path (relay first, then
upgrade).  Such a pair counts as direct when it moved (winner ``udp (moved)``,
and the time of the move after the introduction is printed); one that stays
on the UDP relay is ``udp+relay``.

Root only; every lab, with every process started in it, is removed on
exit, on Ctrl-C and on SIGTERM.  Traffic stays inside the lab.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.natlab import Preset  # noqa: E402 (needs the repository on sys.path)


def _time_to_connect() -> ModuleType:
    """The time_to_connect benchmark's module: its lower bound and lab sides."""
    path = REPO_ROOT / "benchmarks" / "time_to_connect" / "run.py"
    spec = importlib.util.spec_from_file_location("time_to_connect_run", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


TTC = _time_to_connect()

KINDS = (
    Preset.FULL_CONE,
    Preset.RESTRICTED_CONE,
    Preset.PORT_RESTRICTED,
    Preset.SYMMETRIC,
    Preset.SYMMETRIC_SEQUENTIAL,
)
ALL_METHODS = "direct,reversal,tcp,udp,relay"
RELAY_METHODS = {"relay"}
DEFAULT_RUNS = 3
DEFAULT_DELAY_MS = 10.0
#: Seconds each caller keeps its connection: time to move off the UDP relay.
#: Birthday probing's whole budget (1500 probes at 200 a second, from 0.5 s
#: after the checks start) ends some 8 s after the introduction.
DEFAULT_HOLD = 8.0


def _winner(report: dict[str, Any]) -> str:
    """One run's winner, as its connection ended (see :attr:`PairOutcome.winners`)."""
    method = str(report.get("method"))
    if method == "relay" or not report.get("relayed"):
        return method
    return f"{method} (moved)" if report.get("move") else f"{method}+relay"


def _is_direct(winner: str) -> bool:
    """Whether a run's winner (see :attr:`PairOutcome.winners`) ended on a direct path."""
    return winner != "-" and winner not in RELAY_METHODS and not winner.endswith("+relay")


@dataclass(frozen=True)
class PairOutcome:
    """One pair's runs: time_to_connect's result, read for the winner and the relay."""

    result: Any  # time_to_connect's PairResult

    @property
    def pair(self) -> str:
        return str(self.result.pair)

    @property
    def connect_ms(self) -> list[float]:
        return list(self.result.connect_ms)

    @property
    def methods(self) -> list[str]:
        return list(self.result.methods)

    @property
    def failures(self) -> list[str]:
        return list(self.result.failures)

    @property
    def bound_ms(self) -> float:
        return float(self.result.bound.total)

    @property
    def races(self) -> list[dict[str, Any]]:
        """Each run's connection report (natcat's ``"race"``)."""
        return [report.get("race") or {} for report in self.result.reports]

    @property
    def why_relayed(self) -> list[str]:
        return [str(race["why_relayed"]) for race in self.races if race.get("why_relayed")]

    @property
    def winners(self) -> list[str]:
        """
        Each run's winner, as the connection ended: ``"udp+relay"`` when the
        ``udp`` method connected through the rendezvous' UDP relay and stayed
        there, ``"udp (moved)"`` when such a connection moved to a direct path.
        """
        return [_winner(report) for report in self.result.reports]

    @property
    def moved_ms(self) -> list[float]:
        """When each connection that moved off the UDP relay moved (after the introduction)."""
        return [
            float(upgrade["at_ms"])
            for report in self.result.reports
            for upgrade in ((report.get("move") or {}).get("race") or {}).get("upgrades", [])[:1]
        ]

    @property
    def method(self) -> str:
        """
        The winner of most runs (``-`` when none won); of a tie, a relayed
        one first, so that a pair counts as direct only when most runs were.
        """
        if not self.winners:
            return "-"
        counts = Counter(self.winners)
        most = max(counts.values())
        tied = [winner for winner, count in counts.items() if count == most]
        return max(tied, key=lambda winner: not _is_direct(winner))

    @property
    def direct(self) -> bool:
        """Whether the pair connected, mostly, without a relay."""
        return _is_direct(self.method)

    @property
    def ratio(self) -> float | None:
        ratio = self.result.ratio
        return None if ratio is None else float(ratio)

    @property
    def median(self) -> float | None:
        median = self.result.median
        return None if median is None else float(median)


def measure(
    pair: tuple[str, str], *, runs: int, delay_ms: float, hold: float = DEFAULT_HOLD
) -> PairOutcome:
    """
    One pair's lab, *runs* callers with every method, each holding its
    connection *hold* seconds (time_to_connect's measure_pair).
    """
    return PairOutcome(
        TTC.measure_pair(
            pair,
            methods=ALL_METHODS,
            runs=runs,
            warmup=0,
            delay_ms=delay_ms,
            rendezvous_delay_ms=delay_ms,
            hold=hold,
        )
    )


def format_report(
    outcomes: Sequence[PairOutcome], *, delay_ms: float, runs: int, hold: float = DEFAULT_HOLD
) -> str:
    """Per pair: winner, median time against the bound; then the shares."""
    lines = [
        f"every method ({ALL_METHODS}), {runs} run(s) per pair, each connection held "
        f"{hold:g} s; one-way delay {delay_ms:g} ms on every WAN link; "
        "bound = introduction at both peers + 1 peer round trip",
        "",
        f"{'pair (callee/caller)':<44}{'winner':<13}{'runs':>5}{'median ms':>11}"
        f"{'bound ms':>10}{'ratio':>8}",
    ]
    for o in outcomes:
        median, ratio = o.median, o.ratio
        lines.append(
            f"{o.pair:<44}{o.method:<13}{len(o.connect_ms):>5}"
            f"{'-' if median is None else f'{median:.1f}':>11}{o.bound_ms:>10.0f}"
            f"{'-' if ratio is None else f'{ratio:.2f}x':>8}"
        )
    connected = sum(1 for o in outcomes if o.methods)
    direct = sum(1 for o in outcomes if o.direct)
    lines += [
        "",
        f"connected: {connected}/{len(outcomes)}   direct: {direct}/{len(outcomes)} "
        "(goal: 25/25 connected, 22/25 direct)",
    ]
    for o in outcomes:
        if o.moved_ms:
            lines.append(
                f"{o.pair} moved off the UDP relay to a direct path in {len(o.moved_ms)} of "
                f"{len(o.connect_ms)} run(s), median {statistics.median(o.moved_ms):.0f} ms "
                "after the introduction"
            )
    for o in outcomes:
        if o.why_relayed and not o.direct:
            lines.append(f"{o.pair} relayed because {o.why_relayed[0]}")
    for o in outcomes:
        lines += [f"{o.pair}: {failure}" for failure in o.failures]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the lab's 5x5 NAT matrix with every method (root only)."
    )
    parser.add_argument(
        "--pairs",
        default=None,
        help="comma list of CALLEE/CALLER presets (default: all 25 pairs)",
    )
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help="callers per pair (default: %(default)s)"
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=DEFAULT_DELAY_MS,
        help="one-way delay of every WAN link (default: %(default)s)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=DEFAULT_HOLD,
        help="seconds each caller keeps its connection, time to move off the UDP relay "
        "(default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be from 1 to 20")
    if not 0 <= args.delay_ms <= 1000:
        parser.error("--delay-ms must be from 0 to 1000")
    if not 0 <= args.hold <= 20:
        parser.error("--hold must be from 0 to 20")
    if args.pairs is None:
        args.pair_list = [(a.value, b.value) for a in KINDS for b in KINDS]
    else:
        try:
            args.pair_list = [TTC.parse_pair(p.strip()) for p in args.pairs.split(",") if p.strip()]
        except ValueError as e:
            parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if sys.platform != "linux" or os.geteuid() != 0:
        print(
            "error: needs root on Linux: the lab builds network namespaces and nftables NATs",
            file=sys.stderr,
        )
        return 2
    try:
        outcomes = [
            measure(p, runs=args.runs, delay_ms=args.delay_ms, hold=args.hold)
            for p in args.pair_list
        ]
    except TTC.BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the labs and every process in them were removed", file=sys.stderr)
        return 130
    if args.json:
        print(
            json.dumps(
                {
                    "methods": ALL_METHODS,
                    "delay_ms": args.delay_ms,
                    "hold": args.hold,
                    "seconds": time.monotonic() - started,
                    "pairs": [
                        {
                            "pair": o.pair,
                            "winner": o.method,
                            "direct": o.direct,
                            "connect_ms": o.connect_ms,
                            "moved_ms": o.moved_ms,
                            "methods": o.methods,
                            "bound_ms": o.bound_ms,
                            "ratio": o.ratio,
                            "why_relayed": o.why_relayed,
                            "races": o.races,
                            "failures": o.failures,
                        }
                        for o in outcomes
                    ],
                },
                indent=2,
            )
        )
    else:
        print(format_report(outcomes, delay_ms=args.delay_ms, runs=args.runs, hold=args.hold))
    return 1 if any(o.failures for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
