"""
Candidates and candidate pairs for UDP hole punching, in the style of ICE
(RFC 8445 sections 5.1 and 6.1.2).

One punching socket serves every pair, so the local side of a pair is
always that socket's base (a host candidate), and pairs are pruned to one
per remote address (RFC 8445 section 6.1.2.4 prunes by base and remote
address; with one base that is the remote address alone).

Pairs are ordered by :class:`PairClass` first and by RFC 8445 pair priority
within a class:

1. :attr:`PairClass.PRIVATE`: host to host, when both peers share a public
   address (behind one NAT): the LAN path needs no NAT at all;
2. :attr:`PairClass.PUBLIC`: to the peer's server-reflexive (or
   peer-reflexive) address on another public address: plain punching;
3. :attr:`PairClass.HAIRPIN`: to a reflexive address on *our own* public
   address, which only an outer NAT that hairpins can deliver (peers behind
   several levels of NAT);
4. :attr:`PairClass.FOREIGN_PRIVATE`: host to host across different public
   addresses; it works only when both happen to share a private network
   (a VPN, a carrier's inner realm).  A host that answers there without
   the session's key is ignored by the checks.
5. :attr:`PairClass.PREDICTED`: to a predicted mapping of a peer behind a
   sequential symmetric NAT (:mod:`~nattraverse.punch.mapping`).  These
   are last in the paced order, but the check machine sends them all at
   once when it starts, before any other check.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nattraverse._types import Endpoint

__all__ = [
    "Candidate",
    "CandidateKind",
    "CandidatePair",
    "PairClass",
    "candidate_priority",
    "classify",
    "form_pairs",
    "gather",
    "pair_priority",
]


class CandidateKind(enum.Enum):
    """The candidate types of RFC 8445 section 5.1.1 (relayed ones excluded)."""

    HOST = "host"
    SERVER_REFLEXIVE = "srflx"
    PEER_REFLEXIVE = "prflx"
    #: Not from RFC 8445: a mapping the peer's sequential NAT is predicted
    #: to allocate (:func:`~nattraverse.punch.mapping.predicted_ports`).
    PREDICTED = "predicted"


#: Type preferences recommended by RFC 8445 section 5.1.2.2.
TYPE_PREFERENCE = {
    CandidateKind.HOST: 126,
    CandidateKind.PEER_REFLEXIVE: 110,
    CandidateKind.SERVER_REFLEXIVE: 100,
    CandidateKind.PREDICTED: 50,
}


def candidate_priority(
    kind: CandidateKind, local_preference: int = 65535, component: int = 1
) -> int:
    """
    A candidate's priority (RFC 8445 section 5.1.2.1):
    ``2**24 * type preference + 2**8 * local preference + (256 - component)``.
    """
    if not 0 <= local_preference <= 65535:
        raise ValueError(f"local preference {local_preference} is outside 0-65535")
    if not 1 <= component <= 256:
        raise ValueError(f"component {component} is outside 1-256")
    return (TYPE_PREFERENCE[kind] << 24) | (local_preference << 8) | (256 - component)


@dataclass(frozen=True, slots=True)
class Candidate:
    """
    A transport address a peer may be reached at.

    :ivar kind: Host, server-reflexive or peer-reflexive.
    :ivar address: The address.
    :ivar priority: Its RFC 8445 priority; :meth:`of` computes it.
    """

    kind: CandidateKind
    address: Endpoint
    priority: int

    @classmethod
    def of(
        cls, kind: CandidateKind, address: tuple[str, int], local_preference: int = 65535
    ) -> Candidate:
        """A candidate with the RFC 8445 recommended priority for its kind."""
        return cls(
            kind, Endpoint(address[0], address[1]), candidate_priority(kind, local_preference)
        )

    @classmethod
    def host(cls, address: tuple[str, int]) -> Candidate:
        """A host candidate: an address of the punching socket itself."""
        return cls.of(CandidateKind.HOST, address)

    @classmethod
    def server_reflexive(cls, address: tuple[str, int]) -> Candidate:
        """A server-reflexive candidate, as a STUN/rendezvous server observed it."""
        return cls.of(CandidateKind.SERVER_REFLEXIVE, address)

    @classmethod
    def predicted(cls, address: tuple[str, int]) -> Candidate:
        """A predicted candidate: a mapping the peer's NAT is expected to allocate."""
        return cls.of(CandidateKind.PREDICTED, address)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.address}"


class PairClass(enum.IntEnum):
    """How a pair reaches the peer; lower values are checked first."""

    PRIVATE = 0
    PUBLIC = 1
    HAIRPIN = 2
    FOREIGN_PRIVATE = 3
    PREDICTED = 4


