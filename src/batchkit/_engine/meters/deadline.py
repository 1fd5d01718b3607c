"""Deadline admission as a meter: start an attempt only if it can be expected to end in time.

The expected duration is the item's ``cost=`` hint, else a high quantile (p75) of the attempt
durations this run has observed, else nothing (start: there is nothing to go by yet); capped
by the ``timeout``. ``fit_timeout=True`` is the worst case instead: the whole timeout must fit.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Final, final

from ..watchdog import SLACK

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from typing import Any

    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import StopReason

__all__ = ["DeadlineMeter"]

_QUANTILE: Final = 0.75
_WINDOW: Final = 256  # the most recent attempt durations kept
_REFRESH: Final = 16  # recompute the quantile after this many new durations


@final
class DeadlineMeter:
    __slots__ = (
        "_cost",
        "_durations",
        "_fit_timeout",
        "_loop",
        "_quantile",
        "_since",
        "_timeout",
        "by_hint",
        "by_weight",
        "deadline_at",
    )

    def __init__(
        self,
        deadline_at: float,
        loop: asyncio.AbstractEventLoop,
        *,
        timeout: float | None,
        fit_timeout: bool,
        cost: Callable[[Any], float] | None,
    ) -> None:
        self.deadline_at = deadline_at
        self._loop = loop
        self._timeout = timeout
        self._fit_timeout = fit_timeout
        self._cost = cost
        self._durations: deque[float] = deque(maxlen=_WINDOW)
        self._quantile = 0.0
        self._since = 0
        self.by_hint = False
        """Whether the last ``out_of_time`` refusal came from the item's own ``cost=``."""
        self.by_weight = False
        """Whether it came from the item's ``RateLimit.weight``, not granted in time (set by
        the weighted rate meter): a lighter item may still go, so only this one is skipped."""

    def expected(self, job: Job) -> float:
        """How long the next attempt of ``job`` is expected to take (0: no idea)."""
        timeout = self._timeout
        if self._fit_timeout and timeout is not None:
            return timeout
        hint = self._hint(job)
        guess = self._quantile if hint is None else hint
        return min(guess, timeout) if timeout is not None else guess

    def _hint(self, job: Job) -> float | None:
        """The item's own ``cost=`` hint, if it gave a usable one."""
        if self._cost is None:
            return None
        try:
            return _usable(float(self._cost(job.item)))
        except Exception:  # a broken hint was reported when the item was read
            return None

    def fits(self, cost: float) -> bool:
        """Whether an attempt with this ``cost=`` hint, started now, is expected to end in
        time (by the same rule as :meth:`wait_task_can_start`)."""
        hint = _usable(cost)
        guess = self._quantile if hint is None else hint
        if self._timeout is not None:
            guess = self._timeout if self._fit_timeout else min(guess, self._timeout)
        return self._loop.time() + guess <= self.deadline_at + SLACK

    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        now = self._loop.time()
        self.by_weight = False
        if now + SLACK >= self.deadline_at:
            return "deadline"
        if now + self.expected(job) > self.deadline_at + SLACK:
            # By the item's own hint, only this item does not fit (a cheaper one may); by
            # the run's observed durations or the timeout, nothing does.
            self.by_hint = not self._fit_timeout and self._hint(job) is not None
            return "out_of_time"
        return None

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        return None

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        if result is None or result.kind == "cancelled":
            return
        self._durations.append(result.ended - result.started)
        self._since += 1
        if self._since >= _REFRESH or len(self._durations) < _REFRESH:
            self._since = 0
            ordered = sorted(self._durations)
            self._quantile = ordered[max(0, math.ceil(_QUANTILE * len(ordered)) - 1)]


def _usable(hint: float) -> float | None:
    return hint if math.isfinite(hint) and hint >= 0 else None
