"""
The engines that move a relay's bytes between its two connections.

A relay joins two connections, side 0 (the caller's) and side 1 (the
callee's), and moves bytes in both directions.  Two engines do it, with the
same behaviour:

- :class:`StreamSplice`, the generic one: Twisted producer/consumer on the
  two transports.  Each transport is registered as the other's streaming
  producer, so a full write buffer on one side pauses reading on the other.
  It works on any transport (TLS included) and on test transports.
- :class:`ZeroCopySplice`, the fast path on Linux when both transports are
  plain TCP sockets of the relay's reactor: ``os.splice(2)`` through one
  pipe per direction, so the bytes never enter Python.  It lives in
  :mod:`nattraverse.rendezvous._zerocopy` (with the pieces both engines
  share) and is re-exported here.

Common rules, per direction (source to destination):

- Bytes already received through the protocol before the engine started
  (``early``), and bytes still in the destination transport's own write
  buffer (for example the AMP answer to ``RelayJoin``), go out before any
  relayed byte.
- When the destination cannot take more, the source is not read
  (backpressure); with a rate cap, a token bucket per direction on the
  reactor's clock pauses reading when over budget.
- End of the source's data: everything read is delivered, then the
  destination's sending half is closed (``shutdown(SHUT_WR)``, or a full
  close where the transport cannot half-close).  When both directions have
  ended, both connections are closed.
- A destination that is gone: what its source still sends is read and
  dropped until the source closes too, for at most :data:`DISCARD_GRACE`
  seconds, then both are aborted.  So a close never resets a connection
  that still has unread data in flight towards a peer.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorFDSet,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse.rendezvous._zerocopy import _DISCARD_CHUNK as _DISCARD_CHUNK
from nattraverse.rendezvous._zerocopy import _SPLICE_FLAGS as _SPLICE_FLAGS
from nattraverse.rendezvous._zerocopy import BURST_SECONDS as BURST_SECONDS
from nattraverse.rendezvous._zerocopy import CALLEE as CALLEE
from nattraverse.rendezvous._zerocopy import CALLER as CALLER
from nattraverse.rendezvous._zerocopy import DISCARD_GRACE as DISCARD_GRACE
from nattraverse.rendezvous._zerocopy import PIPE_SIZE as PIPE_SIZE
from nattraverse.rendezvous._zerocopy import RESUME_BYTES as RESUME_BYTES
from nattraverse.rendezvous._zerocopy import ROUNDS as ROUNDS
from nattraverse.rendezvous._zerocopy import TokenBucket as TokenBucket
from nattraverse.rendezvous._zerocopy import ZeroCopySplice as ZeroCopySplice
from nattraverse.rendezvous._zerocopy import _Direction as _Direction
from nattraverse.rendezvous._zerocopy import _grow_pipe as _grow_pipe
from nattraverse.rendezvous._zerocopy import _Socket as _Socket
from nattraverse.rendezvous._zerocopy import _take_write_buffer as _take_write_buffer

_log = Logger()


class Engine(Protocol):
    """
    What a relay asks of an engine.  The relay's two protocols forward what
    their transports tell them; side is :data:`CALLER` or :data:`CALLEE`.
    """

    #: ``"splice"`` or ``"stream"``, for logs.
    name: str

    def start(self) -> None:
        """Start moving bytes."""

    def data_received(self, side: int, data: bytes) -> None:
        """*side*'s transport delivered *data*."""

    def read_eof(self, side: int) -> None:
        """*side* closed its sending half (a half-close)."""

    def connection_lost(self, side: int, reason: Failure) -> None:
        """*side*'s connection is closed."""

    def abort(self) -> None:
        """Drop both connections now and release everything; idempotent."""

    def moved(self) -> tuple[int, int]:
        """Bytes delivered from the caller to the callee, and back."""
        ...


