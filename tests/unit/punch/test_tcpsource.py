"""
:func:`~nattraverse.punch.tcpsource.from_shared_port` without sockets: which
endpoints it recognises, what it refuses and why, the private Twisted
attributes it reads (these tests fail first when Twisted renames them), and
how the rebound endpoint resolves, tries addresses, times out and cancels,
against a fake reactor, a fake resolver and a port whose connects the test
settles by hand.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    _WrapperEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer
from zope.interface.verify import verifyObject

from nattraverse.punch.tcpport import SharedTcpPort
from nattraverse.punch.tcpsource import (
    MAX_ADDRESSES,
    NotFromPort,
    _FromSharedPort,
    _hostname_settings,
    _port_family,
    _private,
    _tcp_settings,
    _TcpSettings,
    _wrapper_parts,
    from_shared_port,
)
from tests.deferreds import failure_of, succeeded


@implementer(IHostResolution)
class Resolution:
    """What the fake resolver hands back."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        raise NotImplementedError()


@implementer(IHostnameResolver)
class FakeResolver:
    """Records each resolution; the test answers it with :meth:`answer`."""

    def __init__(self) -> None:
        self.calls: list[tuple[IResolutionReceiver, str, int, Any, str]] = []
        self.raises: Exception | None = None

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        if self.raises is not None:
            raise self.raises
        self.calls.append(
            (resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics)
        )
        resolution = Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        return resolution

    def answer(self, *addresses: IAddress, index: int = -1) -> None:
        receiver = self.calls[index][0]
        for address in addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()


class ResolvingReactor(MemoryReactorClock):
    """A fake reactor whose name resolver the test drives."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.resolver = FakeResolver()
        self.nameResolver = self.resolver


class FakePort(SharedTcpPort):
    """A SharedTcpPort whose connects are recorded and settled by the test."""

    def __init__(self, interface: str = "0.0.0.0") -> None:
        super().__init__(MemoryReactorClock(), interface)
        self.calls: list[tuple[tuple[str, int], IProtocolFactory, float]] = []
        self.attempts: list[Deferred[IProtocol]] = []
        self.cancelled: list[tuple[str, int]] = []

    def connect(
        self,
        remote: tuple[str, int],
        factory: IProtocolFactory,
        *,
        timeout: float,
        ttl: int | None = None,
        isn: int | None = None,
    ) -> Deferred[IProtocol]:
        self.calls.append((remote, factory, timeout))
        attempt: Deferred[IProtocol] = Deferred(lambda _: self.cancelled.append(remote))
        self.attempts.append(attempt)
        return attempt


@pytest.fixture
def reactor() -> ResolvingReactor:
    """A fake reactor with a fake name resolver."""
    return ResolvingReactor()


@pytest.fixture
def port() -> FakePort:
    """An IPv4 fake shared port."""
    return FakePort()


def _v4(host: str, number: int = 4000) -> IPv4Address:
    return IPv4Address("TCP", host, number)


def _v6(host: str, number: int = 4000) -> IPv6Address:
    return IPv6Address("TCP", host, number)


# The private attributes read from each Twisted type


def test_tcp4_settings_from_client_string(reactor: ResolvingReactor) -> None:
    """clientFromString 'tcp:' gives a TCP4ClientEndpoint whose settings are read back."""
    endpoint = clientFromString(reactor, "tcp:127.0.0.1:4000:timeout=7")
    assert type(endpoint) is TCP4ClientEndpoint
    assert _tcp_settings(endpoint) == _TcpSettings(reactor, "127.0.0.1", 4000, 7.0, None)


def test_tcp4_settings_from_constructor(reactor: ResolvingReactor) -> None:
    """A constructed TCP4ClientEndpoint's host, port, timeout and bindAddress are read back."""
    endpoint = TCP4ClientEndpoint(reactor, "example.test", 80, 3, ("10.0.0.1", 0))
    assert _tcp_settings(endpoint) == _TcpSettings(
        reactor, "example.test", 80, 3.0, ("10.0.0.1", 0)
    )


