"""
The rendezvous' TCP relay: two introduced peers each open a connection to
the rendezvous, join with a one-time token, and the relay splices the two
connections (see ``docs/protocol.rst``, "Relay connections").

:class:`RelayHub` issues the tokens (:meth:`RelayHub.allocate`, for the
``Relay`` command), hands the server the protocol a joining connection
switches to (:meth:`RelayHub.join`, for ``RelayJoin``), and enforces the
caps of :class:`RelayLimits`: relays at once, bytes per second per
direction, lifetime, and how long a relay waits for its peers to join.
The bytes are moved by an engine of :mod:`nattraverse.rendezvous.splice`.

The relay never connects anywhere: it only joins two connections that were
opened to it, by the two peers a session introduced.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nattraverse.errors import LimitExceeded, RelayRefused
from nattraverse.identity import PeerId
from nattraverse.rendezvous.commands import TOKEN_SIZE
from nattraverse.rendezvous.splice import CALLEE, CALLER, Engine, make_engine

_log = Logger()

_ROLES = ("caller", "callee")


@dataclass(frozen=True)
class RelayLimits:
    """
    The relay's caps.

    :ivar max_relays: Relays at once, waiting for their peers or running.
    :ivar rate: Bytes per second in each direction of each relay; 0 for no
        cap.  Up to half a second's worth may go at once.
    :ivar lifetime: Seconds a relay may run once both peers joined; then
        both connections are closed.
    :ivar join_timeout: Seconds from :meth:`RelayHub.allocate` within which
        both peers must join; the tokens are void after that, and a peer
        that joined alone is disconnected.
    """

    max_relays: int = 256
    rate: float = 4 * 1024 * 1024
    lifetime: float = 3600.0
    join_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.max_relays < 0:
            raise ValueError(f"max_relays must be 0 or more, not {self.max_relays}")
        if self.rate < 0:
            raise ValueError(f"rate must be 0 (no cap) or more, not {self.rate}")
        for name in ("lifetime", "join_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0 seconds, not {getattr(self, name)}")


class RelayHub:
    """
    The relays of one rendezvous server.

    :param reactor: For timers and, on Linux, for the zero-copy engine's
        file descriptors.
    :param limits: The caps.
    :param random: Source of the tokens' bytes.
    :param zero_copy: Whether the zero-copy ``os.splice`` engine may be used
        when both connections are plain TCP sockets (``False`` forces the
        generic engine).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        limits: RelayLimits,
        *,
        random: Callable[[int], bytes] = os.urandom,
        zero_copy: bool = True,
    ) -> None:
        self._reactor = reactor
        self._limits = limits
        self._random = random
        self._zero_copy = zero_copy
        self._relays: dict[bytes, _Relay] = {}
        self._tickets: dict[bytes, tuple[_Relay, int]] = {}
        self._relayed_done = 0
        self.relays_started = 0
        self.relays_ended = 0

    @property
    def limits(self) -> RelayLimits:
        """The caps this hub enforces."""
        return self._limits

    @property
    def lifetime(self) -> float:
        """Seconds a relay may run (what ``RelayOffer`` tells the callee)."""
        return self._limits.lifetime

    @property
    def pending(self) -> int:
        """Relays allocated whose peers have not both joined yet."""
        return sum(1 for relay in self._relays.values() if relay.engine is None)

    @property
    def active(self) -> int:
        """Relays moving bytes."""
        return sum(1 for relay in self._relays.values() if relay.engine is not None)

    @property
    def bytes_relayed(self) -> int:
        """Bytes delivered by all relays so far, both directions."""
        return self._relayed_done + sum(sum(relay.moved()) for relay in self._relays.values())

    def allocate(self, session: bytes, caller: PeerId, callee: PeerId) -> tuple[bytes, bytes]:
        """
        Allocate a relay for *session* between *caller* and *callee*.

        :return: Fresh tokens for the caller and for the callee, each good
            once, for that peer only, until the join timeout.
        :raises RelayRefused: when *session* already has a relay.
        :raises LimitExceeded: when the cap of relays at once is reached.
        """
        if session in self._relays:
            raise RelayRefused("this session already has a relay; use the tokens it was given")
        if len(self._relays) >= self._limits.max_relays:
            raise LimitExceeded(
                f"the relay is full ({self._limits.max_relays} relays at once); try again later"
            )
        tokens = (self._fresh_token(), self._fresh_token())
        while tokens[1] == tokens[0]:
            tokens = (tokens[0], self._fresh_token())
        relay = _Relay(self, session, (caller, callee), tokens)
        self._relays[session] = relay
        for side, token in enumerate(tokens):
            self._tickets[token] = (relay, side)
        relay.join_call = self._reactor.callLater(self._limits.join_timeout, relay.join_expired)
        _log.debug(
            "relay {session} allocated for {caller} and {callee}",
            session=session.hex(),
            caller=str(caller),
            callee=str(callee),
        )
        return tokens

    def _fresh_token(self) -> bytes:
        for _ in range(8):
            token = self._random(TOKEN_SIZE)
            if len(token) != TOKEN_SIZE:
                raise ValueError(f"random source gave {len(token)} bytes, not {TOKEN_SIZE}")
            if token not in self._tickets:
                return token
        raise RuntimeError("the random source keeps repeating itself")

    def join(self, token: bytes, peer: PeerId) -> Protocol:
        """
        The protocol a connection authenticated as *peer* switches to when
        it joins with *token*.  The token is spent.

        :raises RelayRefused: when the token is unknown, expired or spent,
            or was issued to another peer (the token then stays good for
            its own peer).
        """
        ticket = self._tickets.get(token)
        if ticket is None:
            raise RelayRefused("unknown, expired or already used relay token")
        relay, side = ticket
        if relay.peers[side] != peer:
            raise RelayRefused("this relay token was issued to another peer")
        del self._tickets[token]
        leg = _Leg(relay, side)
        relay.legs[side] = leg
        return leg

    def close(self) -> None:
        """
        Abort every relay, running or waiting, and cancel every timer.
        """
        for relay in list(self._relays.values()):
            relay.abort("the relay is shutting down")
        self._tickets.clear()

    def _ended(self, relay: _Relay) -> None:
        if self._relays.get(relay.session) is relay:
            del self._relays[relay.session]
        for token in relay.tokens:
            if self._tickets.get(token, (None, 0))[0] is relay:
                del self._tickets[token]
        self._relayed_done += sum(relay.moved())
        if relay.engine is not None:
            self.relays_ended += 1


