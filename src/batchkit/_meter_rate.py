"""``RateLimit`` as a meter: each attempt waits for its turn in a token bucket (GCRA)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, final

from ._ratelimit import TokenBucket

if TYPE_CHECKING:
    from ._attempt import Job, Slot
    from ._errors import StopReason
    from ._policies import RateLimit
    from ._runner import AttemptResult

__all__ = ["RateMeter"]


@final
class RateMeter:
    """Attempts start in arrival order, each when the bucket allows it at the moment it really
    starts. One waiter at a time (a FIFO lock) re-checks after every sleep, so a loop stalled
    past several due turns releases one start and paces the rest, never a bunch."""

    __slots__ = ("_bucket", "_lock", "_loop")

    def __init__(self, policy: RateLimit, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._bucket = TokenBucket(policy, loop.time())
        self._lock = asyncio.Lock()

    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        bucket, loop = self._bucket, self._loop
        if not self._lock.locked() and bucket.take(loop.time()) <= 0.0:
            return None  # nobody waiting and a token free: no lock on the fast path
        async with self._lock:
            while True:
                wait = bucket.take(loop.time())
                if wait <= 0.0:
                    return None
                await asyncio.sleep(wait)

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        return None

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        return None
