"""natcheck's time to an answer with the STUN server 50 ms away, in the NAT lab.

Builds a lab (network namespaces, real kernel NATs): a public host with two
addresses running ``twistd natrendezvous``, its link delayed *delay* ms each
way (so a client's round trip to it is twice that), and one NAT per preset
with a host behind it.  Behind each NAT, in turn, it times:

- the whole command, ``python -m nattraverse.natcheck --json SERVER``, from
  the start of the process to its end (interpreter start and imports
  included);
- ``discover()`` alone, inside a process whose reactor already runs;
- the interpreter start and imports alone
  (``python -c "import nattraverse.natcheck, twisted.internet.reactor"``);

and prints each against the 3 s budget and against the round trip.  See
README.md.  Root only (it builds network namespaces); the lab, with every
process started in it, is removed on exit, on Ctrl-C and on SIGTERM.
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

from tests.lab.natcheck_support import (  # noqa: E402 (needs the repository on sys.path)
    ALTERNATE,
    PRIMARY,
    Case,
    Finished,
    behind_each,
    natcheck_argv,
    natcheck_report,
    repo_environment,
    running,
    start_rendezvous,
)
from tests.natlab import Host, Lab, LabError, LabUnavailable, Preset  # noqa: E402

#: natcheck's budget for a whole check with the server 50 ms away (the issue's).
BUDGET_SECONDS = 3.0
DEFAULT_PRESETS = ("full-cone", "port-restricted", "symmetric")
DEFAULT_DELAY_MS = 50.0
DEFAULT_RUNS = 3
#: Seconds one measured process may run before it is killed.
RUN_TIMEOUT = 30.0
#: The imports ``natcheck`` does before it sends anything.
IMPORTS = "import nattraverse.natcheck, twisted.internet.reactor"


class BenchmarkError(Exception):
    """The benchmark cannot run here (not root, no namespaces, no delay)."""


@dataclass
class PresetResult:
    """The figures measured behind one preset (seconds)."""

    preset: str
    verdict: str = ""
    cli: list[float] = field(default_factory=list)
    discover: list[float] = field(default_factory=list)
    startup: list[float] = field(default_factory=list)
    rtt: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# -- inside a namespace -----------------------------------------------------------


def discover_once(server_text: str) -> None:
    """
    Run ``discover()`` once against *server_text* (``HOST:PORT``) and print
    one JSON line: its duration on the running reactor, the RTT it measured
    and its report.  Runs in the host's namespace; never returns.
    """
    from twisted.internet.task import react

    from nattraverse._types import Endpoint
    from nattraverse.discovery import discover

    server = Endpoint.parse(server_text)

    async def main(reactor: Any) -> None:
        started = time.perf_counter()
        report = await discover(reactor, server)
        seconds = time.perf_counter() - started
        out = {"seconds": seconds, "rtt": report.rtt, "report": report.to_json()}
        print(json.dumps(out), flush=True)

    react(main)


# -- the benchmark ------------------------------------------------------------------


def _median(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _share(values: Sequence[float], whole: float) -> str:
    return "-" if not values else f"{statistics.median(values) / whole:.2f}"


def format_report(results: Sequence[PresetResult], delay_ms: float, method: str) -> str:
    """The figures as a table: medians over the runs, (min-max)."""
    rtt = 2 * delay_ms / 1000
    lines = [
        f"natcheck time to an answer; STUN server {delay_ms:g} ms away one way (nominal RTT "
        f"{rtt * 1000:g} ms, delay by {method}); budget {BUDGET_SECONDS:g} s",
        "median (min-max) seconds over the runs; ratios from medians",
        "",
        f"{'preset':<22}{'verdict':<22}{'runs':>5}  {'CLI wall s':<22}{'discover() s':<22}"
        f"{'startup s':<22}{'RTT ms':>7}  {'CLI/budget':>10}{'disc/budget':>12}{'disc/RTT':>9}",
    ]
    for r in results:
        measured_rtt = f"{statistics.median(r.rtt) * 1000:.1f}" if r.rtt else "-"
        lines.append(
            f"{r.preset:<22}{r.verdict or '-':<22}{len(r.discover):>5}  {_median(r.cli):<22}"
            f"{_median(r.discover):<22}{_median(r.startup):<22}{measured_rtt:>7}  "
            f"{_share(r.cli, BUDGET_SECONDS):>10}{_share(r.discover, BUDGET_SECONDS):>12}"
            f"{_share(r.discover, rtt):>9}"
        )
    over = [r.preset for r in results if r.cli and statistics.median(r.cli) > BUDGET_SECONDS]
    lines.append("")
    lines.append(
        "over budget: " + ", ".join(over) if over else "every CLI run's median is within budget"
    )
    for r in results:
        lines += [f"{r.preset}: {failure}" for failure in r.failures]
    return "\n".join(lines)


def run_benchmark(
    presets: Sequence[str], runs: int, delay_ms: float
) -> tuple[list[PresetResult], str]:
    """Build the lab, measure behind each preset *runs* times, remove the lab."""
    if sys.platform != "linux":
        raise BenchmarkError("needs Linux: the lab is made of network namespaces")
    if os.geteuid() != 0:
        raise BenchmarkError(
            "needs root: the lab builds network namespaces and nftables NATs "
            f"(run: sudo {sys.executable} {Path(__file__).relative_to(REPO_ROOT)})"
        )
    cases = [Case(Preset(name).value, Preset(name)) for name in presets]
    env = repo_environment()
    results = [PresetResult(case.name) for case in cases]
    with Lab() as lab:
        try:
            server = lab.public_host("stun", [PRIMARY.host, ALTERNATE.host], delay_ms=delay_ms)
            behind = behind_each(lab, cases)
            lab.build()
        except (LabUnavailable, LabError) as e:
            raise BenchmarkError(f"cannot build the lab here: {e}") from e
        method = lab.impairment_method()
        with tempfile.TemporaryDirectory(prefix="natcheck-time-") as directory:
            try:
                rendezvous = start_rendezvous(server, Path(directory))
            except RuntimeError as e:
                raise BenchmarkError(f"our STUN server did not start in the lab: {e}") from e
            with running(rendezvous):
                for result, b in zip(results, behind, strict=True):
                    for _ in range(runs):
                        _measure(b.host, result, env)
    return results, method


def _run(
    host: Host, argv: Sequence[str], env: dict[str, str], result: PresetResult
) -> tuple[subprocess.CompletedProcess[str] | None, float]:
    """Run *argv* in *host*'s namespace; the result (``None`` when it ran too
    long and was killed) and its wall time."""
    started = time.perf_counter()
    try:
        done = host.run(argv, timeout=RUN_TIMEOUT, check=False, env=env)
    except subprocess.TimeoutExpired:
        result.failures.append(f"killed after {RUN_TIMEOUT:g} s: {' '.join(argv)}")
        return None, time.perf_counter() - started
    return done, time.perf_counter() - started


def _measure(host: Host, result: PresetResult, env: dict[str, str]) -> None:
    """One round behind *host*: the CLI, discover() alone, the imports alone."""
    done, cli = _run(host, natcheck_argv(PRIMARY), env, result)
    if done is not None:
        finished = Finished(tuple(done.args), done.returncode, done.stdout, done.stderr, cli)
        try:
            report = natcheck_report(finished)
        except (AssertionError, ValueError) as e:
            result.failures.append(f"natcheck gave no report: {e}")
        else:
            result.cli.append(cli)
            result.verdict = str(report["rfc3489"])

    argv = [sys.executable, str(Path(__file__).resolve()), "--discover-once", str(PRIMARY)]
    done, _ = _run(host, argv, env, result)
    if done is not None:
        try:
            inner = json.loads(done.stdout.strip().splitlines()[-1])
            result.discover.append(float(inner["seconds"]))
            if inner["rtt"] is not None:
                result.rtt.append(float(inner["rtt"]))
        except (IndexError, ValueError, KeyError) as e:
            result.failures.append(f"discover() run failed ({e}): {done.stderr.strip()[-500:]}")

    done, startup = _run(host, [sys.executable, "-c", IMPORTS], env, result)
    if done is not None and done.returncode == 0:
        result.startup.append(startup)
    elif done is not None:
        result.failures.append(f"imports failed: {done.stderr.strip()[-500:]}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time natcheck behind real NATs with the STUN server far away (root only).",
    )
    parser.add_argument(
        "--presets",
        default=",".join(DEFAULT_PRESETS),
        help="comma-separated lab presets (default: %(default)s)",
    )
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help="runs per preset (default: %(default)s)"
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=DEFAULT_DELAY_MS,
        help="one-way delay of the STUN server's link (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--discover-once", metavar="SERVER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 100:
        parser.error("--runs must be from 1 to 100")
    if not 0 < args.delay_ms <= 1000:
        parser.error("--delay-ms must be above 0 and at most 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.discover_once:
        discover_once(args.discover_once)
        return 0
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in {preset.value for preset in Preset}]
    if unknown or not presets:
        known = ", ".join(preset.value for preset in Preset)
        print(f"error: unknown preset(s) {unknown or presets}; known: {known}", file=sys.stderr)
        return 2
    try:
        results, method = run_benchmark(presets, args.runs, args.delay_ms)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the lab and every process in it were removed", file=sys.stderr)
        return 130
    if args.json:
        out = {
            "delay_ms": args.delay_ms,
            "nominal_rtt_s": 2 * args.delay_ms / 1000,
            "budget_s": BUDGET_SECONDS,
            "impairment": method,
            "presets": [asdict(r) for r in results],
        }
        print(json.dumps(out, indent=2))
    else:
        print(format_report(results, args.delay_ms, method))
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
