"""
Tests for nattraverse.discovery: the pure rules, table-driven; and
:func:`discover` on the in-memory network of :mod:`nattraverse.testing`,
against the real STUN server and against scripted servers that misbehave
(ignore CHANGE-REQUEST, cannot send from their other address, answer with
errors).  No sockets; the clock is the network's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import DatagramProtocol

from nattraverse import errors, testing
from nattraverse._types import Endpoint
from nattraverse.discovery import (
    Allocation,
    AllocationPattern,
    BindingLifetime,
    DiscoveryError,
    Filtering,
    FilterProbe,
    Mapping,
    NatReport,
    Rfc3489Type,
    classify_allocation,
    classify_filtering,
    classify_mapping,
    discover,
    rfc3489_type,
)
from nattraverse.stun.attributes import ErrorCode, Software
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import decode, encode, is_stun
from nattraverse.stun.responder import (
    BindingResponder,
    Reply,
    ServerAddresses,
    SocketKey,
)
from nattraverse.stun.server import StunServer
from nattraverse.testing import Link, Network, SimulatedHost

EIM = Mapping.ENDPOINT_INDEPENDENT
ADM = Mapping.ADDRESS_DEPENDENT
APDM = Mapping.ADDRESS_AND_PORT_DEPENDENT
EIF = Filtering.ENDPOINT_INDEPENDENT
ADF = Filtering.ADDRESS_DEPENDENT
APDF = Filtering.ADDRESS_AND_PORT_DEPENDENT
ANSWERED, SILENT, INVALID = FilterProbe.ANSWERED, FilterProbe.SILENT, FilterProbe.INVALID

PRIMARY_IP = "192.0.2.10"
OTHER_IP = "192.0.2.11"
SERVER = Endpoint(PRIMARY_IP, 3478)
OTHER = Endpoint(OTHER_IP, 3479)
M1 = Endpoint("203.0.113.1", 40000)
M2 = Endpoint("203.0.113.1", 40001)
M3 = Endpoint("203.0.113.1", 40002)

JSON_KEYS = {
    "udp",
    "mapping",
    "filtering",
    "hairpin",
    "port_preservation",
    "allocation",
    "external",
    "rfc3489",
}


# -- the pure rules ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("other_ip", "other_both", "other_port", "expected"),
    [
        (M1, M1, None, EIM),
        (M1, M1, M1, EIM),
        (M2, M2, None, ADM),
        (M2, M2, M1, ADM),
        (M2, M3, None, APDM),
        # Test II equal to test I, test III not: still port-dependent.
        (M1, M2, None, APDM),
        # The other port gives another mapping even though tests II and III
        # agree with test I.
        (M1, M1, M2, APDM),
        (None, M1, None, None),
        (M1, None, None, None),
    ],
)
def test_classify_mapping(
    other_ip: Endpoint | None,
    other_both: Endpoint | None,
    other_port: Endpoint | None,
    expected: Mapping | None,
) -> None:
    """Mapping follows RFC 5780 section 4.3 from the mapped addresses."""
    assert classify_mapping(M1, other_ip, other_both, other_port) is expected


@pytest.mark.parametrize(
    ("both", "port", "other_ok", "other_port_ok", "expected"),
    [
        (ANSWERED, ANSWERED, True, True, EIF),
        (ANSWERED, SILENT, False, False, EIF),
        (SILENT, ANSWERED, True, True, ADF),
        (SILENT, SILENT, True, True, APDF),
        # Silence from a socket that never showed it can reach us proves nothing.
        (SILENT, SILENT, False, True, None),
        (SILENT, SILENT, True, False, None),
        (SILENT, ANSWERED, False, True, None),
        # An answer from the wrong place is never a pass.
        (INVALID, ANSWERED, True, True, None),
        (SILENT, INVALID, True, True, None),
    ],
)
def test_classify_filtering(
    both: FilterProbe,
    port: FilterProbe,
    other_ok: bool,
    other_port_ok: bool,
    expected: Filtering | None,
) -> None:
    """Filtering follows RFC 5780 section 4.4, and silence needs evidence."""
    assert classify_filtering(both, port, other_ok, other_port_ok) is expected


def ext(port: int, host: str = "203.0.113.1") -> Endpoint:
    return Endpoint(host, port)


@pytest.mark.parametrize(
    ("mappings", "expected"),
    [
        (
            [(5000, ext(5000)), (6000, ext(6000)), (7000, ext(7000))],
            Allocation(AllocationPattern.PRESERVED),
        ),
        (
            [(5000, ext(20000)), (6000, ext(20001)), (7000, ext(20002)), (80, ext(20003))],
            Allocation(AllocationPattern.SEQUENTIAL, 1),
        ),
        # Another host took a port in between: a gap of two steps.
        (
            [(1, ext(20000)), (2, ext(20002)), (3, ext(20006)), (4, ext(20008)), (5, ext(20010))],
            Allocation(AllocationPattern.SEQUENTIAL, 2),
        ),
        (
            [(1, ext(30000)), (2, ext(29999)), (3, ext(29998))],
            Allocation(AllocationPattern.SEQUENTIAL, -1),
        ),
        # Wrapping around the top of the port range.
        (
            [(1, ext(65534)), (2, ext(65535)), (3, ext(0)), (4, ext(1))],
            Allocation(AllocationPattern.SEQUENTIAL, 1),
        ),
        # A gap (unknown mapping) breaks the run but not the pattern.
        (
            [(1, ext(20000)), (2, ext(20001)), None, (4, ext(20003)), (5, ext(20004))],
            Allocation(AllocationPattern.SEQUENTIAL, 1),
        ),
        (
            [(1, ext(17667)), (2, ext(6253)), (3, ext(2194)), (4, ext(54028))],
            Allocation(AllocationPattern.RANDOM),
        ),
        # The same port for two mappings is not a step.
        (
            [(1, ext(20000)), (2, ext(20000)), (3, ext(20000))],
            Allocation(AllocationPattern.RANDOM),
        ),
        # Steps too large to predict.
        (
            [(1, ext(1000)), (2, ext(2000)), (3, ext(3000))],
            Allocation(AllocationPattern.RANDOM),
        ),
        # Mappings on different external addresses.
        (
            [(1, ext(20000)), (2, ext(20001, "203.0.113.2")), (3, ext(20002))],
            Allocation(AllocationPattern.RANDOM),
        ),
        # Reordered on the way to the NAT: the sorted ports still form a run.
        (
            [(1, ext(20001)), (2, ext(20000)), (3, ext(20002)), (4, ext(20004)), (5, ext(20003))],
            Allocation(AllocationPattern.SEQUENTIAL, 1),
        ),
        # Unseen mappings took ports too: the delta counts per socket.
        (
            [(1, ext(20000)), None, (3, ext(20002)), None, (5, ext(20004))],
            Allocation(AllocationPattern.SEQUENTIAL, 1),
        ),
        # Reordered and partly unseen: no prediction.
        (
            [(1, ext(20002)), None, (3, ext(20000)), (4, ext(20004))],
            Allocation(AllocationPattern.RANDOM),
        ),
        ([(1, ext(20000)), (2, ext(20001))], Allocation()),
        ([], Allocation()),
    ],
)
def test_classify_allocation(
    mappings: list[tuple[int, Endpoint] | None], expected: Allocation
) -> None:
    """Preserved, sequential with its step, random, or unknown."""
    assert classify_allocation(mappings) == expected


@pytest.mark.parametrize(
    ("udp", "nat", "mapping", "filtering", "expected"),
    [
        (False, None, None, None, Rfc3489Type.BLOCKED),
        (True, False, EIM, EIF, Rfc3489Type.OPEN),
        (True, False, EIM, APDF, Rfc3489Type.SYMMETRIC_UDP_FIREWALL),
        (True, False, None, None, Rfc3489Type.SYMMETRIC_UDP_FIREWALL),
        (True, True, EIM, EIF, Rfc3489Type.FULL_CONE),
        (True, True, EIM, ADF, Rfc3489Type.RESTRICTED_CONE),
        (True, True, EIM, APDF, Rfc3489Type.PORT_RESTRICTED_CONE),
        (True, True, EIM, None, Rfc3489Type.PORT_RESTRICTED_CONE),
        (True, True, ADM, APDF, Rfc3489Type.SYMMETRIC),
        (True, True, APDM, EIF, Rfc3489Type.SYMMETRIC),
        (True, True, None, None, Rfc3489Type.SYMMETRIC),
        (True, True, None, EIF, Rfc3489Type.SYMMETRIC),
    ],
)
def test_rfc3489_type(
    udp: bool,
    nat: bool | None,
    mapping: Mapping | None,
    filtering: Filtering | None,
    expected: Rfc3489Type,
) -> None:
    """The classic name never promises more than was seen."""
    assert rfc3489_type(udp, nat, mapping, filtering) is expected


def test_report_json_keys() -> None:
    """to_json has exactly the documented keys, with plain JSON values."""
    report = NatReport(
        "ok",
        mapping=EIM,
        filtering=APDF,
        hairpin=False,
        port_preservation=True,
        allocation=Allocation(AllocationPattern.SEQUENTIAL, 2),
        external=(M1, M2),
        nat=True,
    )
    assert report.to_json() == {
        "udp": "ok",
        "mapping": "endpoint-independent",
        "filtering": "address-and-port-dependent",
        "hairpin": False,
        "port_preservation": True,
        "allocation": {"pattern": "sequential", "step": 2},
        "external": ["203.0.113.1:40000", "203.0.113.1:40001"],
        "rfc3489": "port-restricted-cone",
    }


def test_report_json_blocked() -> None:
    """A blocked report has every key, unknowns as null."""
    assert NatReport("blocked").to_json() == {
        "udp": "blocked",
        "mapping": None,
        "filtering": None,
        "hairpin": None,
        "port_preservation": None,
        "allocation": {"pattern": None, "step": None},
        "external": [],
        "rfc3489": "blocked",
    }


@pytest.mark.parametrize(
    ("lifetime", "expected"),
    [
        (BindingLifetime(30.0, 45.0), {"at_least": 30.0, "less_than": 45.0}),
        (BindingLifetime(120.0, None), {"at_least": 120.0, "less_than": None}),
        (BindingLifetime(None, None), None),
    ],
)
def test_report_json_lifetime(lifetime: BindingLifetime, expected: object) -> None:
    """The lifetime key appears only when the test was asked for."""
    out = NatReport("ok", lifetime=lifetime).to_json()
    assert set(out) == JSON_KEYS | {"lifetime"}
    assert out["lifetime"] == expected


def test_shared_values() -> None:
    """The report speaks the simulated NATs' behaviour values, and its error
    is the one in nattraverse.errors."""
    assert (Mapping, Filtering) == (testing.Mapping, testing.Filtering)
    assert DiscoveryError is errors.DiscoveryError
    assert issubclass(DiscoveryError, errors.NatTraverseError)


# -- arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "kwargs", "message"),
    [
        (("stun.example.org", 3478), {}, "not an IP address"),
        ((PRIMARY_IP, 0), {}, "not a port number"),
        ((PRIMARY_IP, 3478), {"timeout": 0}, "timeout"),
        ((PRIMARY_IP, 3478), {"timeout": float("nan")}, "timeout"),
        ((PRIMARY_IP, 3478), {"rto": -1}, "rto"),
        ((PRIMARY_IP, 3478), {"probe_wait": 0}, "probe_wait"),
        ((PRIMARY_IP, 3478), {"allocation_probes": 1}, "allocation_probes"),
        ((PRIMARY_IP, 3478), {"lifetime_max": 0}, "lifetime_max"),
        ((PRIMARY_IP, 3478), {"local_interface": "::"}, "same IP version"),
        ((PRIMARY_IP, 3478), {"local_interface": "eth0"}, "not an IP address"),
    ],
)
def test_bad_arguments_fail_the_deferred(
    server: tuple[str, int], kwargs: dict[str, Any], message: str
) -> None:
    """discover never raises: a bad argument fails its Deferred with ValueError."""
    network = Network()
    host = network.host("laptop")
    failures: list[Any] = []
    discover(host.reactor, server, **kwargs).addErrback(failures.append)
    (failure,) = failures
    assert failure.check(ValueError)
    assert message in str(failure.value)
    assert host.ports == ()


# -- discover() on the simulated network ----------------------------------------------


def stun_host(network: Network, *, delay: float = 0.0) -> SimulatedHost:
    return network.host("stun", address=PRIMARY_IP, aliases=[OTHER_IP], link=Link(delay=delay))


def stun_server(network: Network, *, rfc5780: bool = True, delay: float = 0.0) -> StunServer:
    """The project's STUN server on a public host, with two addresses or one."""
    server = StunServer(
        stun_host(network, delay=delay).reactor,
        interface=PRIMARY_IP,
        port=SERVER.port,
        alt_address=OTHER_IP if rfc5780 else None,
        alt_port=OTHER.port,
        tcp=False,
    )
    server.startService()
    return server


