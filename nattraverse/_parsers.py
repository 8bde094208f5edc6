"""
The ``punch:`` endpoint-string parsers, registered as Twisted plugins by
``twisted/plugins/nattraverse_punch.py`` (``docs/endpoints.rst`` is the
reference for the syntax).

Plugin scans import this module, so it imports nothing heavy: the
endpoints, the identity and the nested endpoint parsing are imported when
a string is parsed.  Each parser hands its keys to a function with a real
signature (as Twisted's ``_parseClientTLS`` does), which checks every key
and converts every value explicitly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

from nattraverse._keyfile import MAX_KEY_FILE, read_key_file

if TYPE_CHECKING:
    from nattraverse.endpoints import PunchClientEndpoint, PunchServerEndpoint
    from nattraverse.identity import Identity

__all__ = [
    "ACCESS_KEY_ENVIRONMENT",
    "CLIENT_KEYS",
    "SERVER_KEYS",
    "PunchClientParser",
    "PunchServerParser",
    "parse_client",
    "parse_server",
]

#: The environment variable an access key is taken from when no file is given.
ACCESS_KEY_ENVIRONMENT = "NATTRAVERSE_ACCESS_KEY"

#: Largest access key file read (as ``twistd natrendezvous`` reads its own).
MAX_ACCESS_KEY_FILE = MAX_KEY_FILE

#: The keys each side takes.
CLIENT_KEYS = (
    "peer",
    "rendezvous",
    "identity",
    "methods",
    "timeout",
    "accessKeyFile",
    "checkInterval",
    "punchTimeout",
    "preferTcp",
    "birthdayProbes",
    "birthdayRate",
    "birthdaySockets",
)
SERVER_KEYS = (
    "name",
    "rendezvous",
    "identity",
    "port",
    "interface",
    "methods",
    "timeout",
    "accessKeyFile",
    "checkInterval",
    "punchTimeout",
    "birthdayProbes",
    "birthdayRate",
    "birthdaySockets",
)


def _check_keys(side: str, args: tuple[object, ...], kwargs: Mapping[str, object]) -> None:
    known = CLIENT_KEYS if side == "client" else SERVER_KEYS
    if args:
        raise TypeError(
            f"punch: {args[0]!r}: the {side} endpoint takes key=value arguments only "
            f"({', '.join(known)})"
        )
    for key in kwargs:
        if key not in known:
            raise TypeError(
                f"punch: unknown key {key!r}; the {side} endpoint takes {', '.join(known)}"
            )


def _required(key: str, value: str | None, why: str = "") -> str:
    if value is None or value == "":
        raise TypeError(f"punch: the key {key}= is required{why}")
    return value


def _rendezvous(reactor: Any, value: str | None) -> Any:
    from twisted.internet.endpoints import clientFromString

    description = _required("rendezvous", value, " (the rendezvous' client endpoint, escaped)")
    try:
        return clientFromString(reactor, description)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(
            f"punch: rendezvous={description!r} is not a client endpoint description: {e}"
        ) from e


def _identity(value: str) -> Identity:
    from nattraverse.errors import IdentityError
    from nattraverse.identity import load_or_create

    try:
        return load_or_create(os.path.expanduser(value))
    except IdentityError as e:
        raise ValueError(f"punch: identity={value!r}: {e}") from e


def _methods(value: str | None) -> list[str] | None:
    if value is None:
        return None
    from nattraverse.methods import available_methods

    names = [name.strip() for name in value.split(",")]
    if not value.strip() or "" in names:
        raise ValueError(f"punch: methods={value!r} is not a comma list of method names")
    known = available_methods()
    for name in names:
        if name not in known:
            raise ValueError(
                f"punch: methods={value!r}: {name!r} is not a known traversal method "
                f"(known: {', '.join(known) or 'none'})"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"punch: methods={value!r} lists a method twice")
    return names


def _positive(value: str | None, default: float, key: str, unit: str) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"punch: {key}={value!r} is not a positive number of {unit}")
    return number


def _timeout(value: str | None, default: float, key: str = "timeout") -> float:
    return _positive(value, default, key, "seconds")


def _checks(interval: str | None, deadline: str | None) -> Any:
    """The UDP checks' pacing and deadline, when either key is given."""
    if interval is None and deadline is None:
        return None
    from nattraverse.punch.checks import CheckConfig

    default = CheckConfig()
    return CheckConfig.with_deadline(
        _timeout(deadline, default.deadline, "punchTimeout"),
        ta=_timeout(interval, default.ta, "checkInterval"),
    )


