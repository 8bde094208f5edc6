"""
What one discovery run owns, and the waiting it does: UDP sockets,
STUN transactions, timers and concurrent steps, every one released by
:meth:`Session.close`.

Steps are coroutines run with :meth:`Session.task`; they wait only through
:meth:`Session.all`, so that cancelling a step cancels whatever it waits
for, down to the timers.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    TimeoutError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import DiscoveryError, StunTimeout, StunTransactionCancelled
from nattraverse.stun.attributes import Attribute
from nattraverse.stun.client import match_key
from nattraverse.stun.constants import TRANSACTION_ID_LENGTH
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.message import is_stun
from nattraverse.stun.transaction import StunResponse

__all__ = ["Outcome", "ProbeSocket", "Session", "Transaction"]

_log = Logger()

T = TypeVar("T")

#: What became of a request: its success response, the error it failed
#: with (an error response, a send failure), or ``None`` for no answer in
#: time.
Outcome = StunResponse | BaseException | None

#: Times a probe whose silence is the finding is sent within its wait.
PROBE_SENDS = 4


class ProbeSocket(StunDemultiplexer):
    """
    One discovery socket: a STUN client, plus watchers that catch the STUN
    messages whose transaction id is a probe token (hairpin probes, and the
    responses the lifetime test has sent here with RESPONSE-PORT) before the
    client would drop them as unmatched.
    """

    def __init__(self, reactor: Any, rto: float, random_bytes: Callable[[int], bytes]) -> None:
        super().__init__(reactor, rto=rto, random_bytes=random_bytes)
        self.local = Endpoint("0.0.0.0", 0)
        self._watchers: dict[bytes, Callable[[Endpoint], object]] = {}

    def watch(self, token: bytes, seen: Callable[[Endpoint], object]) -> None:
        """Call *seen*, once, with the source of a STUN message carrying
        *token* as its transaction id."""
        self._watchers[token] = seen

    def unwatch(self, token: bytes) -> None:
        """Stop watching for *token*."""
        self._watchers.pop(token, None)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self._watchers and is_stun(datagram):
            seen = self._watchers.pop(bytes(datagram[8:20]), None)
            if seen is not None:
                seen(match_key(addr))
                return
        super().datagramReceived(datagram, addr)


class Transaction:
    """A STUN transaction whose outcome several steps may wait for."""

    def __init__(self, session: Session, deferred: Deferred[StunResponse]) -> None:
        self.session = session
        self.done = False
        self.outcome: Outcome = None
        self._deferred = deferred
        self._waiters: list[Deferred[Outcome]] = []
        deferred.addBoth(self._fire)

    def _fire(self, result: StunResponse | Failure) -> None:
        self.done = True
        if isinstance(result, Failure):
            error = result.value
            quiet = (StunTimeout, StunTransactionCancelled, CancelledError, TimeoutError)
            self.outcome = None if isinstance(error, quiet) else error
        else:
            self.outcome = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(self.outcome)

    @property
    def response(self) -> StunResponse | None:
        """The success response, if the transaction got one."""
        return self.outcome if isinstance(self.outcome, StunResponse) else None

    @property
    def mapped(self) -> Endpoint | None:
        """The mapped address of the success response, if any."""
        response = self.response
        address = None if response is None else response.mapped_address
        return None if address is None else match_key(address)

    def cancel(self) -> None:
        """Stop retransmitting; the outcome becomes ``None`` (no answer)."""
        self._deferred.cancel()

    def wait(self, until: float, *, give_up: bool = True) -> Deferred[Outcome]:
        """
        The outcome, or ``None`` at time *until*; then the transaction is
        given up (cancelled), unless *give_up* is false.
        """
        if self.done:
            return succeed(self.outcome)
        waiter: Deferred[Outcome] = Deferred()
        self._waiters.append(waiter)

        def expire() -> None:
            if give_up:
                self.cancel()
            elif not waiter.called:
                waiter.callback(None)

        call = self.session.call_at(until, expire)
        waiter.addBoth(self.session.forget_call, call)
        return waiter


class Session:
    """
    The resources of one discovery run.

    :param reactor: Provides ``IReactorUDP`` and ``IReactorTime``.
    :param interface: The local address sockets are bound to.
    :param rto: Initial STUN retransmission timeout of every socket.
    :param random_bytes: Source of transaction ids and probe tokens.
    """

    def __init__(
        self, reactor: Any, interface: str, rto: float, random_bytes: Callable[[int], bytes]
    ) -> None:
        self.reactor = reactor
        self.interface = interface
        self.rto = rto
        self.random_bytes = random_bytes
        self._ports: list[Any] = []
        self._transactions: list[Transaction] = []
        self._calls: set[IDelayedCall] = set()
        self._tasks: list[Deferred[Any]] = []
        self._closed = False

    def now(self) -> float:
        return float(self.reactor.seconds())

    def open(self, rto: float | None = None) -> ProbeSocket:
        """
        A new UDP socket on the local interface, closed at the end; its STUN
        client retransmits after *rto* seconds (the session's by default).

        :raises DiscoveryError: when the socket cannot be bound.
        """
        if self._closed:
            raise CancelledError("discovery is over; it opens no more sockets")
        sock = ProbeSocket(self.reactor, rto or self.rto, self.random_bytes)
        try:
            port = self.listen(sock, self.interface)
        except CannotListenError as e:
            raise DiscoveryError(
                f"cannot open a UDP socket on {self.interface}: {e.socketError}; "
                "check the local interface address"
            ) from e
        host = port.getHost()
        sock.local = Endpoint(host.host, host.port)
        return sock

    def listen(self, protocol: Any, interface: str) -> Any:
        """``reactor.listenUDP(0, ...)``; the port is closed at the end."""
        port = self.reactor.listenUDP(0, protocol, interface=interface)
        self._ports.append(port)
        return port

    def request(
        self,
        sock: ProbeSocket,
        destination: Endpoint,
        attributes: Sequence[Attribute] = (),
        match_source: bool = True,
    ) -> Transaction:
        """Start a Binding transaction; its first datagram leaves now."""
        transaction = Transaction(
            self, sock.client.binding(destination, attributes, match_source=match_source)
        )
        self._transactions.append(transaction)
        return transaction

    def send(self, sock: ProbeSocket, data: bytes, destination: Endpoint) -> None:
        """Write one probe datagram; a failure is logged, not raised."""
        if self._closed:
            return
        try:
            sock.send(data, destination)
        except Exception as e:
            _log.debug("probe to {dest} not sent: {error}", dest=str(destination), error=e)

    def token(self) -> bytes:
        """A fresh probe token, shaped like a transaction id."""
        return self.random_bytes(TRANSACTION_ID_LENGTH)

    def call_at(self, when: float, f: Callable[[], object]) -> IDelayedCall:
        """Run *f* at time *when*; the timer is cancelled at the end."""
        call: IDelayedCall

        def run() -> None:
            self._calls.discard(call)
            f()

        call = self.reactor.callLater(max(0.0, when - self.now()), run)
        self._calls.add(call)
        return call

    def forget_call(self, result: T, call: IDelayedCall) -> T:
        """Cancel a timer that is no longer needed; pass *result* on."""
        self._calls.discard(call)
        if call.active():
            call.cancel()
        return result

    def until(self, when: float, event: Deferred[None] | None = None) -> Deferred[None]:
        """Fires at time *when*, or earlier when *event* fires."""
        out: Deferred[None] = Deferred()

        def fire(result: object = None) -> object:
            if not out.called:
                out.callback(None)
            return result

        call = self.call_at(when, fire)
        out.addBoth(self.forget_call, call)
        if event is not None:
            event.addBoth(fire)
        return out

    def task(self, coroutine: Coroutine[Deferred[Any], Any, T]) -> Deferred[T]:
        """Run a step concurrently; it is cancelled at the end."""
        deferred = Deferred.fromCoroutine(coroutine)
        self._tasks.append(deferred)
        return deferred

    @staticmethod
    def cancel_task(task: Deferred[Any]) -> None:
        """Stop a step that is no longer needed."""
        task.cancel()
        task.addErrback(lambda failure: failure.trap(CancelledError))

    def all(self, deferreds: Sequence[Deferred[Any]]) -> Deferred[list[Any]]:
        """
        The results of *deferreds*.  Cancelling the Deferred returned (as
        cancelling the step that awaits it does) cancels every one of them
        and raises :class:`CancelledError` in the step.
        """
        gathered = gatherResults(list(deferreds), consumeErrors=True)
        gate: Deferred[list[Any]] = Deferred(lambda _: gathered.cancel())

        def done(result: list[Any] | Failure) -> None:
            if gate.called:
                return
            if isinstance(result, Failure):
                error = result.value
                gate.errback(error.subFailure if isinstance(error, FirstError) else result)
            else:
                gate.callback(result)

        gathered.addBoth(done)
        return gate

    async def probe(self, send: Callable[[], object], event: Deferred[None], wait: float) -> bool:
        """
        Call *send* :data:`PROBE_SENDS` times, evenly within *wait* seconds,
        until *event* fires.

        :returns: Whether *event* fired within the wait.
        """
        start = self.now()
        for i in range(PROBE_SENDS):
            if event.called:
                break
            send()
            await self.all([self.until(start + wait * (i + 1) / PROBE_SENDS, event)])
        return event.called

    async def close(self) -> None:
        """Cancel every step, transaction and timer; close every socket, and
        wait until they are closed."""
        self._closed = True
        for task in self._tasks:
            self.cancel_task(task)
        for transaction in self._transactions:
            transaction.cancel()
        for call in list(self._calls):
            if call.active():
                call.cancel()
        self._calls.clear()
        ports, self._ports = self._ports, []
        await gatherResults([maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)