class ScriptedServer:
    """
    An RFC 5780 server on four sockets whose answers go through *route*:
    given the reply the real responder chose and the socket the request
    came in on, it returns the reply to send (from the socket it names),
    or ``None`` to drop it.
    """

    def __init__(
        self, host: SimulatedHost, route: Callable[[Reply, SocketKey], Reply | None]
    ) -> None:
        addresses = ServerAddresses(SERVER, OTHER)
        self.responder = BindingResponder(addresses)
        self.route = route
        self.ports: dict[SocketKey, Any] = {}
        for key in (SocketKey(0, 0), SocketKey(0, 1), SocketKey(1, 0), SocketKey(1, 1)):
            endpoint = addresses.endpoint(key)
            self.ports[key] = host.reactor.listenUDP(
                endpoint.port, _Answer(self, key), interface=endpoint.host
            )


class _Answer(DatagramProtocol):
    def __init__(self, server: ScriptedServer, key: SocketKey) -> None:
        self.server = server
        self.key = key

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        server = self.server
        reply = server.responder.respond(datagram, Endpoint(*addr), self.key)
        if reply is not None:
            reply = server.route(reply, self.key)
        if reply is not None:
            server.ports[reply.via].write(reply.payload, reply.destination)


class OneAnswer(DatagramProtocol):
    """A server on one socket that answers every request with *answer(request)*."""

    def __init__(self, answer: Callable[[bytes, Endpoint], bytes]) -> None:
        self.answer = answer

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if is_stun(datagram) and decode(datagram).message_class is MessageClass.REQUEST:
            self.transport.write(self.answer(datagram, Endpoint(*addr)), addr)  # type: ignore[union-attr]