def make_engine(
    reactor: IReactorTime,
    transports: Sequence[Any],
    early: Sequence[bytes],
    rate: float,
    *,
    zero_copy: bool = True,
) -> Engine:
    """
    The fastest engine that can relay between *transports* (caller's,
    callee's): :class:`ZeroCopySplice` when allowed by *zero_copy* and
    :func:`can_zero_copy` says so, else :class:`StreamSplice`.  *early* are
    the bytes each side sent that its protocol already received; *rate* is
    the cap in bytes per second per direction (0: none).
    """
    if zero_copy and can_zero_copy(reactor, transports):
        try:
            return ZeroCopySplice(reactor, transports, early, rate)
        except OSError as e:
            _log.warn(
                "relay: zero-copy splice unavailable ({error}); relaying through Twisted", error=e
            )
    return StreamSplice(reactor, transports, early, rate)


def can_zero_copy(reactor: object, transports: Sequence[Any]) -> bool:
    """
    Whether :class:`ZeroCopySplice` can take over both *transports*: Linux
    with ``os.splice``, a reactor with file descriptors, and both transports
    plain, connected TCP sockets of that reactor with no TLS, no producer
    and no pending close.
    """
    if not sys.platform.startswith("linux") or not hasattr(os, "splice"):
        return False
    if not IReactorFDSet.providedBy(reactor):
        return False
    return all(_plain_tcp(reactor, transport) for transport in transports)


def _plain_tcp(reactor: object, transport: Any) -> bool:
    return (
        isinstance(transport, tcp.Connection)
        and getattr(transport, "reactor", None) is reactor
        and not getattr(transport, "TLS", False)
        and bool(transport.connected)
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and transport.producer is None
        and isinstance(getattr(transport, "socket", None), socket.socket)
        and isinstance(transport.dataBuffer, bytes)
        and isinstance(transport._tempDataBuffer, list)
    )


# -- the generic engine --------------------------------------------------------


@implementer(IPushProducer)
class _Flow:
    """
    One direction of :class:`StreamSplice`: the producer registered on the
    destination transport, which pauses and resumes the source transport.
    """

    def __init__(self, engine: StreamSplice, source: int) -> None:
        self.engine = engine
        self.source = source
        self.destination = 1 - source
        self.reasons: set[str] = {"starting"}
        self.source_paused = True  # the relay paused it while waiting
        self.ended = False  # no more bytes from the source
        self.discarding = False  # the destination is gone
        self.delivered = 0
        self.bucket = TokenBucket.for_rate(engine.rate, engine.reactor.seconds())
        self.resume_call: IDelayedCall | None = None

    # IPushProducer, called by the destination transport
    def pauseProducing(self) -> None:
        self._pause("consumer")

    def resumeProducing(self) -> None:
        self._resume("consumer")

    def stopProducing(self) -> None:
        self.engine._destination_gone(self)

    def _pause(self, reason: str) -> None:
        self.reasons.add(reason)
        self.update()

    def _resume(self, reason: str) -> None:
        self.reasons.discard(reason)
        self.update()

    def update(self) -> None:
        """
        Pause or resume the source transport as the reasons say.
        """
        if self.ended or self.source in self.engine.lost or self.source in self.engine.closing:
            return
        transport = self.engine.transports[self.source]
        if self.reasons and not self.source_paused:
            self.source_paused = True
            transport.pauseProducing()
        elif not self.reasons and self.source_paused:
            self.source_paused = False
            transport.resumeProducing()

    def deliver(self, data: bytes) -> None:
        """
        Send *data* from the source to the destination, within the rate cap.
        """
        if self.bucket is not None:
            now = self.engine.reactor.seconds()
            self.bucket.take(len(data), now)
            delay = self.bucket.wait(now)
            if delay > 0 and self.resume_call is None:
                self._pause("rate")
                self.resume_call = self.engine.reactor.callLater(delay, self._rate_ok)
        if self.discarding:
            return
        self.engine.transports[self.destination].write(data)
        self.delivered += len(data)

    def _rate_ok(self) -> None:
        self.resume_call = None
        assert self.bucket is not None
        delay = self.bucket.wait(self.engine.reactor.seconds())
        if delay > 0:
            self.resume_call = self.engine.reactor.callLater(delay, self._rate_ok)
        else:
            self._resume("rate")

    def cancel(self) -> None:
        if self.resume_call is not None and self.resume_call.active():
            self.resume_call.cancel()
        self.resume_call = None


