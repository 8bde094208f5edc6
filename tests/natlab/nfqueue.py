"""
A delaying wire for the NAT lab: an NFQUEUE client that holds each packet
for a set time, then lets it go.  Standard library only.

This kernel has no ``sch_netem``, so the lab delays and loses packets in a
*wire namespace* between two of its namespaces: a bridge with two ports,
whose firewall hands every IPv4 packet crossing it to an NFQUEUE, and this
program, run inside that namespace, accepts each queued packet *delay* ms
after it arrived (or drops it, with probability *loss*).  It speaks
nfnetlink_queue over a raw ``AF_NETLINK`` socket (``NETLINK_NETFILTER``),
asks only for packet metadata (``NFQNL_COPY_META``: the packet id is all it
needs), and accepts whole runs of due packets with one
``NFQNL_MSG_VERDICT_BATCH``.

Recipe for one delayed wire between namespaces ``A`` and ``B``
---------------------------------------------------------------

Every name carries the lab's per-run prefix; every veth end gets a
lab-unique ifindex (equal ifindexes on the two ends can keep a bridge port
disabled for up to a second)::

    ip netns add W
    ip link add a0 netns A index 101 type veth peer name wa netns W index 102
    ip link add b0 netns B index 103 type veth peer name wb netns W index 104
    ip -n W link add br0 type bridge      # STP off by default: ports forward at once
    ip -n W link set wa master br0 up
    ip -n W link set wb master br0 up
    ip -n W link set br0 up
    ip netns exec W sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    # then, in this order (a queue nobody listens on drops what reaches it):
    #   start_delayer(W, 1, 20.0); start_delayer(W, 2, 20.0)     # A->B, B->A
    #   install_wire_rules(W, "wa", "wb", 1, 2, iptables_restore=PATH)

:func:`install_wire_rules` does, in ``W`` only::

    sysctl -qw net.bridge.bridge-nf-call-iptables=1
    iptables-restore -w 5 <<EOF
    *filter
    -A FORWARD -m physdev --physdev-in wa -j NFQUEUE --queue-num 1
    -A FORWARD -m physdev --physdev-in wb -j NFQUEUE --queue-num 2
    COMMIT
    EOF

Why iptables (Debian package ``iptables``; either backend works): this
kernel has no ``nft_queue`` (``CONFIG_NFT_QUEUE`` is not set), so nft's
``queue`` statement fails with "No such file or directory" in every family,
bridge included; the xtables ``NFQUEUE`` target and ``physdev`` match are
built in, and reach bridged packets through br_netfilter.  NAT and host
namespaces must switch ``bridge-nf-call-iptables`` (and the arp/ip6
variants) off, or their bridged traffic goes through their conntrack.
Only IPv4 is delayed: ARP crosses at once (so send one probe first when
measuring), and IPv6 would need the same rules for ``ip6tables-restore``
and ``bridge-nf-call-ip6tables=1``.  Both directions may share one queue
(``queue_ba`` left out) when one delayer is enough.  The rules have no
``--queue-bypass``, so a wire whose delayer died is cut, not silently
undelayed.  Loss can come from the rules too (``-m statistic --mode random
--probability P -j DROP`` before the NFQUEUE rule) instead of ``--loss``.

Measured on this machine (kernel 6.18, 2 cores, a VM), UDP ping-pong
between A and B, medians of 100 over several runs: no delayer 0.01-0.07 ms;
delay 0 each way 0.04-0.17 ms (0.02-0.08 ms per crossing); delay 5 ms each
way 10.25-10.29 ms; delay 20 ms each way 40.38-40.45 ms, i.e. 0.12-0.2 ms
per delayed crossing, most of it the wake-ups of the idle delayer and
endpoints.  Releases are on time within about 10 us (median).  Starting
two delayers and the rules takes 90 ms.  One delayer took a burst of
20,000 datagrams at 350,000 per second without loss and in order.

Choices
-------

* No ``NFQA_CFG_F_FAIL_OPEN``: with it, packets that do not fit the queue
  or the socket would cross *undelayed*, overtaking delayed ones; without
  it they are dropped, as on an overloaded link.  The queue's maximum
  length defaults to 10,000 packets (the kernel's is 1,024), the socket's
  receive buffer to 8 MiB; an ``ENOBUFS`` from the socket is counted and
  logged (at most once a second) and the program carries on.  The kernel's
  counts of both kinds of drop are in the summary logged at exit.
* No ``NFQA_CFG_F_GSO``: the kernel segments GSO packets before queueing,
  so loss counts wire-sized packets.
* Jitter never reorders: a packet is never released before the one queued
  ahead of it (like a FIFO link).  That keeps the released packets a prefix
  of the kernel's queue, which is what lets one batch verdict accept them.
  Lost packets are dropped as soon as they arrive.
* The timer oversleeps (about 0.14 ms here), so the loop learns by how much
  (:class:`TimerLead`), wakes that much early and releases what is due
  within it.
* On SIGTERM or SIGINT it accepts what it still holds, unbinds and exits 0.

API for the lab library
-----------------------

:func:`start_delayer` runs this file inside a namespace (``ip netns exec NS
python -I .../nfqueue.py ...``: ``ip`` execs, so the PID is the delayer's),
waits (bounded) for the ``ready`` line it prints once bound, and returns a
:class:`Delayer` whose :meth:`~Delayer.stop` signals that PID.
:func:`install_wire_rules` feeds the queues; :func:`wire_rules` is its
``iptables-restore`` input (:func:`wire_rules_to` the variant that queues
only what one port sends to given addresses).  On the command line, from
the repository root::

    python -m tests.natlab.nfqueue --queue N --delay-ms D \\
        [--jitter-ms J] [--loss P] [--seed S] [--max-len L]

The sans-I/O core is :class:`Scheduler` (times in, packet ids out) plus
the message codec functions; :func:`run` is the socket loop around them.
"""