def client_host(network: Network, preset: str | None = None, **nat: Any) -> SimulatedHost:
    """A host on the internet (no preset), or behind a NAT."""
    if preset is None:
        return network.host("laptop")
    return network.host("laptop", network.nat("home", preset=preset, **nat).lan)


def assert_released(host: SimulatedHost) -> None:
    """Every socket and timer of the host is gone."""
    assert host.ports == ()
    assert host.reactor.getDelayedCalls() == []


def run(network: Network, host: SimulatedHost, **kwargs: Any) -> NatReport:
    """
    discover() from *host*; checks that, whether it succeeded or failed, it
    had released every socket and timer by the time its Deferred fired.
    """
    released: list[bool] = []

    def check(result: object) -> object:
        released.append(host.ports == () and host.reactor.getDelayedCalls() == [])
        return result

    d = discover(host.reactor, SERVER, **kwargs)
    d.addBoth(check)
    try:
        return network.run_until(d, timeout=1000)
    finally:
        assert released == [True]


def test_no_nat_rfc5780_server() -> None:
    """A public host and a two-address server: open, everything known."""
    network = Network(seed=1)
    stun_server(network)
    host = client_host(network)
    report = run(network, host)
    assert report.udp == "ok"
    assert report.nat is False
    assert (report.mapping, report.filtering) == (EIM, EIF)
    assert report.port_preservation is True
    assert report.allocation == Allocation(AllocationPattern.PRESERVED)
    assert report.hairpin is True
    assert report.rfc3489 is Rfc3489Type.OPEN
    assert report.external == (Endpoint(host.address, report.local.port),)  # type: ignore[union-attr]
    assert report.other_address == OTHER
    assert report.notes == ()


