"""
Tests for nattraverse.rendezvous.udprelay (latching, forwarding, caps and
timers of the UDP relay) with a task.Clock and fake sockets, and for the
client's checks of ``UdpRelayOffer``: no sockets, no sleeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from nattraverse._types import Endpoint
from nattraverse.errors import InvalidRequest, LimitExceeded, RelayRefused, RendezvousUnavailable
from nattraverse.identity import PeerId
from nattraverse.rendezvous._protocol import RendezvousProtocol
from nattraverse.rendezvous.commands import UDP_TOKEN_SIZE, udp_credentials
from nattraverse.rendezvous.relay import RelayLimits
from nattraverse.rendezvous.udprelay import UdpAllocation, UdpRelayHub, udp_sockets
from nattraverse.stun.attributes import Attribute, Fingerprint, Username, XorMappedAddress
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import decode, encode
from nattraverse.tap import Options, makeService

CALLER = PeerId(b"\x01" * 32)
CALLEE = PeerId(b"\x02" * 32)
SESSION = b"S" * 16
CALLER_AT = Endpoint("198.51.100.1", 40001)
CALLEE_AT = Endpoint("203.0.113.2", 50002)
STRANGER_AT = Endpoint("192.0.2.66", 6666)
QUIC = b"\xc0" + b"q" * 1199


def counting_random() -> Callable[[int], bytes]:
    """A predictable random source that never repeats, in either half of a token."""
    counter = itertools.count(1)
    return lambda size: bytes([next(counter) % 256]) * size


@dataclass
class FakeSocket:
    """A relay port: records what the relay sends, and whether it is closed."""

    port: int
    receive: Callable[[bytes, Endpoint], None]
    sent: list[tuple[bytes, Endpoint]] = field(default_factory=list)
    closed: bool = False

    def send(self, data: bytes, destination: Endpoint) -> None:
        assert not self.closed, "sent on a closed relay port"
        self.sent.append((data, destination))

    def close(self) -> None:
        self.closed = True

    def is_closed(self) -> bool:
        return self.closed

    def take(self) -> list[tuple[bytes, Endpoint]]:
        """What was sent since the last take."""
        sent, self.sent = self.sent, []
        return sent


class Opener:
    """Opens fake sockets on ports 40000, 40001...; fails with *error* when set."""

    def __init__(self) -> None:
        self.sockets: list[FakeSocket] = []
        self.error: Exception | None = None

    def __call__(self, receive: Callable[[bytes, Endpoint], None]) -> FakeSocket:
        if self.error is not None:
            raise self.error
        socket = FakeSocket(40000 + len(self.sockets), receive)
        self.sockets.append(socket)
        return socket


@dataclass
class Rig:
    """A hub on a Clock with fake sockets."""

    clock: Clock
    opener: Opener
    hub: UdpRelayHub

    def allocate(self, session: bytes = SESSION) -> tuple[UdpAllocation, FakeSocket]:
        allocation = self.hub.allocate(session, CALLER, CALLEE)
        return allocation, self.opener.sockets[-1]

    def latched(self) -> tuple[UdpAllocation, FakeSocket]:
        """A relay both sides latched onto (from CALLER_AT and CALLEE_AT)."""
        allocation, socket = self.allocate()
        socket.receive(latch(allocation.caller_token), CALLER_AT)
        socket.receive(latch(allocation.callee_token), CALLEE_AT)
        socket.take()
        return allocation, socket


def make_rig(limits: RelayLimits | None = None, idle_timeout: float = 30.0) -> Rig:
    clock = Clock()
    opener = Opener()
    hub = UdpRelayHub(
        clock,
        limits if limits is not None else RelayLimits(rate=0),
        opener,
        idle_timeout=idle_timeout,
        random=counting_random(),
    )
    return Rig(clock, opener, hub)


@pytest.fixture
def rig() -> Rig:
    """A hub without a rate cap."""
    return make_rig()


def latch(
    token: bytes,
    *,
    key: bytes | None = None,
    fingerprint: bool = True,
    transaction: bytes = b"T" * 12,
    username: str | None = None,
) -> bytes:
    """A latch request for *token* (its key, or *key*)."""
    name, right_key = udp_credentials(token)
    attributes: list[Attribute] = [Username(username if username is not None else name)]
    return encode(
        Method.BINDING,
        MessageClass.REQUEST,
        transaction,
        attributes,
        integrity_key=key if key is not None else right_key,
        fingerprint=fingerprint,
    )


@contextmanager
def captured() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


def assert_nothing_left(rig: Rig) -> None:
    """No relay, no timer, every port closed."""
    assert len(rig.hub) == 0
    assert rig.clock.getDelayedCalls() == []
    assert all(socket.closed for socket in rig.opener.sockets)


# -- allocation ---------------------------------------------------------------


def test_allocate_opens_a_port_with_two_tokens(rig: Rig) -> None:
    """Allocation opens one fresh port and draws two distinct tokens."""
    allocation, socket = rig.allocate()
    assert allocation.port == socket.port == 40000
    assert len(allocation.caller_token) == len(allocation.callee_token) == UDP_TOKEN_SIZE
    assert allocation.caller_token != allocation.callee_token
    assert allocation.lifetime == rig.hub.lifetime == 3600.0
    assert (rig.hub.pending, rig.hub.active, rig.hub.stats.allocated) == (1, 0, 1)


def test_allocation_repr_hides_tokens(rig: Rig) -> None:
    """An allocation's repr does not show the tokens."""
    allocation, _ = rig.allocate()
    assert allocation.caller_token.hex() not in repr(allocation)


