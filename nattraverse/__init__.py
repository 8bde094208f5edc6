"""
nattraverse: peer-to-peer connectivity for Twisted.

This package's ``__init__`` imports nothing heavy, so that Twisted's plugin
scans stay cheap.
"""

from nattraverse._version import __version__

__all__ = ["__version__"]
