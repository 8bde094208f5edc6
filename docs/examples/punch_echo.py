"""
Two peers through a rendezvous: ``echo`` echoes, a caller sends a line.

Run ``twistd -n natrendezvous`` first (``scripts/serve``), then::

    .venv/bin/python docs/examples/punch_echo.py tcp:127.0.0.1:8478

Both peers run in this one process to keep the example short; in real use
each runs on its own machine, with the same endpoint strings.  The name is
bound to the key in the temporary directory, created on the first run and
used again by the next ones.
"""

import sys
import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Hello(Protocol):
    def __init__(self):
        self.answer = Deferred()

    def connectionMade(self):
        how = self.transport
        print(f"connected to {how.peer_id} via {how.method} ({how.remote})")
        self.transport.write(b"hello through the NAT\n")

    def dataReceived(self, data):
        self.answer.callback(data)
        self.transport.loseConnection()


async def main(reactor, rendezvous):
    nested = rendezvous.replace(":", r"\:")
    key = Path(tempfile.gettempdir()) / "nattraverse-example-echo.key"
    port = await serverFromString(
        reactor, f"punch:name=echo:rendezvous={nested}:identity={key}"
    ).listen(Factory.forProtocol(Echo))
    print(f"echo is registered as {port.getHost().peer_id}")

    protocol = await clientFromString(reactor, f"punch:peer=echo:rendezvous={nested}").connect(
        Factory.forProtocol(Hello)
    )
    print("echoed:", (await protocol.answer).decode().strip())
    await port.stopListening()


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1])))
