"""
The NAT presets of the lab and the RFC 4787 behaviour each one claims.

RFC 4787 section 4.1 classifies how a NAT *maps* an inside endpoint to an
outside one, section 5 how it *filters* packets arriving at a mapping.
:class:`Preset` names the kinds of NAT the lab builds; its
:attr:`~Preset.mapping` and :attr:`~Preset.filtering` are what the
lab tests check from inside the namespaces.
"""

from __future__ import annotations

import enum

__all__ = ["Filtering", "Inbound", "Mapping", "Preset"]


class Mapping(enum.Enum):
    """How outbound flows of one inside endpoint are mapped (RFC 4787 section 4.1)."""

    #: No translation: the inside endpoint is its own public endpoint.
    NONE = "no translation"
    #: EIM: one external endpoint for every destination.
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    #: ADM: one external endpoint per destination address.
    ADDRESS_DEPENDENT = "address-dependent"
    #: APDM: one external endpoint per destination address and port.
    ADDRESS_AND_PORT_DEPENDENT = "address and port-dependent"


class Filtering(enum.Enum):
    """Which outside endpoints may send to a mapping (RFC 4787 section 5)."""

    #: No filtering at all: unsolicited packets reach every inside port.
    NONE = "none"
    #: EIF: anyone may send to a mapping once it exists.
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    #: ADF: addresses the inside endpoint has sent to, from any port.
    ADDRESS_DEPENDENT = "address-dependent"
    #: APDF: exactly the endpoints the inside endpoint has sent to.
    ADDRESS_AND_PORT_DEPENDENT = "address and port-dependent"


class Inbound(enum.StrEnum):
    """What a NAT or firewall does with unsolicited inbound packets."""

    #: Silently discard them.
    DROP = "drop"
    #: Answer UDP with ICMP port unreachable and TCP with a reset.
    REJECT = "reject"


class Preset(enum.StrEnum):
    """
    A kind of NAT router the lab builds with nftables in the router's
    namespace; ``Preset("full-cone")`` parses the name.
    """

    #: EIM / EIF: a learned map of mappings DNATs inbound packets from anyone.
    FULL_CONE = "full-cone"
    #: EIM / ADF: the learned map is keyed by the remote address too.
    RESTRICTED_CONE = "restricted-cone"
    #: EIM / APDF: plain Linux SNAT and conntrack.
    PORT_RESTRICTED = "port-restricted"
    #: APDM / APDF with a random external port per flow.
    SYMMETRIC = "symmetric"
    #: APDM / APDF with external ports counting up by one per new flow.
    SYMMETRIC_SEQUENTIAL = "symmetric-sequential"
    #: A port-restricted NAT that drops all UDP.
    UDP_BLOCKED = "udp-blocked"
    #: No translation (public addresses behind it); only replies come in.
    SYMMETRIC_UDP_FIREWALL = "symmetric-udp-firewall"
    #: A plain router: no translation, no filtering.
    OPEN = "open"

    @property
    def mapping(self) -> Mapping | None:
        """The RFC 4787 mapping behaviour; ``None`` when no UDP passes."""
        return _BEHAVIOUR[self][0]

    @property
    def filtering(self) -> Filtering | None:
        """The RFC 4787 filtering behaviour; ``None`` when no UDP passes."""
        return _BEHAVIOUR[self][1]

    @property
    def translates(self) -> bool:
        """Whether hosts behind it have private addresses (a NAT, not a router)."""
        return self not in (Preset.SYMMETRIC_UDP_FIREWALL, Preset.OPEN)

    @property
    def sequential(self) -> bool:
        """Whether new mappings get predictable, consecutive external ports."""
        return self is Preset.SYMMETRIC_SEQUENTIAL


_EIM = Mapping.ENDPOINT_INDEPENDENT
_APDM = Mapping.ADDRESS_AND_PORT_DEPENDENT
_APDF = Filtering.ADDRESS_AND_PORT_DEPENDENT

_BEHAVIOUR: dict[Preset, tuple[Mapping | None, Filtering | None]] = {
    Preset.FULL_CONE: (_EIM, Filtering.ENDPOINT_INDEPENDENT),
    Preset.RESTRICTED_CONE: (_EIM, Filtering.ADDRESS_DEPENDENT),
    Preset.PORT_RESTRICTED: (_EIM, _APDF),
    Preset.SYMMETRIC: (_APDM, _APDF),
    Preset.SYMMETRIC_SEQUENTIAL: (_APDM, _APDF),
    Preset.UDP_BLOCKED: (None, None),
    Preset.SYMMETRIC_UDP_FIREWALL: (Mapping.NONE, _APDF),
    Preset.OPEN: (Mapping.NONE, Filtering.NONE),
}