def test_same_session_twice_refused(rig: Rig) -> None:
    """A session has one UDP relay at a time."""
    rig.allocate()
    with pytest.raises(RelayRefused, match="already has a UDP relay"):
        rig.allocate()
    assert len(rig.opener.sockets) == 1


def test_max_relays() -> None:
    """Past max_relays, allocation is refused until one ends."""
    rig = make_rig(RelayLimits(max_relays=2, rate=0))
    rig.allocate(b"a" * 16)
    rig.allocate(b"b" * 16)
    with pytest.raises(LimitExceeded, match="2 relays at once"):
        rig.allocate(b"c" * 16)
    assert len(rig.opener.sockets) == 2
    assert rig.hub.release(b"a" * 16, "test")
    rig.allocate(b"c" * 16)
    assert len(rig.hub) == 2


def test_no_port_means_unavailable(rig: Rig) -> None:
    """When no port can be opened, allocation fails and leaves nothing behind."""
    rig.opener.error = OSError(98, "Address already in use")
    with pytest.raises(RendezvousUnavailable, match="cannot open a UDP port"):
        rig.allocate()
    assert_nothing_left(rig)
    assert rig.hub.stats.allocated == 0


def test_idle_timeout_must_be_positive() -> None:
    """An idle timeout of 0 is refused."""
    with pytest.raises(ValueError, match="idle_timeout"):
        UdpRelayHub(Clock(), RelayLimits(), Opener(), idle_timeout=0)


# -- latching -----------------------------------------------------------------


def test_latch_answered_with_mapped_address(rig: Rig) -> None:
    """An authentic latch gets XOR-MAPPED-ADDRESS of its source, integrity and fingerprint."""
    allocation, socket = rig.allocate()
    request = latch(allocation.caller_token)
    socket.receive(request, CALLER_AT)
    [(reply, destination)] = socket.take()
    assert destination == CALLER_AT
    assert len(reply) <= len(request)
    message = decode(reply)
    assert (message.method, message.message_class) == (Method.BINDING, MessageClass.SUCCESS)
    assert message.transaction_id == b"T" * 12
    mapped = message.get(XorMappedAddress)
    assert mapped is not None
    assert mapped.address == CALLER_AT
    message.check_integrity(udp_credentials(allocation.caller_token)[1])
    assert message.get(Fingerprint) is not None
    assert rig.hub.stats.latches == 1


def test_latch_with_wrong_key_dropped(rig: Rig) -> None:
    """A latch whose integrity fails is counted and not answered, and latches nothing."""
    allocation, socket = rig.allocate()
    socket.receive(latch(allocation.caller_token, key=b"k" * 16), CALLER_AT)
    socket.receive(latch(allocation.callee_token), CALLEE_AT)
    socket.take()
    socket.receive(QUIC, CALLER_AT)
    assert socket.take() == []
    stats = rig.hub.stats
    assert (stats.latch_failures, stats.latches, stats.dropped_unlatched) == (1, 1, 1)


def test_latch_without_fingerprint_dropped(rig: Rig) -> None:
    """A latch without FINGERPRINT is not answered."""
    allocation, socket = rig.allocate()
    socket.receive(latch(allocation.caller_token, fingerprint=False), CALLER_AT)
    assert socket.take() == []
    assert rig.hub.stats.latch_failures == 1


