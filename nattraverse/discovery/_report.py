"""
What NAT behaviour discovery found, and the pure rules that turn probe
results into findings (RFC 5780 section 4, RFC 4787 terms).

Nothing here touches a socket or a clock: :mod:`nattraverse.discovery._probes`
runs the probes and hands the results to these functions.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from nattraverse._types import Endpoint, Filtering, Mapping

__all__ = [
    "Allocation",
    "AllocationPattern",
    "BindingLifetime",
    "FilterProbe",
    "NatReport",
    "Rfc3489Type",
    "classify_allocation",
    "classify_filtering",
    "classify_mapping",
    "rfc3489_type",
]

#: The largest distance between consecutive new mappings still called
#: sequential; NATs that allocate sequentially step by 1 or 2, rarely more.
MAX_SEQUENTIAL_STEP = 64

#: A delta of up to this many steps is taken as a sequential NAT that gave
#: the ports in between to other traffic.
MAX_GAP_STEPS = 4


class AllocationPattern(enum.Enum):
    """How the NAT picks the external port of a new mapping."""

    #: The external port is the local port.
    PRESERVED = "preserved"
    #: Each new mapping gets the port *step* after the previous one.
    SEQUENTIAL = "sequential"
    #: No pattern: the next port cannot be predicted.
    RANDOM = "random"


class Rfc3489Type(enum.Enum):
    """The classic RFC 3489 (section 5) names, for display only."""

    OPEN = "open"
    FULL_CONE = "full-cone"
    RESTRICTED_CONE = "restricted-cone"
    PORT_RESTRICTED_CONE = "port-restricted-cone"
    SYMMETRIC = "symmetric"
    SYMMETRIC_UDP_FIREWALL = "symmetric-udp-firewall"
    BLOCKED = "blocked"


class FilterProbe(enum.Enum):
    """What came of a CHANGE-REQUEST probe (RFC 5780 section 4.4)."""

    #: A response arrived from exactly the changed address and port.
    ANSWERED = "answered"
    #: No response arrived within the wait.
    SILENT = "silent"
    #: A response that cannot be judged: from another source than the
    #: changed address, or an error response.  Never taken as a pass.
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Allocation:
    """
    The port allocation pattern: how the external ports of consecutive new
    mappings relate, which drives port prediction.

    :ivar pattern: ``None`` when too few mappings were seen.
    :ivar step: The distance between consecutive ports for
        :attr:`AllocationPattern.SEQUENTIAL`, else ``None``.
    """

    pattern: AllocationPattern | None = None
    step: int | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"pattern": ..., "step": ...}``."""
        return {
            "pattern": None if self.pattern is None else self.pattern.value,
            "step": self.step,
        }


@dataclass(frozen=True, slots=True)
class BindingLifetime:
    """
    How long an idle mapping survived (RFC 5780 section 4.6): it was still
    there after :attr:`at_least` seconds and gone after :attr:`less_than`.

    :ivar at_least: The longest idle time after which the mapping still
        worked; ``None`` when the test could not run (the server has no
        RESPONSE-PORT, or the NAT gave the probing socket another address).
    :ivar less_than: The shortest idle time after which it was gone;
        ``None`` when it outlived the longest time tried.
    """

    at_least: float | None
    less_than: float | None

    def to_json(self) -> dict[str, Any] | None:
        """``{"at_least": ..., "less_than": ...}``, or ``None`` when the
        test could not run."""
        if self.at_least is None:
            return None
        return {"at_least": self.at_least, "less_than": self.less_than}


