"""
The NFQUEUE delayer (:mod:`tests.natlab.nfqueue`) on a real delayed wire.

Each lab test builds namespace A -- wire namespace W (a two-port bridge) --
namespace B, with 198.51.100.1 in A and 198.51.100.2 in B, all named with a
per-run prefix, and removes them afterwards.  UDP probes run in this
process on sockets opened inside A and B (a short-lived thread enters the
namespace with ``setns``, opens the socket and leaves).  The first tests
are the sans-I/O core and need nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import secrets
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.natlab.nfqueue import (
    NF_ACCEPT,
    NFNL_SUBSYS_QUEUE,
    NFQNL_MSG_PACKET,
    NFQNL_MSG_VERDICT_BATCH,
    Delayer,
    NfqueueError,
    Scheduler,
    TimerLead,
    install_wire_rules,
    packet_id_of,
    parse_messages,
    start_delayer,
    verdict_message,
    wire_rules,
)

pytestmark = pytest.mark.lab

A_ADDRESS = "198.51.100.1"
B_ADDRESS = "198.51.100.2"
ECHO_PORT = 7
CLONE_NEWNET = 0x40000000
DISABLE_IPV6 = "/proc/sys/net/ipv6/conf/all/disable_ipv6"
#: Queue numbers for the two directions of the wire.
QUEUE_AB, QUEUE_BA = 1, 2


# --- the sans-I/O core ------------------------------------------------------


def test_scheduler_releases_after_the_delay_in_order() -> None:
    """Packets are due *delay* after arrival; a release returns the last due id."""
    scheduler = Scheduler(delay=0.020)
    for packet_id, now in [(1, 0.0), (2, 0.001), (3, 0.005)]:
        assert scheduler.arrive(packet_id, now)
    assert scheduler.release(0.019) is None
    assert scheduler.release(0.0211) == 2
    assert scheduler.next_release() == pytest.approx(0.025)
    assert scheduler.release_all() == 3
    assert len(scheduler) == 0


def test_scheduler_jitter_never_reorders() -> None:
    """With jitter, no packet is due before the one queued ahead of it."""
    scheduler = Scheduler(delay=0.010, jitter=0.009, rng=random.Random(7))
    for packet_id in range(500):
        scheduler.arrive(packet_id, packet_id * 0.0001)
    released = [scheduler.release(step * 0.0005) for step in range(200)]
    ids = [packet_id for packet_id in released if packet_id is not None]
    assert ids == sorted(ids)
    assert ids[-1] == 499


def test_scheduler_loss_is_seeded() -> None:
    """The same seed loses the same packets; the rate is close to *loss*."""

    def lost(seed: int) -> list[int]:
        scheduler = Scheduler(delay=0.0, loss=0.3, rng=random.Random(seed))
        return [packet_id for packet_id in range(2000) if not scheduler.arrive(packet_id, 0.0)]

    assert lost(5) == lost(5)
    assert 500 < len(lost(5)) < 700


def test_timer_lead_learns_the_mean_oversleep() -> None:
    """The lead converges on the oversleep, capped, ignoring short sleeps."""
    lead = TimerLead()
    for _ in range(100):
        lead.overslept(0.0002, 0.010)
        lead.overslept(0.5, 0.0001)
    assert lead.lead == pytest.approx(0.0002, rel=0.01)
    lead.overslept(5.0, 0.010)
    assert lead.lead <= lead.cap


def test_verdict_batch_message_layout() -> None:
    """A batch verdict is nlmsghdr, nfgenmsg with the queue, one verdict attribute."""
    message = verdict_message(queue=300, seq=9, packet_id=0x01020304, verdict=NF_ACCEPT, batch=True)
    length, kind, flags, seq, portid = struct.unpack_from("=IHHII", message)
    assert (length, kind, flags, seq, portid) == (
        len(message),
        NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT_BATCH,
        1,
        9,
        0,
    )
    assert message[16:20] == b"\x00\x00\x01\x2c"
    assert message[20:] == struct.pack("=HH", 12, 2) + struct.pack("!II", 1, 0x01020304)


def test_packet_id_parsed_from_packet_messages() -> None:
    """Packet ids come out of concatenated NFQNL_MSG_PACKET messages, in order."""

    def packet(packet_id: int) -> bytes:
        attrs = struct.pack("=HH", 4 + 7, 1) + struct.pack("!IHB", packet_id, 0x0800, 2) + b"\0"
        attrs += struct.pack("=HH", 8, 5) + struct.pack("!I", 3)  # NFQA_IFINDEX_INDEV
        body = struct.pack("!BBH", socket.AF_INET, 0, 1) + attrs
        kind = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET
        return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body

    messages = list(parse_messages(packet(41) + packet(42)))
    assert [packet_id_of(payload) for _, _, payload in messages] == [41, 42]


def test_wire_rules_split_the_directions() -> None:
    """Each bridge port's traffic goes to its own queue; one queue when not split."""
    rules = wire_rules("wa", "wb", 1, 2)
    assert "-A FORWARD -m physdev --physdev-in wa -j NFQUEUE --queue-num 1\n" in rules
    assert "-A FORWARD -m physdev --physdev-in wb -j NFQUEUE --queue-num 2\n" in rules
    assert wire_rules("wa", "wb", 4).count("--queue-num 4") == 2


