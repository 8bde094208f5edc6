"""
Small frozen value types shared by every layer: transport addresses and
the RFC 4787 NAT behaviours that discovery reports and the simulated NATs
of :mod:`nattraverse.testing` implement.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import NamedTuple


class Endpoint(NamedTuple):
    """
    A transport address: an IP address in text form and a port.

    It is a tuple, so it can be handed to socket and Twisted UDP APIs as it
    is.
    """

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Endpoint:
        """
        Parse ``"192.0.2.1:3478"``, ``"[2001:db8::1]:3478"`` or, when
        *default_port* is given, a bare address.

        :raises ValueError: naming the text when it is not an address.
        """
        host, sep, port_text = text.rpartition(":")
        if text.startswith("[") and "]" in text:
            host, _, rest = text[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ValueError(f"{text!r} has {rest!r} after ']'; write it as [HOST]:PORT")
            sep, port_text = rest[:1], rest[1:]
        elif not sep or ":" in host:
            host, sep, port_text = text, "", ""
        if not sep:
            if default_port is None:
                raise ValueError(f"{text!r} has no port; write it as HOST:PORT")
            port = default_port
        else:
            if not (port_text.isascii() and port_text.isdigit()):
                raise ValueError(f"{text!r} has a port that is not a number")
            port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError(f"{text!r} has a port outside 0-65535")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address") from None
        return cls(str(address), port)


class Mapping(enum.Enum):
    """
    How a NAT reuses a mapping (RFC 4787 section 4.1): for which outbound
    packets from one internal endpoint ``X:x`` it keeps the same external
    endpoint ``X':x'``.  The values are the RFC 5780 names.
    """

    #: The same mapping for every destination (REQ-1 asks for this).
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    #: The same mapping while the destination IP address is the same.
    ADDRESS_DEPENDENT = "address-dependent"
    #: The same mapping only for the same destination address and port
    #: (what "symmetric NAT" means).
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class Filtering(enum.Enum):
    """
    Which inbound packets a NAT lets through an existing mapping (RFC 4787
    section 5).  The values are the RFC 5780 names.
    """

    #: Any source may use the mapping ("full cone").
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    #: Only IP addresses the internal endpoint has sent to ("restricted cone").
    ADDRESS_DEPENDENT = "address-dependent"
    #: Only the exact address and port sent to ("port-restricted cone").
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
