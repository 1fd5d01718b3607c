"""``RateLimit`` as a meter: each attempt waits for its turn in a token bucket (GCRA)."""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from .rate_math import TokenBucket

if TYPE_CHECKING:
    import asyncio

    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import StopReason
    from ..._model.policies import RateLimit

__all__ = ["RateMeter"]


@final
class RateMeter:
    """Attempts start in arrival order, each when the bucket allows it at the moment it really
    starts (see :meth:`TokenBucket.wait_turn`)."""

    __slots__ = ("_bucket", "_loop")

    def __init__(self, policy: RateLimit, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._bucket = TokenBucket.of(policy, loop.time())

    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        await self._bucket.wait_turn(self._loop)
        return None

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        return None

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        return None
