"""
The probes of NAT behaviour discovery, run on a reactor (RFC 5780 section 4).

:func:`discover` opens its own UDP sockets with ``reactor.listenUDP``, runs
the tests at the same time on separate sockets, hands the results to the
pure rules of :mod:`nattraverse.discovery._report` and closes every socket
and timer before its Deferred fires, whether it succeeds, fails or is
cancelled.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from nattraverse._types import Endpoint, Filtering
from nattraverse.discovery._report import (
    BindingLifetime,
    FilterProbe,
    NatReport,
    classify_allocation,
    classify_filtering,
    classify_mapping,
)
from nattraverse.discovery._session import ProbeSocket, Session, Transaction
from nattraverse.errors import DiscoveryError, StunError
from nattraverse.stun.attributes import ChangeRequest, ResponsePort
from nattraverse.stun.client import match_key
from nattraverse.stun.constants import MessageClass, Method
from nattraverse.stun.message import encode
from nattraverse.stun.transaction import StunResponse

__all__ = ["LIFETIME_STEPS", "discover"]

_log = Logger()

#: Idle times, in seconds, after which the lifetime test checks a mapping.
LIFETIME_STEPS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0)

#: Shortest wait for a probe whose silence is the finding, and the round
#: trips it waits at least.
MIN_PROBE_WAIT = 0.25
PROBE_WAIT_RTTS = 4

#: Shortest wait for a request that should be answered, and the round trips
#: it waits at least.
MIN_ANSWER_WAIT = 1.0
ANSWER_WAIT_RTTS = 8


class _Discovery(Session):
    """One run of :func:`discover`."""

    def __init__(
        self,
        reactor: Any,
        server: Endpoint,
        interface: str,
        timeout: float,
        probe_wait: float | None,
        rto: float,
        allocation_probes: int,
        lifetime_max: float | None,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        super().__init__(reactor, interface, rto, random_bytes)
        self.server = server
        self.timeout = timeout
        self.probe_wait = probe_wait
        self.allocation_probes = allocation_probes
        self.lifetime_max = lifetime_max
        self.notes: list[str] = []

    # -- the tests -------------------------------------------------------------

    async def run(self, lifetime: bool) -> NatReport:
        try:
            report = await self._discover(lifetime)
        finally:
            await self.close()
        _log.info(
            "NAT discovery with {server}: {json}", server=str(self.server), json=report.to_json()
        )
        return report

    async def _discover(self, lifetime: bool) -> NatReport:
        server = self.server
        # Port allocation: the main socket and the allocation sockets send
        # their first datagrams one after the other, before any other new
        # socket, so that their mappings are consecutive new mappings.
        allocation = [self.open() for _ in range(self.allocation_probes + 1)]
        main = allocation[0]
        start = self.now()
        bindings = [self.request(sock, server) for sock in allocation]

        first = await self._first_answer(bindings[0], start)
        if first is None:
            return NatReport("blocked", server=server, local=main.local, notes=tuple(self.notes))
        mapped = bindings[0].mapped
        assert mapped is not None
        rtt = first.elapsed
        answered = self.now()
        probe_wait = self.probe_wait or min(
            max(MIN_PROBE_WAIT, PROBE_WAIT_RTTS * rtt), self.timeout
        )
        answer_wait = max(
            probe_wait, min(max(MIN_ANSWER_WAIT, ANSWER_WAIT_RTTS * rtt), self.timeout)
        )
        other = self._other_address(first)

        waits: list[Deferred[Any]] = [b.wait(answered + answer_wait) for b in bindings[1:]]
        mapping_tests: list[Transaction] = []
        change_tests: list[Transaction] = []
        if other is not None:
            # Mapping (RFC 5780 section 4.3): the main socket asks the other
            # address, the other address and port, and the other port.
            mapping_tests = [
                self.request(main, destination)
                for destination in (
                    Endpoint(other.host, server.port),
                    other,
                    Endpoint(server.host, other.port),
                )
            ]
            # Filtering (RFC 5780 section 4.4): each CHANGE-REQUEST from a
            # fresh socket, whose only contact is the primary address.  A
            # filtered answer never arrives: these retransmit twice as often,
            # to be sent a few times within the wait.
            change_tests = [
                self.request(self.open(self.rto / 2), server, [change], match_source=False)
                for change in (ChangeRequest(True, True), ChangeRequest(False, True))
            ]
            waits += [t.wait(answered + answer_wait) for t in mapping_tests]
            waits += [t.wait(answered + probe_wait) for t in change_tests]
        hairpin = self.task(
            self._hairpin(
                main, mapped, allocation[1:], bindings[1:], answered + probe_wait, probe_wait
            )
        )
        (hairpins, *_) = await self.all([hairpin, *waits])

        mapping = filtering = None
        external = [mapped]
        if other is not None:
            to_other_ip, to_other, to_other_port = (t.mapped for t in mapping_tests)
            external += [a for a in (to_other_ip, to_other, to_other_port) if a is not None]
            mapping = classify_mapping(mapped, to_other_ip, to_other, to_other_port)
            if mapping is None:
                self.notes.append(
                    f"the server's other address {other} did not answer: mapping unknown"
                )
            filtering = self._filtering(
                change_tests,
                other,
                other_reaches_us=to_other is not None,
                other_port_reaches_us=to_other_port is not None,
            )
        binding_lifetime = None
        if lifetime:
            binding_lifetime = await self._lifetime(other, answer_wait, probe_wait)
        new_mappings = [
            None if b.mapped is None else (sock.local.port, b.mapped)
            for sock, b in zip(allocation, bindings, strict=True)
        ]
        kept = [m[1].port == m[0] for m in new_mappings if m is not None]
        return NatReport(
            "ok",
            mapping=mapping,
            filtering=filtering,
            hairpin=hairpins,
            port_preservation=all(kept) if kept else None,
            allocation=classify_allocation(new_mappings),
            external=tuple(dict.fromkeys(external)),
            nat=self._is_nat(main.local, mapped),
            server=server,
            other_address=other,
            local=main.local,
            rtt=rtt,
            lifetime=binding_lifetime,
            notes=tuple(self.notes),
        )

    async def _first_answer(self, binding: Transaction, start: float) -> StunResponse | None:
        """
        The answer to the main socket's first Binding request, or ``None``
        (and a note) when none came within the timeout.

        :raises DiscoveryError: when the request failed otherwise.
        """
        server = self.server
        (outcome,) = await self.all([binding.wait(start + self.timeout)])
        if outcome is None:
            self.notes.append(
                f"no answer from {server} within {self.timeout:g} s: the server is unreachable, "
                "or UDP is blocked on the way"
            )
            return None
        if isinstance(outcome, StunError):
            raise DiscoveryError(
                f"the STUN server {server} answered a plain Binding request with an error: "
                f"{outcome}"
            ) from outcome
        if not isinstance(outcome, StunResponse):
            raise DiscoveryError(f"could not send to the STUN server {server}: {outcome}") from (
                outcome
            )
        if binding.mapped is None:
            raise DiscoveryError(
                f"the STUN server {server} answered without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS"
            )
        return outcome

    def _other_address(self, response: StunResponse) -> Endpoint | None:
        """The server's OTHER-ADDRESS, when the RFC 5780 tests can use it."""
        server = self.server
        other = response.other_address
        if other is None:
            self.notes.append(
                f"{server} sent no OTHER-ADDRESS: mapping and filtering need a STUN server "
                "with two addresses (RFC 5780)"
            )
            return None
        other = match_key(other)
        family = ipaddress.ip_address(server.host).version
        if (
            ipaddress.ip_address(other.host).version != family
            or other.host == server.host
            or other.port == server.port
        ):
            self.notes.append(
                f"{server} gave {other} as its other address, which needs another IP address "
                "and port: mapping and filtering not tested"
            )
            return None
        return other

    def _filtering(
        self,
        change_tests: list[Transaction],
        other: Endpoint,
        *,
        other_reaches_us: bool,
        other_port_reaches_us: bool,
    ) -> Filtering | None:
        """
        Filtering from the CHANGE-REQUEST probes.  A response counts only
        when it came from exactly the address asked for: a server that
        ignores CHANGE-REQUEST must not make a NAT look open.
        """
        expected = (other, Endpoint(self.server.host, other.port))
        probes: list[FilterProbe] = []
        reasons: list[str] = []
        for request, source in zip(change_tests, expected, strict=True):
            outcome = request.outcome
            if outcome is None:
                probes.append(FilterProbe.SILENT)
            elif isinstance(outcome, StunResponse) and outcome.source == source:
                probes.append(FilterProbe.ANSWERED)
            else:
                probes.append(FilterProbe.INVALID)
                if isinstance(outcome, StunResponse):
                    reasons.append(
                        f"a CHANGE-REQUEST answer came from {outcome.source}, not {source}: "
                        "the server does not honour CHANGE-REQUEST"
                    )
                else:
                    reasons.append(f"a CHANGE-REQUEST failed: {outcome}")
        filtering = classify_filtering(
            probes[0], probes[1], other_reaches_us, other_port_reaches_us
        )
        if filtering is None:
            if not reasons:
                reasons.append(
                    "the server's other address or port did not answer a direct request, so "
                    "silence after a CHANGE-REQUEST proves nothing"
                )
            self.notes.extend(f"filtering unknown: {r}" for r in reasons)
        return filtering

    def _is_nat(self, local: Endpoint, mapped: Endpoint) -> bool:
        """Whether *mapped* is not this socket's own address."""
        if mapped.port != local.port:
            return True
        if not ipaddress.ip_address(self.interface).is_unspecified:
            return mapped != match_key((self.interface, local.port))
        # Bound to every interface: the mapped address is ours exactly
        # when a socket can be bound to it.
        try:
            self.listen(DatagramProtocol(), mapped.host)
        except CannotListenError:
            return True
        return False

    async def _hairpin(
        self,
        main: ProbeSocket,
        main_mapped: Endpoint,
        others: list[ProbeSocket],
        bindings: list[Transaction],
        until: float,
        wait: float,
    ) -> bool | None:
        """
        Hairpinning (RFC 5780 section 4.5): the main socket and another
        local socket send each other a Binding request at their external
        addresses; a NAT that hairpins delivers at least one of them.  Each
        sends to the other's external address, so that a filtering NAT lets
        the other's datagram in.  The other socket is the last allocation
        socket with a mapping by time *until* (they were all sent with the
        main socket's request, so they normally have one already).
        """
        await self.all([b.wait(until, give_up=False) for b in bindings])
        partners = [
            (s, b.mapped) for s, b in zip(others, bindings, strict=True) if b.mapped is not None
        ]
        if not partners:
            self.notes.append("no second socket got a mapping: hairpinning unknown")
            return None
        sock, sock_mapped = partners[-1]
        event: Deferred[None] = Deferred()
        tokens = self.token(), self.token()

        def seen(source: Endpoint) -> None:
            if not event.called:
                event.callback(None)

        main.watch(tokens[0], seen)
        sock.watch(tokens[1], seen)
        to_main = encode(Method.BINDING, MessageClass.REQUEST, tokens[0])
        to_sock = encode(Method.BINDING, MessageClass.REQUEST, tokens[1])

        def send() -> None:
            self.send(main, to_sock, sock_mapped)
            self.send(sock, to_main, main_mapped)

        try:
            return await self.probe(send, event, wait)
        finally:
            main.unwatch(tokens[0])
            sock.unwatch(tokens[1])

    async def _lifetime(
        self, other: Endpoint | None, answer_wait: float, probe_wait: float
    ) -> BindingLifetime:
        """
        Binding lifetime (RFC 5780 section 4.6): one fresh socket per idle
        time, all bound at once; after its idle time, another socket asks
        the server to answer at the first one's external port
        (RESPONSE-PORT).  The answer arrives only while the first socket's
        mapping lives, and is the only packet that mapping sees after its
        Binding.  An idle time of 0 checks that the method works here; the
        test ends at the first mapping found gone.
        """
        if other is None:
            self.notes.append("the binding lifetime test needs an RFC 5780 server (RESPONSE-PORT)")
            return BindingLifetime(None, None)
        assert self.lifetime_max is not None
        idle = [0.0, *(t for t in LIFETIME_STEPS if t < self.lifetime_max), self.lifetime_max]
        sockets = [self.open() for _ in idle]
        asker = self.open()
        bindings = [self.request(sock, self.server) for sock in sockets]
        now = self.now()
        await self.all([b.wait(now + answer_wait) for b in bindings])
        start = self.now()
        checks = [
            self.task(self._still_mapped(sock, binding.mapped, asker, start + t, probe_wait))
            for sock, binding, t in zip(sockets, bindings, idle, strict=True)
        ]
        at_least: float | None = None
        less_than: float | None = None
        for t, check in zip(idle, checks, strict=True):
            (alive,) = await self.all([check])
            if t == 0 and alive is not True:
                break
            if alive is False:
                less_than = t
                break
            if alive is True:
                at_least = t
        for check in checks:
            self.cancel_task(check)
        if at_least is None:
            self.notes.append(
                "the binding lifetime test did not work here (no answer through RESPONSE-PORT "
                "right after binding): lifetime unknown"
            )
            return BindingLifetime(None, None)
        return BindingLifetime(at_least, less_than)

    async def _still_mapped(
        self,
        sock: ProbeSocket,
        mapped: Endpoint | None,
        asker: ProbeSocket,
        at: float,
        wait: float,
    ) -> bool | None:
        """Whether *sock*'s mapping still lets the server's answer in at
        time *at*; ``None`` when it had no mapping."""
        if mapped is None:
            return None
        await self.all([self.until(at)])
        token = self.token()
        event: Deferred[None] = Deferred()

        def seen(source: Endpoint) -> None:
            if not event.called:
                event.callback(None)

        sock.watch(token, seen)
        request = encode(Method.BINDING, MessageClass.REQUEST, token, [ResponsePort(mapped.port)])
        try:
            return await self.probe(lambda: self.send(asker, request, self.server), event, wait)
        finally:
            sock.unwatch(token)


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds greater than 0, not {value!r}")