@dataclass(frozen=True, slots=True)
class NatReport:
    """
    What :func:`~nattraverse.discovery.discover` found.

    ``None`` in a finding means "could not tell"; :attr:`notes` says why.

    :ivar udp: ``"ok"`` when the server answered, ``"blocked"`` when it did
        not (the server is down, or UDP is blocked on the way).
    :ivar mapping: Mapping behaviour (RFC 5780 section 4.3); needs a server
        with two addresses.
    :ivar filtering: Filtering behaviour (RFC 5780 section 4.4); needs a
        server with two addresses.
    :ivar hairpin: Whether a datagram sent to this host's external address
        from another local socket came back in (RFC 5780 section 4.5).
    :ivar port_preservation: Whether every new mapping kept its local port.
    :ivar allocation: The port allocation pattern of consecutive new
        mappings.
    :ivar external: The distinct external addresses the server saw the main
        socket at, first the one the primary address saw.
    :ivar nat: Whether there is a NAT (the external address is not this
        host's); ``None`` when UDP is blocked.
    :ivar server: The primary server address.
    :ivar other_address: The server's OTHER-ADDRESS (RFC 5780 section
        7.4), when it has one.
    :ivar local: The main socket's local address.
    :ivar rtt: Seconds from the first request to its response.
    :ivar lifetime: The binding lifetime, when the test was asked for
        (RFC 5780 section 4.6).
    :ivar notes: Why findings are unknown, or other caveats, in words.
    """

    udp: Literal["ok", "blocked"]
    mapping: Mapping | None = None
    filtering: Filtering | None = None
    hairpin: bool | None = None
    port_preservation: bool | None = None
    allocation: Allocation = Allocation()
    external: tuple[Endpoint, ...] = ()
    nat: bool | None = None
    server: Endpoint | None = None
    other_address: Endpoint | None = None
    local: Endpoint | None = None
    rtt: float | None = None
    lifetime: BindingLifetime | None = None
    notes: tuple[str, ...] = ()

    @property
    def rfc3489(self) -> Rfc3489Type:
        """The RFC 3489 name derived from the findings (see
        :func:`rfc3489_type`)."""
        return rfc3489_type(self.udp == "ok", self.nat, self.mapping, self.filtering)

    def to_json(self) -> dict[str, Any]:
        """
        The report as a JSON object: exactly the keys ``udp``, ``mapping``,
        ``filtering``, ``hairpin``, ``port_preservation``, ``allocation``,
        ``external`` and ``rfc3489``, and ``lifetime`` when the lifetime test
        was asked for.
        """
        out: dict[str, Any] = {
            "udp": self.udp,
            "mapping": None if self.mapping is None else self.mapping.value,
            "filtering": None if self.filtering is None else self.filtering.value,
            "hairpin": self.hairpin,
            "port_preservation": self.port_preservation,
            "allocation": self.allocation.to_json(),
            "external": [str(e) for e in self.external],
            "rfc3489": self.rfc3489.value,
        }
        if self.lifetime is not None:
            out["lifetime"] = self.lifetime.to_json()
        return out


def classify_mapping(
    first: Endpoint,
    other_ip: Endpoint | None,
    other_both: Endpoint | None,
    other_port: Endpoint | None = None,
) -> Mapping | None:
    """
    Mapping behaviour from the external addresses one socket got (RFC 5780
    section 4.3).

    :param first: Mapped address from the primary address and port.
    :param other_ip: From the other address and the primary port (test II).
    :param other_both: From the other address and the other port (test III).
    :param other_port: From the primary address and the other port, when
        known: a NAT that maps per port shows it here too.
    :returns: ``None`` unless tests II and III were both answered.
    """
    if other_ip is None or other_both is None:
        return None
    if other_port is not None and other_port != first:
        # Same IP, another port, another mapping: port-dependent however
        # the other tests came out.
        return Mapping.ADDRESS_AND_PORT_DEPENDENT
    if other_ip == first and other_both == first:
        return Mapping.ENDPOINT_INDEPENDENT
    if other_both == other_ip:
        return Mapping.ADDRESS_DEPENDENT
    return Mapping.ADDRESS_AND_PORT_DEPENDENT


def classify_filtering(
    change_both: FilterProbe,
    change_port: FilterProbe,
    other_reaches_us: bool,
    other_port_reaches_us: bool,
) -> Filtering | None:
    """
    Filtering behaviour from two CHANGE-REQUEST probes, each sent from a
    fresh socket (RFC 5780 section 4.4).

    Silence counts only when the server showed that the socket it would
    have answered from can reach us: a broken alternate socket must not
    look like a strict NAT.

    :param change_both: The probe asking for the answer from the other
        address and port (test II).
    :param change_port: The probe asking for the answer from the other port
        only (test III).
    :param other_reaches_us: The server's other address and port answered a
        request sent to it directly.
    :param other_port_reaches_us: The primary address with the other port
        answered a request sent to it directly.
    """
    if change_both is FilterProbe.ANSWERED:
        return Filtering.ENDPOINT_INDEPENDENT
    if change_both is FilterProbe.INVALID or not other_reaches_us:
        return None
    if change_port is FilterProbe.ANSWERED:
        return Filtering.ADDRESS_DEPENDENT
    if change_port is FilterProbe.INVALID or not other_port_reaches_us:
        return None
    return Filtering.ADDRESS_AND_PORT_DEPENDENT