def test_behind_nat_reports_external_and_local() -> None:
    """Behind a NAT, the report has the local address and the external one."""
    network = Network(seed=2)
    stun_server(network)
    host = client_host(network, "port-restricted")
    report = run(network, host)
    assert report.nat is True
    assert report.local is not None
    assert report.local.host == "0.0.0.0"
    (external,) = report.external
    assert external.host == network.nats["home"].address
    assert external.port == report.local.port


def test_one_address_server_degrades() -> None:
    """Without OTHER-ADDRESS: mapping and filtering unknown, the rest measured."""
    network = Network(seed=3)
    stun_server(network, rfc5780=False)
    host = client_host(network, "port-restricted")
    report = run(network, host)
    assert report.udp == "ok"
    assert (report.mapping, report.filtering) == (None, None)
    assert report.port_preservation is True
    assert report.allocation.pattern is AllocationPattern.PRESERVED
    assert report.hairpin is False
    assert report.nat is True
    # Unknown mapping is taken at its worst.
    assert report.rfc3489 is Rfc3489Type.SYMMETRIC
    assert any("OTHER-ADDRESS" in note for note in report.notes)


def test_one_address_server_without_nat() -> None:
    """No NAT and no filtering test: a firewall is assumed, not an open host."""
    network = Network(seed=3)
    stun_server(network, rfc5780=False)
    report = run(network, client_host(network))
    assert report.nat is False
    assert report.rfc3489 is Rfc3489Type.SYMMETRIC_UDP_FIREWALL


