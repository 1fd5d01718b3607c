"""An external limiter (anything used as ``async with limiter:``) as a meter."""

from __future__ import annotations

from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import StopReason
    from ..._model.policies import AsyncLimiter

__all__ = ["LimiterMeter"]


@final
class LimiterMeter:
    __slots__ = ("_limiter",)

    def __init__(self, limiter: AsyncLimiter) -> None:
        self._limiter = limiter

    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        await self._limiter.__aenter__()
        return None

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        return None

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        await self._limiter.__aexit__(None, None, None)
