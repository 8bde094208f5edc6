"""
Suite-wide test configuration.

Tests marked ``lab`` (root and network namespaces) or ``interop`` (real
third-party software) skip, saying why, when their needs are missing.  Under
``CI=true`` such a skip fails the run instead, and so does a module skipped
as a whole, so that CI cannot go green by testing less.  Skip inside a test
or a fixture (the ``require_program`` and ``require_lab`` fixtures below do
it), never at module level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Generator

import pytest
from hypothesis import settings

#: Markers whose tests must run, not skip, under CI.
MUST_RUN_IN_CI = ("lab", "interop")

#: The Debian package that provides each program the tests may run.
DEBIAN_PACKAGES = {
    "turnutils_stunclient": "coturn",
    "turnserver": "coturn",
    "turnutils_natdiscovery": "coturn",
    "stun": "stun-client",
    "stund": "stun-server",
    "socat": "socat",
    "nft": "nftables",
    "iptables-restore": "iptables",
    "ip": "iproute2",
    "gcc": "gcc",
    "unshare": "util-linux",
}

# sbin directories are not on every user's PATH, but the programs there are
# still useful to tests running as root.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)


def in_ci() -> bool:
    """Whether the suite runs under CI (``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


# CI machines are slower and busier than laptops: no per-example deadline there.
settings.register_profile("ci", deadline=None, print_blob=True)
if in_ci():
    settings.load_profile("ci")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI, turn the skip of a ``lab`` or ``interop`` test into a failure."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and in_ci():
        markers = [name for name in MUST_RUN_IN_CI if item.get_closest_marker(name)]
        if markers:
            report.outcome = "failed"
            report.longrepr = (
                f"CI=true: this {'/'.join(markers)} test must run but was skipped: "
                f"{_skip_reason(report)}"
            )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Under CI, fail a module skipped as a whole: it hides which tests it skipped."""
    report = yield
    if report.skipped and in_ci():
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true: {collector.nodeid} was skipped at collection: {_skip_reason(report)}; "
            "skip in a test or fixture instead"
        )
    return report


def find_program(name: str) -> str | None:
    """The path of the program *name*, looking in the sbin directories too."""
    return shutil.which(name, path=_SEARCH_PATH)


@pytest.fixture
def require_program() -> Callable[[str], str]:
    """
    A function that returns the path of a program, or skips the test naming
    the Debian package that provides it.
    """

    def require(name: str) -> str:
        path = find_program(name)
        if path is None:
            package = DEBIAN_PACKAGES.get(name)
            where = (
                f" (Debian package {package}; scripts/test installs it when root or with sudo)"
                if package
                else ""
            )
            pytest.skip(f"needs {name}{where}")
        return path

    return require


@pytest.fixture
def require_lab(require_program: Callable[[str], str]) -> None:
    """Skip unless this process is root and can make network namespaces."""
    if os.geteuid() != 0:
        pytest.skip("needs root: lab tests build network namespaces")
    require_program("ip")
    require_program("nft")
    unshare = require_program("unshare")
    probe = subprocess.run(
        [unshare, "--net", "true"], capture_output=True, text=True, check=False, timeout=10
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
