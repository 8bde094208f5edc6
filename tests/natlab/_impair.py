"""
Delay and loss on a link: ``tc netem`` where the kernel has it, otherwise a
*wire* namespace (a two-port bridge with br_netfilter on only there) whose
IPv4 packets are dropped with probability *loss* by nftables and held for
*delay* by the NFQUEUE delayer of :mod:`tests.natlab.nfqueue`.  A public
host's delay may apply only to what it sends to some addresses
(``delay_only_to``): netem then sits on one band of a ``prio`` qdisc that
``u32`` filters feed, and the wire queues only those packets.

Set ``NATLAB_IMPAIR=wire`` (or ``netem``) to force a method.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence
from typing import Protocol

from tests.natlab._netns import program, run_tool
from tests.natlab.errors import LabError, LabUnavailable

__all__ = [
    "NETEM",
    "WIRE",
    "Stoppable",
    "impairment_method",
    "netem_qdisc",
    "netem_qdisc_to",
    "start_delayers",
]

NETEM = "netem"
WIRE = "wire"
#: The NFQUEUE queue number used in every wire namespace (queues are per namespace).
WIRE_QUEUE = 0
#: Seconds a delayer may take to bind its queue.
DELAYER_READY_TIMEOUT = 10.0

_method_lock = threading.Lock()
_method: str | None = None


class Stoppable(Protocol):
    """A process the lab started and stops at teardown."""

    def stop(self, timeout: float = 5.0) -> int: ...


def impairment_method(probe_namespace: str) -> str:
    """
    How this machine delays links: :data:`NETEM` when ``tc qdisc ... netem``
    works in a namespace, else :data:`WIRE`.  Probed once per process, in a
    namespace called *probe_namespace* that this function creates and
    deletes.
    """
    global _method
    with _method_lock:
        if _method is None:
            forced = os.environ.get("NATLAB_IMPAIR", "").strip().lower()
            if forced in (NETEM, WIRE):
                _method = forced
            else:
                _method = NETEM if _netem_works(probe_namespace) else WIRE
        return _method


def _netem_works(namespace: str) -> bool:
    tc = program("tc")
    if not os.path.isabs(tc):
        return False
    run_tool(["ip", "netns", "add", namespace], what="probing for netem")
    try:
        run_tool(
            ["ip", "-n", namespace, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
            what="probing for netem",
        )
        probe = subprocess.run(
            [program("ip"), "netns", "exec", namespace, tc, "qdisc", "add", "dev", "p0", "root",
             "netem", "delay", "1ms"],
            capture_output=True,
            check=False,
            timeout=10,
        )  # fmt: skip
        return probe.returncode == 0
    finally:
        subprocess.run([program("ip"), "netns", "del", namespace], capture_output=True, check=False)


def netem_qdisc(interface: str, delay_ms: float, loss: float) -> str:
    """The ``tc -batch`` line that delays and loses what leaves *interface*."""
    return f"qdisc add dev {interface} root " + _netem_options(delay_ms, loss)


def netem_qdisc_to(
    interface: str, delay_ms: float, loss: float, destinations: Sequence[str]
) -> list[str]:
    """
    The ``tc -batch`` lines that delay only the IPv4 packets leaving
    *interface* for one of *destinations*, and lose *loss* of everything
    leaving it: a two-band ``prio`` root whose priomap sends all to band 2
    (``1:2``), ``u32`` filters steering those destinations to band 1
    (``1:1``), netem with the delay (and loss) on band 1 and, only when
    there is loss, netem with the loss alone on band 2 (else prio's
    default FIFO).
    """
    lines = [
        f"qdisc add dev {interface} root handle 1: prio bands 2 priomap {' '.join(['1'] * 16)}",
        f"qdisc add dev {interface} parent 1:1 handle 10: " + _netem_options(delay_ms, loss),
    ]
    if loss > 0:
        lines.append(f"qdisc add dev {interface} parent 1:2 handle 20: " + _netem_options(0, loss))
    lines += [
        f"filter add dev {interface} parent 1: protocol ip prio 1 u32 "
        f"match ip dst {destination}/32 flowid 1:1"
        for destination in destinations
    ]
    return lines


def _netem_options(delay_ms: float, loss: float) -> str:
    """``netem ...``: the qdisc and its options for *delay_ms* and *loss*."""
    options = f"netem delay {delay_ms:g}ms"
    if loss > 0:
        options += f" loss {loss * 100:g}%"
    return options + " limit 100000"


def wire_iptables(port_a: str, port_b: str, destinations: Sequence[str] = ()) -> str:
    """
    ``iptables-restore`` input that queues what a wire bridges, both ways;
    with *destinations*, only what *port_a* sends to those addresses.
    """
    from tests.natlab.nfqueue import wire_rules, wire_rules_to

    if destinations:
        return wire_rules_to(port_a, destinations, WIRE_QUEUE)
    return wire_rules(port_a, port_b, WIRE_QUEUE)


def start_delayers(wires: Sequence[tuple[str, float]]) -> list[Stoppable]:
    """
    Start one delayer per ``(wire namespace, delay_ms)``, all at once, and
    wait until each has bound its queue.

    :raises LabError: when one does not start (those that did are stopped).
    """
    try:
        from tests.natlab.nfqueue import start_delayer
    except ImportError as e:
        raise LabUnavailable(f"delayed links need tests/natlab/nfqueue.py: {e}") from None
    started: list[Stoppable] = []
    failures: list[str] = []
    lock = threading.Lock()

    def start(namespace: str, delay_ms: float) -> None:
        try:
            delayer = start_delayer(
                namespace,
                WIRE_QUEUE,
                delay_ms,
                ready_timeout=DELAYER_READY_TIMEOUT,
                ip=program("ip"),
            )
        except Exception as e:
            with lock:
                failures.append(f"{namespace}: {e}")
            return
        with lock:
            started.append(delayer)

    threads = [threading.Thread(target=start, args=wire, daemon=True) for wire in wires]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        for delayer in started:
            delayer.stop(2.0)
        raise LabError("delayer did not start: " + "; ".join(failures))
    return started