def test_latch_with_other_relays_token_ignored(rig: Rig) -> None:
    """A latch with a token of another relay latches nothing here."""
    _, socket = rig.allocate()
    other, _ = rig.allocate(b"o" * 16)
    socket.receive(latch(other.caller_token), CALLER_AT)
    assert socket.take() == []
    assert rig.hub.stats.dropped_unlatched == 1


def test_latch_retransmission_answered_again(rig: Rig) -> None:
    """A retransmitted latch is answered every time, and latches the same source."""
    allocation, socket = rig.allocate()
    for _ in range(3):
        socket.receive(latch(allocation.caller_token), CALLER_AT)
    assert [destination for _, destination in socket.take()] == [CALLER_AT] * 3
    assert (rig.hub.stats.latches, rig.hub.stats.rebindings) == (3, 0)


def test_rebinding_moves_the_latch(rig: Rig) -> None:
    """An authentic latch from a new source moves that side there; the old source is dropped."""
    allocation, socket = rig.latched()
    moved = Endpoint(CALLER_AT.host, CALLER_AT.port + 1)
    socket.receive(latch(allocation.caller_token, transaction=b"U" * 12), moved)
    [(reply, destination)] = socket.take()
    mapped = decode(reply).get(XorMappedAddress)
    assert destination == moved
    assert mapped is not None
    assert mapped.address == moved
    socket.receive(b"old", CALLER_AT)
    assert socket.take() == []
    socket.receive(b"new", moved)
    assert socket.take() == [(b"new", CALLEE_AT)]
    socket.receive(b"back", CALLEE_AT)
    assert socket.take() == [(b"back", moved)]
    assert rig.hub.stats.rebindings == 1


def test_latch_from_the_other_sides_source_refused(rig: Rig) -> None:
    """One source cannot be both sides."""
    allocation, socket = rig.allocate()
    socket.receive(latch(allocation.caller_token), CALLER_AT)
    socket.take()
    socket.receive(latch(allocation.callee_token), CALLER_AT)
    assert socket.take() == []
    assert rig.hub.stats.dropped_conflict == 1
    assert rig.hub.pending == 1


# -- forwarding ---------------------------------------------------------------


def test_forwarding_both_ways(rig: Rig) -> None:
    """Once both latched, each side's datagrams reach the other unchanged, one for one."""
    _, socket = rig.latched()
    socket.receive(QUIC, CALLER_AT)
    socket.receive(b"answer", CALLEE_AT)
    socket.receive(b"", CALLEE_AT)
    assert socket.take() == [(QUIC, CALLEE_AT), (b"answer", CALLER_AT), (b"", CALLER_AT)]
    stats = rig.hub.stats
    assert (stats.datagrams, stats.bytes) == (3, len(QUIC) + 6)
    assert (rig.hub.active, rig.hub.pending, stats.started) == (1, 0, 1)


def test_other_stun_requests_forwarded(rig: Rig) -> None:
    """A STUN request that is no latch of this relay (a connectivity check) is forwarded."""
    allocation, socket = rig.latched()
    check = latch(allocation.caller_token, username="peer-check:abc")
    socket.receive(check, CALLER_AT)
    assert socket.take() == [(check, CALLEE_AT)]


def test_drop_before_other_side_latched(rig: Rig) -> None:
    """A latched side's datagrams are dropped until the other side latches."""
    allocation, socket = rig.allocate()
    socket.receive(latch(allocation.caller_token), CALLER_AT)
    socket.take()
    socket.receive(QUIC, CALLER_AT)
    assert socket.take() == []
    assert rig.hub.stats.dropped_early == 1


def test_unlatched_sources_dropped(rig: Rig) -> None:
    """Datagrams from a source no side latched are dropped."""
    _, socket = rig.latched()
    socket.receive(QUIC, STRANGER_AT)
    socket.receive(QUIC, Endpoint(CALLER_AT.host, CALLER_AT.port + 1))
    assert socket.take() == []
    assert rig.hub.stats.dropped_unlatched == 2


