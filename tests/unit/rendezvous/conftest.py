"""
Fixtures shared by the rendezvous client and registration tests: a key, a
clock, and the in-memory network with a fake rendezvous on it.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from nattraverse.identity import Identity
from tests.unit.rendezvous.rendezvous_fakes import Handler, Network


@pytest.fixture(scope="module")
def identity() -> Identity:
    """This peer's key (one per test module: generating keys is slow)."""
    return Identity.generate()


@pytest.fixture
def clock() -> Clock:
    """The injected clock."""
    return Clock()


@pytest.fixture
def network(clock: Clock) -> Network:
    """The in-memory network to the fake rendezvous."""
    return Network(clock)


@pytest.fixture
def handler() -> Handler:
    """A callee-side handler that records what the server asks of it."""
    return Handler()
