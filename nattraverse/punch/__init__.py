"""
UDP hole punching: ICE-style connectivity checks (RFC 8445 style) between
two introduced peers.  :mod:`~nattraverse.punch.candidates` holds the
value types and pair order, :mod:`~nattraverse.punch.checks` the pure
check machine, :mod:`~nattraverse.punch.agent` its Twisted adapter.
"""

from nattraverse.punch.agent import IceAgent, punch
from nattraverse.punch.candidates import Candidate, CandidateKind, CandidatePair, PairClass
from nattraverse.punch.checks import (
    CheckConfig,
    CheckMachine,
    CheckStats,
    IceCredentials,
    PairState,
    PunchChecksFailed,
)

__all__ = [
    "Candidate",
    "CandidateKind",
    "CandidatePair",
    "CheckConfig",
    "CheckMachine",
    "CheckStats",
    "IceAgent",
    "IceCredentials",
    "PairClass",
    "PairState",
    "PunchChecksFailed",
    "punch",
]