def test_tcp6_settings_from_constructor(reactor: ResolvingReactor) -> None:
    """A TCP6ClientEndpoint's settings are read back."""
    endpoint = TCP6ClientEndpoint(reactor, "::1", 81, 4)
    assert _tcp_settings(endpoint) == _TcpSettings(reactor, "::1", 81, 4.0, None)


def test_hostname_settings_from_constructor(reactor: ResolvingReactor) -> None:
    """A HostnameEndpoint's name (as text), port and timeout are read back."""
    endpoint = HostnameEndpoint(reactor, b"example.test", 443, timeout=5)
    assert _hostname_settings(endpoint) == _TcpSettings(reactor, "example.test", 443, 5.0, None)


def test_tls_string_parts_and_inner_settings(reactor: ResolvingReactor) -> None:
    """clientFromString 'tls:' is a wrapper around a HostnameEndpoint, both read back."""
    endpoint = clientFromString(reactor, "tls:example.test:4443:timeout=9")
    assert isinstance(endpoint, _WrapperEndpoint)
    assert type(endpoint) is _WrapperEndpoint
    inner, wrapper = _wrapper_parts(endpoint)
    assert type(inner) is HostnameEndpoint
    assert _hostname_settings(inner) == _TcpSettings(reactor, "example.test", 4443, 9.0, None)
    assert isinstance(wrapper(Factory.forProtocol(Protocol)), TLSMemoryBIOFactory)


def test_wrap_client_tls_parts(reactor: ResolvingReactor) -> None:
    """wrapClientTLS's endpoint yields the very endpoint it wraps and a TLS factory maker."""
    tcp: object = TCP4ClientEndpoint(reactor, "127.0.0.1", 4000)
    wrapped = wrapClientTLS(optionsForClientTLS("example.test"), tcp)  # type: ignore[arg-type]
    assert isinstance(wrapped, _WrapperEndpoint)
    inner, wrapper = _wrapper_parts(wrapped)
    assert inner is tcp
    assert isinstance(wrapper(Factory.forProtocol(Protocol)), TLSMemoryBIOFactory)


def test_a_renamed_attribute_fails_loudly() -> None:
    """Reading an attribute Twisted no longer has raises a RuntimeError naming it."""
    with pytest.raises(RuntimeError, match="Resolution has no attribute _host"):
        _private(Resolution("x"), "_host")


@pytest.mark.parametrize(
    ("interface", "family"), [("0.0.0.0", socket.AF_INET), ("::", socket.AF_INET6)]
)
def test_port_family(interface: str, family: socket.AddressFamily) -> None:
    """The shared port's family follows its interface."""
    assert _port_family(FakePort(interface)) == family


# Recognition


@pytest.mark.parametrize(
    "description",
    ["tcp:127.0.0.1:4000", "tcp:example.test:4000", "tls:example.test:4000", "tls:127.0.0.1:4000"],
)
def test_client_strings_are_rebound(
    reactor: ResolvingReactor, port: FakePort, description: str
) -> None:
    """Endpoints made from 'tcp:' and 'tls:' strings are rebound to an endpoint."""
    rebound = from_shared_port(clientFromString(reactor, description), port)
    assert verifyObject(IStreamClientEndpoint, rebound)


def test_hostname_endpoint_is_rebound(reactor: ResolvingReactor, port: FakePort) -> None:
    """A HostnameEndpoint is rebound."""
    rebound = from_shared_port(HostnameEndpoint(reactor, "example.test", 80), port)
    assert isinstance(rebound, _FromSharedPort)


def test_tcp6_endpoint_is_rebound(reactor: ResolvingReactor) -> None:
    """A TCP6ClientEndpoint is rebound to an IPv6 port."""
    endpoint = TCP6ClientEndpoint(reactor, "::1", 80)
    assert isinstance(from_shared_port(endpoint, FakePort("::")), _FromSharedPort)


def test_tls_wrapper_keeps_its_factory(reactor: ResolvingReactor, port: FakePort) -> None:
    """The TLS wrapper is kept, with its own wrapper factory, around a rebound endpoint."""
    endpoint = clientFromString(reactor, "tls:example.test:4000")
    rebound = from_shared_port(endpoint, port)
    assert type(rebound) is _WrapperEndpoint
    inner, wrapper = _wrapper_parts(rebound)
    assert isinstance(inner, _FromSharedPort)
    assert wrapper is _wrapper_parts(endpoint)[1]


