"""Rate-limit math (GCRA, a token bucket without a timer) as pure functions of the state and now.

The state is one number, ``tat``: the theoretical arrival time of the next start. A start
reserved at ``now`` may begin at ``max(tat, now) - tolerance``; each start pushes ``tat`` one
``interval`` further. ``tolerance = (burst - 1) * interval`` is what allows ``burst`` starts at
once, and no more: a fresh bucket does not hand out a start-up burst beyond ``burst``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._policies import RateLimit

__all__ = ["TokenBucket", "reserve"]

_EPSILON = 1e-9


def reserve(tat: float, now: float, interval: float, tolerance: float) -> tuple[float, float]:
    """Reserve one start. Returns ``(new_tat, wait)``: the new state and how long to wait."""
    base = tat if tat > now else now
    allowed = base - tolerance
    # Sums of intervals drift by ulps; a nanosecond early is on time.
    wait = allowed - now if allowed - now > _EPSILON else 0.0
    return base + interval, wait


class TokenBucket:
    """The engine's limiter for a :class:`RateLimit`, judged on the times starts really happen
    (see :meth:`take`)."""

    __slots__ = ("interval", "tat", "tolerance")

    def __init__(self, policy: RateLimit, now: float) -> None:
        self.interval = 1.0 / policy.per_second
        self.tolerance = (policy.burst - 1) * self.interval
        # Start as if the bucket had just filled: ``burst`` starts may go at once, no more.
        self.tat = now

    def take(self, now: float) -> float:
        """Start now if the bucket allows it (returns 0.0, the start is counted); else the
        seconds until it would, with nothing counted. A waiter takes again when it wakes, at
        the time it really starts: a turn reserved in advance would be spent late by a loop
        that was busy when it fell due, bunched with the next ones."""
        tat, wait = reserve(self.tat, now, self.interval, self.tolerance)
        if wait <= 0.0:
            self.tat = tat
        return wait