class StreamSplice:
    """
    The generic engine: producer/consumer on two Twisted transports (any
    ``ITransport`` that is also an ``IPushProducer`` and ``IConsumer``).

    :param reactor: For the rate cap's clock and timers.
    :param transports: The caller's and the callee's transport, both paused
        (``pauseProducing``) by the relay while it waited.
    :param early: Bytes each side sent that were already received.
    :param rate: Bytes per second per direction; 0 for no cap.
    """

    name = "stream"

    def __init__(
        self,
        reactor: IReactorTime,
        transports: Sequence[Any],
        early: Sequence[bytes],
        rate: float,
    ) -> None:
        self.reactor = reactor
        self.transports = list(transports)
        self.rate = rate
        self.lost: set[int] = set()
        self.closing: set[int] = set()
        self._early = list(early)
        self._flows = [_Flow(self, CALLER), _Flow(self, CALLEE)]
        self._grace: IDelayedCall | None = None
        self._started = False
        self._aborted = False

    def start(self) -> None:
        self._started = True
        for flow in self._flows:
            self.transports[flow.destination].registerProducer(flow, True)
        for flow in self._flows:
            early, self._early[flow.source] = self._early[flow.source], b""
            if early:
                flow.deliver(early)
        for flow in self._flows:
            flow._resume("starting")

    def moved(self) -> tuple[int, int]:
        return self._flows[0].delivered, self._flows[1].delivered

    def data_received(self, side: int, data: bytes) -> None:
        if not self._started:
            self._early[side] += data
            return
        self._flows[side].deliver(data)

    def read_eof(self, side: int) -> None:
        self._end_flow(self._flows[side])

    def connection_lost(self, side: int, reason: Failure) -> None:
        if side in self.lost:
            return
        self.lost.add(side)
        self._end_flow(self._flows[side])
        self._destination_gone(self._flows[1 - side])
        if len(self.lost) == 2:
            self._release()

    def _end_flow(self, flow: _Flow) -> None:
        """
        No more bytes from *flow*'s source: close the destination's sending
        half, or all of it if the other direction has ended too.
        """
        if flow.ended:
            return
        flow.ended = True
        flow.cancel()
        destination = flow.destination
        if destination in self.lost or not self._started:
            return
        transport = self.transports[destination]
        transport.unregisterProducer()
        if self._flows[destination].ended:
            self._close(destination)
            if flow.source not in self.lost:
                self._close(flow.source)
        else:
            half_close = getattr(transport, "loseWriteConnection", None)
            if half_close is not None:
                half_close()
            else:
                self._close(destination)

    def _close(self, side: int) -> None:
        if side not in self.lost and side not in self.closing:
            self.closing.add(side)
            self.transports[side].loseConnection()

    def _destination_gone(self, flow: _Flow) -> None:
        """
        *flow*'s destination is gone: drop what its source still sends, for
        at most :data:`DISCARD_GRACE` seconds.
        """
        if flow.discarding:
            return
        flow.discarding = True
        flow.reasons.clear()
        flow.update()  # read on, to see the source's end
        if not flow.ended and self._grace is None and not self._aborted:
            self._grace = self.reactor.callLater(DISCARD_GRACE, self._grace_over)

    def _grace_over(self) -> None:
        self._grace = None
        _log.info("relay: a peer kept sending after its partner left; closing it")
        self.abort()

    def abort(self) -> None:
        self._aborted = True
        for side in (CALLER, CALLEE):
            if side not in self.lost:
                self.transports[side].abortConnection()
        self._release()

    def _release(self) -> None:
        for flow in self._flows:
            flow.cancel()
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None


__all__ = [
    "CALLEE",
    "CALLER",
    "Engine",
    "StreamSplice",
    "TokenBucket",
    "ZeroCopySplice",
    "can_zero_copy",
    "make_engine",
]
