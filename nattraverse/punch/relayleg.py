"""
A punching session's relayed candidate (DESIGN section 3, step 3: "on
demand, a relayed one"): the rendezvous' UDP relay, which forwards the
datagrams of two latched sockets to each other (``docs/protocol.rst``,
"UDP relay").

The caller asks for the relay after a head start for the direct pairs
(:attr:`RelayLeg.delay`) and latches its punching socket to it; the callee
latches when the rendezvous offers the relay (``UdpRelayOffer``).  Either
way the session gets the relay's address once this side is latched; the
caller then starts QUIC through it, as through any validated pair, and the
checks go on: a direct pair validated later takes the connection over
(:meth:`~nattraverse.quic.QuicPath.move`).

The allocation and the latch are the rendezvous' business: this module
only schedules them and cleans up, so that the punch layer imports nothing
from :mod:`nattraverse.rendezvous`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nattraverse._types import Endpoint

__all__ = ["RelayLeg", "RelayLegRun"]

_log = Logger()

#: Opens a relayed leg: allocates the relay (the caller) and latches this
#: side's punching socket to it; fires with the relay's address.
Opener = Callable[[], "Deferred[Endpoint]"]


@dataclass(frozen=True)
class RelayLeg:
    """
    The caller's relayed candidate.

    :ivar delay: Seconds after the checks start before the relay is asked
        for: the direct pairs' head start (0 when no direct pair can work).
    :ivar open: Allocates the relay and latches the punching socket to it.
    """

    delay: float
    open: Opener

    def __post_init__(self) -> None:
        if not self.delay >= 0:
            raise ValueError(f"delay must be 0 or more seconds, not {self.delay}")


class RelayLegRun:
    """
    One session's relayed leg: the timer of its start, the opening under
    way, and what it found.

    :param reactor: For the timer.
    :param label: Names the session in the log.
    :param on_latched: Called with the relay's address once latched.
    :param on_failed: Called when the leg could not be opened.
    """

    def __init__(
        self,
        reactor: Any,
        label: str,
        on_latched: Callable[[Endpoint], None],
        on_failed: Callable[[], None],
    ) -> None:
        self._reactor = reactor
        self._label = label
        self._on_latched = on_latched
        self._on_failed = on_failed
        self._timer: IDelayedCall | None = None
        self._opening: Deferred[Endpoint] | None = None
        self._stopped = False
        #: The relay's address, once latched.
        self.address: Endpoint | None = None
        #: Why the leg failed, when it did.
        self.error: str | None = None

    @property
    def active(self) -> bool:
        """Whether the leg is waiting to start or opening."""
        return self._timer is not None or self._opening is not None

    def schedule(self, leg: RelayLeg) -> None:
        """Open *leg* after its delay."""
        if self._stopped or self.active or self.address is not None:
            return
        self._timer = self._reactor.callLater(leg.delay, self._due, leg.open)

    def _due(self, opener: Opener) -> None:
        self._timer = None
        self.open(opener)

    def open(self, opener: Opener) -> bool:
        """
        Open the leg now with *opener* (the callee: the relay was offered).

        :returns: Whether it was started (not when stopped, or already open
            or opening).
        """
        if self._stopped or self._opening is not None or self.address is not None:
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        _log.info("UDP punch {session}: opening the relayed leg", session=self._label)
        try:
            opening = opener()
        except Exception as e:
            self._failed(Failure(e))
            return True
        self._opening = opening
        opening.addCallbacks(self._latched, self._failed)
        return True

    def _latched(self, address: Endpoint) -> None:
        self._opening = None
        if self._stopped:
            return
        self.address = address
        _log.info(
            "UDP punch {session}: latched to the rendezvous' UDP relay at {relay}",
            session=self._label,
            relay=str(address),
        )
        self._on_latched(address)

    def _failed(self, failure: Failure) -> None:
        self._opening = None
        if self._stopped or failure.check(CancelledError):
            return
        self.error = failure.getErrorMessage()
        _log.info(
            "UDP punch {session}: no relayed leg: {error}",
            session=self._label,
            error=self.error,
        )
        self._on_failed()

    def stop(self) -> None:
        """Cancel the timer and the opening under way; idempotent."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.addErrback(lambda _: None)
            opening.cancel()
