"""
The Twisted adapter of the check machine: feeds it datagrams and the
reactor's time, writes what it sends, keeps one timer.

Which datagrams reach it is the business of its owner
(:class:`~nattraverse.punch.port.PunchingPort` routes a shared socket's
checks by USERNAME and transaction id).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from nattraverse._types import Endpoint
from nattraverse.punch.candidates import CandidatePair
from nattraverse.punch.checks import CheckMachine, ProbeSchedule

__all__ = ["IceAgent"]

_log = Logger()


class IceAgent:
    """
    Drives one :class:`~nattraverse.punch.checks.CheckMachine` until
    :meth:`stop`.

    Its result fires when the machine has a pair to use: on the controlling
    side when it selects one (validated in both directions; the nomination
    goes on), on the controlled side when the peer nominates one.  The agent
    keeps running after that, answering the peer's checks and finishing the
    nomination, until its owner stops it.

    :param reactor: Time.
    :param send: Writes a datagram through the punching socket.
    :param machine: The checks, not started.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        send: Callable[[bytes, Endpoint], object],
        machine: CheckMachine,
    ) -> None:
        self._reactor = reactor
        self._send = send
        self.machine = machine
        self._timer: IDelayedCall | None = None
        self._result: Deferred[CandidatePair] | None = None
        self._stopped = False

    def start(self) -> Deferred[CandidatePair]:
        """
        Start the checks.

        :returns: A Deferred firing with the pair to use, or failing with
            :class:`~nattraverse.punch.checks.PunchChecksFailed`; cancelling
            it stops the agent.
        """
        if self._result is not None:
            raise RuntimeError("the agent was already started")
        result: Deferred[CandidatePair] = Deferred(lambda _: self.stop())
        self._result = result
        self.machine.start(self._reactor.seconds())
        self._flush()
        return result

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped

    def datagram_received(self, data: bytes, source: Endpoint) -> bool:
        """Offer a datagram; see :meth:`CheckMachine.datagram_received`."""
        if self._result is None or self._stopped:
            return False
        taken = self.machine.datagram_received(data, source, self._reactor.seconds())
        self._flush()
        return taken

    def spray(self, schedule: ProbeSchedule) -> None:
        """Start the machine's probes (:meth:`CheckMachine.spray`)."""
        if self._result is None or self._stopped:
            return
        self.machine.spray(schedule, self._reactor.seconds())
        self._flush()

    def stop(self) -> None:
        """Stop checking and answering; cancel the timer.  Idempotent."""
        self._stopped = True
        self._cancel_timer()

    def _fire(self) -> None:
        self._timer = None
        if self._stopped:
            return
        self.machine.handle_timer(self._reactor.seconds())
        self._flush()

    def _flush(self) -> None:
        for data, address in self.machine.take_datagrams():
            try:
                self._send(data, address)
            except Exception:
                _log.failure("could not send a check to {address}", address=str(address))
        result = self._result
        machine = self.machine
        if result is not None and not result.called:
            chosen = machine.selected if machine.controlling else machine.nominated
            if chosen is not None:
                result.callback(chosen)
            elif machine.failure is not None:
                result.errback(machine.failure)
        self._cancel_timer()
        when = machine.next_deadline()
        if when is not None and not self._stopped:
            self._timer = self._reactor.callLater(
                max(0.0, when - self._reactor.seconds()), self._fire
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
