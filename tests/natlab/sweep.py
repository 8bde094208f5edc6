"""
Remove what crashed lab runs left behind: namespaces of the lab family
(``ntl`` + four hex digits + ``-``) whose owner, recorded as the alias of
their ``lo`` (see :class:`~tests.natlab._netns.Owner`), is dead and which
are older than a given age.  A namespace with no readable owner, with a
live owner, or too young is left alone: a live lab is never touched.

Run it by hand with ``python -m tests.natlab [--max-age-minutes N]
[--dry-run]`` (as root, from the repository root).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.natlab._netns import (
    PREFIX_PATTERN,
    Owner,
    delete_namespaces,
    kill_namespace_processes,
    list_namespaces,
    read_owner,
)

__all__ = ["SweepReport", "sweep_stale_labs"]

#: Leftovers younger than this are kept, whatever their owner.
DEFAULT_MAX_AGE = 10 * 60.0


@dataclass
class SweepReport:
    """
    What a sweep found.

    :ivar removed: Namespaces deleted.
    :ivar live: Namespaces kept because their owner runs.
    :ivar young: Namespaces kept because they are younger than the limit.
    :ivar unknown: Namespaces kept because they record no owner.
    :ivar failed: Namespaces that could not be deleted.
    """

    removed: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    young: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def sweep_stale_labs(
    max_age: float = DEFAULT_MAX_AGE, *, dry_run: bool = False, now: float | None = None
) -> SweepReport:
    """
    Delete the lab namespaces whose owner is dead and which were created
    more than *max_age* seconds before *now*, killing the processes
    inside them first.

    :param dry_run: Only report what would be removed (in ``removed``).
    """
    now = time.time() if now is None else now
    report = SweepReport()
    groups: dict[str, list[str]] = {}
    for name in list_namespaces():
        match = PREFIX_PATTERN.match(name)
        if match:
            groups.setdefault(match.group(1), []).append(name)
    stale: list[str] = []
    for names in groups.values():
        owners: dict[str, Owner | None] = {name: read_owner(name) for name in names}
        # One prefix is one lab: a namespace created just before its owner
        # died, not yet marked, goes with its marked siblings.
        known = next((owner for owner in owners.values() if owner is not None), None)
        for name, own in owners.items():
            owner = own or known
            if owner is None:
                report.unknown.append(name)
            elif owner.alive():
                report.live.append(name)
            elif now - owner.created < max_age:
                report.young.append(name)
            else:
                stale.append(name)
    if dry_run:
        report.removed = stale
        return report
    if stale:
        kill_namespace_processes(stale)
        report.failed = delete_namespaces(stale)
        report.removed = [name for name in stale if name not in report.failed]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: sweep, print what happened, fail if a deletion failed."""
    parser = argparse.ArgumentParser(prog="python -m tests.natlab", description=__doc__)
    parser.add_argument("--max-age-minutes", type=float, default=DEFAULT_MAX_AGE / 60)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    report = sweep_stale_labs(args.max_age_minutes * 60, dry_run=args.dry_run)
    for label, names in vars(report).items():
        if names:
            print(f"{label}: {' '.join(names)}")
    return 1 if report.failed else 0
