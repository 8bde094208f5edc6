"""
Run real STUN servers for tests: our ``twistd natrendezvous`` and coturn's
``turnserver``, on loopback only.

Every process is started with :mod:`subprocess`, its PID kept, and stopped
by :func:`stop_process` (terminate, then kill) in the ``finally`` or fixture
teardown of whoever started it.  Every wait is bounded in time.  Files go
in the directory the caller gives, a pytest ``tmp_path``.

The blocking Binding helpers here use plain sockets and the codec, so that
fixtures can check that a server answers before a test's reactor runs.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from nattraverse._types import Endpoint
from nattraverse.errors import StunDecodeError
from nattraverse.stun.attributes import XorMappedAddress
from nattraverse.stun.constants import MAGIC_COOKIE_BYTES, MessageClass, Method
from nattraverse.stun.message import Message, decode, encode, frame_length

#: The repository root: on ``PYTHONPATH``, it gives ``twistd`` our package
#: and our plugin (``twisted/plugins/nattraverse_rendezvous.py``).
REPO_ROOT = Path(__file__).resolve().parents[2]

LOOPBACK = "127.0.0.1"
#: A second loopback address, for RFC 5780 servers (Linux routes 127/8 to lo).
ALT_LOOPBACK = "127.0.0.2"

#: Seconds a server gets to start listening.
STARTUP_TIMEOUT = 15.0

#: How our server reports where it listens, once every socket is open.
_LISTENING = re.compile(r"STUN server on (?P<endpoints>.+) \(RFC 5780: (?:True|False)\)")


def free_port(host: str = LOOPBACK, *, count: int = 1) -> int:
    """
    A port of *host* on which nothing listens, for UDP and TCP, together
    with the *count* - 1 ports after it.  Another process may take it
    before the caller does; callers retry or accept that rare failure.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
            first = int(probe.getsockname()[1])
        if first + count - 1 > 65535:
            continue
        if all(_bindable(host, port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"found no {count} free consecutive port(s) on {host}")


def _bindable(host: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return False
    return True


def require_loopback_address(host: str) -> None:
    """Skip the test unless this host can bind UDP sockets to *host*."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
    except OSError as e:
        pytest.skip(
            f"cannot bind to {host} ({e}): RFC 5780 tests need a second loopback address "
            "(Linux has all of 127.0.0.0/8 on lo)"
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop a process this test started: SIGTERM, then SIGKILL; reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout)


@dataclass
class ServerProcess:
    """
    A server process a test started, with its output files.

    :ivar process: The process; :attr:`process.pid <subprocess.Popen.pid>`
        is the only process the test may signal.
    :ivar log: The server's log file.
    :ivar output: Where its stdout and stderr go.
    """

    process: subprocess.Popen[bytes]
    log: Path
    output: Path
    _output_file: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def log_text(self) -> str:
        """The log and output so far."""
        return "".join(
            path.read_text(errors="replace") for path in (self.log, self.output) if path.exists()
        )

    def rss_kib(self) -> int:
        """The resident set size of the process, in KiB (Linux ``/proc``)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
        assert match is not None, f"no VmRSS in /proc/{self.pid}/status"
        return int(match.group(1))

    def stop(self) -> None:
        """Stop the process and close its output file."""
        try:
            stop_process(self.process)
        finally:
            self._output_file.close()


def _spawn(args: Sequence[str], directory: Path, log: Path, env: dict[str, str]) -> ServerProcess:
    output = directory / "output.txt"
    output_file = output.open("wb")
    try:
        process = subprocess.Popen(
            list(args),
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output_file,
            stderr=subprocess.STDOUT,
        )
    except BaseException:
        output_file.close()
        raise
    return ServerProcess(process, log, output, output_file)


@dataclass
class Rendezvous:
    """
    Our ``twistd natrendezvous`` running in a subprocess.

    :ivar server: The process and its log.
    :ivar endpoints: The UDP endpoints it listens on, as it logged them: the
        primary first; with RFC 5780, then primary address and alternate
        port, alternate address and primary port, alternate address and port.
    """

    server: ServerProcess
    endpoints: list[Endpoint]

    @property
    def primary(self) -> Endpoint:
        """The primary address and port (UDP, and TCP on the same port)."""
        return self.endpoints[0]

    @property
    def alternate(self) -> Endpoint:
        """The alternate address and port (RFC 5780 servers only)."""
        return self.endpoints[3]

    def stop(self) -> None:
        """Stop the server."""
        self.server.stop()

    def __enter__(self) -> Rendezvous:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_rendezvous(directory: Path, *options: str, attempts: int = 3) -> Rendezvous:
    """
    Start ``twistd -n natrendezvous`` with *options* on free ports, with
    ``PYTHONPATH`` set to the repository so that twistd finds our plugin,
    and wait until it listens.  Give ``--stun-port 0`` (and ``--alt-port
    0``) in *options*; the ports are read from the log.

    :raises RuntimeError: when it does not start after *attempts* tries
        (another process may take a port between the server's UDP and TCP
        binds).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    failures = []
    for attempt in range(attempts):
        run_directory = directory / f"rendezvous-{attempt}"
        run_directory.mkdir(parents=True, exist_ok=True)
        log = run_directory / "twistd.log"
        args = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            f"--logfile={log}",
            "natrendezvous",
            *options,
        ]
        if "--listen" not in options:
            # The rendezvous on a free loopback port: never 8478, which
            # another server of the same run (or of the machine) may hold.
            args += ["--listen", "tcp:0:interface=127.0.0.1"]
        server = _spawn(args, run_directory, log, env)
        try:
            endpoints = _wait_for_listening(server, STARTUP_TIMEOUT)
        except BaseException as e:
            server.stop()
            if not isinstance(e, RuntimeError):
                raise
            failures.append(str(e))
            continue
        return Rendezvous(server, endpoints)
    raise RuntimeError("twistd natrendezvous did not start:\n" + "\n".join(failures))


def _wait_for_listening(server: ServerProcess, timeout: float) -> list[Endpoint]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.log.exists():
            match = _LISTENING.search(server.log.read_text(errors="replace"))
            if match is not None:
                return [Endpoint.parse(e) for e in match.group("endpoints").split(", ")]
        if server.process.poll() is not None:
            raise RuntimeError(
                f"twistd exited with status {server.process.returncode}:\n{server.log_text()}"
            )
        time.sleep(0.05)
    raise RuntimeError(f"twistd did not listen within {timeout}s:\n{server.log_text()}")


@dataclass
class Coturn:
    """
    coturn's ``turnserver`` in STUN-only mode, running in a subprocess.

    :ivar server: The process and its log.
    :ivar addresses: The addresses it listens on, primary first.
    :ivar port: Its listening port (UDP and TCP).
    :ivar alt_port: Its RFC 5780 alternate port (used with two addresses).
    """

    server: ServerProcess
    addresses: tuple[str, ...]
    port: int
    alt_port: int

    @property
    def primary(self) -> Endpoint:
        """The primary address and port."""
        return Endpoint(self.addresses[0], self.port)

    def stop(self) -> None:
        """Stop the server."""
        self.server.stop()


def coturn_arguments(
    turnserver: str, directory: Path, addresses: Sequence[str], port: int, alt_port: int
) -> list[str]:
    """
    The command line of a STUN-only coturn on *addresses* (one, or two for
    RFC 5780): no configuration file, no CLI, TLS, DTLS or relaying, its
    user database, log and PID file in *directory*.
    """
    args = [
        turnserver,
        "-n",  # no configuration file
        "--stun-only",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--listening-port",
        str(port),
        "--alt-listening-port",
        str(alt_port),
        "--userdb",
        str(directory / "turndb"),
        "--log-file",
        str(directory / "turn.log"),
        "--simple-log",
        "--no-stdout-log",
        "--pidfile",
        str(directory / "turn.pid"),
    ]
    for address in addresses:
        args += ["--listening-ip", address]
    if len(addresses) < 2:
        args.append("--no-rfc5780")
    return args


def start_coturn(
    turnserver: str, directory: Path, addresses: Sequence[str] = (LOOPBACK,), attempts: int = 3
) -> Coturn:
    """
    Start coturn on free ports of *addresses* and wait until it answers a
    Binding request on the primary address.

    coturn binds with ``SO_REUSEPORT``, so it can start on a port that
    another coturn holds; the ports are chosen free for plain binds.

    :raises RuntimeError: when it does not answer after *attempts* tries.
    """
    failures = []
    for attempt in range(attempts):
        run_directory = directory / f"coturn-{attempt}"
        run_directory.mkdir(parents=True, exist_ok=True)
        port = free_port(addresses[0])
        alt_port = free_port(addresses[0])
        args = coturn_arguments(turnserver, run_directory, addresses, port, alt_port)
        server = _spawn(args, run_directory, run_directory / "turn.log", dict(os.environ))
        coturn = Coturn(server, tuple(addresses), port, alt_port)
        try:
            wait_until_answers(coturn.primary, server, STARTUP_TIMEOUT)
        except BaseException as e:
            server.stop()
            if not isinstance(e, RuntimeError):
                raise
            failures.append(str(e))
            continue
        return coturn
    raise RuntimeError("coturn did not start:\n" + "\n".join(failures))


def wait_until_answers(target: Endpoint, server: ServerProcess, timeout: float) -> None:
    """
    Send Binding requests to *target* until one is answered.

    :raises RuntimeError: when the process exits, or nothing answers within
        *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.process.args!r} exited with status {server.process.returncode}:\n"
                f"{server.log_text()}"
            )
        try:
            udp_binding(target, timeout=0.1)
        except TimeoutError:
            continue
        except ConnectionRefusedError:
            # ICMP port unreachable: nothing listens yet.
            time.sleep(0.05)
            continue
        return
    raise RuntimeError(f"{target} did not answer within {timeout}s:\n{server.log_text()}")


