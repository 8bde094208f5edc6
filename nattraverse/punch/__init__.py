"""
UDP hole punching: ICE-style connectivity checks (RFC 8445 style) between
two introduced peers.  :mod:`~nattraverse.punch.candidates` holds the
value types and pair order, :mod:`~nattraverse.punch.checks` the pure
check machine, :mod:`~nattraverse.punch.agent` its Twisted adapter, and
:mod:`~nattraverse.punch.port` the punching UDP port that routes checks
and QUIC between the sessions sharing it (imported on its own: it needs
aioquic).
"""

from nattraverse.errors import PunchChecksFailed
from nattraverse.punch.agent import IceAgent
from nattraverse.punch.candidates import Candidate, CandidateKind, CandidatePair, PairClass, gather
from nattraverse.punch.checks import (
    CheckConfig,
    CheckMachine,
    CheckStats,
    IceCredentials,
    PairState,
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
    "gather",
]