from __future__ import annotations

import argparse
import collections
import errno
import logging
import math
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import IO

_log = logging.getLogger("natlab.nfqueue")

# <linux/netlink.h>, <linux/netfilter/nfnetlink.h>, <linux/netfilter/nfnetlink_queue.h>
NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NF_DROP = 0
NF_ACCEPT = 1

#: The line printed on stdout once the queue is bound.
READY = "ready"
DEFAULT_MAX_LEN = 10_000
DEFAULT_RCVBUF = 8 << 20

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the queue number)
_NLATTR = struct.Struct("=HH")  # len, type
_PACKET_HDR = struct.Struct("!IHB")  # packet_id, hw_protocol, hook
_VERDICT_HDR = struct.Struct("!II")  # verdict, packet_id
_CFG_CMD = struct.Struct("!BxH")  # command, pad, pf
_CFG_PARAMS = struct.Struct("!IB")  # copy_range, copy_mode
_U32 = struct.Struct("!I")
_ERRNO = struct.Struct("=i")
_NLA_TYPE_MASK = 0x3FFF
_PACKET_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_BRIDGE_NF_CALL_IPTABLES = "/proc/sys/net/bridge/bridge-nf-call-iptables"
#: Release a packet this early rather than sleep again for so little.
_EARLY = 50e-6
#: At most this many messages read in one turn, so releases are not starved.
_RECEIVE_BURST = 256
_SEND_CHUNK = 32 << 10


class NfqueueError(Exception):
    """The kernel refused a queue configuration, or the delayer did not start."""


# --- codec -------------------------------------------------------------------


def _message(kind: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attrs
    msg_type = (NFNL_SUBSYS_QUEUE << 8) | kind
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _attr(kind: int, data: bytes) -> bytes:
    return _NLATTR.pack(_NLATTR.size + len(data), kind) + data + b"\0" * (-len(data) % 4)


def config_message(queue: int, seq: int, command: int, max_len: int | None = None) -> bytes:
    """
    An acknowledged ``NFQNL_MSG_CONFIG``: *command* (bind or unbind), and on
    bind copy mode META and the queue's maximum length, all in one message.
    """
    attrs = _attr(NFQA_CFG_CMD, _CFG_CMD.pack(command, socket.AF_UNSPEC))
    if command == NFQNL_CFG_CMD_BIND:
        attrs += _attr(NFQA_CFG_PARAMS, _CFG_PARAMS.pack(0, NFQNL_COPY_META))
        if max_len is not None:
            attrs += _attr(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(max_len))
    return _message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue, attrs)


