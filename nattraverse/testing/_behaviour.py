"""
What a simulated NAT does: the RFC 4787 behaviours as values (mapping and
filtering are the project's shared values from :mod:`nattraverse._types`),
and the presets that mirror the real namespace lab.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

from nattraverse._types import Filtering, Mapping


class Allocation(enum.Enum):
    """
    How a NAT picks an external port it does not preserve (RFC 4787 section
    4.2.1).
    """

    #: The next free port, *step* after the last one picked: predictable,
    #: what port prediction exploits.
    SEQUENTIAL = "sequential"
    #: A random free port from the range (Linux ``fully-random``).
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class NatBehaviour:
    """
    Everything a simulated NAT (or stateful firewall) does.

    :ivar mapping: Mapping behaviour (RFC 4787 section 4.1).
    :ivar filtering: Filtering behaviour (RFC 4787 section 5).
    :ivar port_preservation: Keep the internal port as the external one
        when it is free (RFC 4787 section 4.2.1).  When another mapping
        holds it, the port is allocated as *allocation* says: no port
        overloading (REQ-3).
    :ivar allocation: How ports that are not preserved are picked.
    :ivar step: Distance between sequentially allocated ports.
    :ivar port_range: Lowest and highest external port allocated (the
        preserved port may lie outside it).
    :ivar hairpin: Let internal hosts reach each other through their
        external endpoints, seen from the sender's external endpoint (RFC
        4787 section 6, REQ-9).
    :ivar mapping_lifetime: Seconds a mapping lives after the last packet
        that refreshed it (RFC 4787 section 4.3; REQ-5 asks for at least
        120, Linux keeps an unanswered UDP flow 30 s).  Each remote endpoint
        a mapping has sent to is permitted for as long after the last
        packet sent to it.
    :ivar inbound_refresh: Inbound packets refresh the mapping too (REQ-6
        makes outbound refresh mandatory and inbound refresh optional).
    :ivar inbound_refused: Answer unsolicited inbound packets with an ICMP
        port unreachable, which a connected UDP port reports as
        ``connectionRefused()``; otherwise they are dropped silently.
    :ivar translate: ``False`` for a router or stateful firewall: inside
        hosts have public addresses and keep them; *filtering* still
        applies, *mapping* and the port settings do not.
    :ivar block_udp: Drop every UDP packet in both directions.
    """

    mapping: Mapping = Mapping.ENDPOINT_INDEPENDENT
    filtering: Filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
    port_preservation: bool = True
    allocation: Allocation = Allocation.SEQUENTIAL
    step: int = 1
    port_range: tuple[int, int] = (1024, 65535)
    hairpin: bool = False
    mapping_lifetime: float = 120.0
    inbound_refresh: bool = False
    inbound_refused: bool = False
    translate: bool = True
    block_udp: bool = False

    def __post_init__(self) -> None:
        for name, kind in (
            ("mapping", Mapping),
            ("filtering", Filtering),
            ("allocation", Allocation),
        ):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, not {getattr(self, name)!r}")
        low, high = self.port_range
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"port_range {self.port_range!r} is not a range of ports 1-65535")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"step must be a positive integer, not {self.step!r}")
        if not self.mapping_lifetime > 0:
            raise ValueError(f"mapping_lifetime must be positive, not {self.mapping_lifetime!r}")

    def replace(self, **changes: Any) -> NatBehaviour:
        """
        A copy with some fields changed.

        :raises TypeError: naming a key that is not a field.
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown NAT behaviour {', '.join(unknown)}; known: {sorted(known)}")
        return replace(self, **changes)


_EIM = Mapping.ENDPOINT_INDEPENDENT
_APDM = Mapping.ADDRESS_AND_PORT_DEPENDENT

#: The presets of the real namespace lab, by name, as RFC 4787 behaviours.
PRESETS: MappingProxyType[str, NatBehaviour] = MappingProxyType(
    {
        # A plain router: public addresses inside, nothing filtered.
        "open": NatBehaviour(translate=False, filtering=Filtering.ENDPOINT_INDEPENDENT),
        "full-cone": NatBehaviour(filtering=Filtering.ENDPOINT_INDEPENDENT),
        "restricted-cone": NatBehaviour(filtering=Filtering.ADDRESS_DEPENDENT),
        # Linux masquerade: EIM while the port is free, APDF.
        "port-restricted": NatBehaviour(filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT),
        "symmetric": NatBehaviour(
            mapping=_APDM,
            filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
            port_preservation=False,
            allocation=Allocation.RANDOM,
        ),
        "symmetric-sequential": NatBehaviour(
            mapping=_APDM,
            filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
            port_preservation=False,
            allocation=Allocation.SEQUENTIAL,
            port_range=(20000, 65535),
        ),
        "udp-blocked": NatBehaviour(block_udp=True),
        # Public addresses inside, but only answers to outbound traffic get in.
        "symmetric-udp-firewall": NatBehaviour(
            translate=False, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT
        ),
    }
)


def behaviour_for(preset: str | None, changes: dict[str, Any]) -> NatBehaviour:
    """
    The behaviour of *preset* (port-restricted when ``None``) with
    *changes* applied.

    :raises ValueError: naming an unknown preset.
    :raises TypeError: naming an unknown field.
    """
    name = "port-restricted" if preset is None else preset
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown NAT preset {name!r}; known: {', '.join(PRESETS)}") from None
    return base.replace(**changes) if changes else base
