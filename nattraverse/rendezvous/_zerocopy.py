"""
The zero-copy relay engine, :class:`ZeroCopySplice`, and the pieces both
engines share (sides, timing constants, :class:`TokenBucket`).

:class:`ZeroCopySplice` is the fast path on Linux when both transports are
plain TCP sockets of the relay's reactor: it takes the two sockets over from
their transports and moves bytes with ``os.splice(2)`` through one pipe per
direction, so they never enter Python.  The reactor still drives it: one
:class:`_Socket` reader/writer per socket replaces the transport in the
reactor while the relay runs, and the transport gets its socket back to close
it.

The rules both engines follow are in :mod:`nattraverse.rendezvous.splice`,
which imports this module (never the other way round) and re-exports its
names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import (
    IDelayedCall,
    ILoggingContext,
    IReactorFDSet,
    IReactorTime,
    IReadWriteDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

# Same namespace as the generic engine's: relay logs did not move.
_log = Logger(namespace="nattraverse.rendezvous.splice")

#: Seconds a direction whose destination is gone keeps reading (and
#: dropping) what its source sends before both connections are aborted.
DISCARD_GRACE = 10.0
#: A rate-capped direction may send this many seconds' worth at once.
BURST_SECONDS = 0.5
#: A rate-capped direction paused for being over budget resumes when the
#: bucket holds this many bytes again (or is full, if that is less).
RESUME_BYTES = 64 * 1024

#: Size asked for each direction's pipe (the kernel may grant less).
PIPE_SIZE = 1024 * 1024
#: Read-and-write rounds per readiness event before the reactor gets control
#: back (level-triggered: whatever is left is reported again).
ROUNDS = 8
_DISCARD_CHUNK = 64 * 1024

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

#: Sides of a relay.
CALLER, CALLEE = 0, 1


class TokenBucket:
    """
    A token bucket: *rate* bytes per second, at most *burst* saved up.  The
    balance may go below zero (a read already made); the owner pauses until
    :meth:`wait` says it is back at :meth:`resume_level`.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate and burst must be positive, not {rate!r} and {burst!r}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._stamp = now

    @classmethod
    def for_rate(cls, rate: float, now: float) -> TokenBucket | None:
        """
        The bucket for a rate cap of *rate* bytes per second, or ``None``
        when *rate* is 0 (no cap).
        """
        if rate <= 0:
            return None
        return cls(rate, max(rate * BURST_SECONDS, 1.0), now)

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = max(self._stamp, now)

    def allowance(self, now: float) -> int:
        """
        Bytes that may be taken now (0 when over budget).
        """
        self._refill(now)
        return max(0, math.ceil(self.tokens))

    def take(self, count: int, now: float) -> None:
        """
        Account for *count* bytes moved at *now*.
        """
        self._refill(now)
        self.tokens -= count

    def resume_level(self) -> float:
        """
        The balance at which a paused direction resumes.
        """
        return min(self.burst, RESUME_BYTES)

    def wait(self, now: float) -> float:
        """
        Seconds until a paused direction may resume (0: it need not pause).
        """
        self._refill(now)
        if self.tokens > 0:
            return 0.0
        return (self.resume_level() - self.tokens) / self.rate


@implementer(IReadWriteDescriptor, ILoggingContext)
class _Socket:
    """
    One relayed socket in the reactor while :class:`ZeroCopySplice` owns it:
    reading it feeds the direction from this side, writing it drains the
    direction towards this side.
    """

    def __init__(self, engine: ZeroCopySplice, side: int, sock: socket.socket) -> None:
        self.engine = engine
        self.side = side
        self.sock = sock
        self.fd = sock.fileno()
        self.reading = False
        self.writing = False
        self.attached = True

    def fileno(self) -> int:
        return self.fd if self.attached else -1

    def logPrefix(self) -> str:
        return "RelaySplice"

    def doRead(self) -> None:
        if self.attached:
            self.engine._event(self.engine._directions[self.side])

    def doWrite(self) -> None:
        if self.attached:
            self.engine._event(self.engine._directions[1 - self.side])

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw a hang-up or an error with no data to read.
        self.reading = self.writing = False
        if self.attached:
            _log.debug("relay: socket of side {side} lost: {reason}", side=self.side, reason=reason)
            self.engine.abort()

    def want(self, *, read: bool | None = None, write: bool | None = None) -> None:
        fds = self.engine._fds
        if read is not None and read != self.reading and self.attached:
            self.reading = read
            (fds.addReader if read else fds.removeReader)(self)
        if write is not None and write != self.writing and self.attached:
            self.writing = write
            (fds.addWriter if write else fds.removeWriter)(self)

    def detach(self) -> None:
        self.want(read=False, write=False)
        self.attached = False


