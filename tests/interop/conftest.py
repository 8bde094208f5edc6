"""
Fixtures of the interop tests: our server and coturn, started on loopback
and always stopped, and the reactor for tests that run our client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import maybeDeferred

from tests.interop.helpers import (
    ALT_LOOPBACK,
    LOOPBACK,
    Coturn,
    Rendezvous,
    require_loopback_address,
    start_coturn,
    start_rendezvous,
)


@pytest.fixture(scope="module")
def rendezvous(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendezvous]:
    """``twistd natrendezvous`` on one address of 127.0.0.1 (no RFC 5780)."""
    with start_rendezvous(
        tmp_path_factory.mktemp("rendezvous"),
        "--stun-interface", LOOPBACK,
        "--stun-port", "0", "--alt-port", "0",
    ) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def rendezvous_rfc5780(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendezvous]:
    """``twistd natrendezvous`` on 127.0.0.1 and 127.0.0.2, two ports each (RFC 5780)."""
    require_loopback_address(ALT_LOOPBACK)
    with start_rendezvous(
        tmp_path_factory.mktemp("rendezvous-rfc5780"),
        "--stun-interface", LOOPBACK,
        "--stun-port", "0",
        "--alt-address", ALT_LOOPBACK,
        "--alt-port", "0",
    ) as server:  # fmt: skip
        yield server


@pytest.fixture
def coturn(require_program: Callable[[str], str], tmp_path: Path) -> Iterator[Coturn]:
    """coturn's ``turnserver``, STUN only, on 127.0.0.1."""
    server = start_coturn(require_program("turnserver"), tmp_path, (LOOPBACK,))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def coturn_rfc5780(require_program: Callable[[str], str], tmp_path: Path) -> Iterator[Coturn]:
    """coturn's ``turnserver``, STUN only, on 127.0.0.1 and 127.0.0.2 (RFC 5780)."""
    turnserver = require_program("turnserver")
    require_loopback_address(ALT_LOOPBACK)
    server = start_coturn(turnserver, tmp_path, (LOOPBACK, ALT_LOOPBACK))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted runs."""
    from twisted.internet import reactor

    return reactor


@pytest_twisted.async_yield_fixture
async def ports() -> AsyncIterator[list[Any]]:
    """Ports and connections a test opened; closed (and waited for) afterwards."""
    opened: list[Any] = []
    yield opened
    for port in opened:
        await maybeDeferred(port.stopListening)
