"""
NAT behaviour discovery (RFC 5780 section 4): what the NAT between this
host and a STUN server does, in RFC 4787 terms, for peer-to-peer
connectivity and for the ``natcheck`` command (:doc:`/natcheck`)::

    from nattraverse.discovery import discover

    report = await discover(reactor, ("192.0.2.1", 3478))
    print(report.mapping, report.filtering, report.rfc3489)
    print(json.dumps(report.to_json()))

:func:`discover` runs the tests; :class:`NatReport` holds what they found,
``None`` wherever they could not tell.  Its mapping and filtering are
``Mapping`` and ``Filtering`` values, the same classes the simulated NATs of
:mod:`nattraverse.testing` take.  The rules that turn probe results
into findings are pure functions (:func:`classify_mapping`,
:func:`classify_filtering`, :func:`classify_allocation`,
:func:`rfc3489_type`), usable without a reactor.
"""

from nattraverse._types import Filtering, Mapping
from nattraverse.discovery._probes import LIFETIME_STEPS, discover
from nattraverse.discovery._report import (
    MAX_SEQUENTIAL_STEP,
    Allocation,
    AllocationPattern,
    BindingLifetime,
    FilterProbe,
    NatReport,
    Rfc3489Type,
    classify_allocation,
    classify_filtering,
    classify_mapping,
    rfc3489_type,
)
from nattraverse.errors import DiscoveryError

__all__ = [
    "LIFETIME_STEPS",
    "MAX_SEQUENTIAL_STEP",
    "Allocation",
    "AllocationPattern",
    "BindingLifetime",
    "DiscoveryError",
    "FilterProbe",
    "Filtering",
    "Mapping",
    "NatReport",
    "Rfc3489Type",
    "classify_allocation",
    "classify_filtering",
    "classify_mapping",
    "discover",
    "rfc3489_type",
]
