"""
How a peer's NAT maps, from the two addresses the rendezvous observed its
punching socket at (its STUN service's primary and second port, bound in
that order), and which of the peer's next mappings to probe (port
prediction).  Pure: no I/O, no clock.

Equal addresses mean the NAT maps independently of the destination (RFC
4787 endpoint-independent mapping): plain punching reaches that mapping.
Different addresses mean it maps per destination (symmetric): the mapping
towards us is a new one, which plain punching cannot know.  When the two
ports are a small step apart, the NAT allocates sequentially and that new
mapping is likely one of the next few steps (:func:`predicted_ports`);
otherwise its ports are random and only birthday-paradox probing or a
relay can help.

**Which ports to probe.**  Let the peer's last observed port be ``b`` and
its step ``s``.  The peer's next new mappings are ``b + s``, ``b + 2s``...,
each a little later than measured (its other traffic takes ports too:
*offsets*).  A side whose own NAT maps independently of the destination
probes the window ``b + k s`` for ``k = 1..W`` (:data:`WINDOW`): the peer's
check towards our one mapping opens one of them, and our probe to it
passes the peer's NAT.  When both NATs allocate sequentially, every probe
opens a new mapping on the sender too, so a probe passes only where a flow
of each side names the other's source: with the callee probing ``a + k s_a``
(``k = 1..W``) straight and the caller probing ``b + (2k - 1) s_b``
(``k = 1..G + 1``, :data:`TOLERANCE` ``= G``), the caller's ``k``-th probe
meets the callee's ``(k + d_a)``-th one exactly when ``k - 1`` equals the
sum of the two sides' offsets ``d_a + d_b``; so any offsets summing to at
most ``G`` give one matching pair, provided each side sends its probes
before anything else it sends (:class:`~nattraverse.punch.checks.CheckMachine`
sends predicted pairs first, at once).

**TCP.**  The same NAT numbers its TCP mappings the same way, from the
same counter or from one of their own: a TCP punching side probes the
window ``t + k s`` after the peer's TCP punching port's observed mapping
``t`` and the window ``b + k s`` after its latest UDP mapping ``b``
(:func:`predicted_tcp_ports`).  Only a side whose own NAT maps independently
of the destination probes: its one mapping is what the sequential peer's
``connect()`` goes to, and the probe that matches the peer's new mapping
completes a simultaneous open.  Two sequential sides would need the
strided, strictly ordered probes of UDP, which a port's ``connect()`` calls
and their kernel retransmissions cannot keep: not attempted over TCP.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from nattraverse._types import Endpoint
from nattraverse.discovery import MAX_SEQUENTIAL_STEP
from nattraverse.punch.candidates import Candidate, CandidateKind

__all__ = [
    "TOLERANCE",
    "WINDOW",
    "MappingKind",
    "NatMapping",
    "beyond_prediction",
    "describe_pair",
    "infer_mapping",
    "own_mapping",
    "predicted_ports",
    "predicted_tcp_ports",
]

#: The sum of both sides' offsets (ports taken by other traffic since
#: the measurement) that prediction between two sequential NATs tolerates.
TOLERANCE = 15
#: How many of a sequential peer's next ports a side probes (when its own
#: NAT maps independently, or as the callee of two sequential sides).
WINDOW = 2 * TOLERANCE + 1


class MappingKind(enum.Enum):
    """How a NAT maps, as far as two observations tell."""

    #: One mapping for every destination (the two observations agree).
    INDEPENDENT = "independent"
    #: A new mapping per destination, its port a small step after the last.
    SEQUENTIAL = "sequential"
    #: A new mapping per destination, at a port that cannot be predicted.
    RANDOM = "random"
    #: Not known: the rendezvous observed the socket at one port only.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class NatMapping:
    """
    A peer's NAT mapping behaviour.

    :ivar kind: What the observations show.
    :ivar last: The later observed mapping (at the second port), when known.
    :ivar step: The port step between new mappings (``SEQUENTIAL`` only;
        0 otherwise).
    """

    kind: MappingKind
    last: Endpoint | None = None
    step: int = 0

    @property
    def per_destination(self) -> bool:
        """Whether the NAT maps per destination ("symmetric")."""
        return self.kind in (MappingKind.SEQUENTIAL, MappingKind.RANDOM)

    def describe(self) -> str:
        """In words, for failure messages and reports."""
        if self.kind is MappingKind.INDEPENDENT:
            return "a NAT (or none) that maps independently of the destination"
        if self.kind is MappingKind.SEQUENTIAL:
            return f"a symmetric NAT that allocates ports sequentially (step {self.step:+d})"
        if self.kind is MappingKind.RANDOM:
            return "a symmetric NAT that allocates random ports"
        return "a NAT whose mapping is not known (observed at one port only)"


def _signed_delta(before: int, after: int) -> int:
    """``after - before`` as a port distance, wrapping around 65536."""
    delta = (after - before) % 65536
    return delta - 65536 if delta >= 32768 else delta


def infer_mapping(primary: Endpoint | None, second: Endpoint | None) -> NatMapping:
    """
    The mapping behaviour shown by a socket observed at *primary* (first)
    and at *second* (next, towards the STUN service's second port).

    Equal: independent.  Same host, ports at most
    :data:`~nattraverse.discovery.MAX_SEQUENTIAL_STEP` apart: sequential
    with that step (two observations cannot tell a step of 2 from a step
    of 1 with a port given to other traffic in between; the prediction
    window absorbs the difference).  Otherwise random; unknown when either
    is missing.
    """
    if primary is None or second is None:
        return NatMapping(MappingKind.UNKNOWN, second or primary)
    if primary == second:
        return NatMapping(MappingKind.INDEPENDENT, second)
    if primary.host == second.host:
        step = _signed_delta(primary.port, second.port)
        if 0 < abs(step) <= MAX_SEQUENTIAL_STEP:
            return NatMapping(MappingKind.SEQUENTIAL, second, step)
    return NatMapping(MappingKind.RANDOM, second)


def predicted_ports(peer: NatMapping, own: NatMapping, *, caller: bool) -> list[Endpoint]:
    """
    The peer's predicted next mappings this side probes, in the order to
    probe them (see the module docstring); empty unless *peer* allocates
    sequentially.  Ports outside 1-65535 are left out.

    :param peer: The peer's mapping.
    :param own: This side's mapping.
    :param caller: Whether this side is the caller (it takes the strided
        sequence when both sides are sequential).
    """
    if peer.kind is not MappingKind.SEQUENTIAL or peer.last is None:
        return []
    base, step = peer.last, peer.step
    if own.kind is MappingKind.SEQUENTIAL and caller:
        offsets = [2 * k - 1 for k in range(1, TOLERANCE + 2)]
    else:
        offsets = list(range(1, WINDOW + 1))
    ports = [base.port + k * step for k in offsets]
    return [Endpoint(base.host, port) for port in ports if 0 < port < 65536]


def predicted_tcp_ports(observed: Endpoint, peer: NatMapping, own: NatMapping) -> list[Endpoint]:
    """
    The TCP ports this side probes after a sequential peer's, in order (see
    the module docstring): the :data:`WINDOW` next steps after *observed*,
    the peer's TCP punching port's mapping as the rendezvous observed it,
    and, when *peer*'s latest UDP mapping is on the same host, after that
    one too, interleaved, without repeats, *observed* itself and ports
    outside 1-65535 left out.  Empty unless *peer* allocates sequentially
    and this side's NAT does not map per destination.

    :param observed: The peer's TCP punching port's public mapping.
    :param peer: The peer's NAT mapping, as its UDP binding showed it.
    :param own: This side's.
    """
    if peer.kind is not MappingKind.SEQUENTIAL or own.per_destination:
        return []
    step = peer.step
    bases = [observed.port]
    if peer.last is not None and peer.last.host == observed.host:
        bases.append(peer.last.port)
    ports = [base + k * step for k in range(1, WINDOW + 1) for base in bases]
    unique = dict.fromkeys(port for port in ports if 0 < port < 65536 and port != observed.port)
    return [Endpoint(observed.host, port) for port in unique]


def own_mapping(local: Sequence[Candidate]) -> NatMapping:
    """
    This side's mapping, from its candidates as
    :func:`~nattraverse.punch.candidates.gather` lists them: the first
    server-reflexive one observed at the primary port, the second (if any)
    at the second port.
    """
    observed = [c.address for c in local if c.kind is CandidateKind.SERVER_REFLEXIVE]
    return infer_mapping(
        observed[0] if observed else None, observed[1] if len(observed) > 1 else None
    )


def beyond_prediction(ours: NatMapping, theirs: NatMapping) -> str | None:
    """
    Why no direct UDP path between these two NATs can be found, or ``None``
    when one may be: both map per destination and at least one allocates
    random ports (prediction needs sequential ports on both; birthday
    probing needs one side that maps independently).
    """
    if not (ours.per_destination and theirs.per_destination):
        return None
    if MappingKind.RANDOM not in (ours.kind, theirs.kind):
        return None
    return (
        "both NATs map per destination and "
        + ("both allocate" if ours.kind is theirs.kind else "one allocates")
        + " random ports, so no direct UDP path can be predicted"
    )


def describe_pair(ours: NatMapping, theirs: NatMapping) -> str:
    """Both sides' mappings in words, for reports."""
    return f"this side is behind {ours.describe()}; the peer behind {theirs.describe()}"