def test_change_request_answered_from_wrong_address_is_not_full_cone() -> None:
    """
    A server that answers CHANGE-REQUEST from the address asked (claiming the
    other in RESPONSE-ORIGIN) never makes a NAT look full cone.
    """
    network = Network(seed=4)
    ScriptedServer(stun_host(network), lambda reply, received: reply._replace(via=received))
    host = client_host(network, "port-restricted")
    report = run(network, host)
    assert report.mapping is EIM
    assert report.filtering is None
    assert report.rfc3489 is Rfc3489Type.PORT_RESTRICTED_CONE
    assert any("does not honour CHANGE-REQUEST" in note for note in report.notes)


def test_change_request_answered_from_wrong_address_without_nat() -> None:
    """The same server in front of an open host: not called open."""
    network = Network(seed=4)
    ScriptedServer(stun_host(network), lambda reply, received: reply._replace(via=received))
    report = run(network, client_host(network))
    assert report.filtering is None
    assert report.rfc3489 is Rfc3489Type.SYMMETRIC_UDP_FIREWALL


def test_silent_other_address_is_not_strict_filtering() -> None:
    """A server whose other address cannot send: mapping and filtering unknown,
    not "symmetric" and "address-and-port-dependent"."""
    network = Network(seed=5)
    ScriptedServer(stun_host(network), lambda reply, received: None if reply.via.address else reply)
    report = run(network, client_host(network, "full-cone"))
    assert report.udp == "ok"
    assert (report.mapping, report.filtering) == (None, None)
    assert any("did not answer" in note for note in report.notes)


