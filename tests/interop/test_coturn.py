"""
Interop with coturn (Debian package ``coturn``), both ways, on loopback:

- coturn's ``turnutils_stunclient`` against our ``twistd natrendezvous``;
- our :class:`~nattraverse.stun.client.StunClient` and
  :func:`~nattraverse.stun.tcp_client.tcp_binding` against coturn's
  ``turnserver`` in STUN-only mode.

The RFC 5780 tests use 127.0.0.2 as the second address.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from nattraverse._types import Endpoint
from nattraverse.stun.attributes import ChangeRequest
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.tcp_client import StunTcpClientProtocol, tcp_binding
from tests.interop.helpers import ALT_LOOPBACK, LOOPBACK, Coturn, Rendezvous

pytestmark = pytest.mark.interop

#: Seconds turnutils_stunclient may run: it waits for each answer forever.
STUNCLIENT_TIMEOUT = 10.0

_ADDRESS = r"(\d{1,3}(?:\.\d{1,3}){3}:\d{1,5})"
_REFLEXIVE = re.compile(r"UDP reflexive addr\W*" + _ADDRESS)
_ORIGIN = re.compile(r"Response origin\W*" + _ADDRESS)
_OTHER = re.compile(r"Other addr\W*" + _ADDRESS)
_RFC5780_RESPONSE = re.compile(r"RFC 5780 response (\d+)")


@dataclass(frozen=True)
class StunclientAnswer:
    """What turnutils_stunclient printed about one response."""

    reflexive: Endpoint
    origin: Endpoint | None
    other: Endpoint | None


def _endpoints(pattern: re.Pattern[str], text: str) -> set[Endpoint]:
    return {Endpoint.parse(m) for m in pattern.findall(text)}


def _one(pattern: re.Pattern[str], text: str) -> Endpoint | None:
    """The address *pattern* finds in *text*; it may be printed more than once."""
    found = _endpoints(pattern, text)
    assert len(found) <= 1, f"different {pattern.pattern!r} in {text!r}"
    return found.pop() if found else None


def parse_stunclient(output: str) -> list[StunclientAnswer]:
    """
    The responses turnutils_stunclient printed, in order: one for a plain
    server, three (numbered "RFC 5780 response N") for an RFC 5780 server.
    """
    numbers = _RFC5780_RESPONSE.findall(output)
    blocks = _RFC5780_RESPONSE.split(output)[2::2] if numbers else [output]
    assert numbers == [str(n) for n in range(1, len(numbers) + 1)], output
    answers = []
    for block in blocks:
        reflexive = _one(_REFLEXIVE, block)
        assert reflexive is not None, f"no reflexive address in {block!r}"
        answers.append(StunclientAnswer(reflexive, _one(_ORIGIN, block), _one(_OTHER, block)))
    return answers


def run_stunclient(stunclient: str, server: Endpoint, *options: str) -> str:
    """Run turnutils_stunclient against *server*; its output."""
    result = subprocess.run(
        [stunclient, "-p", str(server.port), *options, server.host],
        capture_output=True,
        text=True,
        timeout=STUNCLIENT_TIMEOUT,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"turnutils_stunclient exited {result.returncode}:\n{output}"
    return output


def _is_port(port: int) -> bool:
    return 1 <= port <= 65535


# -- turnutils_stunclient against our server ------------------------------------


@pytest.mark.parametrize("options", [(), ("-L", LOOPBACK)], ids=["any-local", "local-127.0.0.1"])
def test_stunclient_gets_reflexive_address(
    require_program: Callable[[str], str], rendezvous: Rendezvous, options: tuple[str, ...]
) -> None:
    """turnutils_stunclient reads its own address, 127.0.0.1 and a port, from our answer."""
    stunclient = require_program("turnutils_stunclient")
    output = run_stunclient(stunclient, rendezvous.primary, *options)
    [answer] = parse_stunclient(output)
    assert answer.reflexive.host == LOOPBACK
    assert _is_port(answer.reflexive.port)
    assert answer.reflexive.port != rendezvous.primary.port
    # A single-address server takes no part in RFC 5780.
    assert (answer.origin, answer.other) == (None, None)
    assert "error" not in output.lower()


def test_stunclient_rfc5780(
    require_program: Callable[[str], str], rendezvous_rfc5780: Rendezvous
) -> None:
    """
    turnutils_stunclient's three RFC 5780 requests (plain; CHANGE-REQUEST
    with RESPONSE-PORT; CHANGE-REQUEST with PADDING from a second socket)
    get the right RESPONSE-ORIGIN, OTHER-ADDRESS and reflexive address.
    """
    stunclient = require_program("turnutils_stunclient")
    primary, alternate = rendezvous_rfc5780.primary, rendezvous_rfc5780.alternate
    assert alternate.host == ALT_LOOPBACK
    output = run_stunclient(stunclient, primary, "-f", "-L", LOOPBACK)
    first, changed, padded = parse_stunclient(output)

    # 1: a plain request, answered from where it went.
    assert first.origin == primary
    assert first.other == alternate
    assert first.reflexive.host == LOOPBACK
    assert _is_port(first.reflexive.port)
    # 2: change IP and port, answer to RESPONSE-PORT (the client's port + 1).
    assert changed.origin == alternate
    assert changed.other == alternate
    assert changed.reflexive == first.reflexive
    # 3: from the client's second socket (that port + 1), with PADDING.
    assert padded.origin == alternate
    assert padded.other == alternate
    assert padded.reflexive == Endpoint(LOOPBACK, first.reflexive.port + 1)


# -- our client against coturn's turnserver ----------------------------------


def _demux(reactor: Any, ports: list[Any]) -> tuple[StunDemultiplexer, Endpoint]:
    """A demultiplexer on a UDP port of 127.0.0.1, retransmitting for about 2s."""
    demux = StunDemultiplexer(reactor, rto=0.2, rc=4, rm=4)
    port = reactor.listenUDP(0, demux, interface=LOOPBACK)
    ports.append(port)
    return demux, Endpoint(LOOPBACK, port.getHost().port)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("fingerprint", [False, True], ids=["plain", "fingerprint"])
async def test_client_udp_against_turnserver(
    reactor: Any, ports: list[Any], coturn: Coturn, fingerprint: bool
) -> None:
    """A Binding over UDP to coturn maps to the client socket's own address."""
    demux, local = _demux(reactor, ports)
    response = await demux.client.binding(coturn.primary, fingerprint=fingerprint)
    assert response.mapped_address == local
    assert response.source == coturn.primary
    assert demux.client.stats.malformed == 0