# -- blocking Binding transactions ----------------------------------------------


def binding_request(transaction_id: bytes | None = None, *, fingerprint: bool = False) -> bytes:
    """
    A Binding request (RFC 8489 section 5): the plain 20 bytes, or with
    FINGERPRINT (which a server's fast path does not answer).
    """
    transaction_id = os.urandom(12) if transaction_id is None else transaction_id
    if fingerprint:
        return encode(Method.BINDING, MessageClass.REQUEST, transaction_id, fingerprint=True)
    return b"\x00\x01\x00\x00" + MAGIC_COOKIE_BYTES + transaction_id


def binding_success(data: bytes, request: bytes) -> Message | None:
    """
    *data* decoded, when it is the success response to *request*; else
    ``None``.
    """
    try:
        message = decode(data)
    except StunDecodeError:
        return None
    if (
        message.transaction_id != request[8:20]
        or message.method != Method.BINDING
        or message.message_class != MessageClass.SUCCESS
    ):
        return None
    return message


def mapped_address(message: Message) -> Endpoint:
    """The XOR-MAPPED-ADDRESS of a Binding response."""
    attribute = message.get(XorMappedAddress)
    assert attribute is not None, f"no XOR-MAPPED-ADDRESS in {message}"
    return attribute.address


def udp_binding(
    target: Endpoint,
    *,
    sock: socket.socket | None = None,
    timeout: float = 1.0,
    attempts: int = 1,
    fingerprint: bool = False,
) -> tuple[Endpoint, Message]:
    """
    One Binding transaction over UDP, from *sock* or from a new socket on
    127.0.0.1, sent up to *attempts* times, *timeout* seconds apart (see
    :func:`binding_request` for *fingerprint*).

    :returns: The local address and the success response.
    :raises TimeoutError: when no matching success response arrives.
    """
    own = sock is None
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOOPBACK, 0))
    try:
        local = Endpoint(*sock.getsockname()[:2])
        request = binding_request(fingerprint=fingerprint)
        for _ in range(attempts):
            sock.sendto(request, target)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    break
                message = binding_success(data, request)
                if message is not None:
                    return local, message
        raise TimeoutError(f"no Binding response from {target} after {attempts} attempt(s)")
    finally:
        if own:
            sock.close()


def tcp_binding_blocking(target: Endpoint, *, timeout: float = 2.0) -> tuple[Endpoint, Message]:
    """
    Connect to *target* over TCP, send one Binding request, read the
    response (RFC 8489 section 6.2.2).

    :returns: The local address and the success response.
    :raises AssertionError: when the answer is not the success response.
    """
    with socket.create_connection(target, timeout=timeout) as sock:
        local = Endpoint(*sock.getsockname()[:2])
        request = binding_request()
        sock.sendall(request)
        data = b""
        while len(data) < 4 or len(data) < frame_length(data):
            chunk = sock.recv(4096)
            assert chunk, f"{target} closed the connection after {len(data)} bytes"
            data += chunk
    message = binding_success(data[: frame_length(data)], request)
    assert message is not None, f"{target} sent {data.hex()}, not the Binding success response"
    return local, message
