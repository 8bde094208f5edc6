"""
The options of the lab's NATs, each probed from inside: hairpinning,
rejecting or dropping unsolicited inbound packets, and the mapping timeout.
"""

from __future__ import annotations

import time

import pytest

from tests.natlab import Inbound, Lab, Preset, PublicHost
from tests.natlab.probe import NEGATIVE_WAIT, receive_token, seen_from, token

#: A port nothing inside listens on or has a mapping for.
UNUSED_PORT = 40999


@pytest.mark.lab
@pytest.mark.parametrize("hairpin", [True, False], ids=["hairpin", "no-hairpin"])
@pytest.mark.parametrize("preset", [Preset.PORT_RESTRICTED, Preset.FULL_CONE], ids=str)
def test_hairpin(lab: Lab, server: PublicHost, preset: Preset, hairpin: bool) -> None:
    """With hairpin, a host reaches a neighbour's mapping and shows its own public endpoint."""
    nat = lab.nat("nat", preset, hairpin=hairpin)
    a = lab.host("a", behind=nat)
    b = lab.host("b", behind=nat)
    probe = server.udp_socket(0, server.address)
    from_a, from_b = a.udp_socket(), b.udp_socket()
    mapped_a = seen_from(from_a, probe)
    mapped_b = seen_from(from_b, probe)
    assert mapped_a is not None
    assert mapped_b is not None
    payload = token()
    from_a.sendto(payload, mapped_b)
    source = receive_token(from_b, payload, NEGATIVE_WAIT)
    assert source == (mapped_a if hairpin else None)


@pytest.mark.lab
@pytest.mark.parametrize("inbound", list(Inbound), ids=str)
@pytest.mark.parametrize(
    "preset", [Preset.PORT_RESTRICTED, Preset.FULL_CONE, Preset.SYMMETRIC_UDP_FIREWALL], ids=str
)
def test_unsolicited_udp(lab: Lab, server: PublicHost, preset: Preset, inbound: Inbound) -> None:
    """Unsolicited UDP gets ICMP port unreachable (ECONNREFUSED) with reject, nothing with drop."""
    host = lab.host("a", behind=lab.nat("nat", preset, inbound=inbound))
    sender = server.udp_socket(0, server.address)
    sender.connect((host.public_address, UNUSED_PORT))
    sender.send(token())
    sender.settimeout(NEGATIVE_WAIT)
    expected = ConnectionRefusedError if inbound is Inbound.REJECT else TimeoutError
    with pytest.raises(expected):
        sender.recv(2048)


@pytest.mark.lab
@pytest.mark.parametrize("inbound", list(Inbound), ids=str)
@pytest.mark.parametrize("preset", [Preset.PORT_RESTRICTED, Preset.SYMMETRIC_UDP_FIREWALL], ids=str)
def test_unsolicited_tcp(lab: Lab, server: PublicHost, preset: Preset, inbound: Inbound) -> None:
    """An unsolicited TCP SYN gets a reset (ECONNREFUSED) with reject, nothing with drop."""
    host = lab.host("a", behind=lab.nat("nat", preset, inbound=inbound))
    sender = server.tcp_socket()
    sender.settimeout(NEGATIVE_WAIT)
    expected = ConnectionRefusedError if inbound is Inbound.REJECT else TimeoutError
    with pytest.raises(expected):
        sender.connect((host.public_address, UNUSED_PORT))


@pytest.mark.lab
def test_replies_pass_rejecting_nat(lab: Lab, server: PublicHost) -> None:
    """A rejecting NAT still lets replies to outbound flows in."""
    host = lab.host("a", behind=lab.nat("nat", Preset.PORT_RESTRICTED, inbound="reject"))
    probe = server.udp_socket(0, server.address)
    client = host.udp_socket()
    mapped = seen_from(client, probe)
    assert mapped is not None
    payload = token()
    probe.sendto(payload, mapped)
    assert receive_token(client, payload, 1.0) == probe.getsockname()


#: The mapping timeout the test configures, seconds.
TIMEOUT = 1


@pytest.mark.lab
@pytest.mark.parametrize("preset", [Preset.PORT_RESTRICTED, Preset.FULL_CONE], ids=str)
def test_mapping_timeout(lab: Lab, server: PublicHost, preset: Preset) -> None:
    """A mapping lives while used and is gone after the configured idle timeout."""
    host = lab.host("a", behind=lab.nat("nat", preset, mapping_timeout=TIMEOUT))
    probe = server.udp_socket(0, server.address)
    client = host.udp_socket()
    mapped = seen_from(client, probe)
    assert mapped is not None
    time.sleep(TIMEOUT / 2)
    alive = token()
    probe.sendto(alive, mapped)
    assert receive_token(client, alive, 1.0) is not None
    time.sleep(TIMEOUT + 0.7)
    expired = token()
    probe.sendto(expired, mapped)
    assert receive_token(client, expired, NEGATIVE_WAIT) is None
