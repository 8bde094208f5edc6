"""
One UDP port for STUN and everything else (RFC 7983 style demultiplexing).

Hole punching needs the socket whose mapping STUN discovered: the same port
sends Binding requests, receives the peer's connectivity checks, and later
carries QUIC.  :class:`StunDemultiplexer` owns that port.  A datagram that
:func:`~nattraverse.stun.message.is_stun` recognises and that the
:class:`~nattraverse.stun.client.StunClient` consumes (a STUN response)
goes to the client; everything else, STUN requests and indications
included, goes to :attr:`StunDemultiplexer.other`, which can be set or
replaced at any time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from nattraverse._types import Endpoint
from nattraverse.stun.client import DEFAULT_MAX_OUTSTANDING, StunClient
from nattraverse.stun.message import is_stun

__all__ = ["DatagramHandler", "DemuxStats", "Interceptor", "StunDemultiplexer"]

_log = Logger()

#: Receives the datagrams that are not for the STUN client.  To hand them
#: to a :class:`~twisted.internet.protocol.DatagramProtocol`, pass its bound
#: ``datagramReceived``.
DatagramHandler = Callable[[bytes, Endpoint], object]
#: Offered every datagram first; returns ``True`` when it consumed it.
Interceptor = Callable[[bytes, Endpoint], bool]


@dataclass(slots=True)
class DemuxStats:
    """
    Where datagrams went.

    :ivar intercepted: Consumed by :attr:`StunDemultiplexer.intercept`.
    :ivar stun: Taken by the STUN client.
    :ivar other: Handed to :attr:`StunDemultiplexer.other`.
    :ivar dropped: Dropped because no other handler was set.
    :ivar handler_errors: Exceptions raised by the other handler or the
        interceptor (logged); the datagram is dropped.
    """

    intercepted: int = 0
    stun: int = 0
    other: int = 0
    dropped: int = 0
    handler_errors: int = 0


class StunDemultiplexer(DatagramProtocol):
    """
    The protocol of a UDP port shared by a STUN client and other traffic::

        demux = StunDemultiplexer(reactor)
        reactor.listenUDP(0, demux, interface="0.0.0.0")
        response = await demux.client.binding(Endpoint("192.0.2.1", 3478))
        demux.other = quic.datagramReceived   # later, on the same socket

    The client writes through :meth:`send`.  When the port stops listening
    the client is stopped: its pending transactions fail with
    :class:`~nattraverse.errors.StunTransactionCancelled` and its timers are
    cancelled.  A demultiplexer serves one port, once.

    :attr:`intercept`, when set (``None`` by default), is offered every
    datagram before anyone else and consumes those it returns ``True`` for:
    connectivity checks (:mod:`nattraverse.punch`) use it to see the
    peer's STUN requests and responses, which are no business of the client.

    :param reactor: The client's clock.
    :param other: Receives every datagram the client does not consume,
        with the source as an :class:`~nattraverse._types.Endpoint`.
        Exceptions it raises are logged and counted, never raised into the
        reactor.
    :param rto: See :class:`~nattraverse.stun.client.StunClient`.
    :param rc: See :class:`~nattraverse.stun.client.StunClient`.
    :param rm: See :class:`~nattraverse.stun.client.StunClient`.
    :param random_bytes: See :class:`~nattraverse.stun.client.StunClient`.
    :param max_outstanding: See :class:`~nattraverse.stun.client.StunClient`.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        other: DatagramHandler | None = None,
        rto: float = 0.5,
        rc: int = 7,
        rm: int = 16,
        random_bytes: Callable[[int], bytes] = os.urandom,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
    ) -> None:
        self.other = other
        self.intercept: Interceptor | None = None
        self.stats = DemuxStats()
        self.client = StunClient(
            reactor,
            self.send,
            rto=rto,
            rc=rc,
            rm=rm,
            random_bytes=random_bytes,
            max_outstanding=max_outstanding,
        )

    def send(self, data: bytes, addr: Endpoint) -> None:
        """
        Write a datagram through the port.

        :raises RuntimeError: when the demultiplexer is not listening.
        """
        if self.transport is None:
            raise RuntimeError(
                "the StunDemultiplexer has no UDP port; give it to reactor.listenUDP first"
            )
        self.transport.write(data, (addr[0], addr[1]))

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Route one datagram to :attr:`intercept`, the STUN client or :attr:`other`."""
        source = Endpoint(addr[0], addr[1])
        intercept = self.intercept
        if intercept is not None:
            try:
                consumed = intercept(datagram, source)
            except Exception:
                self.stats.handler_errors += 1
                _log.failure(
                    "the interceptor {handler!r} failed on a datagram from {source}",
                    handler=intercept,
                    source=str(source),
                )
                return
            if consumed:
                self.stats.intercepted += 1
                return
        if is_stun(datagram) and self.client.datagram_received(datagram, source):
            self.stats.stun += 1
            return
        other = self.other
        if other is None:
            self.stats.dropped += 1
            _log.debug(
                "dropped a {size}-byte datagram from {source}: no handler for non-STUN traffic",
                size=len(datagram),
                source=str(source),
            )
            return
        self.stats.other += 1
        try:
            other(datagram, source)
        except Exception:
            self.stats.handler_errors += 1
            _log.failure(
                "the datagram handler {handler!r} failed on a datagram from {source}",
                handler=other,
                source=str(source),
            )

    def stopProtocol(self) -> None:
        """The port is closed: fail the client's pending transactions."""
        self.client.stop()