def test_silent_other_port_leaves_filtering_open_between_adf_and_apdf() -> None:
    """The other port cannot send from the primary address: a NAT that drops
    the port-changed answer may be ADF or APDF, so filtering is unknown."""
    network = Network(seed=5)
    ScriptedServer(
        stun_host(network),
        lambda reply, received: None if reply.via == SocketKey(0, 1) else reply,
    )
    report = run(network, client_host(network, "port-restricted"))
    assert report.mapping is EIM
    assert report.filtering is None


def test_unreachable_server_is_blocked_within_timeout() -> None:
    """No answer: udp blocked after the timeout, and nothing left behind."""
    network = Network(seed=6)
    network.host("stun", address=PRIMARY_IP)
    host = client_host(network)
    start = network.clock.seconds()
    report = run(network, host, timeout=1.5)
    assert network.clock.seconds() - start == pytest.approx(1.5)
    assert report.udp == "blocked"
    assert report.rfc3489 is Rfc3489Type.BLOCKED
    assert report.nat is None
    assert "no answer from 192.0.2.10:3478 within 1.5 s" in report.notes[0]


def test_error_response_fails_with_discovery_error() -> None:
    """A server that answers Binding with an error: DiscoveryError naming it."""
    network = Network(seed=7)

    def refuse(data: bytes, source: Endpoint) -> bytes:
        request = decode(data)
        return encode(
            request.method, MessageClass.ERROR, request.transaction_id, [ErrorCode(500, "busy")]
        )

    network.host("stun", address=PRIMARY_IP).reactor.listenUDP(3478, OneAnswer(refuse))
    host = client_host(network)
    with pytest.raises(DiscoveryError, match="answered a plain Binding request with an error"):
        run(network, host)


def test_answer_without_mapped_address_fails() -> None:
    """A success response without a mapped address cannot be used."""
    network = Network(seed=7)

    def empty(data: bytes, source: Endpoint) -> bytes:
        request = decode(data)
        return encode(Method.BINDING, MessageClass.SUCCESS, request.transaction_id, [Software("x")])

    network.host("stun", address=PRIMARY_IP).reactor.listenUDP(3478, OneAnswer(empty))
    with pytest.raises(DiscoveryError, match="without XOR-MAPPED-ADDRESS"):
        run(network, client_host(network))


def test_interface_not_on_host_fails() -> None:
    """A local interface the host does not have: DiscoveryError, nothing left."""
    network = Network(seed=8)
    stun_server(network)
    host = client_host(network)
    with pytest.raises(DiscoveryError, match=r"cannot open a UDP socket on 198\.51\.100\.99"):
        run(network, host, local_interface="198.51.100.99")


def test_specific_interface_compares_mapped_to_it() -> None:
    """Bound to the host's own address, no NAT is seen without a bind test."""
    network = Network(seed=8)
    stun_server(network)
    host = client_host(network)
    report = run(network, host, local_interface=host.address)
    assert report.nat is False
    assert report.local == report.external[0]


@pytest.mark.parametrize("at", [0.0, 0.03, 0.05, 0.07, 0.1, 0.2, 0.4, 5.0, 40.0])
def test_cancel_releases_everything(at: float) -> None:
    """Cancelling at any moment fails with CancelledError and leaves nothing."""
    network = Network(seed=9)
    stun_server(network, delay=0.025)
    host = client_host(network, "symmetric", uplink=Link(delay=0.025))
    d = discover(host.reactor, SERVER, lifetime=True)
    network.run(at)
    d.cancel()
    with pytest.raises(CancelledError):
        network.run_until(d)
    assert_released(host)


def test_cancel_after_result_is_harmless() -> None:
    """Cancelling a Deferred that has fired changes nothing."""
    network = Network(seed=9)
    stun_server(network)
    host = client_host(network)
    d = discover(host.reactor, SERVER)
    report = network.run_until(d)
    d.cancel()
    assert report.udp == "ok"
    assert_released(host)


