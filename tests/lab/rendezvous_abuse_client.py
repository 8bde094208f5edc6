"""
Run in a lab namespace by ``test_punch_lab.py``: misuse the rendezvous at
HOST:PORT in the ways a hostile or broken peer would, and print, as one JSON
object, the class of the error each misuse got (or ``"accepted"``)::

    python -m tests.lab.rendezvous_abuse_client 192.0.2.10 8478 alice 10.0.1.2

- ``unknown_peer``: Connect to a name nobody registered;
- ``stolen_name``: Register *name* (registered by someone else) with a new key;
- ``relay_without_introduction``: Relay for a session that was never introduced;
- ``reversal_elsewhere``: Reverse asking to be called back at *other_host*
  (this host's private address, not the one the rendezvous observes);
- ``garbage``: bytes that are no AMP box: the connection is closed
  (``"closed"``) and nothing else happens.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import react

from nattraverse.identity import Identity
from nattraverse.rendezvous.client import open_session


def _garbage(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"\xff" * 64 + b"not an AMP box at all" + b"\x00\x00")
        try:
            while sock.recv(4096):
                pass
        except TimeoutError:
            return "still open"
        return "closed"


async def _abuse(reactor: Any, host: str, port: int, name: str, other_host: str) -> dict[str, str]:
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=5)
    outcome: dict[str, str] = {}

    async def attempt(what: str, call: Any) -> Any:
        try:
            result = await call
        except Exception as e:
            outcome[what] = type(e).__name__
            return None
        outcome[what] = "accepted"
        return result

    session = await open_session(reactor, endpoint, Identity.generate())
    try:
        await attempt("unknown_peer", session.connect("nobody-here", 0, [], ["direct"]))
        await attempt("stolen_name", session.register(name, 0, []))
        await attempt("relay_without_introduction", session.relay(os.urandom(16)))
        introduction = await attempt("introduced", session.connect(name, 4000, [], ["reversal"]))
        if introduction is not None:
            await attempt(
                "reversal_elsewhere", session.reverse(introduction.session, 4000, host=other_host)
            )
    finally:
        session.close()
    outcome["garbage"] = _garbage(host, port)
    return outcome


def main() -> None:
    host, port, name, other_host = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

    async def run(reactor: Any) -> None:
        print(json.dumps(await _abuse(reactor, host, port, name, other_host)), flush=True)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