def verdict_message(queue: int, seq: int, packet_id: int, verdict: int, batch: bool) -> bytes:
    """
    A verdict on *packet_id*; with *batch*, on every packet still queued up
    to and including it (``NFQNL_MSG_VERDICT_BATCH``).  Not acknowledged:
    the kernel answers only errors.
    """
    kind = NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT
    attrs = _attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id))
    return _message(kind, NLM_F_REQUEST, seq, queue, attrs)


def parse_messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Split a netlink datagram into ``(type, seq, payload)``, stopping at garbage."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _portid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            _log.warning("truncated netlink message at offset %d", offset)
            return
        yield kind, seq, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def packet_id_of(payload: bytes) -> int | None:
    """The packet id in the payload of an ``NFQNL_MSG_PACKET``, or None."""
    offset = _NFGENMSG.size
    while offset + _NLATTR.size <= len(payload):
        length, kind = _NLATTR.unpack_from(payload, offset)
        if length < _NLATTR.size:
            return None
        if kind & _NLA_TYPE_MASK == NFQA_PACKET_HDR and length >= _NLATTR.size + 4:
            packet_id: int = _PACKET_HDR.unpack_from(payload, offset + _NLATTR.size)[0]
            return packet_id
        offset += (length + 3) & ~3
    return None


def error_of(payload: bytes) -> int:
    """The errno in an ``NLMSG_ERROR`` payload: 0 for an acknowledgement."""
    return -_ERRNO.unpack_from(payload)[0] if len(payload) >= _ERRNO.size else errno.EPROTO


# --- sans-I/O scheduling -----------------------------------------------------


@dataclass
class Scheduler:
    """
    When to release each queued packet: *delay* seconds after it arrived,
    plus uniform jitter in ``[-jitter, +jitter]``, never before the packet
    queued ahead of it; lost with probability *loss*.  Time is passed in.
    """

    delay: float
    jitter: float = 0.0
    loss: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    _held: collections.deque[tuple[float, int]] = field(
        default_factory=collections.deque, init=False
    )
    _last: float = field(default=-math.inf, init=False)

    def arrive(self, packet_id: int, now: float) -> bool:
        """Hold *packet_id*, arrived at *now*; False if it is to be dropped."""
        if self.loss and self.rng.random() < self.loss:
            return False
        delay = self.delay
        if self.jitter:
            delay = max(0.0, delay + self.rng.uniform(-self.jitter, self.jitter))
        self._last = max(now + delay, self._last)
        self._held.append((self._last, packet_id))
        return True

    def next_release(self) -> float | None:
        """When the next held packet is due, or None if none is held."""
        return self._held[0][0] if self._held else None

    def release(self, now: float) -> int | None:
        """
        Forget the packets due at *now* and return the id of the last of
        them (all held packets queued before it are due too), or None.
        """
        last = None
        while self._held and self._held[0][0] <= now + _EARLY:
            last = self._held.popleft()[1]
        return last

    def release_all(self) -> int | None:
        """Forget every held packet; return the id of the last, or None."""
        return self.release(math.inf)

    def __len__(self) -> int:
        return len(self._held)


@dataclass
class TimerLead:
    """
    How much earlier than due to wake up: the mean time the timer oversleeps
    (about 0.14 ms on this machine's virtual timer), learned from sleeps of
    at least :attr:`min_sleep`, at most :attr:`cap`.  Waking that much early
    and releasing what is due within it puts releases on time on average.
    """

    lead: float = 0.0
    weight: float = 0.125
    min_sleep: float = 1e-3
    cap: float = 1e-3

    def overslept(self, late: float, timeout: float) -> None:
        """Learn from a sleep of *timeout* seconds that ended *late* seconds late."""
        if timeout >= self.min_sleep:
            self.lead += self.weight * (min(max(late, 0.0), self.cap) - self.lead)


# --- the socket loop ---------------------------------------------------------


@dataclass
class Counters:
    """What one run of the delayer did."""

    received: int = 0
    accepted: int = 0
    dropped: int = 0
    enobufs: int = 0
    errors: int = 0
    #: Dropped by the kernel because the queue was full (``--max-len``).
    queue_dropped: int = 0
    #: Dropped by the kernel because the socket was full (``ENOBUFS``).
    socket_dropped: int = 0


