"""
natcheck on the real reactor, on loopback: the project's STUN server in this
process (RFC 5780 on 127.0.0.1 and 127.0.0.2, or one address), discovery in
process and the ``natcheck`` command as a subprocess.  No NAT is on the way,
so the host is open.  No traffic leaves the host.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from nattraverse._types import Endpoint
from nattraverse.discovery import (
    Allocation,
    AllocationPattern,
    Filtering,
    Mapping,
    Rfc3489Type,
    discover,
)
from nattraverse.stun.server import StunServer

ROOT = Path(__file__).resolve().parent.parent.parent
LOCALHOST = "127.0.0.1"
SECOND = "127.0.0.2"
JSON_KEYS = {
    "udp",
    "mapping",
    "filtering",
    "hairpin",
    "port_preservation",
    "allocation",
    "external",
    "rfc3489",
}


def _second_address() -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((SECOND, 0))
    except OSError:
        pytest.skip(f"{SECOND} is not a local address here")


async def _serve(reactor: Any, rfc5780: bool) -> AsyncIterator[Endpoint]:
    if rfc5780:
        _second_address()
    server = StunServer(
        reactor,
        interface=LOCALHOST,
        port=0,
        alt_address=SECOND if rfc5780 else None,
        alt_port=0,
        tcp=False,
    )
    server.startService()
    try:
        yield server.endpoint()
    finally:
        await server.stopService()


@pytest_twisted.async_yield_fixture
async def rfc5780_server(reactor: Any) -> AsyncIterator[Endpoint]:
    """An RFC 5780 STUN server on 127.0.0.1 and 127.0.0.2; its primary address."""
    async for endpoint in _serve(reactor, rfc5780=True):
        yield endpoint


@pytest_twisted.async_yield_fixture
async def plain_server(reactor: Any) -> AsyncIterator[Endpoint]:
    """A one-address STUN server on 127.0.0.1; its address."""
    async for endpoint in _serve(reactor, rfc5780=False):
        yield endpoint


async def natcheck(*argv: str) -> tuple[int, str, str]:
    """Run the natcheck command: its status, stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "nattraverse.natcheck", *argv], env=env, path=str(ROOT)
    )
    return code, out.decode(), err.decode()


@pytest_twisted.ensureDeferred
async def test_discover_open_host(reactor: Any, rfc5780_server: Endpoint) -> None:
    """In process: no NAT, everything endpoint-independent, open; no socket left."""
    readers = len(reactor.getReaders())
    report = await discover(reactor, rfc5780_server, local_interface=LOCALHOST)
    assert report.udp == "ok"
    assert report.nat is False
    assert report.mapping is Mapping.ENDPOINT_INDEPENDENT
    assert report.filtering is Filtering.ENDPOINT_INDEPENDENT
    assert report.port_preservation is True
    assert report.allocation == Allocation(AllocationPattern.PRESERVED)
    assert report.hairpin is True
    assert report.rfc3489 is Rfc3489Type.OPEN
    assert report.other_address == Endpoint(SECOND, report.other_address.port)  # type: ignore[union-attr]
    assert report.external == (report.local,)
    assert len(reactor.getReaders()) == readers


@pytest_twisted.ensureDeferred
async def test_discover_all_interfaces(reactor: Any, rfc5780_server: Endpoint) -> None:
    """Bound to 0.0.0.0, the mapped 127.0.0.1 is found to be this host's own."""
    report = await discover(reactor, rfc5780_server)
    assert report.nat is False
    assert report.rfc3489 is Rfc3489Type.OPEN


@pytest_twisted.ensureDeferred
async def test_discover_cancelled(reactor: Any) -> None:
    """Cancelled while waiting for a silent server: CancelledError, every socket closed."""
    readers = len(reactor.getReaders())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOCALHOST, 0))
        d = discover(reactor, Endpoint(LOCALHOST, silent.getsockname()[1]))
        await deferLater(reactor, 0.2)
        assert len(reactor.getReaders()) > readers
        d.cancel()
        with pytest.raises(CancelledError):
            await d
    assert len(reactor.getReaders()) == readers


@pytest_twisted.ensureDeferred
async def test_natcheck_json(rfc5780_server: Endpoint) -> None:
    """natcheck --json: one object, exactly the keys, an open host, status 0."""
    code, out, err = await natcheck("--json", str(rfc5780_server))
    assert code == 0, err
    (line,) = out.splitlines()
    result = json.loads(line)
    assert set(result) == JSON_KEYS
    assert result["udp"] == "ok"
    assert result["mapping"] == "endpoint-independent"
    assert result["filtering"] == "endpoint-independent"
    assert result["hairpin"] is True
    assert result["port_preservation"] is True
    assert result["allocation"] == {"pattern": "preserved", "step": None}
    assert result["rfc3489"] == "open"
    (external,) = result["external"]
    assert external.startswith("127.0.0.1:")
    assert err == ""


@pytest_twisted.ensureDeferred
async def test_natcheck_report(rfc5780_server: Endpoint) -> None:
    """natcheck prints the report a person reads, status 0."""
    code, out, err = await natcheck("--interface", LOCALHOST, str(rfc5780_server))
    assert code == 0, err
    assert out.startswith(f"STUN server {rfc5780_server}, other address {SECOND}:")
    assert "NAT                none: the server sees this host's own address 127.0.0.1:" in out
    assert "Mapping            endpoint-independent" in out
    assert "Filtering          endpoint-independent" in out
    assert "Port preservation  yes" in out
    assert "RFC 3489 type      open" in out


@pytest_twisted.ensureDeferred
async def test_natcheck_one_address(plain_server: Endpoint) -> None:
    """A one-address server: a degraded report, status 0."""
    code, out, err = await natcheck("--json", str(plain_server))
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == JSON_KEYS
    assert result["udp"] == "ok"
    assert (result["mapping"], result["filtering"]) == (None, None)
    assert result["port_preservation"] is True
    assert result["rfc3489"] == "symmetric-udp-firewall"


@pytest_twisted.ensureDeferred
async def test_natcheck_unreachable() -> None:
    """No server: status 1 and a clear message, within the timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        # A bound socket that never answers: the port is certainly not served.
        silent.bind((LOCALHOST, 0))
        port = silent.getsockname()[1]
        start = time.monotonic()
        code, out, err = await natcheck("--timeout", "1", f"{LOCALHOST}:{port}")
        took = time.monotonic() - start
    assert code == 1
    assert out == ""
    assert f"no answer from 127.0.0.1:{port} within 1 s" in err
    # One second of waiting, plus starting Python.
    assert took < 10


@pytest_twisted.ensureDeferred
async def test_natcheck_bad_usage() -> None:
    """Bad arguments: status 2."""
    code, _, err = await natcheck("--timeout", "-1", LOCALHOST)
    assert code == 2
    assert "--timeout" in err
