"""
The traversal methods: the built-in ones (:mod:`~nattraverse.methods.direct`,
:mod:`~nattraverse.methods.reversal`, :mod:`~nattraverse.methods.tcp`,
:mod:`~nattraverse.methods.udp`,
:mod:`~nattraverse.methods.relay`) and
every third-party :class:`~nattraverse.interfaces.ITraversalMethod` plugin,
found with :func:`twisted.plugin.getPlugins`.

Plugin scans import this package: it imports nothing heavy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import ModuleType

from twisted.logger import Logger

from nattraverse.interfaces import ITraversalMethod

__all__ = ["BUILTIN_ORDER", "available_methods", "choose_methods"]

_log = Logger()

#: The built-in methods, in the order they are listed (and reported).
BUILTIN_ORDER: tuple[str, ...] = ("direct", "reversal", "tcp", "udp", "relay")

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}", re.ASCII)


def available_methods(package: ModuleType | None = None) -> dict[str, ITraversalMethod]:
    """
    Every traversal method plugin, by name: the built-in ones first, in
    :data:`BUILTIN_ORDER`, then the others by name.  A plugin whose name is
    malformed or already taken is skipped, with a warning.

    :param package: The plugin package to scan (``twisted.plugins`` by
        default).
    """
    from twisted.plugin import getPlugins

    found: dict[str, ITraversalMethod] = {}
    for method in getPlugins(ITraversalMethod, package):
        name = getattr(method, "name", None)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            _log.warn(
                "ignoring traversal method {method!r}: bad name {name!r}", method=method, name=name
            )
            continue
        if name in found:
            _log.warn(
                "ignoring traversal method {method!r}: {name!r} is already {other!r}",
                method=method,
                name=name,
                other=found[name],
            )
            continue
        found[name] = method

    def rank(name: str) -> tuple[int, str]:
        return (
            (BUILTIN_ORDER.index(name), "") if name in BUILTIN_ORDER else (len(BUILTIN_ORDER), name)
        )

    return {name: found[name] for name in sorted(found, key=rank)}


def choose_methods(
    wanted: Sequence[str | ITraversalMethod] | None, package: ModuleType | None = None
) -> tuple[ITraversalMethod, ...]:
    """
    The methods an endpoint uses.

    :param wanted: Method names (looked up among the plugins) and method
        objects (used as they are), in any mix; ``None``: every plugin.
    :raises ValueError: naming the method when a name is not a known
        method, or when a method is listed twice or none is.
    """
    if wanted is None:
        chosen = tuple(available_methods(package).values())
        if not chosen:
            raise ValueError("no traversal method plugin was found; is nattraverse installed?")
        return chosen
    if isinstance(wanted, str):
        raise TypeError(f"methods: give a sequence of names, not the string {wanted!r}")
    known: dict[str, ITraversalMethod] | None = None
    result: list[ITraversalMethod] = []
    for item in wanted:
        if isinstance(item, str):
            if known is None:
                known = available_methods(package)
            if item not in known:
                raise ValueError(
                    f"methods: {item!r} is not a known traversal method; "
                    f"known: {', '.join(known) or 'none'}"
                )
            method = known[item]
        elif ITraversalMethod.providedBy(item):
            method = item
        else:
            raise TypeError(f"methods: {item!r} is neither a method name nor an ITraversalMethod")
        if method.name in [m.name for m in result]:
            raise ValueError(f"methods: {method.name!r} is listed twice")
        result.append(method)
    if not result:
        raise ValueError("methods: at least one traversal method is needed")
    return tuple(result)
