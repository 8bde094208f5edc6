"""
Interop with the classic RFC 3489 client (Debian package ``stun-client``,
Vovida STUN client 0.97) against our ``twistd natrendezvous`` with two
addresses, 127.0.0.1 and 127.0.0.2, on loopback.

The client runs the RFC 3489 tests: I (plain), II (change IP and port),
III (change port), I again to CHANGED-ADDRESS, and a hairpin test; with
no NAT between it and the server, it must conclude "Open".

Its exit status is the low byte of the "Return value" it prints
(client.cxx): the NAT type code (Open 0x00, independent filter 0x02, ...,
firewall 0x0A, blocked 0x0C), plus 0x10 when it saw no hairpin and 0x01
when the mapping preserved its port; it exits with -1 (255) on a STUN
failure.  Open, hairpin and port preserved is therefore 0x01.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

import pytest

from nattraverse._types import Endpoint
from tests.interop.helpers import ALT_LOOPBACK, LOOPBACK, Rendezvous, free_port

pytestmark = pytest.mark.interop

#: Seconds the client may run; it takes about one.
STUN_CLIENT_TIMEOUT = 30.0

#: "Open" (0x00) | port preserved (0x01); no 0x10: it hairpinned.
OPEN_PRESERVING_PORT = 0x01


def test_stun_client_reports_open(
    require_program: Callable[[str], str], rendezvous_rfc5780: Rendezvous
) -> None:
    """stun-client passes tests I, II and III against our server and reports Open."""
    stun = require_program("stun")
    server = rendezvous_rfc5780.primary
    # The client binds the source port and the one after it.
    source_port = free_port(LOOPBACK, count=2)
    result = subprocess.run(
        [stun, str(server), "-v", "-i", LOOPBACK, "-p", str(source_port)],
        capture_output=True,
        text=True,
        timeout=STUN_CLIENT_TIMEOUT,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "Primary: Open" in result.stdout, output
    for line in (
        "test I = 1",
        "test II = 1",
        "test III = 1",
        "test I(2) = 1",
        "is nat  = 0",
        "mapped IP same = 1",
        "hairpin = 1",
        "preserver port = 1",  # sic
    ):
        assert re.search(rf"^{re.escape(line)}$", output, re.MULTILINE), f"no {line!r}:\n{output}"
    assert f"Return value is 0x{OPEN_PRESERVING_PORT:06x}" in result.stdout, output
    assert result.returncode == OPEN_PRESERVING_PORT, output

    # Test I's answer: the client's own address, from the primary address,
    # naming the alternate address and port as CHANGED-ADDRESS.
    assert f"MappedAddress = {Endpoint(LOOPBACK, source_port)}" in output, output
    assert f"SourceAddress = {server}" in output, output
    changed = rendezvous_rfc5780.alternate
    assert changed.host == ALT_LOOPBACK
    assert f"ChangedAddress = {changed}" in output, output