def test_first_datagrams_leave_in_order() -> None:
    """The main socket and the allocation sockets send first, one after the other."""
    network = Network(seed=10)
    stun_server(network)
    host = client_host(network, "symmetric-sequential")
    report = run(network, host, allocation_probes=5)
    assert report.allocation == Allocation(AllocationPattern.SEQUENTIAL, 1)
    # The main socket's first mapping is the NAT's first port.
    assert report.external[0].port == 20000


def test_lifetime_bounds() -> None:
    """The lifetime test brackets the NAT's mapping lifetime and stops at the first loss."""
    network = Network(seed=11)
    stun_server(network)
    host = client_host(network, "port-restricted", mapping_lifetime=40.0)
    start = network.clock.seconds()
    report = run(network, host, lifetime=True)
    assert report.lifetime == BindingLifetime(30.0, 45.0)
    assert network.clock.seconds() - start < 46
    assert set(report.to_json()) == JSON_KEYS | {"lifetime"}


def test_lifetime_beyond_max() -> None:
    """A mapping that outlives every idle time tried: at least lifetime_max."""
    network = Network(seed=11)
    stun_server(network)
    host = client_host(network, "full-cone", mapping_lifetime=600.0)
    report = run(network, host, lifetime=True, lifetime_max=50.0)
    assert report.lifetime == BindingLifetime(50.0, None)


def test_lifetime_needs_rfc5780_server() -> None:
    """With one address the lifetime test cannot run, and says so."""
    network = Network(seed=11)
    stun_server(network, rfc5780=False)
    report = run(network, client_host(network), lifetime=True)
    assert report.lifetime == BindingLifetime(None, None)
    assert report.to_json()["lifetime"] is None
    assert any("RESPONSE-PORT" in note for note in report.notes)


def test_lifetime_not_asked_for() -> None:
    """Without lifetime=True the report has no lifetime and JSON no key."""
    network = Network(seed=11)
    stun_server(network)
    report = run(network, client_host(network))
    assert report.lifetime is None
    assert set(report.to_json()) == JSON_KEYS


class Ids:
    """Predictable transaction ids and tokens: 1, 2, 3, ..."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, size: int) -> bytes:
        self.n += 1
        return self.n.to_bytes(size, "big")


def test_injected_randomness_is_used() -> None:
    """Transaction ids and probe tokens come from random_bytes."""
    network = Network(seed=12)
    stun_server(network)
    ids = Ids()
    report = run(network, client_host(network, "full-cone", hairpin=True), random_bytes=ids)
    assert report.hairpin is True
    assert ids.n >= 10


def test_rtt_measured() -> None:
    """The report's round trip is the first Binding's."""
    network = Network(seed=13)
    stun_server(network, delay=0.03)
    report = run(network, client_host(network, "full-cone", uplink=Link(delay=0.02)))
    assert report.rtt == pytest.approx(0.1)


def test_server_error_for_change_request_only() -> None:
    """A server that refuses CHANGE-REQUEST with an error: filtering unknown."""
    network = Network(seed=14)

    def refuse_change(reply: Reply, received: SocketKey) -> Reply:
        if reply.via == received:
            return reply
        error = encode(
            Method.BINDING,
            MessageClass.ERROR,
            decode(reply.payload).transaction_id,
            [ErrorCode(400, "no")],
        )
        return Reply(error, received, reply.destination)

    ScriptedServer(stun_host(network), refuse_change)
    report = run(network, client_host(network, "full-cone"))
    assert report.mapping is EIM
    assert report.filtering is None
    assert any("CHANGE-REQUEST failed" in note for note in report.notes)


def test_deferred_type() -> None:
    """discover returns a Deferred at once."""
    network = Network()
    host = network.host("laptop")
    d = discover(host.reactor, SERVER, timeout=0.1)
    assert isinstance(d, Deferred)
    network.run_until(d)
    assert_released(host)
