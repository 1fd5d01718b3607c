"""What follows an attempt that did not succeed at once: the retry policy's answer, the items
waiting for their retry, and the envelope of an item that ends.

:meth:`Retries.run_job` takes an item from its first failed attempt to its end (or to the
heap, released from its slot). :meth:`Retries.delay` asks the pure
:func:`~batchkit._engine.decide.next_retry` (it runs user code: ``retry_on``, the error's
``retry_after``; if that raises, the item is not retried and its error says why). Items
released from their slot while they wait (``hold_slot=False``) wait in a heap by the loop
time of their next attempt.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import TYPE_CHECKING, Any, final

from .._model.errors import ItemTimeout, add_note, describe
from .._model.outcomes import make_success
from . import ledger as envelopes
from .decide import next_retry, too_late
from .watchdog import SLACK

if TYPE_CHECKING:
    import random
    from collections.abc import Callable

    from .._model.attempt import AttemptResult, Job, Slot
    from .._model.outcomes import Outcome
    from .._model.policies import Retry
    from .intake import Intake
    from .ledger import Ledger
    from .meters.budget import BudgetMeter
    from .meters.deadline import DeadlineMeter
    from .runner import Runner
    from .sinks import Sink
    from .stopper import Stopper

__all__ = ["Retries"]


@final
class Retries:
    """The retries of one run under ``policy`` (``None``: no retry). ``record`` and
    ``stopped`` are the workers': record an envelope (and act on the threshold it reaches),
    and end an item the run stopped around."""

    __slots__ = (
        "_deadline",
        "_intake",
        "_ledger",
        "_loop",
        "_put_success",
        "_record",
        "_rng",
        "_runner",
        "_stopped",
        "_stopper",
        "_wake",
        "budget",
        "heap",
        "policy",
    )

    def __init__(
        self,
        policy: Retry | None,
        *,
        ledger: Ledger[Any, Any],
        stopper: Stopper,
        intake: Intake[Any],
        sink: Sink[Any, Any],
        wake: Callable[[], None],
        record: Callable[[Outcome[Any, Any], Job], None],
        stopped: Callable[..., None],
    ) -> None:
        self.policy = policy
        self.heap: list[Job] = []
        """Jobs released from their slot until ``job.ready`` (loop time)."""
        self._rng: random.Random | None = policy.rng if policy is not None else None
        self._ledger = ledger
        self._stopper = stopper
        self._intake = intake
        self._put_success = sink.success_writer()
        self._wake = wake
        self._record = record
        self._stopped = stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Runner | None = None
        self._deadline: DeadlineMeter | None = None
        self.budget: BudgetMeter | None = None
        """The ``item_budget`` meter: no retry whose backoff would reach the budget."""

    def start(
        self, loop: asyncio.AbstractEventLoop, runner: Runner, deadline: DeadlineMeter | None
    ) -> None:
        self._loop, self._runner, self._deadline = loop, runner, deadline

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def run_job(self, slot: Slot, job: Job, result: AttemptResult) -> None:
        """After a first attempt that did not succeed: the retries of the item until it ends
        or is released to the retry heap."""
        runner = self._runner
        assert runner is not None
        while True:
            if result.kind == "settled":
                return  # a hedged item's pair took it over (hedges.py)
            if result.kind == "success":
                self.succeeded(job, result)
                return
            if not await self._retry_after(slot, job, result):
                return
            if self._stopper.stopping:
                self._stopped(job, running=False)
                return
            result = await runner.run(slot, job)
            if slot.abandoned:
                return  # its envelope was given when it was abandoned

    async def _retry_after(self, slot: Slot, job: Job, result: AttemptResult) -> bool:
        """After a failed attempt: True to run the next attempt in this slot now."""
        delay = self._failed_attempt(job, result)
        if delay is None:
            return False
        job.attempt += 1
        assert self.policy is not None
        assert self._loop is not None
        if not self.policy.hold_slot:
            self.park(job, self._loop.time() + delay)
            # An idle worker may be sleeping until a later retry: wake it to re-plan.
            self._wake()
            return False
        if delay > 0:
            slot.cancellable = True
            try:
                await asyncio.sleep(delay)
            finally:
                slot.cancellable = False
        return True

    def succeeded(self, job: Job, result: AttemptResult) -> None:
        """Record a successful attempt: as columns when no one listens (and no failure ratio
        waits for its sample), else as an envelope that observers hear of."""
        assert job.first_start is not None
        elapsed = result.ended - job.first_start
        if self._ledger.careful:
            self._record(make_success(job.item, result.value, job.index, job.attempt, elapsed), job)
        else:
            self._ledger.finished += 1
            self._put_success(job.item, result.value, job.index, job.attempt, elapsed)

    def _failed_attempt(self, job: Job, result: AttemptResult) -> float | None:
        """Record what a failed attempt means; the seconds until a retry, or None."""
        kind, error = result.kind, result.error
        if kind == "refused":
            assert result.reason is not None
            if result.reason == "circuit_open":  # only this item: its circuit is open
                self._record(envelopes.skipped(job, "circuit_open", self._now()), job)
                return None
            if result.reason == "out_of_time" and self._another_fits():
                # This item's own cost= does not fit: only it is skipped.
                self._record(envelopes.skipped(job, "out_of_time", self._now()), job)
                return None
            self._stopper.no_more_starts(result.reason)
            self._stopped(job, running=False)
            return None
        if kind == "cancelled":
            self._stopped(job, running=True)
            return None
        assert error is not None
        if job.errors is None:
            job.errors = []
        job.errors.append(error)
        job.last_kind = kind
        delay = self.delay(job, kind, error) if not self._stopper.stopping else None
        if isinstance(error, ItemTimeout) and error.budget:
            delay = None  # the item's budget ran out: that is its end
        deadline = self._deadline
        dropped = (
            delay is not None
            and deadline is not None
            and too_late(
                delay, now=result.ended, deadline_at=deadline.deadline_at,
                expected=deadline.expected(job),
            )
        )  # fmt: skip
        spent = self._budget_spent(job, delay, result.ended)
        if spent and dropped:
            # The earlier of the item's budget and the run's deadline decides.
            assert deadline is not None
            budget_ends = self.budget.ends_at(job) if self.budget is not None else 0.0
            dropped = budget_ends > deadline.deadline_at
            spent = not dropped
        if dropped or spent:
            delay = None  # AttemptFailed does not announce a retry that will not happen
        if self._ledger.emit_events:
            self._ledger.attempt_failed(job, error, kind, delay, result.ended)
        if dropped:
            self._record(envelopes.skipped(job, "out_of_time", self._now()), job)
        elif spent:
            self._record(envelopes.budget_spent(job, self._budget_seconds(), result.ended), job)
        elif delay is None:
            self._record(envelopes.last_error(job, result.ended), job)
        return delay

    def _budget_spent(self, job: Job, delay: float | None, now: float) -> bool:
        """Whether a retry in ``delay`` seconds would start at or past the item's budget
        (False when it is not retried anyway, or has no budget)."""
        budget = self.budget
        return (
            delay is not None and budget is not None and now + delay + SLACK >= budget.ends_at(job)
        )

    def _budget_seconds(self) -> float:
        assert self.budget is not None
        return self.budget.seconds

    def _another_fits(self) -> bool:
        """An item was refused for ``out_of_time`` by its own ``cost=`` hint: whether an item
        read ahead (or waiting to retry) may still fit. Then only that item is skipped; else
        nothing more fits, judged on what was read (``batch_size=`` items ahead)."""
        deadline = self._deadline
        if deadline is not None and deadline.by_weight:
            deadline.by_weight = False
            return True  # refused by its weight: each item's own weight decides for it
        if deadline is None or not deadline.by_hint:
            return False  # by the run's observed durations: nothing fits
        fits = deadline.fits
        return any(fits(-cost) for cost, _, _ in self._intake.buffer) or any(
            fits(deadline.expected(job)) for job in self.heap
        )

    def delay(self, job: Job, kind: str, error: BaseException) -> float | None:
        """Seconds until ``job``'s next attempt, or None: it ends with this error."""
        try:
            return next_retry(
                self.policy, attempt=job.attempt, kind=kind, error=error, draw=self._draw()
            )
        except Exception as hook_error:
            add_note(
                error,
                "batchkit: not retried: deciding on a retry (Retry.retry_on, or the error's "
                f"retry_after) raised {describe(hook_error)}",
            )
            return None

    def _draw(self) -> float:
        """The backoff's random draw; the source is made on first use (start-up time)."""
        if self._rng is None:
            import random

            self._rng = random.Random()
        return self._rng.random()

    def park(self, job: Job, ready: float) -> None:
        """``job`` waits out of any slot until loop time ``ready``."""
        job.ready = ready
        heapq.heappush(self.heap, job)

    def ready(self, now: float, pick: Callable[[Job], bool] | None = None) -> Job | None:
        """The first parked job whose time has come (within the clock's resolution); with
        ``pick`` (limit groups), the first of those that ``pick`` takes."""
        heap = self.heap
        if pick is None:
            if heap and heap[0].ready <= now + SLACK:
                return heapq.heappop(heap)
            return None
        passed: list[Job] = []
        found = None
        while heap and heap[0].ready <= now + SLACK:
            job = heapq.heappop(heap)
            if pick(job):
                found = job
                break
            passed.append(job)
        for job in passed:
            heapq.heappush(heap, job)
        return found

    def next_at(self) -> float | None:
        """When the first parked job is due, if any."""
        return self.heap[0].ready if self.heap else None

    def drain(self) -> list[Job]:
        """Every parked job, soonest first: the run ended before their retries."""
        heap, self.heap = self.heap, []
        return [heapq.heappop(heap) for _ in range(len(heap))]
