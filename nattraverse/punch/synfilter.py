"""
A classic BPF socket filter that makes a listening TCP socket ignore SYNs
from given addresses (Linux ``SO_ATTACH_FILTER``; no privilege needed).

Why (:mod:`nattraverse.punch.tcppunch`): while a peer punches towards one
of our candidates from its own fixed port, the SYN it sends can reach our
host when our own ``connect()`` to that 4-tuple is not in flight.  Our
listener would answer it, and behind a Linux NAT the answer is lost: the
NAT tracks the sequence numbers of our earlier SYN to that 4-tuple (the
one that opened it), and a SYN-ACK with the listener's new ones is
``INVALID``.  Worse, the listener's half-open connection then holds the
4-tuple, and our next ``connect()`` fails with ``EADDRNOTAVAIL`` for as
long as it retransmits.  Ignored instead, the peer's SYN stays unanswered
(no RST either), the peer's ``connect()`` keeps waiting, and our next SYN
completes the simultaneous open with consistent sequence numbers.  SYNs
from other ports (a symmetric NAT's new mapping) still reach ``accept()``.

The program reads the IPv4 source address from the network header
(``SKF_NET_OFF``) and the TCP source port at offset 0 (a TCP socket's
filter sees the segment from its header).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Final

__all__ = ["MAX_IGNORED", "ignore_syns_from", "program"]

#: Most addresses one filter ignores (a punch has a few candidates each);
#: classic BPF jumps reach at most 255 instructions ahead.
MAX_IGNORED: Final = 60

_SO_ATTACH_FILTER: Final = 26
_SO_DETACH_FILTER: Final = 27
_SKF_NET_OFF: Final = -0x100000
# Instruction classes and modes of classic BPF.
_LD_W_ABS: Final = 0x20
_LD_H_ABS: Final = 0x28
_LD_B_ABS: Final = 0x30
_AND_K: Final = 0x54
_JEQ_K: Final = 0x15
_RET_K: Final = 0x06
_ACCEPT: Final = 0xFFFFFFFF
#: Offset of the flags byte in the TCP header, and the flags.
_TCP_FLAGS: Final = 13
_SYN: Final = 0x02
_ACK: Final = 0x10
_DROP: Final = 0


def program(addresses: Iterable[tuple[str, int]]) -> list[tuple[int, int, int, int]]:
    """
    The filter's instructions ``(code, jt, jf, k)``: drop a SYN (without
    ACK) from any of the IPv4 *addresses* ``(host, port)``, accept every
    other segment.

    :raises ValueError: for a host that is not an IPv4 literal, or more than
        :data:`MAX_IGNORED` addresses.
    """
    unique = list(dict.fromkeys((host, port) for host, port in addresses))
    if len(unique) > MAX_IGNORED:
        raise ValueError(f"at most {MAX_IGNORED} addresses, not {len(unique)}")
    source_ip = _SKF_NET_OFF + 12
    blocks = []
    for host, port in unique:
        try:
            blocks.append((int(ipaddress.IPv4Address(host)), port))
        except ValueError:
            raise ValueError(f"a SYN filter takes IPv4 addresses, not {host!r}") from None
    count = len(blocks)
    # Only a pure SYN (SYN without ACK) can be dropped: a connection the
    # socket accepted inherits its filter, and must receive everything.
    code: list[tuple[int, int, int, int]] = [
        (_LD_B_ABS, 0, 0, _TCP_FLAGS),
        (_AND_K, 0, 0, _SYN | _ACK),
        (_JEQ_K, 0, 4 * count, _SYN),
    ]
    # Each block: load the source address; if not this one skip the next 2;
    # load the source port; if this one jump to the drop at the very end.
    for index, (ip, port) in enumerate(blocks):
        remaining = count - index - 1  # blocks after this one
        to_drop = 4 * remaining + 1  # past those blocks and the accept
        code.append((_LD_W_ABS, 0, 0, source_ip & 0xFFFFFFFF))
        code.append((_JEQ_K, 0, 2, ip))
        code.append((_LD_H_ABS, 0, 0, 0))
        code.append((_JEQ_K, to_drop, 0, port))
    code.append((_RET_K, 0, 0, _ACCEPT))
    code.append((_RET_K, 0, 0, _DROP))
    return code


class _Instruction(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


def ignore_syns_from(sock: socket.socket, addresses: Iterable[tuple[str, int]]) -> bool:
    """
    Make the listening *sock* ignore segments from *addresses* (IPv4; others
    are left out), or accept all again when none is given.

    :returns: Whether a filter is in place as asked (``False`` where socket
        filters are not available, or for an IPv6 socket).
    """
    wanted = [(h, p) for h, p in addresses if ipaddress.ip_address(h).version == 4]
    if sock.family != socket.AF_INET or not sys.platform.startswith("linux"):
        return False
    if not wanted:
        with contextlib.suppress(OSError):  # none attached
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        return True
    code = program(wanted)
    instructions = (_Instruction * len(code))(*[_Instruction(*i) for i in code])
    fprog = struct.pack("HL", len(code), ctypes.addressof(instructions))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True