def _count(value: str | None, default: int, key: str) -> int:
    if value is None:
        return default
    # (Bounded in length: int() refuses thousands of digits with a message of its own.)
    number = int(value) if value.isascii() and value.isdigit() and len(value) < 20 else 0
    if number < 1:
        raise ValueError(f"punch: {key}={value!r} is not a whole number of at least 1")
    return number


def _birthday(probes: str | None, rate: str | None, sockets: str | None) -> Any:
    """Birthday-paradox probing's budget, rate and sockets, when any key is given."""
    if probes is None and rate is None and sockets is None:
        return None
    from nattraverse.punch.birthday import BirthdayConfig

    default = BirthdayConfig()
    budget = _count(probes, default.probes, "birthdayProbes")
    per_second = _positive(rate, default.rate, "birthdayRate", "probes per second")
    count = _count(sockets, default.sockets, "birthdaySockets")
    try:
        return BirthdayConfig(probes=budget, rate=per_second, sockets=count)
    except ValueError as e:
        # The values are each acceptable, but not together (more probes than ports).
        given = {"birthdayProbes": probes, "birthdayRate": rate, "birthdaySockets": sockets}
        keys = ":".join(f"{key}={value!r}" for key, value in given.items() if value is not None)
        raise ValueError(f"punch: {keys}: {e}") from None


def _access_key(path: str | None, environ: Mapping[str, str]) -> bytes | None:
    """
    The access key: the content of *path* (a regular file others may not
    read) without surrounding whitespace, else the environment's
    ``NATTRAVERSE_ACCESS_KEY``, else none.
    """
    if path is not None:
        try:
            return read_key_file(path)
        except ValueError as e:
            raise ValueError(f"punch: accessKeyFile={path!r}: {e}") from None
    from_environment = environ.get(ACCESS_KEY_ENVIRONMENT, "").strip()
    return from_environment.encode("utf-8") if from_environment else None


def _peer(value: str) -> str:
    from nattraverse.rendezvous.commands import check_name, is_peer_id

    if is_peer_id(value):
        return value
    try:
        return check_name(value)
    except Exception as e:
        raise ValueError(f"punch: peer={value!r} is neither a name nor a peer id: {e}") from e


def _name(value: str) -> str:
    from nattraverse.rendezvous.commands import check_name

    try:
        return check_name(value)
    except Exception as e:
        raise ValueError(f"punch: name={value!r} cannot be registered: {e}") from e


def _port(value: str | None) -> int:
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit()) or not 0 <= int(value) <= 65535:
        raise ValueError(f"punch: port={value!r} is not a port number (0-65535)")
    return int(value)


def _interface(value: str | None) -> str:
    import ipaddress

    if value is None:
        return "0.0.0.0"
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"punch: interface={value!r} is not an IP address") from None


