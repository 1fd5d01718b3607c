"""``item_budget=``: seconds per item across all its attempts, as a meter.

The budget runs from the item's first attempt's start (``job.first_start``). The meter is the
last the runner asks, after every wait: an attempt whose budget is spent by then does not
start (its admission fails with a budget :class:`~batchkit.ItemTimeout`, kind ``"timeout"``).
An attempt that starts is cancelled when the budget runs out, like a ``timeout=`` (and, if it
does not stop, cancelled again after ``grace`` and abandoned). The retry decision
(:mod:`~batchkit._engine.retries`) makes no retry whose backoff would reach the budget.
Only runs with a budget pay for this: one timer per attempt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from ..._model.attempt import CancelKind
from ..._model.errors import ItemTimeout
from ..watchdog import SLACK, cancel_attempt, cancel_once

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import StopReason

__all__ = ["BudgetMeter", "budget_error"]


def budget_error(budget: float) -> ItemTimeout:
    return ItemTimeout(budget, budget=True)


@final
class BudgetMeter:
    __slots__ = ("_abandon", "_budget", "_grace", "_loop", "_timers", "seconds")

    def __init__(
        self,
        budget: float,
        loop: asyncio.AbstractEventLoop,
        grace: float,
        abandon: Callable[[Slot], None],
    ) -> None:
        self._budget = self.seconds = budget
        self._loop = loop
        self._grace = grace
        self._abandon = abandon
        self._timers: dict[Slot, asyncio.TimerHandle] = {}

    def ends_at(self, job: Job) -> float:
        """Loop time at which ``job``'s budget runs out (from its first attempt's start)."""
        start = job.first_start if job.first_start is not None else self._loop.time()
        return start + self._budget

    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        if job.first_start is not None and self._loop.time() + SLACK >= self.ends_at(job):
            raise budget_error(self._budget)  # the item's failure: see the module docstring
        return None

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        # The runner starts the attempt right after this (no await between), numbering it
        # slot.gen + 1: a timer for a later attempt in this slot finds another number.
        gen = slot.gen + 1
        at = self.ends_at(job) if job.first_start is not None else now + self._budget
        self._timers[slot] = self._loop.call_at(at, self._expire, slot, gen)

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        handle = self._timers.pop(slot, None)
        if handle is not None:
            handle.cancel()

    def _expire(self, slot: Slot, gen: int) -> None:
        if slot.gen == gen and cancel_once(slot, CancelKind.BUDGET):
            self._loop.call_later(self._grace, self._escalate, slot, gen)

    def _escalate(self, slot: Slot, gen: int) -> None:
        """Still running ``grace`` after the budget's cancellation: the second and last."""
        if slot.gen == gen and not slot.abandoned:
            cancel_attempt(slot, CancelKind.BUDGET)
            self._loop.call_soon(self._abandon_if_stuck, slot, gen)

    def _abandon_if_stuck(self, slot: Slot, gen: int) -> None:
        if slot.gen == gen and not slot.abandoned:
            self._abandon(slot)
