"""
Tests for nattraverse.stun.demux: one UDP port shared by the STUN client and
other traffic, with FakeDatagramTransport and task.Clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from nattraverse._types import Endpoint
from nattraverse.errors import StunTransactionCancelled
from nattraverse.stun.attributes import XorMappedAddress
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.message import decode, encode

SERVER = Endpoint("192.0.2.1", 3478)
PEER = Endpoint("198.51.100.7", 5000)
MAPPED = Endpoint("203.0.113.5", 40000)


class Recorder:
    """An ``other`` handler that records what it gets."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Endpoint]] = []

    def __call__(self, data: bytes, addr: Endpoint) -> None:
        self.received.append((data, addr))


def listening(**kwargs: Any) -> tuple[Clock, FakeDatagramTransport, StunDemultiplexer]:
    clock = Clock()
    demux = StunDemultiplexer(clock, **kwargs)
    transport = FakeDatagramTransport()
    demux.makeConnection(transport)
    return clock, transport, demux


def response_to(request: bytes) -> bytes:
    message = decode(request)
    return encode(
        Method.BINDING, MessageClass.SUCCESS, message.transaction_id, [XorMappedAddress(MAPPED)]
    )


def test_client_writes_through_port() -> None:
    """The client's requests go out through the port's transport."""
    _, transport, demux = listening()
    demux.client.binding(SERVER)
    ((data, addr),) = transport.written
    assert decode(data).method == Method.BINDING
    assert addr == ("192.0.2.1", 3478)


def test_stun_response_goes_to_client() -> None:
    """A response to the client's request fires its Deferred and skips the other handler."""
    clock, transport, demux = listening(other=(other := Recorder()))
    d = demux.client.binding(SERVER)
    results: list[Any] = []
    d.addBoth(results.append)
    demux.datagramReceived(response_to(transport.written[0][0]), ("192.0.2.1", 3478))
    assert results[0].mapped_address == MAPPED
    assert other.received == []
    assert demux.stats.stun == 1
    assert clock.getDelayedCalls() == []


def test_unknown_stun_response_consumed() -> None:
    """A STUN response for no transaction stays away from the other handler."""
    _, _, demux = listening(other=(other := Recorder()))
    stray = encode(Method.BINDING, MessageClass.SUCCESS, b"\x07" * 12)
    demux.datagramReceived(stray, ("192.0.2.1", 3478))
    assert other.received == []
    assert demux.client.stats.unmatched == 1


@pytest.mark.parametrize(
    "data",
    [
        b"\xc0\x00\x00\x01QUIC long header",
        b"hello",
        encode(Method.BINDING, MessageClass.REQUEST, b"\x01" * 12),
        encode(Method.BINDING, MessageClass.INDICATION, b"\x01" * 12),
    ],
)
def test_everything_else_goes_to_other(data: bytes) -> None:
    """Non-STUN datagrams and STUN requests/indications go to the other handler."""
    _, _, demux = listening(other=(other := Recorder()))
    demux.datagramReceived(data, ("198.51.100.7", 5000))
    assert other.received == [(data, PEER)]
    assert isinstance(other.received[0][1], Endpoint)
    assert demux.stats.other == 1


def test_other_set_later() -> None:
    """The other handler can be set after the port is listening."""
    _, _, demux = listening()
    demux.datagramReceived(b"early", ("198.51.100.7", 5000))
    assert demux.stats.dropped == 1
    demux.other = other = Recorder()
    demux.datagramReceived(b"late", ("198.51.100.7", 5000))
    assert other.received == [(b"late", PEER)]


def test_other_handler_errors_are_logged() -> None:
    """An exception in the other handler is logged and counted, not raised."""

    def broken(data: bytes, addr: Endpoint) -> None:
        raise ZeroDivisionError("boom")

    _, _, demux = listening(other=broken)
    with capturedLogs() as events:
        demux.datagramReceived(b"data", ("198.51.100.7", 5000))
    assert demux.stats.handler_errors == 1
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    failure = failures[0]["log_failure"]
    assert isinstance(failure, Failure)
    assert isinstance(failure.value, ZeroDivisionError)
    assert failures[0]["source"] == "198.51.100.7:5000"


def test_send_without_port() -> None:
    """Sending before the demultiplexer listens fails the request with a clear error."""
    clock = Clock()
    demux = StunDemultiplexer(clock)
    results: list[Any] = []
    demux.client.binding(SERVER).addBoth(results.append)
    assert isinstance(results[0], Failure)
    assert isinstance(results[0].value, RuntimeError)
    assert "listenUDP" in str(results[0].value)
    assert clock.getDelayedCalls() == []


def test_stop_protocol_stops_client() -> None:
    """When the port stops, pending transactions fail and no timer is left."""
    clock, _, demux = listening()
    results: list[Any] = []
    demux.client.binding(SERVER).addBoth(results.append)
    demux.doStop()  # type: ignore[no-untyped-call]
    assert isinstance(results[0], Failure)
    assert isinstance(results[0].value, StunTransactionCancelled)
    assert clock.getDelayedCalls() == []


def test_client_options() -> None:
    """Retransmission options reach the client."""
    clock, transport, demux = listening(rto=1.0, rc=2, rm=1)
    demux.client.binding(SERVER).addErrback(lambda _: None)
    clock.pump([0.5] * 10)
    assert len(transport.written) == 2
    assert demux.client.stats.timeouts == 1


def test_intercept_sees_every_datagram_first() -> None:
    """The interceptor is offered every datagram first; what it consumes goes nowhere else."""
    _, _, demux = listening(other=(other := Recorder()))
    offered: list[tuple[bytes, Endpoint]] = []

    def intercept(data: bytes, addr: Endpoint) -> bool:
        offered.append((data, addr))
        return data.startswith(b"mine")

    demux.intercept = intercept
    response = encode(Method.BINDING, MessageClass.SUCCESS, b"\x01" * 12, [])
    demux.datagramReceived(response, ("198.51.100.7", 5000))
    demux.datagramReceived(b"mine: a check", ("198.51.100.7", 5000))
    demux.datagramReceived(b"not mine", ("198.51.100.7", 5000))
    assert [data for data, _ in offered] == [response, b"mine: a check", b"not mine"]
    assert other.received == [(b"not mine", PEER)]
    assert demux.stats.intercepted == 1
    # The unknown STUN response, declined by the interceptor, reached the client.
    assert demux.stats.stun == 1


def test_intercept_errors_are_logged_and_drop_the_datagram() -> None:
    """An exception in the interceptor is logged and counted; the datagram goes nowhere."""

    def broken(data: bytes, addr: Endpoint) -> bool:
        raise ZeroDivisionError("boom")

    _, _, demux = listening(other=(other := Recorder()))
    demux.intercept = broken
    with capturedLogs() as events:
        demux.datagramReceived(b"data", ("198.51.100.7", 5000))
    assert demux.stats.handler_errors == 1
    assert other.received == []
    assert [e for e in events if "log_failure" in e]
