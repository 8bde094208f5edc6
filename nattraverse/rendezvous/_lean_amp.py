"""
AMP for tens of thousands of idle connections, for
:mod:`nattraverse.rendezvous.server`: :class:`LeanAMP` frames and parses
boxes as :class:`twisted.protocols.amp.AMP` does, in less memory per
connection, and caps the size of a box; :func:`settle_transport` and
:func:`pushes` prepare a TCP transport.

The savings rest on CPython's shared-key attribute storage: every attribute
a connection ever sets must be set in ``__init__``, in one order, and
nothing may look into an instance's ``__dict__`` (which turns the compact
storage into a full dict, a few hundred bytes more per idle connection; see
``benchmarks/rendezvous_scale``).

This module knows nothing of the rendezvous commands; it imports nothing
from the rest of :mod:`nattraverse.rendezvous`.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from twisted.protocols import amp

__all__ = ["MAX_BOX_KEYS", "MAX_BOX_SIZE", "LeanAMP", "pushes", "settle_transport"]

#: Most bytes of keys and values in one AMP box; a bigger box closes the
#: connection.  One value at AMP's own maximum (65535 bytes) still fits, so
#: an oversized field gets an ``INVALID_REQUEST`` naming it.
MAX_BOX_SIZE = 65535 + 4096
#: Most keys in one AMP box (the largest command has 10).
MAX_BOX_KEYS = 32


class LeanAMP(amp.AMP):
    """
    An AMP connection that stays small while idle, and closes itself on a
    box of more than :data:`MAX_BOX_KEYS` keys or :data:`MAX_BOX_SIZE`
    bytes, on a box AMP cannot handle, and on a passed file descriptor.

    Subclasses set all their own attributes in ``__init__`` too, and
    implement :meth:`_drop`.
    """

    _ampInitialized = True

    def __init__(self) -> None:
        # Not AMP.__init__: it also builds the file-descriptor passing
        # machinery of UNIX sockets (a dict, two counters, three callables:
        # about half a KiB), which TCP and TLS connections never use.
        self._outstandingRequests: dict[bytes, defer.Deferred[Any]] = {}
        self.transport = None
        self.boxSender = self
        self._dropped = False
        self._counter = 0
        self._unprocessed = b""
        self._compatibilityOffset = 0
        self.state = "init"
        self.MAX_LENGTH = self._MAX_KEY_LENGTH
        self._currentBox: amp.AmpBox | None = None
        self._currentKey: bytes | None = None
        self._box_bytes = 0
        self._box_keys = 0

    @property
    def locator(self) -> LeanAMP:
        """AMP's responder locator: this protocol."""
        return self

    @property
    def boxReceiver(self) -> LeanAMP:
        """AMP's box receiver: this protocol."""
        return self

    def _drop(self, why: str) -> None:
        """
        Abort the connection, once, because of *why*; from then on, what
        it sends is ignored.  Subclasses implement it.
        """
        raise NotImplementedError

    def _malformed(self, why: str) -> None:
        """A box broke the rules (*why*): drop the connection."""
        self._drop(why)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        # Only UNIX sockets pass descriptors; nothing here expects one.
        os.close(descriptor)
        self._drop("a file descriptor was passed")

    def makeConnection(self, transport: Any) -> None:
        # AMP.makeConnection logs every connection and keeps two address
        # objects: not worth it for tens of thousands of idle peers.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    # -- framing -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        AMP's framing (16-bit length prefixes), as in
        :class:`~twisted.protocols.basic.IntNStringReceiver` but without
        its look into ``self.__dict__`` after every string, which turns the
        compact attribute storage of each connection into a full dict (a
        few hundred bytes per idle peer).
        """
        inner = self.innerProtocol
        if inner is not None:
            inner.dataReceived(data)
            return
        buffer = self._unprocessed + data
        self._unprocessed = buffer
        offset = 0
        size = len(buffer)
        while size - offset >= 2 and not self._dropped and not self.paused:
            start = offset + 2
            length = int.from_bytes(buffer[offset:start], "big")
            if length > self.MAX_LENGTH:
                self._compatibilityOffset = offset
                self.lengthLimitExceeded(length)  # type: ignore[no-untyped-call]
                return
            end = start + length
            if size < end:
                break
            offset = end
            # ``recvd`` (what AMP hands a protocol it switches to) is what
            # follows this string.
            self._compatibilityOffset = end
            self.stringReceived(buffer[start:end])  # type: ignore[no-untyped-call]
            if self.innerProtocol is not None:
                return
        self._unprocessed = buffer[offset:]
        self._compatibilityOffset = 0

    def proto_init(self, string: bytes) -> str:
        self._box_bytes = 0
        self._box_keys = 0
        return super().proto_init(string)  # type: ignore[no-untyped-call,no-any-return]

    def proto_key(self, string: bytes) -> str:
        self._box_keys += 1
        if self._box_keys > MAX_BOX_KEYS:
            return self._oversized(f"an AMP box of more than {MAX_BOX_KEYS} keys")
        return super().proto_key(string)  # type: ignore[no-untyped-call,no-any-return]

    def proto_value(self, string: bytes) -> str:
        self._box_bytes += len(self._currentKey or b"") + len(string)
        if self._box_bytes > MAX_BOX_SIZE:
            return self._oversized(f"an AMP box of more than {MAX_BOX_SIZE} bytes")
        return super().proto_value(string)  # type: ignore[no-untyped-call,no-any-return]

    def proto_closed(self, string: bytes) -> str:
        """Ignore whatever follows a box that closed the connection."""
        return "closed"

    def _oversized(self, what: str) -> str:
        self._currentBox = None
        self._currentKey = None
        self._malformed(what)
        return "closed"

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        if self._dropped:
            return
        try:
            super().ampBoxReceived(box)  # type: ignore[no-untyped-call]
        except Exception as e:
            self._malformed(f"a malformed AMP box ({type(e).__name__})")


def settle_transport(transport: Any) -> None:
    """
    Give a fresh TCP transport the write-buffer attributes its first write
    would give it, with the same (empty) values.  Set early, while few
    transports exist, they join CPython's shared-key storage of the class;
    set on the first write of a connection among thousands, they would turn
    that transport's attributes into a full dict (about 0.8 KiB).
    """
    if (
        isinstance(transport, FileDescriptor)
        and transport.dataBuffer == b""
        and transport.offset == 0
        and not transport._tempDataLen
    ):
        transport.dataBuffer = b""
        transport.offset = 0


def pushes(transport: object) -> bool:
    """Whether *transport* can pause its own reading (TCP and TLS can)."""
    return bool(IPushProducer.providedBy(transport))
