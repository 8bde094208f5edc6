"""
Ask a STUN server which address it sees us at, over UDP and over TCP.

Usage: python stun_query.py [HOST [PORT]]   (default 127.0.0.1 3478)
"""

import sys

from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import react

from nattraverse.stun.attributes import ChangeRequest
from nattraverse.stun.demux import StunDemultiplexer
from nattraverse.stun.tcp_client import tcp_binding


async def main(reactor, host="127.0.0.1", port="3478"):
    server = (host, int(port))

    # UDP: a port of our own; its STUN client retransmits on the RFC 8489 schedule.
    demux = StunDemultiplexer(reactor)
    udp = reactor.listenUDP(0, demux)
    try:
        response = await demux.client.binding(server)
        print(f"UDP: the server sees us at {response.mapped_address}")
        if response.other_address is not None:
            # The server has a second address (RFC 5780): ask for the answer
            # from the other address and port.  It comes from elsewhere, so
            # accept a response from another source than the one we asked.
            changed = await demux.client.binding(
                server,
                [ChangeRequest(change_ip=True, change_port=True)],
                match_source=False,
            )
            print(
                f"UDP: other address {response.other_address}; "
                f"the CHANGE-REQUEST answer came from {changed.source}"
            )
    finally:
        await maybeDeferred(udp.stopListening)

    # TCP: connect, ask once, close.
    response = await tcp_binding(reactor, TCP4ClientEndpoint(reactor, host, int(port)))
    print(f"TCP: the server sees us at {response.mapped_address}")


if __name__ == "__main__":
    react(main, sys.argv[1:])
