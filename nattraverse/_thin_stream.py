"""
Linear retransmission timeouts for thin TCP streams (Linux).

The rendezvous connection is a *thin stream*: a few small messages at a
time, each waited for.  TCP's exponential backoff of the retransmission
timeout (1, 2, 4, 8... seconds) was made for bulk flows; on a lossy link it
holds a lost ``Introduce`` or answer back for tens of seconds, while both
peers wait for it to start punching.  Linux's ``TCP_THIN_LINEAR_TIMEOUTS``
(Petlund et al., "Improving application layer latency for reliable
thin-stream game traffic") keeps the timeout linear for the first six
retransmissions of a stream with fewer than four segments in flight, and
leaves bulk transfers (the relay) as they are.
"""

from __future__ import annotations

import socket
import sys

__all__ = ["mark_thin_stream"]

#: ``TCP_THIN_LINEAR_TIMEOUTS`` from ``linux/tcp.h`` (Python does not name it).
TCP_THIN_LINEAR_TIMEOUTS = getattr(socket, "TCP_THIN_LINEAR_TIMEOUTS", 16)


def _tcp_socket(transport: object) -> socket.socket | None:
    """The TCP socket under *transport* (under TLS too), when there is one."""
    for candidate in (transport, getattr(transport, "transport", None)):
        get_handle = getattr(candidate, "getHandle", None)
        if get_handle is None:
            continue
        try:
            handle = get_handle()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(handle, socket.socket) and handle.type == socket.SOCK_STREAM:
            return handle
    return None


def mark_thin_stream(transport: object) -> bool:
    """
    Ask for linear retransmission timeouts on *transport*'s TCP socket.

    :returns: Whether the option was set: ``False`` off Linux, for a
        transport without a TCP socket (a test's, a relay's), or when the
        kernel refuses it; the connection works the same, only slower to
        recover from loss.
    """
    if not sys.platform.startswith("linux"):
        return False
    sock = _tcp_socket(transport)
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 1)
    except OSError:
        return False
    return True