class QueueSocket:
    """A netlink socket bound to one NFQUEUE, with copy mode META."""

    def __init__(self, queue: int, max_len: int, rcvbuf: int = DEFAULT_RCVBUF) -> None:
        self.queue = queue
        self.early: list[int] = []  # packet ids received while waiting for an ack
        self._seq = 0
        self._enobufs_logged = -math.inf
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            self._configure(NFQNL_CFG_CMD_BIND, max_len)
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def fileno(self) -> int:
        """The socket's file descriptor, for :func:`select.select`."""
        return self.sock.fileno()

    def next_seq(self) -> int:
        """A fresh netlink sequence number."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _configure(self, command: int, max_len: int | None = None, timeout: float = 2.0) -> None:
        seq = self.next_seq()
        self.sock.send(config_message(self.queue, seq, command, max_len))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                continue
            for kind, got_seq, payload in parse_messages(data):
                if kind == NLMSG_ERROR and got_seq == seq:
                    code = error_of(payload)
                    if code:
                        raise NfqueueError(
                            f"queue {self.queue}: config command {command} refused: "
                            f"{os.strerror(code)} (EBUSY: another process holds the queue; "
                            "EPERM: needs CAP_NET_ADMIN)"
                        )
                    return
                if kind == _PACKET_TYPE:
                    packet_id = packet_id_of(payload)
                    if packet_id is not None:
                        self.early.append(packet_id)
        raise NfqueueError(f"queue {self.queue}: no answer to config command {command}")

    def receive(self, counters: Counters) -> Iterator[int]:
        """Packet ids waiting on the socket, at most a burst of them; never blocks."""
        for _ in range(_RECEIVE_BURST):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                counters.enobufs += 1
                if time.monotonic() - self._enobufs_logged >= 1.0:
                    self._enobufs_logged = time.monotonic()
                    _log.warning(
                        "queue %d: ENOBUFS (%d so far): the socket overflowed and the kernel "
                        "dropped packets; a larger receive buffer or a slower sender helps",
                        self.queue,
                        counters.enobufs,
                    )
                continue
            for kind, _seq, payload in parse_messages(data):
                if kind == NLMSG_ERROR:
                    code = error_of(payload)
                    if code:
                        counters.errors += 1
                        _log.warning("queue %d: kernel error %s", self.queue, os.strerror(code))
                elif kind == _PACKET_TYPE:
                    packet_id = packet_id_of(payload)
                    if packet_id is not None:
                        yield packet_id

    def send(self, data: bytes) -> None:
        """Send verdicts (several netlink messages may be concatenated)."""
        try:
            self.sock.send(data)
        except BlockingIOError:
            self.sock.setblocking(True)
            try:
                self.sock.send(data)
            finally:
                self.sock.setblocking(False)

    def kernel_drops(self, counters: Counters) -> None:
        """Copy the kernel's drop counts for this queue into *counters*."""
        portid = self.sock.getsockname()[0]
        try:
            with open("/proc/net/netfilter/nfnetlink_queue") as table:
                for line in table:
                    fields = [int(word) for word in line.split()]
                    if fields[:2] == [self.queue, portid] and len(fields) >= 7:
                        counters.queue_dropped, counters.socket_dropped = fields[5:7]
        except (OSError, ValueError) as e:
            _log.warning("queue %d: cannot read the kernel's counts: %s", self.queue, e)

    def close(self) -> None:
        """Unbind the queue (the kernel drops what is still queued) and close."""
        try:
            self.sock.setblocking(True)
            self._configure(NFQNL_CFG_CMD_UNBIND, timeout=1.0)
        except (OSError, NfqueueError) as e:
            _log.warning("queue %d: unbind failed: %s", self.queue, e)
        finally:
            self.sock.close()


