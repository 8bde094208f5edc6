"""UDP stream throughput: one QUIC stream through our QuicPath against aioquic alone, on loopback.

Each run is one bulk one-way transfer of ``--megabytes`` over one QUIC
stream between two UDP sockets on 127.0.0.1, sender and receiver in one
process of its own (so both stacks pay for both ends on one core):

- ``ours``: two :class:`nattraverse.quic.QuicPath` on the Twisted reactor,
  pinned both ways, the caller's application writing through a push
  producer, the callee's counting bytes;
- ``aioquic``: aioquic's own asyncio API (``serve``/``connect``, a stream's
  ``StreamWriter`` with ``drain()``), same TLS 1.3 certificates and
  windows.

MB/s (10^6 bytes per second, from the first byte written to the last byte
received) of each, and the ratio ours/aioquic, are printed.  Every run is a
child process of this script (``--child ours`` / ``--child aioquic``),
bounded by ``--timeout`` and stopped by its PID when it overruns.  Traffic
goes to 127.0.0.1 only.  See README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from typing import Any

#: The checkout this script is in: its nattraverse, not an installed one.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPOSITORY not in sys.path:
    sys.path.insert(0, REPOSITORY)

CHUNK = 64 * 1024
LOCALHOST = "127.0.0.1"
WINDOW = 1024 * 1024


def _child_ours(total: int, limit: float) -> dict[str, Any]:
    from twisted.internet import reactor as _reactor
    from twisted.internet.interfaces import IPushProducer
    from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
    from zope.interface import implementer

    from nattraverse.identity import Identity
    from nattraverse.quic import QuicPath, is_quic

    reactor: Any = _reactor
    out: dict[str, Any] = {}

    class Socket(DatagramProtocol):
        path: QuicPath | None = None

        def datagramReceived(self, datagram: bytes, addr: Any) -> None:
            if self.path is not None and is_quic(datagram):
                self.path.datagram_received(datagram, (addr[0], addr[1]))

        def send(self, datagram: bytes, address: tuple[str, int]) -> None:
            assert self.transport is not None
            self.transport.write(datagram, address)

    @implementer(IPushProducer)
    class Sender(Protocol):
        sent = 0
        paused = False

        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
            out["start"] = time.perf_counter()
            self.resumeProducing()

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False
            block = b"\0" * CHUNK
            while not self.paused and self.sent < total:
                assert self.transport is not None
                self.transport.write(block)
                self.sent += CHUNK
            if self.sent >= total and self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]

        def stopProducing(self) -> None:
            pass

    class Receiver(Protocol):
        got = 0

        def dataReceived(self, data: bytes) -> None:
            self.got += len(data)
            if self.got >= total and "end" not in out:
                out["end"] = time.perf_counter()
                reactor.stop()

    a, b = Identity.generate(), Identity.generate()
    sa, sb = Socket(), Socket()
    pa = reactor.listenUDP(0, sa, interface=LOCALHOST)
    pb = reactor.listenUDP(0, sb, interface=LOCALHOST)
    address_a = (LOCALHOST, pa.getHost().port)
    address_b = (LOCALHOST, pb.getHost().port)
    caller = QuicPath(reactor, a, "caller", b.peer_id, sa.send, address_b, local=address_a)
    callee = QuicPath(reactor, b, "callee", a.peer_id, sb.send, address_a, local=address_b)
    sa.path, sb.path = caller, callee
    receiver = Receiver()
    caller.authenticated.addCallback(lambda p: p.select(Factory.forProtocol(Sender)))
    callee.authenticated.addCallback(lambda p: p.attach(Factory.forProtocol(lambda: receiver)))
    callee.start()
    caller.start()
    reactor.callLater(limit, reactor.stop)
    reactor.run()
    out["bytes"] = receiver.got
    return out


async def _aioquic(total: int, limit: float) -> dict[str, Any]:
    from aioquic.asyncio.client import connect
    from aioquic.asyncio.server import serve
    from aioquic.quic.configuration import QuicConfiguration

    from nattraverse.identity import Identity

    out: dict[str, Any] = {}
    done = asyncio.get_running_loop().create_future()
    server_identity = Identity.generate()

    tasks: list[asyncio.Task[None]] = []

    def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def count() -> None:
            got = 0
            while got < total:
                data = await reader.read(WINDOW)
                if not data:
                    break
                got += len(data)
            out["end"] = time.perf_counter()
            out["bytes"] = got
            if not done.done():
                done.set_result(None)

        tasks.append(asyncio.ensure_future(count()))

    server_configuration = QuicConfiguration(
        is_client=False, alpn_protocols=["bench"], max_stream_data=WINDOW, max_data=2 * WINDOW
    )
    server_configuration.certificate = server_identity.certificate
    server_configuration.private_key = server_identity.private_key
    server = await serve(LOCALHOST, 0, configuration=server_configuration, stream_handler=handler)
    transport = server._transport
    assert transport is not None
    port = transport.get_extra_info("sockname")[1]
    client_configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=["bench"],
        verify_mode=ssl.CERT_NONE,
        max_stream_data=WINDOW,
        max_data=2 * WINDOW,
    )
    try:
        async with connect(LOCALHOST, port, configuration=client_configuration) as client:
            _reader, writer = await client.create_stream()
            block = b"\0" * CHUNK
            out["start"] = time.perf_counter()
            sent = 0
            while sent < total:
                writer.write(block)
                sent += CHUNK
                await writer.drain()
            await asyncio.wait_for(done, limit)
    finally:
        server.close()
    return out


def _child(kind: str, total: int, limit: float) -> None:
    if kind == "ours":
        result = _child_ours(total, limit)
    else:
        result = asyncio.run(asyncio.wait_for(_aioquic(total, limit), limit))
    print(json.dumps(result))


def _run(kind: str, total: int, timeout: float) -> float | None:
    """Run one child; MB/s, or None when it failed or overran."""
    command = [sys.executable, __file__, "--child", kind, "--bytes", str(total)]
    command += ["--timeout", str(timeout)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout + 10)
    except subprocess.TimeoutExpired:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
        print(f"{kind}: overran {timeout + 10:g} s; stopped pid {child.pid}", file=sys.stderr)
        return None
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"{kind}: no result\n{stderr[-2000:]}", file=sys.stderr)
        return None
    if result.get("bytes", 0) < total or "end" not in result:
        print(f"{kind}: only {result.get('bytes', 0)} of {total} bytes arrived", file=sys.stderr)
        return None
    return float(total / (result["end"] - result["start"]) / 1e6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=32, help="per run (default 32)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", choices=["ours", "aioquic"], help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        _child(options.child, options.bytes, options.timeout)
        return 0
    total = options.megabytes * 1024 * 1024
    figures: dict[str, list[float]] = {"ours": [], "aioquic": []}
    failed = False
    for _ in range(options.runs):
        for kind in ("aioquic", "ours"):
            rate = _run(kind, total, options.timeout)
            if rate is None:
                failed = True
            else:
                figures[kind].append(rate)
    best = {kind: (max(rates) if rates else None) for kind, rates in figures.items()}
    ratio = best["ours"] / best["aioquic"] if best["ours"] and best["aioquic"] else None
    if options.json:
        print(json.dumps({"runs": figures, "best": best, "ratio": ratio}))
    else:
        print(f"one QUIC stream, {options.megabytes} MiB per run, loopback UDP, MB/s")
        for kind in ("aioquic", "ours"):
            rates = " ".join(f"{r:.1f}" for r in figures[kind])
            shown = f"{best[kind]:.1f}" if best[kind] else "-"
            print(f"  {kind:8} best {shown:>6}   runs: {rates}")
        print(f"  ratio ours/aioquic (best): {ratio:.2f}" if ratio else "  ratio: -")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