def parse_client(
    reactor: Any,
    peer: str | None = None,
    rendezvous: str | None = None,
    identity: str | None = None,
    methods: str | None = None,
    timeout: str | None = None,
    accessKeyFile: str | None = None,
    checkInterval: str | None = None,
    punchTimeout: str | None = None,
    preferTcp: str | None = None,
    birthdayProbes: str | None = None,
    birthdayRate: str | None = None,
    birthdaySockets: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> PunchClientEndpoint:
    """
    The client endpoint of ``punch:peer=...:rendezvous=...``; every
    argument is the text of the key of the same name.

    :raises TypeError: when ``peer`` or ``rendezvous`` is missing.
    :raises ValueError: naming the key and value, when a value is wrong.
    """
    from nattraverse.endpoints import PunchClientEndpoint

    wanted = _peer(_required("peer", peer, " (a name or a peer id)"))
    endpoint = _rendezvous(reactor, rendezvous)
    chosen = _methods(methods)
    seconds = _timeout(timeout, 30.0)
    key = _access_key(accessKeyFile, os.environ if environ is None else environ)
    checks = _checks(checkInterval, punchTimeout)
    prefer = 0.0 if preferTcp in (None, "0") else _timeout(preferTcp, 0.0, "preferTcp")
    birthday = _birthday(birthdayProbes, birthdayRate, birthdaySockets)
    loaded = _identity(identity) if identity is not None else None
    try:
        return PunchClientEndpoint(
            reactor,
            endpoint,
            wanted,
            identity=loaded,
            methods=chosen,
            timeout=seconds,
            access_key=key,
            checks=checks,
            prefer_tcp=prefer,
            birthday=birthday,
        )
    except ValueError as e:
        raise ValueError(f"punch: {e}") from e


def parse_server(
    reactor: Any,
    name: str | None = None,
    rendezvous: str | None = None,
    identity: str | None = None,
    port: str | None = None,
    interface: str | None = None,
    methods: str | None = None,
    timeout: str | None = None,
    accessKeyFile: str | None = None,
    checkInterval: str | None = None,
    punchTimeout: str | None = None,
    birthdayProbes: str | None = None,
    birthdayRate: str | None = None,
    birthdaySockets: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> PunchServerEndpoint:
    """
    The server endpoint of ``punch:name=...:rendezvous=...:identity=...``;
    every argument is the text of the key of the same name.

    :raises TypeError: when ``name``, ``rendezvous`` or ``identity`` is
        missing.
    :raises ValueError: naming the key and value, when a value is wrong.
    """
    from nattraverse.endpoints import PunchServerEndpoint

    wanted = _name(_required("name", name, " (the name to register)"))
    endpoint = _rendezvous(reactor, rendezvous)
    key_file = _required(
        "identity",
        identity,
        ": the key file the name is bound to (created on first use, mode 0600); "
        "keep it, or the name is lost to whoever holds the old key",
    )
    number = _port(port)
    address = _interface(interface)
    chosen = _methods(methods)
    seconds = _timeout(timeout, 30.0)
    key = _access_key(accessKeyFile, os.environ if environ is None else environ)
    checks = _checks(checkInterval, punchTimeout)
    birthday = _birthday(birthdayProbes, birthdayRate, birthdaySockets)
    loaded = _identity(key_file)
    try:
        return PunchServerEndpoint(
            reactor,
            endpoint,
            wanted,
            identity=loaded,
            port=number,
            interface=address,
            methods=chosen,
            access_key=key,
            timeout=seconds,
            checks=checks,
            birthday=birthday,
        )
    except ValueError as e:
        raise ValueError(f"punch: {e}") from e


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class PunchClientParser:
    """``punch:peer=NAME:rendezvous=DESC[:...]`` client endpoints."""

    prefix = "punch"

    def parseStreamClient(self, reactor: Any, *args: Any, **kwargs: Any) -> PunchClientEndpoint:
        """Check the keys, then build with :func:`parse_client`."""
        _check_keys("client", args, kwargs)
        return parse_client(reactor, **kwargs)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class PunchServerParser:
    """``punch:name=NAME:rendezvous=DESC:identity=FILE[:...]`` server endpoints."""

    prefix = "punch"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> PunchServerEndpoint:
        """Check the keys, then build with :func:`parse_server`."""
        _check_keys("server", args, kwargs)
        return parse_server(reactor, **kwargs)