def pair_priority(controlling: int, controlled: int) -> int:
    """
    The pair priority of RFC 8445 section 6.1.2.3, from the controlling
    and the controlled agent's candidate priorities.
    """
    g, d = controlling, controlled
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


@dataclass(frozen=True, slots=True)
class CandidatePair:
    """
    A local base and a remote candidate.

    :ivar local: The local host candidate (the punching socket).
    :ivar remote: The peer's candidate.
    :ivar pair_class: Where it stands in the check order.
    :ivar priority: The RFC 8445 pair priority.
    """

    local: Candidate
    remote: Candidate
    pair_class: PairClass
    priority: int

    def sort_key(self) -> tuple[int, int, str]:
        """The check order: class, then higher priority, then address."""
        return (self.pair_class, -self.priority, str(self.remote.address))

    def __str__(self) -> str:
        return f"{self.local.address} -> {self.remote} ({self.pair_class.name.lower()})"


def _family(host: str) -> int:
    return ipaddress.ip_address(host).version


def _reflexive_hosts(candidates: Iterable[Candidate]) -> set[str]:
    return {c.address.host for c in candidates if c.kind is not CandidateKind.HOST}


def classify(
    local: Sequence[Candidate], remote_candidates: Sequence[Candidate], remote: Candidate
) -> PairClass:
    """
    The :class:`PairClass` of a pair to *remote*, given every local
    candidate and every (known) remote candidate.
    """
    if remote.kind is CandidateKind.PREDICTED:
        return PairClass.PREDICTED
    ours = _reflexive_hosts(local)
    if remote.kind is CandidateKind.HOST:
        theirs = {c.address for c in remote_candidates if c.kind is not CandidateKind.HOST}
        if remote.address in theirs:
            # The peer's host address is its public address: no NAT there.
            return PairClass.HAIRPIN if remote.address.host in ours else PairClass.PUBLIC
        if ours & _reflexive_hosts(remote_candidates):
            return PairClass.PRIVATE
        return PairClass.FOREIGN_PRIVATE
    if remote.address.host in ours:
        return PairClass.HAIRPIN
    return PairClass.PUBLIC


def make_pair(
    base: Candidate,
    remote: Candidate,
    *,
    controlling: bool,
    local: Sequence[Candidate],
    remote_candidates: Sequence[Candidate],
) -> CandidatePair:
    """One pair from *base* to *remote*, classified and prioritised."""
    g, d = (base.priority, remote.priority) if controlling else (remote.priority, base.priority)
    return CandidatePair(
        base, remote, classify(local, remote_candidates, remote), pair_priority(g, d)
    )


def form_pairs(
    local: Sequence[Candidate], remote: Sequence[Candidate], *, controlling: bool
) -> list[CandidatePair]:
    """
    Every pair worth checking, in check order.

    The base is the first local host candidate.  Remote candidates of
    another address family, or equal to one of our own addresses, are
    left out; one pair is kept per remote address (the best ordered).

    :raises ValueError: when *local* has no host candidate.
    """
    bases = [c for c in local if c.kind is CandidateKind.HOST]
    if not bases:
        raise ValueError("no local host candidate: give the punching socket's address")
    base = bases[0]
    own = {c.address for c in local}
    best: dict[Endpoint, CandidatePair] = {}
    for candidate in remote:
        if candidate.address in own or _family(candidate.address.host) != _family(
            base.address.host
        ):
            continue
        pair = make_pair(
            base, candidate, controlling=controlling, local=local, remote_candidates=remote
        )
        kept = best.get(candidate.address)
        if kept is None or pair.sort_key() < kept.sort_key():
            best[candidate.address] = pair
    return sorted(best.values(), key=CandidatePair.sort_key)


def gather(
    port: int,
    hosts: Sequence[str],
    observed: tuple[str, int] | None,
    second: tuple[str, int] | None = None,
) -> list[Candidate]:
    """
    One side's candidates on its punching port: a host candidate per
    address in *hosts* (the port's local addresses), then the
    server-reflexive address *observed* by the rendezvous, when known, and
    the one its STUN service's *second* port observed, when known (even
    when equal: the two show how this side's NAT maps, see
    :func:`~nattraverse.punch.mapping.own_mapping`).  Without a usable host
    address (a peer on loopback only), the observed address is the base too.
    """
    found = [Candidate.host((host, port)) for host in hosts]
    if observed is not None:
        if not found:
            found.append(Candidate.host(observed))
        found.append(Candidate.server_reflexive(observed))
        if second is not None:
            found.append(Candidate.server_reflexive(second))
    return found
