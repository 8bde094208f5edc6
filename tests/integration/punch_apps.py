"""
The applications the ``punch:`` loopback tests run over the paths: an echo
that remembers its transport, and a collector that waits for its bytes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


class Echo(Protocol):
    """Echoes; remembers its transport for the test."""

    def __init__(self, seen: list[Any]) -> None:
        self._seen = seen

    def connectionMade(self) -> None:
        self._seen.append(self.transport)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Collector(Protocol):
    """Gathers what comes back until it has *expected* bytes; remembers why it was lost."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = bytearray()
        self.complete: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        #: The transport's ``report`` as connectionMade saw it.
        self.report: Any = None

    def connectionMade(self) -> None:
        self.report = getattr(self.transport, "report", None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expected and not self.complete.called:
            self.complete.callback(bytes(self.received))

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if not self.lost.called:
            self.reason = reason
            self.lost.callback(None)
