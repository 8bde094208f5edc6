"""
A lean UDP receive loop for STUN servers.

Most traffic of a public STUN server is plain 20-byte Binding requests with
no attributes.  :class:`FastStunPort` answers those in whole batches with
``recvmmsg``/``sendmmsg`` (Linux, through :mod:`ctypes`), laying out its
buffers so that no Python runs per answered request:

- ``recvmmsg`` scatters each request: bytes 0-3 (type and length) into one
  buffer, bytes 4-19 (magic cookie and transaction id) straight into the
  response slot, anything longer into an overflow buffer; the source
  ``sockaddr_in`` into a name slot.
- ``sendmmsg`` gathers each response from a constant header (Binding
  success, length 12), that slot, a constant attribute header
  (XOR-MAPPED-ADDRESS, length 8) and the 8-byte attribute value, to the
  very name slot the request came from.
- The attribute values of a whole batch are one big-integer XOR: bytes 0-7
  of a little-endian ``sockaddr_in`` are ``02 00 | port | address``, and
  XOR with ``02 01 21 12 21 12 a4 42`` turns them into ``00 01 |
  port^0x2112 | address^0x2112a442``, the XOR-MAPPED-ADDRESS value of RFC
  8489 section 14.2.
- Three whole-batch comparisons check that every datagram is a plain
  Binding request.  A batch holding anything else goes through a
  per-datagram loop: plain requests are still answered, every other
  datagram goes to the protocol's ``datagramReceived``.

The answers are byte for byte what
:class:`~nattraverse.stun.responder.BindingResponder` gives (the tests check
this), so the fast path changes speed, never behaviour.  Nothing is kept per
source.  On other platforms, for IPv6, or when disabled, the port is a plain
:class:`twisted.internet.udp.Port`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import socket
import struct
import sys
from typing import Any

from twisted.internet import udp
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from nattraverse.stun.constants import MAGIC_COOKIE_BYTES

_log = Logger()

#: Datagrams per recvmmsg call.
BATCH = 256
#: recvmmsg calls per wake-up before the reactor gets control back.
BATCHES_PER_WAKEUP = 16
#: Room for the part of a datagram after its first 20 bytes.  Longer
#: datagrams are truncated by the kernel, counted and dropped: no STUN
#: request a server answers is that long.
OVERFLOW = 2048
#: Largest datagram read one at a time.
MAX_DATAGRAM = 65535
#: Datagrams read one at a time per wake-up before switching to batches.
SINGLE_READS = 8
#: Receive buffer asked for, so that bursts are not dropped (capped by
#: net.core.rmem_max).
RECEIVE_BUFFER = 4 << 20

_NAME = 16  # sizeof(struct sockaddr_in)
_MMSG = 64  # sizeof(struct mmsghdr) on LP64 Linux
_MSG_DONTWAIT = 0x40
_MSG_TRUNC = 0x20
_PLAIN_HEAD = b"\x00\x01\x00\x00"  # Binding request, no attributes
_PLAIN_PREFIX = _PLAIN_HEAD + MAGIC_COOKIE_BYTES
_COOKIE = int.from_bytes(MAGIC_COOKIE_BYTES, "big")
_ADDRESS_VALUE = struct.Struct("!HI")  # XOR-MAPPED-ADDRESS port and IPv4 address
_COOKIE_NATIVE = int.from_bytes(MAGIC_COOKIE_BYTES, sys.byteorder)
_XMA_MASK = bytes.fromhex("020121122112a442") + bytes(_NAME - 8)
_CONSTANTS = b"\x01\x01\x00\x0c\x00\x20\x00\x08"


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _load_mmsg() -> tuple[Any, Any] | None:
    """recvmmsg and sendmmsg from libc, where the layout above is right."""
    if not (
        sys.platform.startswith("linux")
        and sys.byteorder == "little"
        and ctypes.sizeof(_MMsgHdr) == _MMSG
        and _MMsgHdr.msg_len.offset == 56
        and _MsgHdr.msg_flags.offset == 48
    ):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_MMSG_CALLS = _load_mmsg()

#: Whether batched answering is possible on this platform.
AVAILABLE = _MMSG_CALLS is not None


def _buffer(size: int) -> tuple[Any, int, memoryview]:
    buf = (ctypes.c_char * size)()
    return buf, ctypes.addressof(buf), memoryview(buf).cast("B")


def _words(value: int, count: int) -> memoryview:
    return memoryview((ctypes.c_uint * count)(*([value] * count))).cast("B").cast("I")


class _Batch:
    """
    The ctypes buffers and message headers of one batched socket.
    """

    def __init__(self) -> None:
        keep: list[Any] = []
        head, head_at, self.head = _buffer(BATCH * 4)
        body, body_at, self.body = _buffer(BATCH * 16)
        overflow, overflow_at, self.overflow = _buffer(BATCH * OVERFLOW)
        names, names_at, self.names = _buffer(BATCH * _NAME)
        values, values_at, self.values = _buffer(BATCH * _NAME)
        constants, constants_at, constants_view = _buffer(len(_CONSTANTS))
        constants_view[:] = _CONSTANTS
        received = (_MMsgHdr * BATCH)()
        sending = (_MMsgHdr * BATCH)()
        keep += [head, body, overflow, names, values, constants, received, sending]
        for i in range(BATCH):
            scatter = (_IOVec * 3)(
                _IOVec(head_at + 4 * i, 4),
                _IOVec(body_at + 16 * i, 16),
                _IOVec(overflow_at + OVERFLOW * i, OVERFLOW),
            )
            gather = (_IOVec * 4)(
                _IOVec(constants_at, 4),
                _IOVec(body_at + 16 * i, 16),
                _IOVec(constants_at + 4, 4),
                _IOVec(values_at + _NAME * i, 8),
            )
            keep += [scatter, gather]
            for message, vector, count in ((received[i], scatter, 3), (sending[i], gather, 4)):
                message.msg_hdr.msg_name = names_at + _NAME * i
                message.msg_hdr.msg_namelen = _NAME
                message.msg_hdr.msg_iov = ctypes.addressof(vector)
                message.msg_hdr.msg_iovlen = count
        self._keep = keep  # the kernel writes through raw addresses into these
        self.received_at = ctypes.addressof(received)
        self.sending_at = ctypes.addressof(sending)
        words = memoryview(received).cast("B").cast("I")
        self.lengths = words[14::16]  # mmsghdr.msg_len
        self.flags = words[12::16]  # mmsghdr.msg_hdr.msg_flags
        self.cookies = self.body.cast("I")[::4]
        self.want_lengths = _words(20, BATCH)
        self.want_cookies = _words(_COOKIE_NATIVE, BATCH)
        self.want_head = memoryview(_PLAIN_HEAD * BATCH)
        self.masks = [int.from_bytes(_XMA_MASK * n, "little") for n in range(BATCH + 1)]
        # For single reads: a receive buffer that holds any datagram, and an
        # answer whose transaction id and address value are filled in.
        self.single = bytearray(MAX_DATAGRAM)
        self.single_view = memoryview(self.single)
        self.answer = bytearray(
            _CONSTANTS[:4]
            + MAGIC_COOKIE_BYTES
            + bytes(12)
            + _CONSTANTS[4:]
            + b"\x00\x01"
            + bytes(6)
        )
        self.answer_id = memoryview(self.answer)[8:20]


class FastStunPort(udp.Port):
    """
    A :class:`twisted.internet.udp.Port` that answers plain IPv4 Binding
    requests in batches itself and hands every other datagram to its
    protocol.

    :param enabled: Whether to answer plain requests here; the server turns
        this off when its answers carry more than XOR-MAPPED-ADDRESS
        (SOFTWARE, RFC 5780 attributes).

    :ivar fast_answers: Plain requests answered by the batch loop.
    :ivar dropped_truncated: Datagrams too long for the batch buffers.
    :ivar send_errors: Answers the kernel refused (full buffer, unreachable).
    """

    def __init__(
        self,
        port: int,
        protocol: DatagramProtocol,
        *,
        enabled: bool = True,
        interface: str = "",
        reactor: Any = None,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            port, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM, reactor=reactor
        )
        self._wanted = enabled
        self._batch: _Batch | None = None
        self.fast_answers = 0
        self.dropped_truncated = 0
        self.send_errors = 0

    @property
    def batched(self) -> bool:
        """Whether this port answers plain requests in batches."""
        return self._batch is not None

    def startListening(self) -> None:
        super().startListening()  # type: ignore[no-untyped-call]
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        if self._wanted and AVAILABLE and self.addressFamily == socket.AF_INET:
            self._batch = _Batch()

    def connectionLost(self, reason: Any = None) -> None:
        self._batch = None
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def doRead(self) -> None:
        batch = self._batch
        if batch is None or _MMSG_CALLS is None:
            super().doRead()  # type: ignore[no-untyped-call]
            return
        if self._read_singly(batch):
            self._read_batches(batch)

    def _read_singly(self, batch: _Batch) -> bool:
        """
        Answer up to :data:`SINGLE_READS` datagrams one by one: under light
        load that is all there is, and plain calls cost less than a batch.
        Return whether more may be waiting.
        """
        sock = self.socket
        buffer, view = batch.single, batch.single_view
        head, transaction_id = view[:8], view[8:20]
        answer, answer_id = batch.answer, batch.answer_id
        pack_into = _ADDRESS_VALUE.pack_into
        for _ in range(SINGLE_READS):
            try:
                length, source = sock.recvfrom_into(buffer)
            except BlockingIOError:
                return False
            except (InterruptedError, ConnectionRefusedError):
                # Interrupted, or an ICMP error for an earlier answer.
                continue
            except OSError as e:
                _log.warn("STUN socket read failed: {error}", error=e)
                return False
            if length == 20 and head == _PLAIN_PREFIX:
                host, port = source
                answer_id[:] = transaction_id
                pack_into(
                    answer, 26, port ^ 0x2112, int.from_bytes(socket.inet_aton(host)) ^ _COOKIE
                )
                try:
                    sock.sendto(answer, source)
                    self.fast_answers += 1
                except OSError:
                    self.send_errors += 1
                continue
            try:
                self.protocol.datagramReceived(bytes(view[:length]), source)
            except Exception:
                _log.failure("STUN datagram handler failed")
        return True

    def _read_batches(self, batch: _Batch) -> None:
        """Answer whole batches until the socket is empty, or for a while."""
        assert _MMSG_CALLS is not None
        recvmmsg = _MMSG_CALLS[0]
        fd = self.socket.fileno()
        lengths, cookies, head = batch.lengths, batch.cookies, batch.head
        want_lengths, want_cookies, want_head = (
            batch.want_lengths,
            batch.want_cookies,
            batch.want_head,
        )
        names, values, masks = batch.names, batch.values, batch.masks
        from_bytes = int.from_bytes
        for _ in range(BATCHES_PER_WAKEUP):
            count = recvmmsg(fd, batch.received_at, BATCH, _MSG_DONTWAIT, None)
            if count <= 0:
                if count < 0:
                    error = ctypes.get_errno()
                    if error in (errno.EINTR, errno.ECONNREFUSED):
                        # Interrupted, or an ICMP error for an earlier answer.
                        continue
                    if error not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        _log.warn(
                            "STUN socket read failed: {error}",
                            error=errno.errorcode.get(error, error),
                        )
                return
            size = count * _NAME
            if (
                lengths[:count] == want_lengths[:count]
                and head[: 4 * count] == want_head[: 4 * count]
                and cookies[:count] == want_cookies[:count]
            ):
                values[:size] = (from_bytes(names[:size], "little") ^ masks[count]).to_bytes(
                    size, "little"
                )
                self._send(fd, batch, 0, count)
            else:
                self._mixed(fd, batch, count)
            # A batch that was not full emptied the socket.
            if count < BATCH:
                return

    def _send(self, fd: int, batch: _Batch, start: int, count: int) -> None:
        """Send answers *start* to *start* + *count* - 1 of the batch."""
        assert _MMSG_CALLS is not None
        sendmmsg = _MMSG_CALLS[1]
        end = start + count
        while start < end:
            sent = sendmmsg(fd, batch.sending_at + _MMSG * start, end - start, 0)
            if sent > 0:
                start += sent
                self.fast_answers += sent
                continue
            error = ctypes.get_errno()
            if error == errno.EINTR:
                continue
            if error in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                self.send_errors += end - start
                return
            # This destination is refused (UDP): skip it.
            self.send_errors += 1
            start += 1

    def _mixed(self, fd: int, batch: _Batch, count: int) -> None:
        """Per-datagram loop for a batch that holds more than plain requests."""
        lengths, head, body, names, values = (
            batch.lengths,
            batch.head,
            batch.body,
            batch.names,
            batch.values,
        )
        mask = batch.masks[1]
        run = -1
        for i in range(count + 1):
            if (
                i < count
                and lengths[i] == 20
                and head[4 * i : 4 * i + 4] == _PLAIN_HEAD
                and body[16 * i : 16 * i + 4] == MAGIC_COOKIE_BYTES
            ):
                at = _NAME * i
                values[at : at + _NAME] = (
                    int.from_bytes(names[at : at + _NAME], "little") ^ mask
                ).to_bytes(_NAME, "little")
                if run < 0:
                    run = i
                continue
            if run >= 0:
                self._send(fd, batch, run, i - run)
                run = -1
            if i < count:
                self._hand_over(batch, i)

    def _hand_over(self, batch: _Batch, i: int) -> None:
        """Give datagram *i* of the batch to the protocol."""
        if batch.flags[i] & _MSG_TRUNC:
            self.dropped_truncated += 1
            return
        length = batch.lengths[i]
        data = (
            bytes(batch.head[4 * i : 4 * i + 4])
            + bytes(batch.body[16 * i : 16 * i + 16])
            + bytes(batch.overflow[OVERFLOW * i : OVERFLOW * i + max(0, length - 20)])
        )[:length]
        name = batch.names[_NAME * i : _NAME * (i + 1)]
        source = (socket.inet_ntoa(name[4:8]), int.from_bytes(name[2:4], "big"))
        try:
            self.protocol.datagramReceived(data, source)
        except Exception:
            _log.failure("STUN datagram handler failed")
