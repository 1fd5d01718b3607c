"""Rate-limit math (GCRA, a token bucket without a timer) as pure functions of the state and now.

The state is one number, ``tat``: the theoretical arrival time of the next start. A start
reserved at ``now`` may begin at ``max(tat, now) - tolerance``; each start pushes ``tat`` one
``interval`` further. ``tolerance = (burst - 1) * interval`` is what allows ``burst`` starts at
once, and no more: a fresh bucket does not hand out a start-up burst beyond ``burst``.

A start of weight ``w`` (``RateLimit(weight=...)``) is ``w`` starts at once: it may begin at
``max(tat, now) + (w - 1) * interval - tolerance`` and pushes ``tat`` by ``w`` intervals;
``w = 1`` is the rule above. A weight above ``burst`` could never begin.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..._model.policies import RateLimit

__all__ = ["TokenBucket", "reserve", "reserve_weighted"]

_EPSILON = 1e-9


def reserve(tat: float, now: float, interval: float, tolerance: float) -> tuple[float, float]:
    """Reserve one start. Returns ``(new_tat, wait)``: the new state and how long to wait."""
    base = tat if tat > now else now
    allowed = base - tolerance
    # Sums of intervals drift by ulps; a nanosecond early is on time.
    wait = allowed - now if allowed - now > _EPSILON else 0.0
    return base + interval, wait


def reserve_weighted(
    tat: float, now: float, interval: float, tolerance: float, weight: float
) -> tuple[float, float]:
    """Reserve a start of ``weight`` tokens (at most ``burst``). As :func:`reserve`."""
    base = tat if tat > now else now
    allowed = base + (weight - 1.0) * interval - tolerance
    wait = allowed - now if allowed - now > _EPSILON else 0.0
    return base + weight * interval, wait


class TokenBucket:
    """A :class:`RateLimit`'s bucket (the engine's, and each Dask worker's share of a
    cluster-wide one), judged on the times starts really happen (see :meth:`wait_turn`)."""

    __slots__ = ("_lock", "interval", "tat", "tolerance")

    def __init__(self, per_second: float, burst: int, now: float) -> None:
        self.set_rate(per_second, burst)
        # Start as if the bucket had just filled: ``burst`` starts may go at once, no more.
        self.tat = now
        self._lock = asyncio.Lock()

    @classmethod
    def of(cls, policy: RateLimit, now: float) -> TokenBucket:
        return cls(policy.per_second, policy.burst, now)

    def set_rate(self, per_second: float, burst: int) -> None:
        """A new rate from now on (a Dask worker's share, re-split as workers come and go)."""
        self.interval = 1.0 / per_second
        self.tolerance = (burst - 1) * self.interval

    def take(self, now: float) -> float:
        """Start now if the bucket allows it (returns 0.0, the start is counted); else the
        seconds until it would, with nothing counted."""
        tat, wait = reserve(self.tat, now, self.interval, self.tolerance)
        if wait <= 0.0:
            self.tat = tat
        return wait

    async def wait_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until this start may go, in arrival order. One waiter at a time (a FIFO lock)
        takes its token when it wakes, at the time it really starts: a turn reserved ahead
        would be spent late by a loop that was busy when it fell due, bunched with the next
        ones, so a stalled loop releases one start and paces the rest."""
        if not self._lock.locked() and self.take(loop.time()) <= 0.0:
            return  # nobody waiting and a token free: no lock on the fast path
        async with self._lock:
            while True:
                wait = self.take(loop.time())
                if wait <= 0.0:
                    return
                await asyncio.sleep(wait)

    def take_weighted(self, now: float, weight: float) -> float:
        """As :meth:`take`, for a start of ``weight`` tokens."""
        tat, wait = reserve_weighted(self.tat, now, self.interval, self.tolerance, weight)
        if wait <= 0.0:
            self.tat = tat
        return wait

    async def wait_weighted(
        self, loop: asyncio.AbstractEventLoop, weight: float, until: float | None
    ) -> bool:
        """As :meth:`wait_turn`, for a start of ``weight`` tokens; False (nothing taken) if
        it could only be granted after ``until`` (the run's deadline)."""
        if not self._lock.locked() and self.take_weighted(loop.time(), weight) <= 0.0:
            return True
        async with self._lock:
            while True:
                now = loop.time()
                wait = self.take_weighted(now, weight)
                if wait <= 0.0:
                    return True
                if until is not None and now + wait > until:
                    return False
                await asyncio.sleep(wait)
