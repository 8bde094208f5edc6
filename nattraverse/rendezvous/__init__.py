"""
The rendezvous: where peers register their names, are introduced to each
other, ask for connection reversal, and meet in the relay.

:mod:`~nattraverse.rendezvous.commands` is the wire schema (AMP commands),
shared by :mod:`~nattraverse.rendezvous.server` and
:mod:`~nattraverse.rendezvous.client`.  See ``docs/protocol.rst``.
"""