def test_other_endpoint_is_refused(reactor: ResolvingReactor, port: FakePort) -> None:
    """A UNIX endpoint is refused, naming its type and what punching needs."""
    endpoint = UNIXClientEndpoint(reactor, "/tmp/nowhere")
    with pytest.raises(NotFromPort) as caught:
        from_shared_port(endpoint, port)
    message = str(caught.value)
    assert "twisted.internet.endpoints.UNIXClientEndpoint" in message
    assert "TCP (or TLS-over-TCP) rendezvous endpoint" in message


def test_not_from_port_is_a_value_error() -> None:
    """NotFromPort is a ValueError."""
    assert issubclass(NotFromPort, ValueError)


def test_ssl_endpoint_is_refused_with_a_hint(reactor: ResolvingReactor, port: FakePort) -> None:
    """An 'ssl:' client endpoint is refused, pointing at 'tls:'."""
    endpoint = clientFromString(reactor, "ssl:127.0.0.1:4000")
    with pytest.raises(NotFromPort, match="use 'tls:' instead of 'ssl:'"):
        from_shared_port(endpoint, port)


def test_tls_around_unix_is_refused(reactor: ResolvingReactor, port: FakePort) -> None:
    """A TLS wrapper around a UNIX endpoint is refused, saying where."""
    endpoint = wrapClientTLS(
        optionsForClientTLS("example.test"), UNIXClientEndpoint(reactor, "/tmp/nowhere")
    )
    with pytest.raises(NotFromPort, match=r"inside the TLS wrapper endpoint: .*UNIXClientEndpoint"):
        from_shared_port(endpoint, port)


def test_subclass_is_refused(reactor: ResolvingReactor, port: FakePort) -> None:
    """A subclass of a supported type is refused: it may connect differently."""

    class Special(TCP4ClientEndpoint):
        pass

    with pytest.raises(NotFromPort, match="Special"):
        from_shared_port(Special(reactor, "127.0.0.1", 80), port)


def test_bind_address_is_refused(reactor: ResolvingReactor, port: FakePort) -> None:
    """An endpoint with its own bindAddress is refused: the shared port decides."""
    endpoint = clientFromString(reactor, "tcp:127.0.0.1:80:bindAddress=127.0.0.2")
    with pytest.raises(NotFromPort, match="drop bindAddress"):
        from_shared_port(endpoint, port)


def test_invalid_host_name_is_refused(reactor: ResolvingReactor, port: FakePort) -> None:
    """A HostnameEndpoint with an invalid name is refused."""
    with pytest.raises(NotFromPort, match="invalid host name"):
        from_shared_port(HostnameEndpoint(reactor, b"\xff\xfe", 80), port)


@pytest.mark.parametrize(
    ("make", "interface", "expected"),
    [
        (lambda r: TCP4ClientEndpoint(r, "127.0.0.1", 80), "::", "over IPv4, .* is IPv6"),
        (lambda r: TCP4ClientEndpoint(r, "example.test", 80), "::", "over IPv4, .* is IPv6"),
        (lambda r: TCP4ClientEndpoint(r, "::1", 80), "0.0.0.0", "over IPv6, .* is IPv4"),
        (lambda r: TCP6ClientEndpoint(r, "example.test", 80), "0.0.0.0", "over IPv6"),
        (lambda r: HostnameEndpoint(r, "::1", 80), "0.0.0.0", "over IPv6, .* is IPv4"),
        (lambda r: HostnameEndpoint(r, "127.0.0.1", 80), "::", "over IPv4, .* is IPv6"),
    ],
)
def test_family_mismatch_is_refused(
    reactor: ResolvingReactor, make: Any, interface: str, expected: str
) -> None:
    """A host that cannot be of the port's family is refused, naming both families."""
    with pytest.raises(NotFromPort, match=expected):
        from_shared_port(make(reactor), FakePort(interface))


# Connecting