# --- a real wire -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Tools:
    """The programs a wire lab runs, by full path."""

    ip: str
    iptables_restore: str

    def run(self, *arguments: str) -> str:
        """Run ``ip`` with *arguments*; what it printed."""
        done = subprocess.run(
            [self.ip, *arguments], check=True, capture_output=True, text=True, timeout=10
        )
        return done.stdout

    def namespaces(self, prefix: str) -> list[str]:
        """The network namespaces whose names start with *prefix*."""
        listed = self.run("netns", "list").splitlines()
        return [line.split()[0] for line in listed if line.startswith(prefix)]


@dataclass
class WireLab:
    """Namespaces A, W, B of one test, and the delayers started in W."""

    prefix: str
    tools: Tools
    delayers: list[Delayer] = field(default_factory=list)

    @property
    def a(self) -> str:
        return f"{self.prefix}a"

    @property
    def w(self) -> str:
        return f"{self.prefix}w"

    @property
    def b(self) -> str:
        return f"{self.prefix}b"

    def delay(
        self, ab_ms: float, ba_ms: float, *, loss_ab: float = 0.0, jitter_ms: float = 0.0
    ) -> None:
        """Start one delayer per direction, then the rules that feed them."""
        ip = self.tools.ip
        self.delayers.append(
            start_delayer(self.w, QUEUE_AB, ab_ms, jitter_ms=jitter_ms, loss=loss_ab, seed=1, ip=ip)
        )
        self.delayers.append(
            start_delayer(self.w, QUEUE_BA, ba_ms, jitter_ms=jitter_ms, seed=2, ip=ip)
        )
        install_wire_rules(
            self.w,
            "wa",
            "wb",
            QUEUE_AB,
            QUEUE_BA,
            ip=ip,
            iptables_restore=self.tools.iptables_restore,
        )

    def udp_socket(self, namespace: str) -> socket.socket:
        """A UDP socket opened inside *namespace*."""
        opened: list[socket.socket] = []
        failed: list[BaseException] = []

        def enter_and_open() -> None:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
                try:
                    if _libc.setns(target, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {namespace} failed")
                    try:
                        opened.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    finally:
                        if _libc.setns(own, CLONE_NEWNET) != 0:
                            raise OSError(ctypes.get_errno(), "setns back failed")
                finally:
                    os.close(target)
            except BaseException as e:
                failed.append(e)
            finally:
                os.close(own)

        thread = threading.Thread(target=enter_and_open)
        thread.start()
        thread.join(5)
        if failed:
            raise failed[0]
        return opened[0]


@contextlib.contextmanager
def wire_lab(tools: Tools) -> Iterator[WireLab]:
    """Build A -- W -- B; stop the delayers and delete the namespaces afterwards."""
    lab = WireLab("ntq" + secrets.token_hex(3), tools)
    index = random.randrange(10_000, 60_000)
    run = tools.run
    try:
        for namespace in (lab.a, lab.w, lab.b):
            run("netns", "add", namespace)
            run("netns", "exec", namespace, "sh", "-c", f"echo 1 > {DISABLE_IPV6}")
        for offset, (host, end, port) in enumerate([(lab.a, "a0", "wa"), (lab.b, "b0", "wb")]):
            first = index + 2 * offset
            run("link", "add", end, "netns", host, "index", str(first), "type", "veth",
                "peer", "name", port, "netns", lab.w, "index", str(first + 1))  # fmt: skip
        run("-n", lab.w, "link", "add", "br0", "type", "bridge")
        for port in ("wa", "wb"):
            run("-n", lab.w, "link", "set", port, "master", "br0", "up")
        run("-n", lab.w, "link", "set", "br0", "up")
        for host, end, address in [(lab.a, "a0", A_ADDRESS), (lab.b, "b0", B_ADDRESS)]:
            run("-n", host, "addr", "add", f"{address}/24", "dev", end)
            run("-n", host, "link", "set", end, "up")
        yield lab
    finally:
        for delayer in lab.delayers:
            delayer.stop()
        for namespace in tools.namespaces(lab.prefix):
            subprocess.run([tools.ip, "netns", "del", namespace], check=False, timeout=10)


@pytest.fixture
def tools(require_lab: None, require_program: Callable[[str], str]) -> Tools:
    """``ip``, and ``iptables-restore`` (Debian package iptables)."""
    return Tools(require_program("ip"), require_program("iptables-restore"))


@pytest.fixture
def lab(tools: Tools) -> Iterator[WireLab]:
    """A fresh A -- W -- B lab, checked to be gone afterwards."""
    with wire_lab(tools) as built:
        yield built
    assert tools.namespaces(built.prefix) == []


@contextlib.contextmanager
def echo_in_b(lab: WireLab) -> Iterator[None]:
    """A UDP echo server on B_ADDRESS, in a thread of this process."""
    server = lab.udp_socket(lab.b)
    server.bind((B_ADDRESS, ECHO_PORT))
    server.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                data, peer = server.recvfrom(2048)
            except TimeoutError:
                continue
            server.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()


def round_trips(client: socket.socket, count: int, timeout: float = 1.0) -> list[float | None]:
    """Ping-pong *count* probes one at a time: RTTs in ms, None where lost."""
    client.settimeout(timeout)
    rtts: list[float | None] = []
    for number in range(count):
        sent = time.perf_counter()
        client.sendto(struct.pack("!I", number), (B_ADDRESS, ECHO_PORT))
        rtt = None
        with contextlib.suppress(TimeoutError):
            while rtt is None:
                if struct.unpack("!I", client.recv(64)[:4])[0] == number:
                    rtt = (time.perf_counter() - sent) * 1000
        rtts.append(rtt)
    return rtts


def burst(client: socket.socket, count: int, gap: float, quiet: float) -> list[int]:
    """Send *count* numbered probes *gap* s apart; the numbers echoed, in arrival order."""
    for number in range(count):
        client.sendto(struct.pack("!I", number), (B_ADDRESS, ECHO_PORT))
        if gap:
            time.sleep(gap)
    client.settimeout(quiet)
    echoed: list[int] = []
    with contextlib.suppress(TimeoutError):
        while len(echoed) < count:
            echoed.append(struct.unpack("!I", client.recv(64)[:4])[0])
    return echoed


def test_round_trip_is_twice_the_one_way_delay(lab: WireLab) -> None:
    """20 ms each way: the median UDP round trip of 10 probes is about 40 ms."""
    lab.delay(20, 20)
    with echo_in_b(lab), lab.udp_socket(lab.a) as client:
        round_trips(client, 1)  # ARP, which the wire does not delay
        rtts = round_trips(client, 10)
    assert None not in rtts
    measured = [rtt for rtt in rtts if rtt is not None]
    assert 38 <= statistics.median(measured) <= 60, measured
    assert min(measured) >= 38, measured


def test_loss_drops_about_that_share(lab: WireLab) -> None:
    """Loss 0.3 on A->B loses about 30% of 200 probes (60 expected)."""
    lab.delay(5, 0, loss_ab=0.3)
    with echo_in_b(lab), lab.udp_socket(lab.a) as client:
        round_trips(client, 1)
        echoed = burst(client, 200, gap=0.001, quiet=0.3)
    assert 30 <= 200 - len(echoed) <= 95
    assert echoed == sorted(set(echoed))


@pytest.mark.parametrize("jitter_ms", [0.0, 8.0])
def test_burst_keeps_its_order(lab: WireLab, jitter_ms: float) -> None:
    """A back-to-back burst of 100 probes comes back complete and in order."""
    lab.delay(10, 10, jitter_ms=jitter_ms)
    with echo_in_b(lab), lab.udp_socket(lab.a) as client:
        round_trips(client, 1)
        echoed = burst(client, 100, gap=0.0, quiet=0.5)
    assert echoed == list(range(100))


def test_delayer_stops_cleanly_and_unbinds(lab: WireLab) -> None:
    """stop() ends the delayer with status 0, and its queue is unbound."""
    lab.delay(20, 20)
    queues = ("netns", "exec", lab.w, "cat", "/proc/net/netfilter/nfnetlink_queue")
    bound = lab.tools.run(*queues)
    assert sorted(int(line.split()[0]) for line in bound.splitlines()) == [QUEUE_AB, QUEUE_BA]
    assert [delayer.stop() for delayer in lab.delayers] == [0, 0]
    assert lab.tools.run(*queues) == ""
    assert [delayer.stop() for delayer in lab.delayers] == [0, 0]


def test_queue_held_by_another_delayer_is_refused(lab: WireLab) -> None:
    """A second delayer on a bound queue fails to start, saying why."""
    lab.delay(1, 1)
    with pytest.raises(NfqueueError, match="before it was ready"):
        start_delayer(lab.w, QUEUE_AB, 1, ip=lab.tools.ip, stderr=subprocess.DEVNULL)


def test_lab_leaves_nothing_behind(tools: Tools) -> None:
    """After the lab, no namespace with its prefix and no delayer process is left."""
    with wire_lab(tools) as built:
        built.delay(1, 1)
        assert len(tools.namespaces(built.prefix)) == 3
    assert tools.namespaces(built.prefix) == []
    assert all(delayer.process.poll() is not None for delayer in built.delayers)
