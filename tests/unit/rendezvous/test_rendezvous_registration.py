"""
Tests for nattraverse.rendezvous.registration: the self-healing
registration of a listening peer, against the fake AMP rendezvous of
rendezvous_fakes.py connected in memory, on a task.Clock.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from nattraverse.errors import (
    InvalidRequest,
    LimitExceeded,
    NameTaken,
    NotAuthenticated,
    PeerAuthenticationFailed,
    PeerNotFound,
    RendezvousUnavailable,
)
from nattraverse.identity import Identity
from nattraverse.rendezvous.client import RendezvousSession
from nattraverse.rendezvous.commands import Introduce
from nattraverse.rendezvous.registration import Registration
from tests.deferreds import failed, succeeded
from tests.unit.rendezvous.rendezvous_fakes import (
    Handler,
    Network,
    call,
    introduce_args,
)

RETRY_DELAY = 5.0


class Policy:
    """A retry policy that records the attempt numbers it is asked about."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def __call__(self, attempt: int) -> float:
        self.asked.append(attempt)
        return RETRY_DELAY * attempt


@pytest.fixture
def policy() -> Policy:
    return Policy()


@pytest.fixture
def registration(
    clock: Clock, network: Network, identity: Identity, handler: Handler, policy: Policy
) -> Registration:
    return Registration(
        clock,
        network.endpoint(),
        identity,
        "alice",
        listen_port=7000,
        private=[("10.0.0.2", 7000)],
        handler=handler,
        retry_policy=policy,
    )


@pytest.fixture
def registered(registration: Registration, network: Network) -> Registration:
    registration.startService()
    network.flush()
    succeeded(registration.when_registered())
    return registration


def registers(network: Network) -> list[dict[str, Any]]:
    return [request for server in network.servers for request in server.named(b"Register")]


def current(registration: Registration) -> RendezvousSession | None:
    """The registration's session now (a call, so that mypy does not narrow it)."""
    return registration.session


def stop(registration: Registration, network: Network) -> None:
    stopped = registration.stopService()
    network.flush()
    succeeded(stopped)


def test_registers_on_start(registered: Registration, network: Network) -> None:
    """Starting runs Hello, Authenticate and Register, and when_registered fires."""
    assert registers(network) == [
        {
            "name": "alice",
            "listen_port": 7000,
            "private": [{"host": "10.0.0.2", "port": 7000}],
            "udp_private": [],
            "tcp_private": [],
        }
    ]
    assert registered.session is not None
    assert registered.session.is_open
    assert registered.ttl == 30.0


def test_when_registered_waits_for_register(registration: Registration, network: Network) -> None:
    """when_registered fires only once Register is answered."""
    network.script.hold.add(b"Register")
    registration.startService()
    network.flush()
    waiting = registration.when_registered()
    assert not waiting.called
    assert current(registration) is None
    network.server.held[0].callback({"ttl": 30.0})
    network.flush()
    assert succeeded(waiting) is None


def test_refreshes_at_a_third_of_the_ttl(
    registered: Registration, network: Network, clock: Clock
) -> None:
    """Refresh is sent at ttl/3, and again a third of the new TTL later."""
    clock.advance(9.9)
    network.flush()
    assert network.server.named(b"Refresh") == []
    clock.advance(0.1)
    network.flush()
    assert len(network.server.named(b"Refresh")) == 1
    clock.advance(10)
    network.flush()
    assert len(network.server.named(b"Refresh")) == 2


def test_reregisters_after_server_drops_connection(
    registered: Registration, network: Network, clock: Clock, policy: Policy
) -> None:
    """When the server drops the connection, the registration reconnects after the retry delay."""
    first = registered.session
    network.server.drop()
    network.flush()
    assert current(registered) is None
    assert policy.asked == [1]
    clock.advance(RETRY_DELAY - 0.1)
    assert len(network.servers) == 1
    clock.advance(0.1)
    network.flush()
    assert len(network.servers) == 2
    assert len(registers(network)) == 2
    assert registered.session is not None
    assert registered.session is not first


def test_retries_with_backoff_while_unreachable(
    registration: Registration, network: Network, clock: Clock, policy: Policy
) -> None:
    """Refused connections are retried with the policy's growing delays, then register."""
    network.refuse = True
    registration.startService()
    clock.pump([1.0] * 29)
    assert network.attempts == [0.0, 5.0, 15.0]
    assert policy.asked == [1, 2, 3]
    network.refuse = False
    clock.advance(1.0)
    network.flush()
    assert network.attempts == [0.0, 5.0, 15.0, 30.0]
    succeeded(registration.when_registered())


def test_no_refresh_timer_after_loss(
    registered: Registration, network: Network, clock: Clock
) -> None:
    """Losing the connection cancels the refresh timer; only the retry is scheduled."""
    network.server.drop()
    network.flush()
    (retry,) = clock.getDelayedCalls()
    assert retry.getTime() == RETRY_DELAY


