"""Candidate priorities, pair classes and check order."""

from __future__ import annotations

import pytest

from nattraverse.punch.candidates import (
    Candidate,
    CandidateKind,
    PairClass,
    candidate_priority,
    form_pairs,
    pair_priority,
)

HOST_A = Candidate.host(("10.0.1.2", 4000))
HOST_B = Candidate.host(("10.0.1.3", 5000))
OTHER_LAN_B = Candidate.host(("10.0.2.3", 5000))
SRFLX_A = Candidate.server_reflexive(("203.0.113.1", 4000))
SRFLX_B_SAME = Candidate.server_reflexive(("203.0.113.1", 5000))
SRFLX_B = Candidate.server_reflexive(("203.0.113.2", 5000))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (CandidateKind.HOST, (126 << 24) | (65535 << 8) | 255),
        (CandidateKind.PEER_REFLEXIVE, (110 << 24) | (65535 << 8) | 255),
        (CandidateKind.SERVER_REFLEXIVE, (100 << 24) | (65535 << 8) | 255),
    ],
)
def test_candidate_priority(kind: CandidateKind, expected: int) -> None:
    """Priorities follow RFC 8445 section 5.1.2.1 with the recommended preferences."""
    assert candidate_priority(kind) == expected


def test_pair_priority_formula() -> None:
    """Pair priority is RFC 8445 section 6.1.2.3's formula."""
    assert pair_priority(5, 3) == (3 << 32) + 10 + 1
    assert pair_priority(3, 5) == (3 << 32) + 10


@pytest.mark.parametrize(
    ("local", "remote", "expected"),
    [
        # Behind one NAT: private first, then the hairpin through it.
        (
            [HOST_A, SRFLX_A],
            [HOST_B, SRFLX_B_SAME],
            [(HOST_B, PairClass.PRIVATE), (SRFLX_B_SAME, PairClass.HAIRPIN)],
        ),
        # Different NATs: public first, the unrelated private address last.
        (
            [HOST_A, SRFLX_A],
            [OTHER_LAN_B, SRFLX_B],
            [(SRFLX_B, PairClass.PUBLIC), (OTHER_LAN_B, PairClass.FOREIGN_PRIVATE)],
        ),
        # A public peer: its host address is its reflexive one; one pair.
        (
            [HOST_A, SRFLX_A],
            [
                Candidate.host(("198.51.100.7", 80)),
                Candidate.server_reflexive(("198.51.100.7", 80)),
            ],
            [(Candidate.host(("198.51.100.7", 80)), PairClass.PUBLIC)],
        ),
    ],
)
def test_pair_order(
    local: list[Candidate],
    remote: list[Candidate],
    expected: list[tuple[Candidate, PairClass]],
) -> None:
    """Pairs come private (shared public address), public, hairpin, foreign private."""
    pairs = form_pairs(local, remote, controlling=True)
    assert [(p.remote, p.pair_class) for p in pairs] == expected
    assert all(p.local == local[0] for p in pairs)


def test_pairs_skip_own_address() -> None:
    """A remote candidate equal to one of our own addresses forms no pair."""
    assert form_pairs([HOST_A, SRFLX_A], [SRFLX_A, SRFLX_B], controlling=False)[0].remote == SRFLX_B
    assert len(form_pairs([HOST_A, SRFLX_A], [SRFLX_A, SRFLX_B], controlling=False)) == 1


def test_pairs_need_a_host_candidate() -> None:
    """Without a local host candidate there is no base to pair from."""
    with pytest.raises(ValueError, match="host candidate"):
        form_pairs([SRFLX_A], [SRFLX_B], controlling=True)
