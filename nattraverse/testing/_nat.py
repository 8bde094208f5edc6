"""
A simulated NAT: RFC 4787 mapping and filtering between its inside realm
and the realm it is attached to, with hairpinning (RFC 4787 section 6) and
ICMP port unreachable handling (section 9).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from nattraverse._types import Filtering
from nattraverse.testing._behaviour import NatBehaviour
from nattraverse.testing._link import Link
from nattraverse.testing._realm import AddressPool, Attachment, Packet, Realm
from nattraverse.testing._table import MappingTable, NatMapping, NatStats

if TYPE_CHECKING:
    from nattraverse.testing._network import Network


class SimulatedNAT(Attachment):
    """
    A NAT (or, with ``translate=False``, a router or stateful firewall)
    between its inside realm :attr:`lan` and the realm :attr:`behind`.
    Made by :meth:`Network.nat <nattraverse.testing.Network.nat>`.

    Outbound packets get a mapping (RFC 4787 section 4.1), made as
    :attr:`behaviour` says and refreshed by each outbound packet (section
    4.3); inbound packets to an external endpoint with a mapping are let in
    when the filter allows (section 5), and dropped otherwise.

    :ivar name: The NAT's name.
    :ivar behaviour: What it does.
    :ivar behind: The realm its outside is in.
    :ivar lan: The realm of its inside: put hosts and other NATs there.
    :ivar address: Its public address in :attr:`behind`.
    :ivar lan_address: Its address inside (``None`` for a router that does
        not translate and was given no ``lan``).
    :ivar stats: What it did with packets.
    """

    def __init__(
        self,
        network: Network,
        name: str,
        behind: Realm,
        behaviour: NatBehaviour,
        address: str,
        uplink: Link,
        lan_address: str | None,
        pools: dict[str, AddressPool] | None,
    ) -> None:
        super().__init__(name, uplink, network.random("link", name))
        self.network = network
        self.behaviour = behaviour
        self.behind = behind
        self.address = address
        self.lan_address = lan_address
        self.stats = NatStats()
        self.lan = Realm(
            f"{name}.lan", network.random("realm", f"{name}.lan"), gateway=self, pools=pools
        )
        self._table = MappingTable(behaviour, address, network.random("nat", name), self.stats)

    def __repr__(self) -> str:
        return f"<SimulatedNAT {self.name} {self.address}>"

    @property
    def uplink(self) -> Link:
        """The link between the NAT and :attr:`behind` (settable)."""
        return self.link

    @uplink.setter
    def uplink(self, link: Link) -> None:
        self.link = link

    @property
    def mappings(self) -> tuple[NatMapping, ...]:
        """The live mappings, oldest first."""
        return self._table.snapshot(self.network.clock.seconds())

    def mapping_of(self, internal: tuple[str, int]) -> NatMapping | None:
        """The newest live mapping of the inside endpoint *internal*, if any."""
        found = [m for m in self.mappings if m.internal == tuple(internal)]
        return found[-1] if found else None

    def flush(self) -> None:
        """
        Forget every mapping, as a NAT does when it reboots: peers must
        punch again, and a symmetric NAT hands out new ports.
        """
        self._table.clear()

    # -- inbound: from behind -----------------------------------------------------

    def _arrive(self, packet: Packet) -> None:
        """A packet from outside to the NAT's address (RFC 4787 section 5)."""
        self._inbound(packet, hairpin=False)

    def _inbound(self, packet: Packet, *, hairpin: bool) -> None:
        network = self.network
        behaviour = self.behaviour
        if behaviour.block_udp:
            self.stats.blocked += 1
            network._record("blocked", self.name, packet)
            return
        now = network.clock.seconds()
        entry = self._table.inbound(packet.destination, now)
        if entry is None:
            if (
                not behaviour.translate
                and behaviour.filtering is Filtering.ENDPOINT_INDEPENDENT
                and packet.destination.host != self.address
            ):
                # An open router: everything inside is reachable.
                self.stats.inbound += 1
                network._transmit(packet, self.lan, None)
                return
            self.stats.no_mapping += 1
            network._record("no-mapping", self.name, packet)
            self._refuse(packet, hairpin)
            return
        # RFC 4787 section 9: an ICMP error is let in when the packet it is
        # about could have been answered through the mapping.
        remote = packet.source if packet.about is None else packet.about[1]
        if not self._table.permits(entry, remote, now):
            self.stats.filtered += 1
            network._record("filtered", self.name, packet)
            self._refuse(packet, hairpin)
            return
        if behaviour.inbound_refresh and packet.about is None:
            self._table.refresh(entry, now)
        about = None if packet.about is None else (entry.internal, packet.about[1])
        inside = replace(packet, destination=entry.internal, about=about)
        self.stats.inbound += 1
        network._record("in", self.name, inside)
        network._transmit(inside, self.lan, None)

    def _refuse(self, packet: Packet, hairpin: bool) -> None:
        """Answer a dropped inbound datagram with ICMP port unreachable,
        when configured to (never ICMP with ICMP, nor a hairpinned one)."""
        if not self.behaviour.inbound_refused or packet.about is not None or hairpin:
            return
        network = self.network
        refusal = network._new_packet(
            packet.destination, packet.source, b"", (packet.source, packet.destination)
        )
        self.stats.refused += 1
        network._record("refused", self.name, refusal)
        network._transmit(refusal, self.behind, self)

    # -- outbound: from the inside -----------------------------------------------

    def _from_inside(self, packet: Packet) -> None:
        """A packet from :attr:`lan` to an address not in it."""
        network = self.network
        behaviour = self.behaviour
        destination = packet.destination
        if destination.host == self.lan_address:
            network.stats.unreachable += 1
            network._record("unreachable", self.name, packet)
            return
        if behaviour.block_udp:
            self.stats.blocked += 1
            network._record("blocked", self.name, packet)
            return
        if packet.about is not None:
            self._icmp_out(packet)
            return
        if behaviour.translate and destination.host == self.address:
            self._hairpin(packet)
            return
        entry = self._table.outbound(packet.source, destination, network.clock.seconds())
        if entry is None:
            self.stats.exhausted += 1
            network._record("exhausted", self.name, packet)
            return
        outside = replace(packet, source=entry.external)
        self.stats.outbound += 1
        network._record("out", self.name, outside)
        network._transmit(outside, self.behind, self)

    def _hairpin(self, packet: Packet) -> None:
        """
        An inside host sends to one of the NAT's external endpoints (RFC
        4787 section 6): with hairpinning on, the packet gets the sender's
        mapping as its source (REQ-9a) and goes back in through the filter
        of the destination's mapping.
        """
        network = self.network
        if not self.behaviour.hairpin:
            self.stats.hairpin_dropped += 1
            network._record("hairpin-dropped", self.name, packet)
            return
        entry = self._table.outbound(packet.source, packet.destination, network.clock.seconds())
        if entry is None:
            self.stats.exhausted += 1
            network._record("exhausted", self.name, packet)
            return
        turned = replace(packet, source=entry.external)
        self.stats.hairpinned += 1
        network._record("hairpin", self.name, turned)
        self._inbound(turned, hairpin=True)

    def _icmp_out(self, packet: Packet) -> None:
        """An inside host refuses a datagram that came in: translate the
        ICMP error through the mapping that datagram used, if it lives."""
        network = self.network
        assert packet.about is not None
        if self.behaviour.translate:
            entry = self._table.lookup(packet.source, packet.destination, network.clock.seconds())
            if entry is None:
                self.stats.no_mapping += 1
                network._record("no-mapping", self.name, packet)
                return
            packet = replace(packet, source=entry.external, about=(packet.about[0], entry.external))
        network._record("out", self.name, packet)
        network._transmit(packet, self.behind, self)