def _server_endpoint(server: tuple[str, int]) -> Endpoint:
    host, port = server[0], server[1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"STUN server {host!r} is not an IP address; resolve host names first"
        ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"STUN server port {port!r} is not a port number from 1 to 65535")
    return match_key((str(address), port))


def discover(
    reactor: Any,
    server: tuple[str, int],
    *,
    local_interface: str | None = None,
    timeout: float = 3.0,
    probe_wait: float | None = None,
    rto: float = 0.25,
    allocation_probes: int = 5,
    lifetime: bool = False,
    lifetime_max: float = 120.0,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> Deferred[NatReport]:
    """
    Find out what the NAT between this host and a STUN server does.

    All tests run at once, on separate sockets; see :doc:`/natcheck` for
    what each does.  With a lossless path and the server 50 ms away the
    whole check takes about half a second.

    :param reactor: Provides ``IReactorUDP`` and ``IReactorTime``.
    :param server: The STUN server's primary IP address (not a host name)
        and port.  An RFC 5780 server (two addresses, OTHER-ADDRESS) allows
        the mapping and filtering tests; with another server they report
        ``None``.
    :param local_interface: The local address to bind the sockets to; by
        default every address of the server's family.
    :param timeout: Seconds to wait for the server's first answer before
        reporting UDP blocked; also the cap on every later wait.
    :param probe_wait: Seconds a probe whose silence is the finding (the
        CHANGE-REQUEST filtering probes, hairpinning) waits after the first
        answer; by default four round trips, at least 0.25 s.
    :param rto: Initial STUN retransmission timeout in seconds (RFC 8489
        section 6.2.1).  Shorter than RFC 8489's 0.5 s by default: the check
        sends a handful of small requests once and must finish quickly.
    :param allocation_probes: New sockets bound after the main one to
        measure port allocation; at least 2.
    :param lifetime: Also measure the binding lifetime (RFC 5780 section
        4.6); this takes *lifetime_max* seconds more.
    :param lifetime_max: The longest idle time the lifetime test tries.
    :param random_bytes: Source of transaction ids and probe tokens.
    :returns: A Deferred that fires with a :class:`NatReport` (``udp`` is
        ``"blocked"`` when the server never answered), or fails with
        :class:`DiscoveryError`, or ``ValueError`` for a bad argument.
        Cancelling it stops every test; every socket and timer is released
        before it fires, in every case.
    """
    try:
        endpoint = _server_endpoint(server)
        for name, value in (("timeout", timeout), ("rto", rto), ("lifetime_max", lifetime_max)):
            _check_seconds(name, value)
        if probe_wait is not None:
            _check_seconds("probe_wait", probe_wait)
        if isinstance(allocation_probes, bool) or not (
            isinstance(allocation_probes, int) and 2 <= allocation_probes <= 64
        ):
            raise ValueError(
                f"allocation_probes must be an integer from 2 to 64, not {allocation_probes!r}"
            )
        family = ipaddress.ip_address(endpoint.host).version
        if local_interface is None:
            local_interface = "0.0.0.0" if family == 4 else "::"
        try:
            interface_family = ipaddress.ip_address(local_interface).version
        except ValueError:
            raise ValueError(f"local_interface {local_interface!r} is not an IP address") from None
        if interface_family != family:
            raise ValueError(
                f"local_interface {local_interface} and server {endpoint} are not of the "
                "same IP version"
            )
    except ValueError as e:
        return fail(e)
    session = _Discovery(
        reactor,
        endpoint,
        local_interface,
        timeout,
        probe_wait,
        rto,
        allocation_probes,
        lifetime_max if lifetime else None,
        random_bytes,
    )
    return Deferred.fromCoroutine(session.run(lifetime))