class _Relay:
    """
    One relay: its tokens, its two legs, the engine once both joined, and
    its timers.
    """

    def __init__(
        self,
        hub: RelayHub,
        session: bytes,
        peers: tuple[PeerId, PeerId],
        tokens: tuple[bytes, bytes],
    ) -> None:
        self.hub = hub
        self.session = session
        self.peers = peers
        self.tokens = tokens
        self.legs: list[_Leg | None] = [None, None]
        self.connected: list[bool] = [False, False]
        self.early: list[list[bytes]] = [[], []]
        self.lost: set[int] = set()
        self.engine: Engine | None = None
        self.join_call: IDelayedCall | None = None
        self.life_call: IDelayedCall | None = None
        self.started_at = 0.0
        self.ended = False

    def moved(self) -> tuple[int, int]:
        return self.engine.moved() if self.engine is not None else (0, 0)

    def _transport(self, side: int) -> Any:
        leg = self.legs[side]
        assert leg is not None
        assert leg.transport is not None
        return leg.transport

    # -- events from the legs --------------------------------------------------

    def leg_connected(self, side: int) -> None:
        transport = self._transport(side)
        if self.ended:
            transport.abortConnection()
            return
        # Hold the peer's bytes back (in its socket) until the relay runs.
        transport.pauseProducing()
        self.connected[side] = True
        if all(self.connected):
            self._start()

    def leg_data(self, side: int, data: bytes) -> None:
        if self.ended:
            return
        if self.engine is None:
            self.early[side].append(data)
        else:
            self.engine.data_received(side, data)

    def leg_eof(self, side: int) -> None:
        if self.engine is not None and not self.ended:
            self.engine.read_eof(side)

    def leg_lost(self, side: int, reason: Failure) -> None:
        if side in self.lost:
            return
        self.lost.add(side)
        if self.ended:
            return
        if self.engine is None:
            self.abort(f"the {_ROLES[side]} left before the relay started")
            return
        self.engine.connection_lost(side, reason)
        if len(self.lost) == 2:
            self._end("closed")

    # -- life cycle ------------------------------------------------------------

    def _start(self) -> None:
        self._cancel_join_call()
        transports = [self._transport(CALLER), self._transport(CALLEE)]
        early = [b"".join(chunks) for chunks in self.early]
        self.early = [[], []]
        hub = self.hub
        self.engine = make_engine(
            hub._reactor, transports, early, hub._limits.rate, zero_copy=hub._zero_copy
        )
        self.started_at = hub._reactor.seconds()
        self.life_call = hub._reactor.callLater(hub._limits.lifetime, self._lifetime_over)
        hub.relays_started += 1
        _log.info(
            "relay {session} started ({engine}): {caller} <-> {callee}",
            session=self.session.hex(),
            engine=self.engine.name,
            caller=str(self.peers[CALLER]),
            callee=str(self.peers[CALLEE]),
        )
        self.engine.start()

    def join_expired(self) -> None:
        self.join_call = None
        joined = sum(self.connected)
        _log.info(
            "relay {session} expired: {joined} of 2 peers joined within {timeout}s",
            session=self.session.hex(),
            joined=joined,
            timeout=self.hub._limits.join_timeout,
        )
        self.abort("the peers did not both join in time")

    def _lifetime_over(self) -> None:
        self.life_call = None
        self.abort(f"its lifetime of {self.hub._limits.lifetime}s is over")

    def abort(self, why: str) -> None:
        """
        Close both connections now and end the relay.
        """
        if self.ended:
            return
        if self.engine is not None:
            self.engine.abort()
        else:
            for side in (CALLER, CALLEE):
                if self.connected[side] and side not in self.lost:
                    self._transport(side).abortConnection()
        self._end(why)

    def _end(self, why: str) -> None:
        if self.ended:
            return
        self.ended = True
        self._cancel_join_call()
        if self.life_call is not None and self.life_call.active():
            self.life_call.cancel()
        self.life_call = None
        self.early = [[], []]
        if self.engine is not None:
            self.engine.abort()  # releases its timers; the connections are closed already
            forward, backward = self.engine.moved()
            _log.info(
                "relay {session} ended ({why}) after {duration:.3f}s: {caller_to_callee} bytes "
                "caller to callee, {callee_to_caller} bytes callee to caller",
                session=self.session.hex(),
                why=why,
                duration=self.hub._reactor.seconds() - self.started_at,
                caller_to_callee=forward,
                callee_to_caller=backward,
            )
        self.hub._ended(self)

    def _cancel_join_call(self) -> None:
        if self.join_call is not None and self.join_call.active():
            self.join_call.cancel()
        self.join_call = None


@implementer(IHalfCloseableProtocol)
class _Leg(Protocol):
    """
    The protocol of one joined connection: it hands everything its
    transport tells it to the relay.
    """

    def __init__(self, relay: _Relay, side: int) -> None:
        self._relay = relay
        self._side = side

    def __repr__(self) -> str:
        return f"<relay {self._relay.session.hex()} {_ROLES[self._side]}>"

    def connectionMade(self) -> None:
        self._relay.leg_connected(self._side)

    def dataReceived(self, data: bytes) -> None:
        self._relay.leg_data(self._side, data)

    def readConnectionLost(self) -> None:
        self._relay.leg_eof(self._side)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._relay.leg_lost(self._side, reason)


__all__ = ["RelayHub", "RelayLimits"]