class _Direction:
    """
    One direction of :class:`ZeroCopySplice`: source socket to pipe to
    destination socket, after the bytes owed to the destination first.
    """

    def __init__(self, engine: ZeroCopySplice, source: int, prefix: bytes) -> None:
        self.engine = engine
        self.source = source
        self.prefix = bytearray(prefix)
        self.not_relayed = 0  # leading bytes of prefix that are the transport's own
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = _grow_pipe(self.pipe_w)
        self.in_pipe = 0
        self.eof = False  # the source has no more bytes
        self.discarding = False  # the destination is gone
        self.done = False
        self.delivered = 0
        self.bucket = TokenBucket.for_rate(engine.rate, engine.reactor.seconds())
        self.rate_paused = False
        self.resume_call: IDelayedCall | None = None

    def close_pipe(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pipe_r = self.pipe_w = -1

    def pump(self, src: _Socket, dst: _Socket) -> None:
        """
        Move what can be moved now, then wait for the right readiness.
        """
        for _ in range(ROUNDS):
            if not self._flush(dst.fd):
                self._wait(src, dst, read=False, write=True)
                return
            if self.eof:
                self._finish(dst)
                src.want(read=False)
                return
            if self.rate_paused:
                self._wait(src, dst, read=False, write=False)
                return
            if not self._fill(src.fd):
                self._wait(src, dst, read=True, write=False)
                return
        owed = bool(self.prefix or self.in_pipe)
        self._wait(src, dst, read=not owed, write=owed)

    def _wait(self, src: _Socket, dst: _Socket, *, read: bool, write: bool) -> None:
        src.want(read=read)
        dst.want(write=write and not self.discarding)

    def _flush(self, dst: int) -> bool:
        """
        Write what is owed to *dst*; ``False`` when it cannot take it all.
        """
        if self.discarding:
            return True
        try:
            if self.prefix:
                count = os.write(dst, self.prefix)
                del self.prefix[:count]
                own = min(count, self.not_relayed)
                self.not_relayed -= own
                self.delivered += count - own
                if self.prefix:
                    return False
            while self.in_pipe:
                count = os.splice(self.pipe_r, dst, self.in_pipe, flags=_SPLICE_FLAGS)
                if count <= 0:
                    return False
                self.in_pipe -= count
                self.delivered += count
                if self.in_pipe:
                    return False
        except BlockingIOError:
            return False
        except OSError as e:
            self._destination_gone(e)
        return True

    def _fill(self, src: int) -> bool:
        """
        Read from *src* into the pipe (or drop it); ``False`` when there is
        nothing to read now.
        """
        limit = self.capacity
        now = self.engine.reactor.seconds()
        if self.bucket is not None:
            limit = max(1, min(limit, self.bucket.allowance(now)))
        try:
            if self.discarding:
                count = len(os.read(src, min(limit, _DISCARD_CHUNK)))
            else:
                count = os.splice(src, self.pipe_w, limit, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return False
        except OSError as e:
            _log.debug("relay: reading side {side} failed: {error}", side=self.source, error=e)
            count = 0
        if count == 0:
            self.eof = True
            return True
        if not self.discarding:
            self.in_pipe += count
        if self.bucket is not None:
            self.bucket.take(count, now)
            delay = self.bucket.wait(now)
            if delay > 0:
                self.rate_paused = True
                self.resume_call = self.engine.reactor.callLater(delay, self._rate_ok)
        return True

    def _rate_ok(self) -> None:
        self.resume_call = None
        assert self.bucket is not None
        delay = self.bucket.wait(self.engine.reactor.seconds())
        if delay > 0:
            self.resume_call = self.engine.reactor.callLater(delay, self._rate_ok)
            return
        self.rate_paused = False
        self.engine._event(self)

    def _destination_gone(self, error: OSError) -> None:
        _log.debug(
            "relay: writing to side {side} failed: {error}", side=1 - self.source, error=error
        )
        self.discarding = True
        self.prefix.clear()
        self.not_relayed = 0
        self.in_pipe = 0
        self.engine._start_grace()

    def _finish(self, dst: _Socket) -> None:
        if self.done:
            return
        self.done = True
        dst.want(write=False)
        if not self.discarding:
            with contextlib.suppress(OSError):
                dst.sock.shutdown(socket.SHUT_WR)
        self.engine._direction_done()

    def cancel(self) -> None:
        if self.resume_call is not None and self.resume_call.active():
            self.resume_call.cancel()
        self.resume_call = None


def _grow_pipe(fd: int) -> int:
    """
    Make the pipe *fd* :data:`PIPE_SIZE` bytes if allowed; return its size.
    """
    setter = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    getter = getattr(fcntl, "F_GETPIPE_SZ", 1032)
    for size in (PIPE_SIZE, 256 * 1024):
        try:
            return int(fcntl.fcntl(fd, setter, size))
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EBUSY, errno.EINVAL):
                raise
    return int(fcntl.fcntl(fd, getter))


class ZeroCopySplice:
    """
    The fast engine: ``os.splice(2)`` between two plain TCP sockets through
    a pipe per direction, in non-blocking mode, driven by the reactor.

    On :meth:`start` both transports stop reading at once; in the next
    reactor turn (outside any of their own callbacks) the engine takes the
    bytes still in their write buffers, takes their sockets out of the
    reactor and puts its own :class:`_Socket` readers/writers in (the epoll
    reactor keys by file descriptor, so never both at once).  When both
    directions have ended it removes them and hands each socket back to its
    transport to close (``loseConnection``); on :meth:`abort` it resets both
    (``abortConnection``).  Its pipes are closed in every case.

    :raises OSError: when the pipes cannot be made (no file descriptors
        left); use :class:`StreamSplice` then.
    """

    name = "splice"

    def __init__(
        self,
        reactor: IReactorTime,
        transports: Sequence[Any],
        early: Sequence[bytes],
        rate: float,
    ) -> None:
        self.reactor = reactor
        fds = IReactorFDSet(reactor)
        self._fds: IReactorFDSet = fds
        self.transports = list(transports)
        self.rate = rate
        self._directions: list[_Direction] = []
        try:
            for side in (CALLER, CALLEE):
                self._directions.append(_Direction(self, side, early[side]))
        except BaseException:
            self._close_pipes()
            raise
        self._sockets: list[_Socket] = []
        self._takeover: IDelayedCall | None = None
        self._grace: IDelayedCall | None = None
        self._finished = False

    def moved(self) -> tuple[int, int]:
        return self._directions[0].delivered, self._directions[1].delivered

    def start(self) -> None:
        for transport in self.transports:
            transport.stopReading()
        self._takeover = self.reactor.callLater(0, self._take_over)

    def _take_over(self) -> None:
        self._takeover = None
        if not all(t.connected and not t.disconnecting for t in self.transports):
            self.abort()  # closed by someone else meanwhile: the relay is over
            return
        for side, transport in enumerate(self.transports):
            transport.stopReading()
            transport.stopWriting()
            pending = _take_write_buffer(transport)
            direction = self._directions[1 - side]  # the one writing into this side
            direction.prefix[:0] = pending
            direction.not_relayed = len(pending)
            self._sockets.append(_Socket(self, side, transport.socket))
        for direction in self._directions:
            self._event(direction)

    def data_received(self, side: int, data: bytes) -> None:
        # Only before the take-over: bytes the protocol above had already read.
        self._directions[side].prefix += data

    def read_eof(self, side: int) -> None:
        # The transports do not read while the engine runs.
        pass

    def connection_lost(self, side: int, reason: Failure) -> None:
        if not self._finished:
            self.abort()

    def _event(self, direction: _Direction) -> None:
        if self._finished or direction.done:
            return
        source = direction.source
        try:
            direction.pump(self._sockets[source], self._sockets[1 - source])
        except Exception:
            _log.failure("relay: splice failed")
            self.abort()

    def _direction_done(self) -> None:
        if all(direction.done for direction in self._directions):
            self._release()
            for transport in self.transports:
                transport.loseConnection()

    def _start_grace(self) -> None:
        if self._grace is None and not self._finished:
            self._grace = self.reactor.callLater(DISCARD_GRACE, self._grace_over)

    def _grace_over(self) -> None:
        self._grace = None
        _log.info("relay: a peer kept sending after its partner left; closing it")
        self.abort()

    def abort(self) -> None:
        if self._finished:
            return
        self._release()
        for transport in self.transports:
            transport.abortConnection()

    def _release(self) -> None:
        self._finished = True
        for call in (self._takeover, self._grace):
            if call is not None and call.active():
                call.cancel()
        self._takeover = self._grace = None
        for sock in self._sockets:
            sock.detach()
        for direction in self._directions:
            direction.cancel()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for direction in self._directions:
            direction.close_pipe()


def _take_write_buffer(transport: Any) -> bytes:
    """
    Remove and return the bytes *transport* (a :class:`tcp.Connection`) has
    accepted but not yet sent.
    """
    pending = bytes(transport.dataBuffer[transport.offset :]) + b"".join(transport._tempDataBuffer)
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return pending


__all__ = [
    "BURST_SECONDS",
    "CALLEE",
    "CALLER",
    "DISCARD_GRACE",
    "PIPE_SIZE",
    "RESUME_BYTES",
    "ROUNDS",
    "TokenBucket",
    "ZeroCopySplice",
]
