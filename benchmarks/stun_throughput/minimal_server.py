"""A minimal Twisted STUN Binding responder: the "twisted-minimal" baseline.

The least a Twisted server can do per request: one ``DatagramProtocol`` that
checks the 20-byte header (RFC 8489 section 5) and answers a Binding success
response carrying XOR-MAPPED-ADDRESS (section 14.2) with ``transport.write``.
IPv4 only; anything else is dropped. Run by ``run.py``; usable by hand::

    python benchmarks/stun_throughput/minimal_server.py --port 3478
"""

from __future__ import annotations

import argparse
import socket
import struct
from typing import cast

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorUDP
from twisted.internet.protocol import DatagramProtocol

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
_BINDING_REQUEST = b"\x00\x01"
# type 0x0101, length 12, cookie, transaction id,
# XOR-MAPPED-ADDRESS: type 0x0020, length 8, reserved, family 0x01, x-port, x-address
_RESPONSE = struct.Struct("!HHI12sHHBBHI")


class MinimalBindingResponder(DatagramProtocol):
    """Answer every well-formed IPv4 Binding request, drop everything else."""

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if (
            len(datagram) < 20
            or datagram[0:2] != _BINDING_REQUEST
            or datagram[4:8] != _COOKIE_BYTES
            or int.from_bytes(datagram[2:4]) != len(datagram) - 20
        ):
            return
        host, port = addr
        response = _RESPONSE.pack(
            0x0101,
            12,
            MAGIC_COOKIE,
            datagram[8:20],
            0x0020,
            8,
            0,
            0x01,
            port ^ 0x2112,
            int.from_bytes(socket.inet_aton(host)) ^ MAGIC_COOKIE,
        )
        self.transport.write(response, addr)  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args()
    responder = MinimalBindingResponder()
    cast(IReactorUDP, reactor).listenUDP(
        args.port, responder, interface=args.interface, maxPacketSize=8192
    )
    reactor.run()


if __name__ == "__main__":
    main()
