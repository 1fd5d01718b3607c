"""``RateLimit`` as a meter: each attempt waits for its turn in a token bucket (GCRA)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, final

from ..._model.errors import InvalidArgument, safe_repr
from .rate_math import TokenBucket

if TYPE_CHECKING:
    import asyncio

    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import StopReason
    from ..._model.policies import RateLimit
    from .deadline import DeadlineMeter

__all__ = ["RateMeter", "WeightedRateMeter"]


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


def checked_weight(weight: object, burst: int, whose: str) -> float:
    """What a ``weight=`` callable (user code) returned for an item, checked: a finite number
    > 0 and at most ``burst`` (a bucket never holds more, so it would wait forever); else
    ``InvalidArgument``, that item's error. ``whose`` names the rate limit in the message."""
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise InvalidArgument(
            f"{whose}.weight must return a finite number > 0, got {safe_repr(weight)} for "
            "this item\nHINT: weigh each item by what the quota counts, e.g. its tokens"
        )
    if weight > burst:
        raise InvalidArgument(
            f"{whose}.weight {weight!r} of this item is larger than its burst={burst}: the "
            "bucket never holds that much, so it could never start\nHINT: raise burst= to "
            "the largest weight, or split the item"
        )
    return float(weight)


@final
class WeightedRateMeter:
    """``RateLimit(weight=...)``: as :class:`RateMeter`, each start taking the item's weight
    (a class of its own so that the unweighted path stays as it is)."""

    __slots__ = ("_bucket", "_burst", "_deadline", "_loop", "_weight")

    def __init__(
        self, policy: RateLimit, loop: asyncio.AbstractEventLoop, deadline: DeadlineMeter | None
    ) -> None:
        assert policy.weight is not None
        self._loop = loop
        self._bucket = TokenBucket.of(policy, loop.time())
        self._burst = policy.burst
        self._weight = policy.weight
        self._deadline = deadline

    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        weight = self.weigh(job.item)
        deadline = self._deadline
        until = deadline.deadline_at if deadline is not None else None
        if await self._bucket.wait_weighted(self._loop, weight, until):
            return None
        assert deadline is not None
        deadline.by_weight = True  # this item's own weight does not fit: a lighter one may
        return "out_of_time"

    def weigh(self, item: object) -> float:
        """The item's weight; ``InvalidArgument`` (that item's error) if it is no number
        > 0, or more than the bucket holds (it would wait forever)."""
        return checked_weight(self._weight(item), self._burst, "RateLimit")

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        return None

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        return None
