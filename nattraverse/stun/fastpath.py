"""
A lean UDP receive loop for STUN servers.

Most traffic of a public STUN server is plain 20-byte Binding requests with
no attributes.  :class:`FastStunPort` recognises them in its read loop and
answers them straight from the socket, without the protocol call, the
decoder and ``Port.write``'s address checks; every other datagram goes to
the protocol as usual.  The answer is byte for byte what
:class:`~nattraverse.stun.responder.BindingResponder` gives (the tests check
this), so the fast path changes speed, never behaviour.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import udp
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from nattraverse.stun.constants import MAGIC_COOKIE_BYTES

_log = Logger()

#: A plain Binding request: type 0x0001, length 0, then the magic cookie.
_PLAIN_BINDING_PREFIX = b"\x00\x01\x00\x00" + MAGIC_COOKIE_BYTES

#: Largest datagram read; bigger ones are truncated by the kernel and then
#: fail to decode.
MAX_DATAGRAM = 65535

#: Datagrams read per wake-up before the reactor gets control back.
READS_PER_WAKEUP = 512


class FastStunPort(udp.Port):
    """
    A :class:`twisted.internet.udp.Port` whose read loop answers plain
    Binding requests itself.

    :param answer: Builds the answer from the transaction id, source host
        and source port, or ``None`` to disable the fast path (the port then
        behaves as a plain ``udp.Port``).
    """

    def __init__(
        self,
        port: int,
        protocol: DatagramProtocol,
        answer: Callable[[bytes, str, int], bytes] | None,
        *,
        interface: str = "",
        reactor: Any = None,
    ) -> None:
        super().__init__(port, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM,  # type: ignore[no-untyped-call]
                         reactor=reactor)
        self._answer = answer
        self.fast_answers = 0
        self.send_errors = 0

    def doRead(self) -> None:
        answer = self._answer
        if answer is None or self.addressFamily != socket.AF_INET:
            super().doRead()  # type: ignore[no-untyped-call]
            return
        sock = self.socket
        recvfrom = sock.recvfrom
        sendto = sock.sendto
        datagram_received = self.protocol.datagramReceived
        size = self.maxPacketSize
        prefix = _PLAIN_BINDING_PREFIX
        answered = 0
        try:
            for _ in range(READS_PER_WAKEUP):
                try:
                    data, addr = recvfrom(size)
                except BlockingIOError:
                    return
                except InterruptedError:
                    continue
                except ConnectionRefusedError:
                    # ICMP port unreachable for an earlier answer.
                    continue
                except OSError as e:
                    # Not worth stopping the port for: log, let the reactor
                    # call again.
                    _log.warn("STUN socket read failed: {error}", error=e)
                    return
                if len(data) == 20 and data[:8] == prefix:
                    try:
                        sendto(answer(data[8:], addr[0], addr[1]), addr)
                        answered += 1
                    except OSError:
                        self.send_errors += 1
                    continue
                try:
                    datagram_received(data, addr)
                except Exception:
                    _log.failure("STUN datagram handler failed")
        finally:
            self.fast_answers += answered