def run(
    queue: int,
    scheduler: Scheduler,
    max_len: int = DEFAULT_MAX_LEN,
    ready: IO[str] | None = None,
) -> Counters:
    """
    Bind *queue*, print :data:`READY` to *ready* (stdout), and delay packets
    until SIGTERM or SIGINT; then accept what is held, unbind and return.
    """
    now = time.monotonic
    counters = Counters()
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def arrive(nfq: QueueSocket, packet_ids: Iterator[int] | list[int], out: bytearray) -> None:
        for packet_id in packet_ids:
            counters.received += 1
            if not scheduler.arrive(packet_id, now()):
                counters.dropped += 1
                out += verdict_message(queue, nfq.next_seq(), packet_id, NF_DROP, False)
                if len(out) >= _SEND_CHUNK:
                    nfq.send(bytes(out))
                    out.clear()

    def release(nfq: QueueSocket, last: int | None, out: bytearray) -> None:
        if last is not None:
            out += verdict_message(queue, nfq.next_seq(), last, NF_ACCEPT, True)
        if out:
            nfq.send(bytes(out))

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        nfq = QueueSocket(queue, max_len)
        try:
            print(READY, file=ready or sys.stdout, flush=True)
            out = bytearray()
            arrive(nfq, nfq.early, out)
            release(nfq, scheduler.release(now()), out)
            sock_fd = nfq.fileno()
            timer = TimerLead()
            while not stopping:
                due = scheduler.next_release()
                timeout = None if due is None else max(0.0, due - timer.lead - now())
                slept = now()
                readable, _, _ = select.select([sock_fd, wake_r], [], [], timeout)
                if not readable and timeout is not None:
                    timer.overslept(now() - slept - timeout, timeout)
                if wake_r in readable:
                    _drain(wake_r)
                out = bytearray()
                if sock_fd in readable:
                    arrive(nfq, nfq.receive(counters), out)
                release(nfq, scheduler.release(now() + timer.lead), out)
            # Accept what is held and what came meanwhile: unbinding drops it.
            late = list(nfq.receive(counters))
            counters.received += len(late)
            held = len(scheduler) + len(late)
            last = scheduler.release_all()
            release(nfq, late[-1] if late else last, bytearray())
            counters.accepted = counters.received - counters.dropped
            nfq.kernel_drops(counters)
            _log.info("queue %d: stopping; %d held packets released early", queue, held)
        finally:
            nfq.close()
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
    return counters


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 512):
                return
        except BlockingIOError:
            return


# --- the command line --------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run a delayer on one queue, inside the namespace this process is in."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.natlab.nfqueue",
        description="Delay (and lose) the packets of one NFQUEUE; prints 'ready' once bound.",
    )
    parser.add_argument("--queue", type=int, required=True, help="queue number (0-65535)")
    parser.add_argument("--delay-ms", type=float, required=True, help="delay per packet")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- jitter")
    parser.add_argument("--loss", type=float, default=0.0, help="drop probability, 0-1")
    parser.add_argument("--seed", type=int, default=None, help="seed for loss and jitter")
    parser.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="queue length")
    args = parser.parse_args(argv)
    if not 0 <= args.queue <= 0xFFFF:
        parser.error("--queue must be 0-65535")
    if args.delay_ms < 0 or args.jitter_ms < 0:
        parser.error("--delay-ms and --jitter-ms must not be negative")
    if not 0.0 <= args.loss <= 1.0:
        parser.error("--loss must be between 0 and 1")
    if args.max_len < 1:
        parser.error("--max-len must be positive")
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="nfqueue[%(process)d]: %(message)s"
    )
    scheduler = Scheduler(
        args.delay_ms / 1000, args.jitter_ms / 1000, args.loss, random.Random(args.seed)
    )
    try:
        counters = run(args.queue, scheduler, args.max_len)
    except (NfqueueError, OSError) as e:
        _log.error("queue %d: %s", args.queue, e)
        return 1
    _log.info("queue %d: %s", args.queue, counters)
    return 0


# --- the lab API -------------------------------------------------------------


