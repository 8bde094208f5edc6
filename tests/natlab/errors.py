"""
Errors of the NAT lab.
"""

from __future__ import annotations

__all__ = ["LabError", "LabUnavailable"]


class LabError(Exception):
    """A lab could not be built, used or removed; the message names the step."""


class LabUnavailable(LabError):
    """
    This machine cannot build what was asked (no root, no network
    namespaces, a missing program); tests turn it into a skip that names
    what to install.
    """
