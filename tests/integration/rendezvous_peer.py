"""
A minimal rendezvous client for the server's integration tests: plain AMP,
answering what the server sends (``Introduce``, ``DialBack``,
``RelayOffer``) and keeping it for the test.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from nattraverse.rendezvous.commands import DialBack, Introduce, RelayOffer

#: Seconds :meth:`Peer.next` waits by default.
WAIT = 5.0


class Peer(amp.AMP):
    """A minimal rendezvous client: answers the server and queues what it sent."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.received: dict[bytes, list[dict[str, Any]]] = {}
        self._waiting: dict[bytes, list[Deferred[dict[str, Any]]]] = {}
        self.closed: Deferred[None] = Deferred()

    def _record(self, command: bytes, arguments: dict[str, Any]) -> dict[str, Any]:
        waiting = self._waiting.pop(command, [])
        if waiting:
            waiting[0].callback(arguments)
            self._waiting[command] = waiting[1:]
        else:
            self.received.setdefault(command, []).append(arguments)
        return {}

    def next(
        self, reactor: Any, command: type[amp.Command], wait: float = WAIT
    ) -> Deferred[dict[str, Any]]:
        """The next *command* the server sends, within *wait* seconds."""
        queued = self.received.get(command.commandName, [])
        if queued:
            d: Deferred[dict[str, Any]] = Deferred()
            d.callback(queued.pop(0))
            return d
        d = Deferred()
        self._waiting.setdefault(command.commandName, []).append(d)
        return d.addTimeout(wait, reactor)

    @Introduce.responder
    def _introduce(self, **arguments: Any) -> dict[str, Any]:
        return self._record(Introduce.commandName, arguments)

    @DialBack.responder
    def _dial_back(self, **arguments: Any) -> dict[str, Any]:
        return self._record(DialBack.commandName, arguments)

    @RelayOffer.responder
    def _relay_offer(self, **arguments: Any) -> dict[str, Any]:
        return self._record(RelayOffer.commandName, arguments)

    def call(self, command: type[amp.Command], *args: Any, **arguments: Any) -> Deferred[Any]:
        """callRemote, typed."""
        return self.callRemote(command, *args, **arguments)  # type: ignore[no-any-return,no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        self.closed.callback(None)