def _signed_delta(a: int, b: int) -> int:
    """``b - a`` as a port distance, wrapping around 65536."""
    delta = (b - a) % 65536
    return delta - 65536 if delta >= 32768 else delta


def _sequential_step(ports: Sequence[int | None]) -> int | None:
    """
    The step of a sequential run of ports, or ``None``: most deltas between
    neighbours are one small step and the others a few steps (ports given
    to other traffic in between).  Across ``None`` entries (mappings not
    seen, which took ports too) the delta is divided by the distance.
    """
    known = [(i, port) for i, port in enumerate(ports) if port is not None]
    deltas = []
    for (i, before), (j, after) in itertools.pairwise(known):
        delta = _signed_delta(before, after)
        deltas.append(delta // (j - i) if delta % (j - i) == 0 else delta)
    if len(deltas) < 2:
        return None
    step, count = Counter(deltas).most_common(1)[0]
    if (
        step != 0
        and abs(step) <= MAX_SEQUENTIAL_STEP
        and count * 2 > len(deltas)
        and all(d % step == 0 and 1 <= d // step <= MAX_GAP_STEPS for d in deltas)
    ):
        return step
    return None


def classify_allocation(mappings: Sequence[tuple[int, Endpoint] | None]) -> Allocation:
    """
    The allocation pattern of consecutive new mappings.

    :param mappings: For each new socket, in the order their first datagrams
        left, its local port and mapped address; ``None`` for a socket whose
        mapping is unknown.
    :returns: :attr:`~AllocationPattern.PRESERVED` when every mapping kept
        its local port; :attr:`~AllocationPattern.SEQUENTIAL` with its step
        when the ports in the order sent form a run of one small step
        (:func:`_sequential_step`), or, since jitter and retransmission may
        have reordered the first datagrams on their way, when every mapping
        is known and the ports sorted do (the step is then positive);
        :attr:`~AllocationPattern.RANDOM` otherwise, or when the mappings
        are on different external IP addresses; no pattern with fewer than
        three mappings.
    """
    known = [m for m in mappings if m is not None]
    if len(known) < 3:
        return Allocation()
    if all(local == mapped.port for local, mapped in known):
        return Allocation(AllocationPattern.PRESERVED)
    if len({mapped.host for _, mapped in known}) > 1:
        return Allocation(AllocationPattern.RANDOM)
    step = _sequential_step([None if m is None else m[1].port for m in mappings])
    if step is None and len(known) == len(mappings):
        step = _sequential_step(sorted(mapped.port for _, mapped in known))
    if step is None:
        return Allocation(AllocationPattern.RANDOM)
    return Allocation(AllocationPattern.SEQUENTIAL, step)


def rfc3489_type(
    udp: bool, nat: bool | None, mapping: Mapping | None, filtering: Filtering | None
) -> Rfc3489Type:
    """
    The RFC 3489 name of RFC 4787 behaviours, for display only.

    Unknown behaviours are taken at their most restrictive, so the name
    never promises more than was seen: with no NAT, only seen
    endpoint-independent filtering makes ``open`` (otherwise
    ``symmetric-udp-firewall``); behind a NAT, an unknown mapping makes
    ``symmetric`` and an unknown filtering ``port-restricted-cone``.
    """
    if not udp:
        return Rfc3489Type.BLOCKED
    eif = filtering is Filtering.ENDPOINT_INDEPENDENT
    if nat is False:
        return Rfc3489Type.OPEN if eif else Rfc3489Type.SYMMETRIC_UDP_FIREWALL
    if mapping is not Mapping.ENDPOINT_INDEPENDENT:
        return Rfc3489Type.SYMMETRIC
    if eif:
        return Rfc3489Type.FULL_CONE
    if filtering is Filtering.ADDRESS_DEPENDENT:
        return Rfc3489Type.RESTRICTED_CONE
    return Rfc3489Type.PORT_RESTRICTED_CONE
