"""
``natcat``: netcat over nattraverse.

Listen under a name at a rendezvous, or connect to a named peer, and pipe
standard input and output through the traversed, authenticated connection::

    natcat --listen alice --rendezvous tcp:rv.example.org:8478
    natcat alice --rendezvous tcp:rv.example.org:8478 < file

It is a thin shell over the ``punch:`` endpoints (:doc:`/endpoints`): the
arguments become a ``punch:`` endpoint string, parsed by the same plugins an
application uses.  ``--json-report`` writes one JSON object per connection
to standard error, saying which method carried it and, on the connecting
side, how every method fared (also when none reached the peer); a
connection made through the rendezvous' UDP relay that moved to a direct
path gets a second one, with ``"moved": true``, when it ends.

Exit status: 0 when the connection ended normally; 1 when it could not be
made (the message lists every method tried and why it failed) or was lost
(a dead path, a reset: the message says so); 2 for bad usage.  See :doc:`/natcat`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "endpoint_string",
    "main",
    "run",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_log = Logger()


def escape(description: str) -> str:
    """
    Escape an endpoint description for nesting as a value of another.
    """
    return description.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def default_identity(name: str) -> Path:
    """
    Where ``natcat --listen NAME`` keeps its key unless ``--identity`` is given.
    """
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nattraverse" / f"natcat-{name}.key"


#: The numeric options and the ``punch:`` keys they become.
_NUMBERS = (
    ("timeout", "timeout"),
    ("punch_timeout", "punchTimeout"),
    ("prefer_tcp", "preferTcp"),
    ("birthday_probes", "birthdayProbes"),
    ("birthday_rate", "birthdayRate"),
    ("birthday_sockets", "birthdaySockets"),
    ("port", "port"),
)


def endpoint_string(options: argparse.Namespace) -> str:
    """
    The ``punch:`` endpoint string the options describe.
    """
    parts = ["punch"]
    if options.listen is not None:
        parts.append(f"name={escape(options.listen)}")
    else:
        parts.append(f"peer={escape(options.peer)}")
    parts.append(f"rendezvous={escape(options.rendezvous)}")
    if options.identity is not None:
        parts.append(f"identity={escape(str(options.identity))}")
    if options.methods is not None:
        parts.append(f"methods={escape(options.methods)}")
    for attribute, key in _NUMBERS:
        value = getattr(options, attribute)
        if value is not None:
            parts.append(f"{key}={value!r}")
    if options.access_key_file is not None:
        parts.append(f"accessKeyFile={escape(options.access_key_file)}")
    return ":".join(parts)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds of 0 or more")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) < 20) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _probes(text: str) -> int:
    from nattraverse.punch.birthday import BirthdayConfig

    count = _count(text)
    low, high = BirthdayConfig().ports
    if count > high - low + 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more probes than there are ports to probe ({high - low + 1})"
        )
    return count


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of probes per second above 0")
    return value


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """
    The command line of ``natcat``.
    """
    parser = argparse.ArgumentParser(
        prog="natcat",
        description=(
            "netcat through NATs: connect to a named peer (or listen under a name) at a "
            "nattraverse rendezvous, and pipe stdin/stdout through the authenticated, "
            "encrypted connection."
        ),
    )
    parser.add_argument("peer", nargs="?", help="name or peer id to connect to")
    parser.add_argument("-l", "--listen", metavar="NAME", help="listen under NAME instead")
    parser.add_argument(
        "-r",
        "--rendezvous",
        required=True,
        metavar="DESC",
        help="client endpoint of the rendezvous, e.g. tcp:rv.example.org:8478",
    )
    parser.add_argument(
        "--identity",
        metavar="FILE",
        help="key file (created on first use, mode 0600); connecting: a fresh key per run "
        "by default; listening: natcat-NAME.key under $XDG_CONFIG_HOME/nattraverse",
    )
    parser.add_argument(
        "--methods", metavar="LIST", help="comma list of methods, e.g. direct,reversal,relay"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        help="seconds to connect at most; listening: seconds the first registration may take",
    )
    parser.add_argument(
        "--punch-timeout",
        type=_positive_seconds,
        metavar="SECS",
        help="seconds the UDP connectivity checks may take (default 10; longer on lossy paths)",
    )
    parser.add_argument(
        "--prefer-tcp",
        type=_positive_seconds,
        metavar="SECS",
        help="connecting: seconds a direct TCP path may take to beat a UDP or relayed one "
        "that came first (for bulk throughput)",
    )
    parser.add_argument(
        "--birthday-probes",
        type=_probes,
        metavar="N",
        help="probes the easy side of birthday-paradox probing sends at most (default 1500; "
        "more: a better chance against a random-port NAT, more traffic)",
    )
    parser.add_argument(
        "--birthday-rate",
        type=_rate,
        metavar="PER_SECOND",
        help="birthday-paradox probes sent per second (default 200)",
    )
    parser.add_argument(
        "--birthday-sockets",
        type=_count,
        metavar="N",
        help="sockets the random-port (hard) side of birthday-paradox probing opens (default 256)",
    )
    parser.add_argument(
        "--port", type=_port, help="TCP port for direct connections (listening only; 0: any)"
    )
    parser.add_argument(
        "--access-key-file",
        metavar="FILE",
        help="file holding the rendezvous' access key (or set NATTRAVERSE_ACCESS_KEY)",
    )
    parser.add_argument(
        "--echo", action="store_true", help="listening: echo what each peer sends back to it"
    )
    parser.add_argument(
        "--json-report",
        action="store_true",
        help=(
            "write one JSON object per connection to stderr: peer, method, remote, connect_ms "
            "and, when connecting, the race: every method tried, how long it took, why it lost"
        ),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log to stderr what happens: registration, each method tried and why it failed",
    )
    parser.add_argument(
        "-q",
        "--quit-after",
        type=_seconds,
        metavar="SECS",
        help="after EOF on stdin, close once nothing has arrived for SECS seconds "
        "(default: wait for the peer to close)",
    )
    return parser


def _check(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    if (options.peer is None) == (options.listen is None):
        parser.error("give either a PEER to connect to or --listen NAME, not both")
    if options.listen is not None:
        if options.quit_after is not None:
            parser.error("--quit-after is for connecting")
        if options.prefer_tcp is not None:
            parser.error("--prefer-tcp is for connecting")
        if options.identity is None:
            options.identity = default_identity(options.listen)
    else:
        if options.echo:
            parser.error("--echo is for --listen")
        if options.port is not None:
            parser.error("--port is for --listen")


def report(stream: TextIO, transport: ITransport, connect_ms: float | None) -> None:
    """
    Write the JSON line ``--json-report`` asks for.
    """
    _write(stream, _describe(transport, connect_ms=connect_ms))


def report_move(stream: TextIO, transport: ITransport) -> None:
    """
    Write the JSON line ``--json-report`` adds when a connection that was
    made through the rendezvous' UDP relay ends on a direct path: the same
    keys as :func:`report` (``remote`` and ``relayed`` as they are now,
    ``race`` with its ``upgrades``), and ``"moved": true``.
    """
    _write(stream, _describe(transport, moved=True))


def _describe(transport: ITransport, **extra: Any) -> dict[str, Any]:
    """The keys both lines share, *extra* before ``race``."""
    method = getattr(transport, "method", "unknown")
    line: dict[str, Any] = {
        "peer": str(getattr(transport, "peer_id", "")),
        "method": method,
        "remote": getattr(transport, "remote", ""),
        # The TCP relay, or the rendezvous' UDP relay now.
        "relayed": method == "relay" or bool(getattr(transport, "relayed", False)),
        **extra,
    }
    race = getattr(transport, "report", None)
    if race is not None:
        line["race"] = race.to_json()
    return line


def _write(stream: TextIO, line: dict[str, Any]) -> None:
    stream.write(json.dumps(line) + "\n")
    stream.flush()


def report_failure(stream: TextIO, error: BaseException) -> None:
    """
    Write the JSON line ``--json-report`` asks for when no connection was
    made: the error, and the race's report when the methods were raced.
    """
    race = getattr(error, "report", None)
    line = {
        "peer": getattr(error, "peer", ""),
        "method": None,
        "error": str(error),
        "race": None if race is None else race.to_json(),
    }
    _write(stream, line)


@implementer(IHalfCloseableProtocol)
class _Console(Protocol):
    """
    Standard input and output, piped to one or more peers.
    """

    def __init__(self, on_stdin_closed: Callable[[], None]) -> None:
        self.peers: list[_Peer] = []
        self._on_stdin_closed = on_stdin_closed
        self.stdin_open = True
        self.gone: defer.Deferred[None] = defer.Deferred()
        self._pending: list[bytes] = []
        self._wired = False

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.stdin_open = False
        if not self.gone.called:
            self.gone.callback(None)

    def dataReceived(self, data: bytes) -> None:
        for peer in self.peers:
            peer.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.stdin_open = False
        # A finished producer must not stay registered: the TLS layer waits
        # for it to go before it closes.
        if self._wired and self.peers[0].transport is not None:
            self.peers[0].transport.unregisterProducer()  # type: ignore[attr-defined]
        self._on_stdin_closed()

    def writeConnectionLost(self) -> None:
        for peer in list(self.peers):
            peer.transport.loseConnection()  # type: ignore[union-attr]

    def connectionMade(self) -> None:
        self._wire()
        pending, self._pending = self._pending, []
        for data in pending:
            self.deliver(data)

    def deliver(self, data: bytes) -> None:
        """Write what a peer sent to standard output (kept until it is open)."""
        if self.transport is None:
            self._pending.append(data)
        else:
            self.transport.write(data)

    def add(self, peer: _Peer) -> None:
        self.peers.append(peer)
        self._wire()

    def _wire(self) -> None:
        # Flow control both ways: stdin pauses while the first peer is backed
        # up, and that peer stops being read while stdout is.
        if self._wired or self.transport is None or not self.peers:
            return
        peer = self.peers[0]
        assert peer.transport is not None
        self._wired = True
        peer.transport.registerProducer(self.transport, True)  # type: ignore[attr-defined]
        self.transport.registerProducer(peer.transport, True)  # type: ignore[attr-defined]

    def remove(self, peer: _Peer) -> None:
        if peer in self.peers:
            if self.peers[0] is peer and self._wired:
                self._wired = False
                if self.transport is not None:
                    self.transport.unregisterProducer()  # type: ignore[attr-defined]
                if self.stdin_open and peer.transport is not None:
                    peer.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.peers.remove(peer)
            self._wire()


class _Peer(Protocol):
    def __init__(
        self,
        console: _Console | None,
        echo: bool,
        report_to: TextIO | None,
        started: float | None,
        clock: Any,
        on_closed: Callable[[_Peer, Failure], None],
    ) -> None:
        self._console = console
        self._echo = echo
        self._report_to = report_to
        self._started = started
        self._clock = clock
        self._on_closed = on_closed
        self.last_received = clock.seconds()
        self._relayed = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self._report_to is not None:
            connect_ms = getattr(self.transport, "connect_ms", None)
            if connect_ms is None and self._started is not None:
                connect_ms = (self._clock.seconds() - self._started) * 1000.0
            report(self._report_to, self.transport, connect_ms)
        self._relayed = bool(getattr(self.transport, "relayed", False))
        _log.info(
            "connected to {peer} via {method} ({remote})",
            peer=str(getattr(self.transport, "peer_id", "?")),
            method=getattr(self.transport, "method", "?"),
            remote=getattr(self.transport, "remote", "?"),
        )
        if self._console is not None:
            self._console.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.last_received = self._clock.seconds()
        if self._echo:
            self.transport.write(data)  # type: ignore[union-attr]
        elif self._console is not None:
            self._console.deliver(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        moved = self._relayed and not getattr(self.transport, "relayed", False)
        if self._report_to is not None and moved and self.transport is not None:
            report_move(self._report_to, self.transport)
        if self._console is not None:
            self._console.remove(self)
        self._on_closed(self, reason)


class _PeerFactory(Factory):
    def __init__(self, build: Callable[[], _Peer]) -> None:
        self._build = build

    def buildProtocol(self, addr: object) -> _Peer:
        return self._build()


async def _connect(reactor: Any, options: argparse.Namespace, stderr: TextIO) -> int:
    done: defer.Deferred[None] = defer.Deferred()
    quit_call: list[IDelayedCall] = []
    lost: list[Failure] = []

    def closed(peer: _Peer, reason: Failure) -> None:
        lost.append(reason)
        for call in quit_call:
            if call.active():
                call.cancel()
        if not done.called:
            done.callback(None)

    def idle_check(peer: _Peer) -> None:
        quit_call.clear()
        assert options.quit_after is not None
        idle = reactor.seconds() - peer.last_received
        if idle >= options.quit_after:
            console.remove(peer)
            peer.transport.loseConnection()  # type: ignore[union-attr]
        else:
            quit_call.append(reactor.callLater(options.quit_after - idle, idle_check, peer))

    peers: list[_Peer] = []

    def stdin_closed() -> None:
        if options.quit_after is not None and peers:
            quit_call.append(reactor.callLater(0, idle_check, peers[0]))

    console = _Console(stdin_closed)
    started = reactor.seconds()

    def build() -> _Peer:
        peer = _Peer(
            console,
            False,
            stderr if options.json_report else None,
            started,
            reactor,
            closed,
        )
        peers.append(peer)
        return peer

    endpoint = clientFromString(reactor, endpoint_string(options))
    try:
        await endpoint.connect(_PeerFactory(build))
    except Exception as e:
        if options.json_report:
            report_failure(stderr, e)
        stderr.write(f"natcat: {e}\n")
        return EXIT_FAILED
    # Standard input is read only once there is a peer to send it to.
    stdio = StandardIO(console, reactor=reactor)
    await done
    stdio.loseConnection()  # flushes what the peer sent to stdout first
    await console.gone
    if lost and not lost[0].check(ConnectionDone):
        # Data may be missing: say so, and do not exit as if all was well.
        stderr.write(f"natcat: the connection was lost: {lost[0].getErrorMessage()}\n")
        return EXIT_FAILED
    return EXIT_OK


async def _listen(reactor: Any, options: argparse.Namespace, stderr: TextIO) -> int:
    stopped: defer.Deferred[None] = defer.Deferred()
    console = None if options.echo else _Console(lambda: None)

    def closed(peer: _Peer, reason: Failure) -> None:
        _log.info("peer left: {reason}", reason=reason.getErrorMessage())

    def build() -> _Peer:
        return _Peer(
            console,
            options.echo,
            stderr if options.json_report else None,
            None,
            reactor,
            closed,
        )

    if options.identity is not None:
        Path(options.identity).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    endpoint = serverFromString(reactor, endpoint_string(options))
    try:
        port = await endpoint.listen(_PeerFactory(build))
    except Exception as e:
        stderr.write(f"natcat: {e}\n")
        return EXIT_FAILED
    if console is not None:
        StandardIO(console, reactor=reactor)
    host = port.getHost()
    stderr.write(
        f"natcat: listening as {options.listen} (peer id {getattr(host, 'peer_id', '?')})\n"
    )
    stderr.flush()
    reactor.addSystemEventTrigger("before", "shutdown", port.stopListening)
    await stopped  # until the process is told to stop
    return EXIT_OK


def run(reactor: Any, argv: Sequence[str], stderr: TextIO | None = None) -> defer.Deferred[int]:
    """
    Run ``natcat`` with *argv* on *reactor*; fires with the exit status.
    """
    parser = build_parser()
    options = parser.parse_args(list(argv))
    _check(parser, options)
    out = sys.stderr if stderr is None else stderr
    if options.verbose:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
    if options.listen is not None:
        return defer.Deferred.fromCoroutine(_listen(reactor, options, out))
    return defer.Deferred.fromCoroutine(_connect(reactor, options, out))


def main(argv: Sequence[str] | None = None) -> None:
    """
    Console-script entry point.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)

    async def _main(reactor: Any) -> None:
        status = await run(reactor, arguments)
        if status != EXIT_OK:
            raise SystemExit(status)

    react(lambda reactor: defer.Deferred.fromCoroutine(_main(reactor)))


if __name__ == "__main__":
    main()