@pytest.mark.parametrize(
    "error",
    [
        NameTaken("alice belongs to someone else"),
        PeerAuthenticationFailed("bad signature"),
        InvalidRequest("bad name"),
    ],
)
def test_fatal_refusal_stops_retrying(
    registration: Registration, network: Network, clock: Clock, error: Exception
) -> None:
    """A refusal no retry can cure fails when_registered and stops, leaving nothing behind."""
    command = b"Authenticate" if isinstance(error, PeerAuthenticationFailed) else b"Register"
    network.script.errors[command] = error
    waiting = registration.when_registered()
    registration.startService()
    network.flush()
    assert str(error) in str(failed(waiting, type(error)))
    assert registration.error is not None
    failed(registration.when_registered(), type(error))
    assert clock.getDelayedCalls() == []
    assert network.server.lost
    clock.advance(3600)
    assert len(network.attempts) == 1


def test_missing_access_key_is_fatal(
    registration: Registration, network: Network, clock: Clock
) -> None:
    """A rendezvous that wants an access key the peer lacks stops the registration."""
    network.script.access_key = b"sesame"
    registration.startService()
    network.flush()
    failed(registration.when_registered(), NotAuthenticated)
    assert clock.getDelayedCalls() == []


def test_limit_exceeded_is_retried(
    registration: Registration, network: Network, clock: Clock
) -> None:
    """LimitExceeded is temporary: the registration retries after the delay."""
    network.script.errors[b"Register"] = LimitExceeded("too many registrations")
    registration.startService()
    network.flush()
    assert not registration.when_registered().called
    assert network.server.lost
    del network.script.errors[b"Register"]
    clock.advance(RETRY_DELAY)
    network.flush()
    succeeded(registration.when_registered())


def test_refresh_refused_reregisters(
    registered: Registration, network: Network, clock: Clock
) -> None:
    """A refused Refresh closes the session; the registration reconnects and registers again."""
    network.script.errors[b"Refresh"] = PeerNotFound("expired")
    clock.advance(10)
    network.flush()
    assert current(registered) is None
    del network.script.errors[b"Refresh"]
    clock.advance(RETRY_DELAY)
    network.flush()
    assert len(registers(network)) == 2
    assert registered.session is not None


def test_refresh_timeout_reconnects(
    registered: Registration, network: Network, clock: Clock
) -> None:
    """A Refresh the server never answers closes the session after the timeout."""
    network.script.hold.add(b"Refresh")
    clock.advance(10)
    network.flush()
    assert registered.session is not None
    clock.advance(10)
    network.flush()
    assert current(registered) is None
    assert network.servers[0].lost


def test_stop_leaves_nothing_behind(
    registered: Registration, network: Network, clock: Clock
) -> None:
    """stopService closes the connection and cancels every timer."""
    stop(registered, network)
    assert network.server.lost
    assert current(registered) is None
    assert clock.getDelayedCalls() == []
    clock.advance(3600)
    assert len(network.attempts) == 1


def test_stop_during_refresh(registered: Registration, network: Network, clock: Clock) -> None:
    """Stopping while a Refresh is pending leaves nothing behind."""
    network.script.hold.add(b"Refresh")
    clock.advance(10)
    network.flush()
    stop(registered, network)
    assert clock.getDelayedCalls() == []


def test_stop_while_waiting_to_retry(
    registration: Registration, network: Network, clock: Clock
) -> None:
    """stopService while waiting to retry cancels the retry and fails when_registered."""
    network.refuse = True
    registration.startService()
    waiting = registration.when_registered()
    stop(registration, network)
    failed(waiting, RendezvousUnavailable)
    assert clock.getDelayedCalls() == []


def test_stop_during_handshake(registration: Registration, network: Network, clock: Clock) -> None:
    """stopService during the handshake closes the connection and leaves no timer."""
    network.script.hold.add(b"Register")
    registration.startService()
    network.flush()
    stop(registration, network)
    assert network.server.lost
    assert clock.getDelayedCalls() == []
    failed(registration.when_registered(), RendezvousUnavailable)


def test_restart_after_stop(registered: Registration, network: Network) -> None:
    """A stopped registration can be started again and registers anew."""
    stop(registered, network)
    registered.startService()
    network.flush()
    assert len(registers(network)) == 2
    assert registered.session is not None


def test_handler_receives_introductions(
    registered: Registration, network: Network, handler: Handler
) -> None:
    """The registered session hands introductions to the registration's handler."""
    succeeded(call(network, network.server.ask(Introduce, **introduce_args())))
    assert len(handler.introductions) == 1


def test_invalid_name_refused_at_construction(
    clock: Clock, network: Network, identity: Identity, handler: Handler
) -> None:
    """A name that could never be registered is refused at once."""
    with pytest.raises(InvalidRequest):
        Registration(
            clock, network.endpoint(), identity, "not a name", listen_port=0, private=[],
            handler=handler,
        )  # fmt: skip


def test_bad_timeout_refused_at_construction(
    clock: Clock, network: Network, identity: Identity, handler: Handler
) -> None:
    """A timeout that is not a positive number is refused at once, not retried forever."""
    with pytest.raises(ValueError, match="timeout"):
        Registration(
            clock, network.endpoint(), identity, "alice", listen_port=0, private=[],
            handler=handler, timeout=-1,
        )  # fmt: skip


def test_logs_registration_with_named_fields(registration: Registration, network: Network) -> None:
    """The registration is logged with the name and TTL as named fields."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        registration.startService()
        network.flush()
    finally:
        globalLogPublisher.removeObserver(observer)
    logged = [e for e in events if e.get("name") == "alice" and "ttl" in e]
    assert logged
    assert logged[0]["ttl"] == 30.0
