"""
Reading Deferreds that have already fired, for deterministic unit tests
(a ``Clock``, in-memory transports): no reactor runs, so a test looks at
the result directly.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def results(d: Deferred[T]) -> list[T | Failure]:
    """What *d* has fired with so far: empty, or one result or failure."""
    out: list[T | Failure] = []
    d.addBoth(out.append)
    return out


def succeeded(d: Deferred[T]) -> T:
    """The result *d* already has; fails the test when it has none or failed."""
    out = results(d)
    assert out, "the Deferred has not fired"
    result = out[0]
    assert not isinstance(result, Failure), result.getTraceback()
    return result


def failure_of(d: Deferred[Any]) -> Failure:
    """The failure *d* already has; fails the test when it has none or succeeded."""
    out = results(d)
    assert out, "the Deferred has not fired"
    failure = out[0]
    assert isinstance(failure, Failure), f"the Deferred succeeded with {failure!r}"
    return failure


def failed(d: Deferred[Any], kind: type[E]) -> E:
    """The exception *d* already failed with, which must be a *kind*."""
    failure = failure_of(d)
    assert isinstance(failure.value, kind), failure.getTraceback()
    return failure.value
