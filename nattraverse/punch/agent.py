"""
The Twisted adapter of the check machine: feeds it the punching socket's
datagrams and the reactor's time, writes what it sends, keeps one timer.

:class:`~nattraverse.stun.demux.StunDemultiplexer` hands every STUN
*response* to its STUN client, so check responses would never reach the
checks, through the port's
:attr:`~nattraverse.stun.demux.StunDemultiplexer.intercept` hook, which
sees every datagram first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from nattraverse._types import Endpoint
from nattraverse.punch.candidates import Candidate, CandidatePair
from nattraverse.punch.checks import CheckConfig, CheckMachine, IceCredentials
from nattraverse.stun.demux import StunDemultiplexer

__all__ = ["IceAgent", "punch"]

_log = Logger()

#: Offered each datagram first; returns whether it took it.


class IceAgent:
    """
    Drives one :class:`~nattraverse.punch.checks.CheckMachine`.

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
        self._deferred: Deferred[CandidatePair] | None = None

    def start(self) -> Deferred[CandidatePair]:
        """
        Start the checks.

        :returns: A Deferred firing with the nominated pair, or failing
            with :class:`~nattraverse.punch.checks.PunchChecksFailed`;
            cancelling it stops the checks and their timer.
        """
        if self._deferred is not None:
            raise RuntimeError("the agent was already started")
        self._deferred = Deferred(lambda _: self._stop())
        self.machine.start(self._reactor.seconds())
        deferred = self._deferred
        self._flush()
        return deferred

    def datagram_received(self, data: bytes, source: Endpoint) -> bool:
        """Offer a datagram; see :meth:`CheckMachine.datagram_received`."""
        if self._deferred is None:
            return False
        taken = self.machine.datagram_received(data, source, self._reactor.seconds())
        self._flush()
        return taken

    def _fire(self) -> None:
        self._timer = None
        self.machine.handle_timer(self._reactor.seconds())
        self._flush()

    def _flush(self) -> None:
        for data, address in self.machine.take_datagrams():
            try:
                self._send(data, address)
            except Exception:
                _log.failure("could not send a check to {address}", address=str(address))
        deferred = self._deferred
        if deferred is None:
            return
        if self.machine.done:
            self._stop()
            if self.machine.nominated is not None:
                deferred.callback(self.machine.nominated)
            elif self.machine.failure is not None:
                deferred.errback(self.machine.failure)
            return
        when = self.machine.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self._reactor.callLater(
                max(0.0, when - self._reactor.seconds()), self._fire
            )

    def _stop(self) -> None:
        self._deferred = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def punch(
    reactor: IReactorTime,
    demux: StunDemultiplexer,
    *,
    controlling: bool,
    secret: bytes,
    local: Sequence[Candidate],
    remote: Sequence[Candidate],
    config: CheckConfig | None = None,
    random_bytes: Callable[[int], bytes] | None = None,
) -> Deferred[CandidatePair]:
    """
    Run connectivity checks on *demux*'s port and return the nominated pair.

    The checks own the port's
    :attr:`~nattraverse.stun.demux.StunDemultiplexer.intercept` until the result:
    on success, failure or cancellation it is cleared and the timer
    cancelled.

    :raises RuntimeError: when another punch holds *demux*.
    """
    if demux.intercept is not None:
        raise RuntimeError("this port is already punching")
    kwargs: dict[str, Any] = {} if random_bytes is None else {"random_bytes": random_bytes}
    machine = CheckMachine(
        controlling=controlling,
        credentials=IceCredentials.from_secret(secret, controlling=controlling),
        local=local,
        remote=remote,
        config=config,
        **kwargs,
    )
    agent = IceAgent(reactor, demux.send, machine)
    hook = agent.datagram_received
    demux.intercept = hook

    def release(result: object) -> object:
        if demux.intercept == hook:
            demux.intercept = None
        return result

    deferred = agent.start()
    deferred.addBoth(release)
    return deferred
