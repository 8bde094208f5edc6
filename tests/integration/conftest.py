"""
Fixtures shared by the integration tests (real sockets on loopback).
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def reactor() -> Any:
    """The global reactor, which pytest-twisted runs."""
    from twisted.internet import reactor

    return reactor