@pytest_twisted.ensureDeferred
async def test_client_tcp_against_turnserver(reactor: Any, coturn: Coturn) -> None:
    """A Binding over TCP to coturn maps to the connection's own address."""
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, coturn.port, timeout=5)
    protocol = StunTcpClientProtocol(reactor, ti=5)
    await connectProtocol(endpoint, protocol)
    assert protocol.transport is not None
    try:
        local = protocol.transport.getHost()
        response = await protocol.binding(fingerprint=True)
    finally:
        protocol.transport.loseConnection()
    assert isinstance(local, IPv4Address)
    assert response.mapped_address == Endpoint(LOOPBACK, local.port)
    assert protocol.stats.malformed == 0


@pytest_twisted.ensureDeferred
async def test_tcp_binding_against_turnserver(reactor: Any, coturn: Coturn) -> None:
    """tcp_binding connects to coturn, asks, and returns a 127.0.0.1 address."""
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, coturn.port, timeout=5)
    response = await tcp_binding(reactor, endpoint, ti=5)
    assert response.mapped_address is not None
    assert response.mapped_address.host == LOOPBACK
    assert _is_port(response.mapped_address.port)
    assert response.mapped_address.port != coturn.port


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("change_ip", "change_port"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["no-change", "change-ip", "change-port", "change-both"],
)
async def test_client_rfc5780_against_turnserver(
    reactor: Any,
    ports: list[Any],
    coturn_rfc5780: Coturn,
    change_ip: bool,
    change_port: bool,
) -> None:
    """
    CHANGE-REQUEST to a two-address coturn is answered from the socket it
    names, which RESPONSE-ORIGIN confirms; OTHER-ADDRESS names the other
    address and port.
    """
    demux, local = _demux(reactor, ports)
    server = coturn_rfc5780.primary
    response = await demux.client.binding(
        server, [ChangeRequest(change_ip, change_port)], match_source=False
    )
    expected = Endpoint(
        ALT_LOOPBACK if change_ip else LOOPBACK,
        coturn_rfc5780.alt_port if change_port else coturn_rfc5780.port,
    )
    assert response.mapped_address == local
    assert response.source == expected
    assert response.response_origin == expected
    assert response.other_address == Endpoint(ALT_LOOPBACK, coturn_rfc5780.alt_port)