def test_literal_host_connects_from_the_port(reactor: ResolvingReactor, port: FakePort) -> None:
    """An IP literal is connected to directly, with the endpoint's timeout, no resolution."""
    factory = Factory.forProtocol(Protocol)
    d = from_shared_port(TCP4ClientEndpoint(reactor, "127.0.0.1", 4000, 7), port).connect(factory)
    assert port.calls == [(("127.0.0.1", 4000), factory, 7.0)]
    assert reactor.resolver.calls == []
    protocol = Protocol()
    port.attempts[0].callback(protocol)
    assert succeeded(d) is protocol


def test_name_is_resolved_for_the_port_family(reactor: ResolvingReactor, port: FakePort) -> None:
    """A name is resolved by the endpoint's reactor, asking for the port's family only."""
    from_shared_port(HostnameEndpoint(reactor, "example.test", 4000), port).connect(
        Factory.forProtocol(Protocol)
    )
    [(_, name, number, types, semantics)] = reactor.resolver.calls
    assert (name, number, list(types), semantics) == ("example.test", 4000, [IPv4Address], "TCP")


def test_resolved_addresses_are_tried_in_order(reactor: ResolvingReactor, port: FakePort) -> None:
    """After a refused first address, the second one is tried and wins."""
    d = from_shared_port(HostnameEndpoint(reactor, "example.test", 4000), port).connect(
        Factory.forProtocol(Protocol)
    )
    reactor.resolver.answer(_v4("10.0.0.1"), _v6("::1"), _v4("10.0.0.2"))
    assert [remote for remote, _, _ in port.calls] == [("10.0.0.1", 4000)]
    port.attempts[0].errback(error.ConnectionRefusedError())
    assert [remote for remote, _, _ in port.calls] == [("10.0.0.1", 4000), ("10.0.0.2", 4000)]
    protocol = Protocol()
    port.attempts[1].callback(protocol)
    assert reactor.getDelayedCalls() == []
    assert succeeded(d) is protocol


def test_all_addresses_failing_fails_with_the_last(
    reactor: ResolvingReactor, port: FakePort
) -> None:
    """When every address fails, the connect fails with the last error."""
    d = from_shared_port(TCP4ClientEndpoint(reactor, "example.test", 4000), port).connect(
        Factory.forProtocol(Protocol)
    )
    reactor.resolver.answer(_v4("10.0.0.1"), _v4("10.0.0.2"))
    port.attempts[0].errback(error.ConnectionRefusedError())
    port.attempts[1].errback(error.TimeoutError())
    failure_of(d).trap(error.TimeoutError)


def test_other_errors_are_not_retried(reactor: ResolvingReactor, port: FakePort) -> None:
    """A failure that is no ConnectError (the factory's) ends the connect at once."""
    d = from_shared_port(TCP4ClientEndpoint(reactor, "example.test", 4000), port).connect(
        Factory.forProtocol(Protocol)
    )
    reactor.resolver.answer(_v4("10.0.0.1"), _v4("10.0.0.2"))
    port.attempts[0].errback(ZeroDivisionError())
    failure_of(d).trap(ZeroDivisionError)
    assert len(port.calls) == 1


def test_duplicates_are_dropped_and_count_bounded(
    reactor: ResolvingReactor, port: FakePort
) -> None:
    """Repeated addresses are tried once, and at most MAX_ADDRESSES are tried."""
    d = from_shared_port(HostnameEndpoint(reactor, "example.test", 4000), port).connect(
        Factory.forProtocol(Protocol)
    )
    hosts = ["10.0.0.1", "10.0.0.1"] + [f"10.0.1.{i}" for i in range(2 * MAX_ADDRESSES)]
    reactor.resolver.answer(*(_v4(h) for h in hosts))
    for i in range(MAX_ADDRESSES):
        port.attempts[i].errback(error.ConnectionRefusedError())
    failure_of(d).trap(error.ConnectionRefusedError)
    tried = [remote[0] for remote, _, _ in port.calls]
    assert tried == ["10.0.0.1"] + [f"10.0.1.{i}" for i in range(MAX_ADDRESSES - 1)]


