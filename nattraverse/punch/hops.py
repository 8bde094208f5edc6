"""
How many NATs sit between this host and the internet, and whether a router
follows them: the hop count that chooses the TTL of low-TTL SYN priming
(:mod:`nattraverse.punch.tcppunch`).

The method, traceroute's, without raw sockets (Linux ``IP_RECVERR``): one
UDP datagram to the rendezvous' address per TTL from 1 to
:data:`MAX_TTL`, each from its own socket; every router where a datagram's
TTL runs out answers with an ICMP Time Exceeded, which the kernel queues on
that socket's error queue together with the router's address.  A NAT
answers from its inside (LAN) address, a private one, since the datagram
dies before it is translated; the first router past the outermost NAT
answers from a public one.  The NAT count is the number of leading TTLs
whose Time Exceeded came from an inside address (RFC 1918, RFC 6598
shared space, link-local), and a SYN with TTL *count + 1* passes every one
of this host's NATs, opening their mappings, and dies at that router.

Where no router answered at *count + 1* (the datagram reached the
rendezvous itself: the outermost NAT shares a segment with public hosts), a
SYN with that TTL may reach the peer's NAT as well, and a NAT's connection
tracking sees a packet before its routing drops it for its TTL: Linux
records the SYN (a simultaneous open, ``SYN_SENT2``, when the peer's own
SYN had opened the entry) and from then on accepts from this side only
SYNs within the TCP window of that one.  With the kernel's ISNs every
fresh ``connect()`` is then dropped as invalid, so there is no priming.
When every SYN to a candidate carries one ISN (:mod:`~nattraverse.punch.isn`)
the later SYNs are retransmissions of the recorded one, and priming at
*count + 1* is worth trying: the router there may just be silent (many
drop or rate-limit ICMP).  If the SYN does reach the peer's NAT, a NAT
that drops unsolicited SYNs forwards it into its TTL's end or drops it,
harmlessly; one that rejects them answers with a RST whatever the TTL
(the SYN is addressed to the NAT itself), and priming stops for that
candidate (:mod:`~nattraverse.punch.tcppunch`).

The datagrams go to the rendezvous only, at its TCP port, where nothing
listens for UDP; :meth:`HopCount.answers` reads the error queues without
waiting, so the caller starts the count when its session opens and reads it
at the introduction, a round trip later.  Without ``IP_RECVERR`` (not
Linux), or when no Time Exceeded came back, there is no priming.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Mapping
from typing import Final

__all__ = ["MAX_TTL", "HopCount", "priming_ttl"]

#: The highest TTL probed: NATs deeper than that are not counted.
MAX_TTL: Final = 6
#: ICMP type of Time Exceeded (IPv4).
_ICMP_TIME_EXCEEDED: Final = 11
#: ``SO_EE_ORIGIN_ICMP``: the error came from an ICMP message.
_ORIGIN_ICMP: Final = 2
#: ``struct sock_extended_err``: errno, origin, type, code, pad, info, data.
_EXTENDED_ERR: Final = struct.Struct("=IBBBBII")
#: ``IP_RECVERR`` (Linux); absent from the socket module elsewhere.
_IP_RECVERR: Final = getattr(socket, "IP_RECVERR", 11)
_PAYLOAD: Final = b"nattraverse hop count"
#: Where a NAT's inside address is: RFC 1918, RFC 6598 shared space, link-local.
_INSIDE: Final = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")
)


def _inside(address: str) -> bool:
    """Whether *address* is the kind a NAT's inside interface has."""
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in _INSIDE)


def priming_ttl(answers: Mapping[int, str], *, may_reach_peer: bool = False) -> int | None:
    """
    The TTL of a priming SYN, from *answers* (TTL to the address of the
    router whose Time Exceeded came back): one more than the leading hops
    that answered from a NAT's inside address, provided a router with a
    public address answered at that TTL or *may_reach_peer* (every SYN to a
    candidate has one ISN, so a priming SYN that reaches the peer's NAT
    leaves no record there that a later SYN contradicts); otherwise ``None``
    (no priming: no NAT, or nothing known to stop the SYN before the peer's
    NAT).
    """
    nats = 0
    while (offender := answers.get(nats + 1)) is not None and _inside(offender):
        nats += 1
    if nats == 0 or (answers.get(nats + 1) is None and not may_reach_peer):
        return None
    return nats + 1


class HopCount:
    """
    Counts this host's NATs on the way to *target* (an IPv4 address and
    port); see the module docstring.  The datagrams leave at once.

    :param max_ttl: The highest TTL probed.
    """

    def __init__(self, target: tuple[str, int], *, max_ttl: int = MAX_TTL) -> None:
        if not 1 <= max_ttl <= 255:
            raise ValueError(f"max_ttl must be 1 to 255, not {max_ttl!r}")
        self.target = (target[0], target[1])
        self._sockets: list[socket.socket] = []
        self._answers: dict[int, str] = {}
        if ipaddress.ip_address(self.target[0]).version != 4:
            return  # IPv6 paths have no NATs to count (and no IP_TTL)
        if not hasattr(socket, "MSG_ERRQUEUE"):
            return
        for ttl in range(1, max_ttl + 1):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
                sock.sendto(_PAYLOAD, self.target)
            except OSError:
                sock.close()
                break
            self._sockets.append(sock)

    def _collect(self) -> None:
        for ttl, sock in enumerate(self._sockets, start=1):
            if ttl in self._answers:
                continue
            for _ in range(4):  # a port unreachable may queue too; bounded
                try:
                    _, ancillary, _, _ = sock.recvmsg(64, 512, socket.MSG_ERRQUEUE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                offender = _time_exceeded_from(ancillary)
                if offender is not None:
                    self._answers[ttl] = offender
                    break

    def answers(self) -> dict[int, str]:
        """
        What has arrived so far: each TTL whose datagram drew a Time
        Exceeded, with the address of the router that sent it.
        """
        self._collect()
        return dict(self._answers)

    def close(self) -> None:
        """Close the sockets; idempotent."""
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()


def _time_exceeded_from(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    """The router of an ICMP Time Exceeded in *ancillary*, if it holds one."""
    for level, kind, data in ancillary:
        if level != socket.IPPROTO_IP or kind != _IP_RECVERR:
            continue
        if len(data) < _EXTENDED_ERR.size + 8:
            continue
        _, origin, icmp_type, _, _, _, _ = _EXTENDED_ERR.unpack_from(data)
        if origin != _ORIGIN_ICMP or icmp_type != _ICMP_TIME_EXCEEDED:
            continue
        # SO_EE_OFFENDER: a sockaddr_in right after the structure.
        family, _ = struct.unpack_from("=HH", data, _EXTENDED_ERR.size)
        if family != socket.AF_INET:
            continue
        return socket.inet_ntoa(data[_EXTENDED_ERR.size + 4 : _EXTENDED_ERR.size + 8])
    return None
