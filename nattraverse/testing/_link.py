"""
Impairments of a simulated link: delay, jitter, loss, duplication and
reordering, drawn from a seeded random generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from random import Random
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Link:
    """
    What happens to each packet crossing a link.

    A host's link, a NAT's uplink and a realm's core are each a
    :class:`Link`; a packet from one attachment to another in a realm
    crosses the sender's link, the realm's and the receiver's, in that
    order.  The default link is perfect and instantaneous (the packet still
    arrives through the clock, never inside ``write()``).

    :ivar delay: Seconds every packet takes.
    :ivar jitter: Up to this many seconds more, uniformly; packets may then
        overtake each other.
    :ivar loss: Probability that a packet is dropped.
    :ivar duplicate: Probability that a packet arrives twice (each copy
        with its own jitter).
    :ivar reorder: Probability that a packet is held back *reorder_delay*
        seconds more, so that the packets behind it overtake it.
    :ivar reorder_delay: See *reorder*.
    """

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.01

    def __post_init__(self) -> None:
        for name in ("delay", "jitter", "reorder_delay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Link {name} must be a finite number of seconds >= 0: {value!r}")
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value <= 1):
                raise ValueError(f"Link {name} must be a probability from 0 to 1: {value!r}")

    @property
    def perfect(self) -> bool:
        """Whether the link neither delays nor disturbs anything."""
        return self == PERFECT


PERFECT = Link()


class Fates(Protocol):
    """Counters of what links did (:class:`~nattraverse.testing.NetworkStats`)."""

    lost: int
    duplicated: int
    reordered: int


def cross(link: Link, rng: Random, fates: Fates) -> list[float]:
    """
    The extra delay of each copy of one packet that gets across *link*:
    empty when it is lost, two delays when it is duplicated.

    Random numbers are drawn only for the impairments the link has, so a
    perfect link leaves *rng* untouched.
    """
    if link.perfect:
        return [0.0]
    if link.loss and rng.random() < link.loss:
        fates.lost += 1
        return []
    copies = 1
    if link.duplicate and rng.random() < link.duplicate:
        fates.duplicated += 1
        copies = 2
    delays = []
    for _ in range(copies):
        delay = link.delay
        if link.jitter:
            delay += rng.uniform(0.0, link.jitter)
        if link.reorder and rng.random() < link.reorder:
            fates.reordered += 1
            delay += link.reorder_delay
        delays.append(delay)
    return delays