def test_no_address_of_the_family_fails_clearly(reactor: ResolvingReactor, port: FakePort) -> None:
    """A name with only IPv6 addresses fails on an IPv4 port with a DNSLookupError saying so."""
    d = from_shared_port(HostnameEndpoint(reactor, "example.test", 4000), port).connect(
        Factory.forProtocol(Protocol)
    )
    reactor.resolver.answer(_v6("::1"))
    reason = failure_of(d)
    reason.trap(error.DNSLookupError)
    assert "'example.test' has no IPv4 address" in str(reason.value)
    assert port.calls == []


def test_ipv6_port_connects_to_ipv6_addresses(reactor: ResolvingReactor) -> None:
    """On an IPv6 port a name resolves to IPv6 addresses, and IPv4 ones are skipped."""
    port = FakePort("::")
    from_shared_port(HostnameEndpoint(reactor, "example.test", 4000), port).connect(
        Factory.forProtocol(Protocol)
    )
    assert list(reactor.resolver.calls[0][3]) == [IPv6Address]
    reactor.resolver.answer(_v4("10.0.0.1"), _v6("::1"))
    assert [remote for remote, _, _ in port.calls] == [("::1", 4000)]


def test_resolution_times_out(reactor: ResolvingReactor, port: FakePort) -> None:
    """A resolution that never completes fails after the endpoint's timeout, leaving no timer."""
    d = from_shared_port(HostnameEndpoint(reactor, "example.test", 80, 5), port).connect(
        Factory.forProtocol(Protocol)
    )
    reactor.advance(4.9)
    assert not d.called
    reactor.advance(0.2)
    failure_of(d).trap(error.DNSLookupError)
    assert reactor.getDelayedCalls() == []
    reactor.resolver.answer(_v4("10.0.0.1"))  # late: ignored
    assert port.calls == []


def test_cancel_during_resolution(reactor: ResolvingReactor, port: FakePort) -> None:
    """Cancelling while resolving fails with CancelledError, stops the timer, ignores the answer."""
    d = from_shared_port(HostnameEndpoint(reactor, "example.test", 80), port).connect(
        Factory.forProtocol(Protocol)
    )
    d.cancel()
    failure_of(d).trap(CancelledError)
    assert reactor.getDelayedCalls() == []
    reactor.resolver.answer(_v4("10.0.0.1"))
    assert port.calls == []


def test_cancel_during_connect(reactor: ResolvingReactor, port: FakePort) -> None:
    """Cancelling while connecting cancels the port's attempt and tries no other address."""
    d = from_shared_port(HostnameEndpoint(reactor, "example.test", 80), port).connect(
        Factory.forProtocol(Protocol)
    )
    reactor.resolver.answer(_v4("10.0.0.1"), _v4("10.0.0.2"))
    d.cancel()
    failure_of(d).trap(CancelledError)
    assert port.cancelled == [("10.0.0.1", 80)]
    assert len(port.calls) == 1


def test_reactor_without_resolver_fails(port: FakePort) -> None:
    """A name whose endpoint reactor has no nameResolver fails with a DNSLookupError."""
    endpoint = TCP4ClientEndpoint(object(), "example.test", 80)
    reason = failure_of(from_shared_port(endpoint, port).connect(Factory.forProtocol(Protocol)))
    reason.trap(error.DNSLookupError)
    assert "no nameResolver" in str(reason.value)


def test_resolver_raising_fails(reactor: ResolvingReactor, port: FakePort) -> None:
    """A resolver that raises fails the connect with a DNSLookupError, leaving no timer."""
    reactor.resolver.raises = OSError("broken")
    d = from_shared_port(HostnameEndpoint(reactor, "example.test", 80), port).connect(
        Factory.forProtocol(Protocol)
    )
    reason = failure_of(d)
    reason.trap(error.DNSLookupError)
    assert "broken" in str(reason.value)
    assert reactor.getDelayedCalls() == []


def test_port_failure_is_passed_on(reactor: ResolvingReactor) -> None:
    """A port that fails at once (closed) fails the connect with its error."""

    class Closed(FakePort):
        def connect(self, *args: Any, **kwargs: Any) -> Deferred[IProtocol]:
            return fail(RuntimeError("this SharedTcpPort is closed"))

    endpoint = from_shared_port(TCP4ClientEndpoint(reactor, "127.0.0.1", 80), Closed())
    failure_of(endpoint.connect(Factory.forProtocol(Protocol))).trap(RuntimeError)
