"""
A tiny STUN client for the lab tests, run inside a host's namespace:
one Binding request with :mod:`nattraverse.stun.client` (through
:class:`~nattraverse.stun.demux.StunDemultiplexer`), then optionally an RFC
5780 CHANGE-REQUEST (other address and port), printing one JSON object::

    python tests/lab/stun_client.py 192.0.2.10 3478 [--change]

``{"local": [host, port], "mapped": [host, port], "other": [host, port] | null,
"changed": [host, port] | null}``; ``changed`` is ``null`` when the
changed answer never came (the NAT filtered it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet import defer, task

from nattraverse.errors import StunTimeout
from nattraverse.stun.attributes import ChangeRequest, OtherAddress
from nattraverse.stun.demux import StunDemultiplexer


async def query(reactor: Any, server: str, port: int, change: bool) -> dict[str, Any]:
    """Run the transactions and return what to print."""
    demux = StunDemultiplexer(reactor, rto=0.1, rc=3, rm=4)
    listening = reactor.listenUDP(0, demux, interface="0.0.0.0")
    try:
        local = listening.getHost()
        response = await demux.client.binding((server, port))
        other = response.message.get(OtherAddress)
        mapped = response.mapped_address
        result: dict[str, Any] = {
            "local": [local.host, local.port],
            "mapped": None if mapped is None else list(mapped),
            "other": None if other is None else list(other.address),
            "changed": None,
        }
        if change:
            try:
                changed = await demux.client.binding(
                    (server, port), [ChangeRequest(True, True)], match_source=False
                )
                result["changed"] = list(changed.source)
            except StunTimeout:
                pass
        return result
    finally:
        await listening.stopListening()


def main(reactor: Any, argv: list[str]) -> defer.Deferred[None]:
    """Parse *argv*, query, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("server")
    parser.add_argument("port", type=int)
    parser.add_argument("--change", action="store_true")
    args = parser.parse_args(argv)

    async def run() -> None:
        print(json.dumps(await query(reactor, args.server, args.port, args.change)), flush=True)

    return defer.Deferred.fromCoroutine(run())


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
