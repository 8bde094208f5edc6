"""
Fixtures of the lab tests: a fresh :class:`~tests.natlab.Lab` per test,
always removed, after one sweep per session of what crashed runs left.
Every fixture here builds on ``require_lab`` (tests/conftest.py), so
without root or network namespaces the tests skip saying why, and under
``CI=true`` such a skip fails the run.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.natlab import Lab, LabUnavailable, PublicHost, Reflector, _impair, sweep_stale_labs
from tests.natlab._netns import program

#: The two addresses of the lab's RFC 5780 style server.
SERVER_ADDRESSES = ("192.0.2.10", "192.0.2.11")


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, Any, Any]:
    """A lab that cannot be built here (a missing program) skips the test, saying why."""
    try:
        return (yield)
    except LabUnavailable as e:
        pytest.skip(str(e))


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any]) -> Generator[None, Any, Any]:
    """The same for fixtures that build labs."""
    try:
        return (yield)
    except LabUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def stale_labs_swept() -> None:
    """Remove, once per session, lab namespaces that dead runs left over 10 minutes ago."""
    sweep_stale_labs()


@pytest.fixture
def lab(require_lab: None, stale_labs_swept: None) -> Iterator[Lab]:
    """An empty lab, removed after the test whatever its outcome."""
    with Lab() as new:
        yield new


@pytest.fixture
def server(lab: Lab) -> PublicHost:
    """A public host with two addresses, 192.0.2.10 and 192.0.2.11."""
    return lab.public_host("server", SERVER_ADDRESSES)


@pytest.fixture
def reflector(server: PublicHost) -> Reflector:
    """Four UDP sockets of :func:`server`: both addresses, the same two ports."""
    return Reflector(server)


@pytest.fixture
def require_delay(lab: Lab) -> None:
    """
    Skip unless links can be delayed here: ``tc netem``, or else
    ``iptables`` (Debian package iptables) for the NFQUEUE wire and the
    delayer ``tests/natlab/nfqueue.py``.
    """
    if lab.impairment_method() == _impair.NETEM:
        return
    if not os.path.isabs(program("iptables-restore")):
        pytest.skip(
            "needs iptables-restore (Debian package iptables) for delayed links: this "
            "kernel's nftables cannot queue to NFQUEUE, iptables' NFQUEUE target can"
        )
    try:
        import tests.natlab.nfqueue  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs the delayer tests/natlab/nfqueue.py: {e}")
