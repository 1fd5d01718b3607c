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
    __slots__ = ("_bucket", "_loop")

    def __init__(self, policy: RateLimit, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._bucket = TokenBucket(policy, loop.time())

    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        wait = self._bucket.reserve(self._loop.time())
        if wait > 0:
            await asyncio.sleep(wait)
        return None

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        return None

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        return None