def test_rate_cap_drops_over_budget() -> None:
    """Over the rate (half a second's worth at once), datagrams are dropped; per direction."""
    rig = make_rig(RelayLimits(rate=1000))
    _, socket = rig.latched()
    for _ in range(3):
        socket.receive(b"x" * 200, CALLER_AT)
    socket.receive(b"y" * 200, CALLEE_AT)
    assert [destination for _, destination in socket.take()] == [CALLEE_AT] * 2 + [CALLER_AT]
    assert rig.hub.stats.dropped_rate == 1
    rig.clock.advance(0.2)
    socket.receive(b"x" * 200, CALLER_AT)
    assert len(socket.take()) == 1


# -- timers -------------------------------------------------------------------


def test_join_timeout_closes(rig: Rig) -> None:
    """When both sides have not latched within join_timeout, the port closes."""
    allocation, socket = rig.allocate()
    socket.receive(latch(allocation.caller_token), CALLER_AT)
    socket.take()
    with captured() as events:
        rig.clock.advance(rig.hub.limits.join_timeout)
    assert socket.is_closed()
    assert_nothing_left(rig)
    [ended] = [e for e in events if "why" in e]
    assert "1 of 2 sides latched" in ended["why"]
    socket.receive(latch(allocation.caller_token), CALLER_AT)
    assert socket.sent == []


def test_join_in_time_cancels_join_timer(rig: Rig) -> None:
    """Once both latched, the join timeout no longer applies."""
    _, socket = rig.latched()
    rig.clock.advance(rig.hub.limits.join_timeout + 1)
    assert not socket.is_closed()


def test_idle_timeout(rig: Rig) -> None:
    """A running relay closes after idle_timeout without a forwarded datagram."""
    _, socket = rig.latched()
    rig.clock.advance(20)
    socket.receive(QUIC, CALLER_AT)
    rig.clock.advance(29)
    assert not socket.is_closed()
    socket.receive(QUIC, STRANGER_AT)  # dropped: no activity
    rig.clock.advance(1)
    assert socket.is_closed()
    assert_nothing_left(rig)


def test_lifetime_from_allocation() -> None:
    """A relay ends at its lifetime from allocation, however busy."""
    rig = make_rig(RelayLimits(rate=0, lifetime=100.0))
    _, socket = rig.latched()
    for _ in range(9):
        rig.clock.advance(10)
        socket.receive(QUIC, CALLER_AT)
    assert not socket.is_closed()
    rig.clock.advance(10)
    assert socket.is_closed()
    assert_nothing_left(rig)
    assert rig.hub.stats.ended == 1


def test_close_ends_everything(rig: Rig) -> None:
    """Closing the hub closes every port, waiting or running, and cancels every timer."""
    rig.latched()
    rig.allocate(b"w" * 16)
    closed = rig.hub.close()
    assert closed.called
    assert_nothing_left(rig)
    assert rig.hub.stats.ended == 2


def test_release(rig: Rig) -> None:
    """release ends one session's relay; an unknown session is no error."""
    _, socket = rig.allocate()
    assert rig.hub.release(SESSION, "test")
    assert not rig.hub.release(SESSION, "test")
    assert socket.is_closed()
    assert_nothing_left(rig)


def test_end_logged_with_figures(rig: Rig) -> None:
    """The end is logged with the session, both sources, bytes and datagrams each way, drops."""
    _, socket = rig.latched()
    socket.receive(b"abc", CALLER_AT)
    socket.receive(b"de", CALLEE_AT)
    socket.receive(b"?", STRANGER_AT)
    with captured() as events:
        rig.hub.release(SESSION, "test")
    [ended] = [e for e in events if e.get("why") == "test"]
    assert ended["session"] == SESSION.hex()
    assert (ended["caller_source"], ended["callee_source"]) == (str(CALLER_AT), str(CALLEE_AT))
    assert (ended["caller_to_callee"], ended["caller_datagrams"]) == (3, 1)
    assert (ended["callee_to_caller"], ended["callee_datagrams"]) == (2, 1)
    assert ended["dropped"] == 1


# -- the client's checks of UdpRelayOffer -------------------------------------


class OfferHandler:
    """Records UDP relay offers."""

    def __init__(self) -> None:
        self.offers: list[tuple[bytes, int, bytes, float]] = []

    def udp_relay_offer(self, session: bytes, port: int, token: bytes, lifetime: float) -> None:
        self.offers.append((session, port, token, lifetime))


