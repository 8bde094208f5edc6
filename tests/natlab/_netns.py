"""
Network namespace primitives of the lab: naming, running ``ip`` and
friends, doing work inside a namespace from a thread, finding and stopping
the processes inside namespaces, deleting them, and the owner mark that
lets a sweeper tell a crashed run's leftovers from a live lab.

Nothing here touches the root namespace's interfaces, routes or firewall:
commands either create namespaces (``ip netns add``), create links directly
inside them (``ip link add ... netns A ... peer ... netns B``), or run in a
thread that has entered one of them with ``setns(2)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tests.natlab.errors import LabError, LabUnavailable

__all__ = [
    "NETNS_DIR",
    "PREFIX_FAMILY",
    "PREFIX_PATTERN",
    "Owner",
    "delete_namespaces",
    "in_namespace",
    "kill_namespace_processes",
    "lab_namespaces",
    "list_namespaces",
    "namespace_pids",
    "new_prefix",
    "program",
    "run_in_namespaces",
    "run_tool",
    "write_sysctls",
]

T = TypeVar("T")

#: Where ``ip netns`` keeps its named namespaces.
NETNS_DIR = "/run/netns"
#: Every lab's prefix is this plus four hex digits, e.g. ``ntl3fa9``.
PREFIX_FAMILY = "ntl"
#: A namespace name of the lab family: ``<prefix>-<node>``.
PREFIX_PATTERN = re.compile(rf"^({PREFIX_FAMILY}[0-9a-f]{{4}})-[a-z0-9-]+$")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_prefix_lock = threading.Lock()
_prefixes_in_use: set[str] = set()

#: The Debian package of each program the lab runs.
DEBIAN_PACKAGES = {
    "ip": "iproute2",
    "tc": "iproute2",
    "nft": "nftables",
    "iptables-restore": "iptables",
}

#: Seconds any single tool invocation may take.
TOOL_TIMEOUT = 20.0


_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@functools.cache
def program(name: str) -> str:
    """The path of the program *name*, looking in the sbin directories too."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
    return shutil.which(name, path=path) or name


def list_namespaces() -> list[str]:
    """The names of all namespaces ``ip netns`` knows, sorted."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def lab_namespaces(prefix: str) -> list[str]:
    """The namespaces whose names carry *prefix*."""
    return [name for name in list_namespaces() if name.startswith(prefix + "-")]


def new_prefix() -> str:
    """
    A fresh lab prefix: ``ntl`` and four random hex digits, used by no
    namespace and by no other lab of this process.
    """
    with _prefix_lock:
        taken = {m.group(1) for n in list_namespaces() if (m := PREFIX_PATTERN.match(n))}
        for _ in range(1000):
            prefix = f"{PREFIX_FAMILY}{secrets.token_hex(2)}"
            if prefix not in taken and prefix not in _prefixes_in_use:
                _prefixes_in_use.add(prefix)
                return prefix
    raise LabError("found no unused lab prefix in 1000 tries; sweep stale labs (natlab.sweep)")


def release_prefix(prefix: str) -> None:
    """Let another lab of this process use *prefix* again."""
    with _prefix_lock:
        _prefixes_in_use.discard(prefix)


def run_tool(
    argv: Sequence[str], *, input: str | None = None, what: str = "", timeout: float = TOOL_TIMEOUT
) -> str:
    """
    Run a tool (``ip``, ``nft``, ``tc``, ``iptables-restore``) and return
    its output.

    :raises LabUnavailable: when the tool is not installed.
    :raises LabError: naming *what* was being done and quoting the tool's
        error output, when it fails.
    """
    try:
        done = subprocess.run(
            [program(argv[0]), *argv[1:]],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError:
        package = DEBIAN_PACKAGES.get(os.path.basename(argv[0]), "")
        raise LabUnavailable(
            f"{argv[0]} is not installed"
            + (f" (Debian package {package})" if package else "")
            + f"; {what or 'the lab'} needs it"
        ) from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)} ({what}) took more than {timeout} s") from None
    if done.returncode != 0:
        detail = done.stderr.strip() or done.stdout.strip()
        shown = input if input is not None and len(input) < 4000 else ""
        raise LabError(
            f"{what or argv[0]} failed ({' '.join(argv)}, status {done.returncode}): {detail}"
            + (f"\ninput was:\n{shown}" if shown else "")
        )
    return done.stdout


def _setns(namespace: str) -> None:
    """Move the calling thread into *namespace*."""
    fd = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {namespace}: {os.strerror(error)}")
    finally:
        os.close(fd)


def in_namespace(namespace: str, function: Callable[[], T]) -> T:
    """
    Call *function* in a new thread that has entered *namespace*, and
    return its result (or raise its exception).

    Sockets it creates stay in that namespace for life, whichever thread
    uses them later; processes it starts are born in the namespace.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _setns(namespace)
            result.append(function())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=work, name=f"natlab:{namespace}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def write_sysctls(settings: Iterable[tuple[str, str]], namespace: str) -> None:
    """
    Write dotted sysctls (``net.ipv4.ip_forward``) in the calling thread's
    namespace, which must be *namespace* (named in errors).
    """
    for name, value in settings:
        path = "/proc/sys/" + name.replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            raise LabError(f"sysctl {name}={value} in {namespace}: {e}") from None


