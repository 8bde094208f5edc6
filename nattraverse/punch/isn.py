"""
Choosing the initial sequence number (ISN) of an outgoing TCP connection
(Linux ``TCP_REPAIR``, which needs ``CAP_NET_ADMIN``).

Why TCP hole punching wants it (:mod:`nattraverse.punch.tcppunch`): a
Linux NAT's connection tracking records the sequence number of the first
SYN of a 4-tuple and, once the peer's SYN has met that entry (a
simultaneous open, ``SYN_SENT2``), accepts from this side only segments
within the TCP window of it, about 4 ms of Linux's ISN clock.  Every
``connect()`` makes a new socket with a new ISN, so a priming SYN, a SYN
after a RST, or a SYN restarted after a silence each risk making the next
one ``INVALID`` at this side's NAT.  With one ISN for every SYN to a
candidate, each later SYN is a retransmission of the first as far as any
NAT can tell, and the SYN-ACK of a simultaneous open agrees with it.

The method: before ``connect()``, with the socket still closed, switch
repair mode on, select the send queue, set its sequence number
(``TCP_QUEUE_SEQ``), and switch repair mode off again without a window
probe.  ``connect()`` then uses that number instead of the kernel's
``secure_tcp_seq()``.  Repair mode off resets ``SO_REUSEADDR``, so
:func:`pin_isn` runs before the reuse options are set.

Without the capability, or off Linux, :func:`can_pin_isn` says so and
punching goes on with the kernel's ISNs.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from typing import Final

__all__ = ["IsnPinningUnavailable", "can_pin_isn", "pin_isn"]

#: ``<linux/tcp.h>``: absent from the socket module.
_TCP_REPAIR: Final = 19
_TCP_REPAIR_QUEUE: Final = 20
_TCP_QUEUE_SEQ: Final = 21
_TCP_SEND_QUEUE: Final = 2
_TCP_REPAIR_ON: Final = 1
_TCP_REPAIR_OFF_NO_WP: Final = -1


class IsnPinningUnavailable(OSError):
    """This process cannot choose ISNs (not Linux, or no ``CAP_NET_ADMIN``)."""


def pin_isn(sock: socket.socket, isn: int) -> None:
    """
    Make *sock*'s next ``connect()`` send its SYN with sequence number *isn*.

    Call it on a new TCP socket, before ``bind()`` and before any other
    option: leaving repair mode clears ``SO_REUSEADDR``.

    :raises ValueError: when *isn* is not a 32-bit unsigned number.
    :raises IsnPinningUnavailable: without ``CAP_NET_ADMIN`` or off Linux.
    :raises OSError: when the kernel refuses for another reason.
    """
    if not 0 <= isn <= 0xFFFFFFFF:
        raise ValueError(f"an ISN is a 32-bit unsigned number, not {isn!r}")
    if not sys.platform.startswith("linux"):
        raise IsnPinningUnavailable(errno.EOPNOTSUPP, "choosing a TCP ISN needs Linux")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_REPAIR, _TCP_REPAIR_ON)
    except PermissionError as e:
        raise IsnPinningUnavailable(
            e.errno, "choosing a TCP ISN needs CAP_NET_ADMIN (TCP_REPAIR)"
        ) from e
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_REPAIR_QUEUE, _TCP_SEND_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUEUE_SEQ, struct.pack("=I", isn))
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_REPAIR, _TCP_REPAIR_OFF_NO_WP)


def can_pin_isn(family: socket.AddressFamily = socket.AF_INET) -> bool:
    """Whether :func:`pin_isn` works in this process, tried on a throwaway socket."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        pin_isn(sock, 1)
    except OSError:
        return False
    finally:
        sock.close()
    return True