def offer(handler: Any, **override: Any) -> dict[str, Any]:
    protocol = RendezvousProtocol(Clock(), handler, "test")
    arguments: dict[str, Any] = {
        "session": SESSION,
        "port": 40000,
        "token": b"t" * UDP_TOKEN_SIZE,
        "lifetime": 60.0,
        **override,
    }
    return protocol._udp_relay_offer(**arguments)


def test_offer_dispatched() -> None:
    """A valid UdpRelayOffer reaches the handler."""
    handler = OfferHandler()
    assert offer(handler) == {}
    assert handler.offers == [(SESSION, 40000, b"t" * UDP_TOKEN_SIZE, 60.0)]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"port": 0}, "UdpRelayOffer.port"),
        ({"token": b"t" * 16}, "UdpRelayOffer.token"),
        ({"session": b"s"}, "UdpRelayOffer.session"),
        ({"lifetime": float("nan")}, "UdpRelayOffer.lifetime"),
    ],
)
def test_offer_checked(override: dict[str, Any], field: str) -> None:
    """An offer with a bad value is refused and not dispatched."""
    handler = OfferHandler()
    with pytest.raises(InvalidRequest, match=field):
        offer(handler, **override)
    assert handler.offers == []


def test_offer_without_handler_refused() -> None:
    """A peer that did not register takes no offers."""
    with pytest.raises(InvalidRequest, match="takes no requests"):
        offer(None)


# -- real sockets and twistd natrendezvous -----------------------------------


class UdpPort:
    """What listenUDP returns: a port number, and whether it was stopped."""

    def __init__(self, protocol: Any, interface: str) -> None:
        self.protocol = protocol
        self.interface = interface
        self.stopped = False
        self.written: list[tuple[bytes, Any]] = []
        protocol.transport = self

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface, 41000)

    def write(self, data: bytes, addr: Any) -> None:
        self.written.append((data, addr))

    def stopListening(self) -> None:
        self.stopped = True


class UdpReactor(MemoryReactorClock):
    """A memory reactor that records listenUDP calls."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.udp: list[tuple[int, UdpPort, int]] = []

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> UdpPort:
        listening = UdpPort(protocol, interface)
        self.udp.append((port, listening, maxPacketSize))
        return listening


def test_real_socket_binds_a_fresh_port_of_the_interface() -> None:
    """udp_sockets binds port 0 of the given interface, reads whole datagrams, sends and closes."""
    reactor = UdpReactor()
    received: list[tuple[bytes, Endpoint]] = []
    socket = udp_sockets(reactor, "192.0.2.1")(lambda data, source: received.append((data, source)))
    [(port, listening, size)] = reactor.udp
    assert (port, listening.interface, size, socket.port) == (0, "192.0.2.1", 65535, 41000)
    listening.protocol.datagramReceived(b"in", ("198.51.100.1", 5))
    assert received == [(b"in", Endpoint("198.51.100.1", 5))]
    socket.send(b"out", Endpoint("198.51.100.1", 5))
    assert listening.written == [(b"out", ("198.51.100.1", 5))]
    socket.close()
    assert listening.stopped


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))  # type: ignore[no-untyped-call]
    return options


def udp_hub_of(options: Options, reactor: Any) -> UdpRelayHub | None:
    service = makeService(options, reactor).getServiceNamed("rendezvous")  # type: ignore[attr-defined]
    hub = service.factory.udp_relay_hub
    assert hub is None or isinstance(hub, UdpRelayHub)
    return hub


def test_tap_udp_relay_on_with_the_relay() -> None:
    """natrendezvous runs the UDP relay with the relay's caps, on --stun-interface."""
    reactor = UdpReactor()
    options = parse(
        "--stun-interface", "127.0.0.1", "--relay-max", "3", "--relay-rate", "1K",
        "--relay-lifetime", "60",
    )  # fmt: skip
    hub = udp_hub_of(options, reactor)
    assert hub is not None
    assert hub.limits == RelayLimits(max_relays=3, rate=1024.0, lifetime=60.0)
    hub.allocate(SESSION, CALLER, CALLEE)
    [(_, listening, _)] = reactor.udp
    assert listening.interface == "127.0.0.1"
    hub.close()


@pytest.mark.parametrize("flag", ["--no-udp-relay", "--no-relay"])
def test_tap_udp_relay_off(flag: str) -> None:
    """--no-udp-relay, or --no-relay, turns the UDP relay off."""
    assert udp_hub_of(parse(flag), UdpReactor()) is None