@dataclass
class Delayer:
    """
    A delayer process started by :func:`start_delayer`.

    :ivar process: The process (``ip netns exec`` execs the interpreter, so
        this PID is the delayer itself); only :meth:`stop` should signal it.
    """

    namespace: str
    queue: int
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        """The delayer's process id."""
        return self.process.pid

    def stop(self, timeout: float = 5.0) -> int:
        """
        SIGTERM the delayer (it releases what it holds and unbinds), SIGKILL
        it after *timeout* seconds; reap it and return its exit status.
        Stopping a stopped delayer only returns the status.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> Delayer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_delayer(
    namespace: str,
    queue: int,
    delay_ms: float,
    *,
    jitter_ms: float = 0.0,
    loss: float = 0.0,
    seed: int | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    ready_timeout: float = 5.0,
    ip: str = "ip",
    stderr: IO[bytes] | int | None = None,
) -> Delayer:
    """
    Start a delayer on *queue* inside *namespace* and wait, at most
    *ready_timeout* seconds, until it has bound the queue.  Its log goes to
    *stderr* (inherited by default).  Start it before the rules that feed
    the queue: a queue without a listener drops packets.

    :raises NfqueueError: if it exits or stays silent instead.
    """
    # -I: the script's folder (this package's modules) must not shadow the stdlib.
    command = [ip, "netns", "exec", namespace, sys.executable, "-I", os.path.abspath(__file__)]
    command += ["--queue", str(queue), "--delay-ms", repr(float(delay_ms))]
    command += ["--jitter-ms", repr(float(jitter_ms)), "--loss", repr(float(loss))]
    command += ["--max-len", str(max_len)]
    if seed is not None:
        command += ["--seed", str(seed)]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
    )
    delayer = Delayer(namespace, queue, process)
    try:
        _wait_ready(process, ready_timeout)
    except BaseException:
        delayer.stop()
        raise
    return delayer


def _wait_ready(process: subprocess.Popen[bytes], timeout: float) -> None:
    assert process.stdout is not None
    fd = process.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise NfqueueError(f"delayer {process.pid} not ready after {timeout} s")
        chunk = os.read(fd, 256)
        if not chunk:
            status = process.wait(timeout)
            raise NfqueueError(f"delayer exited with status {status} before it was ready")
        seen += chunk
    if seen.split(b"\n", 1)[0].decode(errors="replace").strip() != READY:
        raise NfqueueError(f"delayer said {seen!r} instead of {READY!r}")


def wire_rules(port_a: str, port_b: str, queue_ab: int, queue_ba: int | None = None) -> str:
    """
    ``iptables-restore`` input for a wire namespace: every IPv4 packet the
    bridge forwards from *port_a* goes to queue *queue_ab*, every one from
    *port_b* to *queue_ba* (the same queue if None).  It replaces the
    namespace's whole ``filter`` table, so loading it twice is harmless.
    """
    back = queue_ab if queue_ba is None else queue_ba
    return (
        "*filter\n"
        f"-A FORWARD -m physdev --physdev-in {port_a} -j NFQUEUE --queue-num {queue_ab}\n"
        f"-A FORWARD -m physdev --physdev-in {port_b} -j NFQUEUE --queue-num {back}\n"
        "COMMIT\n"
    )


def wire_rules_to(port_a: str, destinations: Sequence[str], queue: int) -> str:
    """
    ``iptables-restore`` input for a wire namespace that queues, to queue
    *queue*, only the IPv4 packets the bridge forwards from *port_a* to one
    of *destinations* (IPv4 addresses): everything else, and all that comes
    from the other port, crosses at once.  Like :func:`wire_rules`, it
    replaces the namespace's whole ``filter`` table.
    """
    rules = "".join(
        f"-A FORWARD -m physdev --physdev-in {port_a} -d {destination}/32 "
        f"-j NFQUEUE --queue-num {queue}\n"
        for destination in destinations
    )
    return f"*filter\n{rules}COMMIT\n"


def install_wire_rules(
    namespace: str,
    port_a: str,
    port_b: str,
    queue_ab: int,
    queue_ba: int | None = None,
    *,
    ip: str = "ip",
    iptables_restore: str = "iptables-restore",
) -> None:
    """
    Send the IPv4 traffic bridged in *namespace* to NFQUEUE: switch
    ``net.bridge.bridge-nf-call-iptables`` on there and load
    :func:`wire_rules` with *iptables_restore* (give its full path when
    ``/usr/sbin`` is not on ``PATH``).

    :raises NfqueueError: with the tool's message, if either step fails.
    """
    enter = [ip, "netns", "exec", namespace]
    steps = [
        ([*enter, "sh", "-c", f"echo 1 > {_BRIDGE_NF_CALL_IPTABLES}"], b""),
        (
            [*enter, iptables_restore, "-w", "5"],
            wire_rules(port_a, port_b, queue_ab, queue_ba).encode(),
        ),
    ]
    for command, stdin in steps:
        done = subprocess.run(command, input=stdin, capture_output=True, check=False, timeout=10)
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip()
            raise NfqueueError(f"{' '.join(command[4:])!r} failed in {namespace}: {message}")


if __name__ == "__main__":
    sys.exit(main())