def _namespace_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def namespace_pids(namespaces: Iterable[str]) -> dict[int, str]:
    """
    The processes inside *namespaces*, as ``{pid: namespace}``: the same
    test as ``ip netns pids`` (the process's ``/proc/PID/ns/net`` is the
    namespace), for all namespaces in one pass over ``/proc``.  This
    process is never listed.
    """
    identities = {}
    for name in namespaces:
        identity = _namespace_identity(os.path.join(NETNS_DIR, name))
        if identity is not None:
            identities[identity] = name
    if not identities:
        return {}
    found = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        identity = _namespace_identity(f"/proc/{entry}/ns/net")
        if identity in identities:
            found[int(entry)] = identities[identity]
    return found


def kill_namespace_processes(namespaces: Sequence[str], grace: float = 1.0) -> list[int]:
    """
    SIGTERM every process inside *namespaces*, SIGKILL those still there
    after *grace* seconds, and wait (bounded) until none is left.

    :returns: The PIDs that were signalled.
    """
    pids = namespace_pids(namespaces)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = namespace_pids(namespaces)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = namespace_pids(namespaces)
    return sorted(pids)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def delete_namespaces(names: Sequence[str]) -> list[str]:
    """
    ``ip netns del`` each of *names* (one ``ip -batch``), carrying on past
    failures.

    :returns: The names that still exist afterwards.
    """
    if names:
        lines = "".join(f"netns del {name}\n" for name in names)
        subprocess.run(
            [program("ip"), "-force", "-batch", "-"],
            input=lines,
            capture_output=True,
            text=True,
            check=False,
            timeout=TOOL_TIMEOUT,
        )
    existing = set(list_namespaces())
    return [name for name in names if name in existing]


def process_start_time(pid: int) -> int | None:
    """When *pid* started, in clock ticks since boot, or ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


@dataclass(frozen=True)
class Owner:
    """
    The process that built a lab, written as the alias of ``lo`` in each of
    its namespaces: the kernel keeps it exactly as long as the namespace.

    :ivar pid: The owner's process id.
    :ivar start: The owner's start time (``/proc/PID/stat`` field 22), so
        that a recycled PID does not pass for the owner.
    :ivar created: When the lab was created, Unix time.
    """

    pid: int
    start: int
    created: float

    _ALIAS = re.compile(r"^natlab owner=(\d+):(\d+) created=(\d+(?:\.\d+)?)$")

    @classmethod
    def me(cls) -> Owner:
        """This process, now."""
        pid = os.getpid()
        start = process_start_time(pid)
        assert start is not None
        return cls(pid, start, time.time())

    @property
    def alias(self) -> str:
        """The ``lo`` alias that records this owner."""
        return f"natlab owner={self.pid}:{self.start} created={int(self.created)}"

    @classmethod
    def parse(cls, alias: str) -> Owner | None:
        """The owner an alias records, or ``None`` when it is not one of ours."""
        match = cls._ALIAS.match(alias.strip())
        if match is None:
            return None
        return cls(int(match.group(1)), int(match.group(2)), float(match.group(3)))

    def alive(self) -> bool:
        """Whether the owner process still runs (same PID, same start time)."""
        return process_start_time(self.pid) == self.start


def read_owner(namespace: str) -> Owner | None:
    """The owner recorded in *namespace*, or ``None`` when there is none."""
    try:
        output = run_tool(["ip", "-n", namespace, "-o", "link", "show", "dev", "lo"])
    except LabError:
        return None
    match = re.search(r"\balias (.*?)(?:\\|$)", output)
    return Owner.parse(match.group(1)) if match else None


def run_in_namespaces(jobs: dict[str, Callable[[], None]]) -> None:
    """
    Run each job in its own thread inside its namespace, all at once, and
    wait for all of them.

    :raises LabError: naming every namespace whose job failed.
    """
    failures: dict[str, BaseException] = {}

    def work(namespace: str, job: Callable[[], None]) -> None:
        try:
            _setns(namespace)
            job()
        except BaseException as e:
            failures[namespace] = e

    threads = [
        threading.Thread(target=work, args=(ns, job), name=f"natlab:{ns}", daemon=True)
        for ns, job in jobs.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        interrupts = [e for e in failures.values() if not isinstance(e, Exception)]
        if interrupts:
            raise interrupts[0]
        raise LabError("; ".join(f"{ns}: {e}" for ns, e in sorted(failures.items()))) from next(
            iter(failures.values())
        )
