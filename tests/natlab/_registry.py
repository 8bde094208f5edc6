"""
The open labs of this process: closed at interpreter exit, and while any
is open SIGTERM raises ``KeyboardInterrupt`` in the main thread (deferred
while a lab is being closed), after calling the handler it replaced (if
that is a function, such as the Twisted reactor's), so that ``with``
blocks and pytest fixtures unwind and remove their namespaces.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.natlab.lab import Lab

__all__ = ["registry"]


class _Registry:
    """
    The open labs of this process, closed at exit; while any is open, SIGTERM
    raises ``KeyboardInterrupt`` in the main thread (deferred while the main
    thread is closing a lab) so that cleanup code runs.
    """

    def __init__(self) -> None:
        self._labs: list[Lab] = []
        self._lock = threading.Lock()
        #: How deep the main thread is in Lab.close (signal handlers run there).
        self._main_closing = 0
        self._deferred = False
        self._previous: Any = signal.SIG_DFL
        self._installed = False
        atexit.register(self.close_all)

    def add(self, lab: Lab) -> None:
        """Track *lab* and :meth:`hook` SIGTERM."""
        with self._lock:
            self._labs.append(lab)
        self.hook()

    def hook(self) -> None:
        """
        Put our SIGTERM handler first, wrapping whatever handler is there
        now (from the main thread only; a SIGTERM that is ignored stays
        ignored).  Called again whenever a lab builds, because a Twisted
        reactor started later (pytest-twisted starts one for the first
        test) installs its own handler over ours.
        """
        if not _in_main_thread():
            return
        with self._lock:
            if not self._labs:
                return
            current = signal.getsignal(signal.SIGTERM)
            if current == self._on_sigterm or current is signal.SIG_IGN or current is None:
                return
            self._previous = current
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def discard(self, lab: Lab) -> None:
        """Forget *lab*; give SIGTERM back to its previous handler when no lab is left."""
        with self._lock:
            if lab in self._labs:
                self._labs.remove(lab)
            if not self._labs and self._installed and _in_main_thread():
                self._uninstall()

    def _uninstall(self) -> None:
        # Only if nobody replaced our handler meanwhile.
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False

    def closing(self) -> _Closing:
        """A context for Lab.close: SIGTERM waits until it ends."""
        return _Closing(self)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        if not self._labs:
            # Every lab is closed (the last one in another thread): as if never hooked.
            self._uninstall()
            if previous is signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGTERM)
            elif callable(previous):
                previous(signum, frame)
            return
        if callable(previous):
            # e.g. the Twisted reactor's handler (pytest-twisted runs one): let it
            # stop its reactor, then unwind so that the labs are removed.
            previous(signum, frame)
        if self._main_closing:
            self._deferred = True
            return
        raise KeyboardInterrupt("SIGTERM: closing the NAT lab")

    def close_all(self) -> None:
        """Close every open lab (at interpreter exit)."""
        for lab in list(self._labs):
            lab.close(raise_errors=False)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _Closing:
    def __init__(self, registry: _Registry) -> None:
        self.registry = registry
        self.main = _in_main_thread()

    def __enter__(self) -> None:
        if self.main:
            self.registry._main_closing += 1

    def __exit__(self, *exc_info: object) -> None:
        registry = self.registry
        if not self.main:
            return
        registry._main_closing -= 1
        if not registry._main_closing and registry._deferred:
            registry._deferred = False
            raise KeyboardInterrupt("SIGTERM: closed the NAT lab")


#: The registry of this process.
registry = _Registry()
