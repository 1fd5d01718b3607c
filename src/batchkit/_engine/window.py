"""The sliding window: the workers and their loop.

One worker task per concurrency slot, started lazily, never more than there is work for;
each takes the next job (a ready retry, else a new item from the intake), runs it through the
runner and records a first attempt's success inline; what follows any other attempt is
:class:`~batchkit._engine.retries.Retries`'. The threshold reasons the ledger returns are
acted on here (:meth:`Window.stop`, through the stopper), and so is work that does not stop
(:meth:`Window.abandon`).
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import TYPE_CHECKING, Generic, TypeVar

from .._model.attempt import _SLOT, Slot
from . import ledger as envelopes
from .picks import GroupPicks
from .retries import Retries
from .waits import YIELD_EVERY_SECONDS

if TYPE_CHECKING:
    from .._model.attempt import Job, RunInfo
    from .._model.errors import StopReason
    from .._model.outcomes import Outcome
    from .hedges import Hedges
    from .intake import Intake
    from .journal import RunJournal
    from .ledger import Ledger
    from .meters.budget import BudgetMeter
    from .meters.deadline import DeadlineMeter
    from .meters.groups import Groups
    from .plan import Plan
    from .runner import Runner
    from .sinks import Sink
    from .stopper import Stopper
    from .waits import Waits

__all__ = ["Window"]

T = TypeVar("T")
R = TypeVar("R")


class Window(Generic[T, R]):
    """The workers of one run, over the engine's parts; :meth:`start` when the loop runs."""

    def __init__(
        self,
        plan: Plan,
        sink: Sink[T, R],
        intake: Intake[T],
        ledger: Ledger[T, R],
        stopper: Stopper,
        waits: Waits,
        slots: list[Slot],
    ) -> None:
        self._p = plan
        self._sink = sink
        self._intake = intake
        self._ledger = ledger
        self._stopper = stopper
        self._waits = waits
        self.retries = Retries(
            plan.retry, ledger=ledger, stopper=stopper, intake=intake, sink=sink,
            wake=self._wake, record=self._record, stopped=self.stopped,
        )  # fmt: skip
        self._slots = slots
        self._put_success = sink.success_writer()
        self.active = 0  # jobs held by workers (in an attempt, a backoff or a meter)
        self._live: set[Slot] = set()  # workers that may still do work (not ended, abandoned
        # or waiting only for a thread that outlived its timeout)
        self._outliving = 0  # workers waiting for a timed-out thread to return
        self.quiet: asyncio.Future[None] | None = None
        """Resolved once no worker is left that could still do work."""
        self.abandoned: list[int] = []
        self.fatal: list[BaseException] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run: RunInfo | None = None
        self._runner: Runner | None = None
        self._deadline: DeadlineMeter | None = None
        self._picks: GroupPicks | None = None  # with limit groups (picks.py)
        self.hedges: Hedges | None = None  # with hedge= (hedges.py, wired by the engine)
        self._base_context = contextvars.copy_context()
        self.journal: RunJournal | None = None  # with journal=: it ends resumed items

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        run: RunInfo,
        runner: Runner,
        deadline: DeadlineMeter | None,
        groups: Groups | None = None,
        budget: BudgetMeter | None = None,
    ) -> None:
        """Each worker runs in a fresh copy of the caller's context (see the runner)."""
        self._loop, self._run, self._runner, self._deadline = loop, run, runner, deadline
        self.retries.budget = budget
        if groups is not None:
            self._picks = GroupPicks(groups, self._intake, self.retries, loop)
            groups.attach(run, self._wake, deadline)
        self.retries.start(loop, runner, deadline)
        self._base_context = contextvars.copy_context()
        self.quiet = loop.create_future()

    async def _pull(self, slot: Slot) -> Job | None:
        """The next item to start (waiting for an async input is cancellable by a stop)."""
        groups = self._picks.groups if self._picks is not None else None
        slot.cancellable = True
        try:
            return await self._intake.pull(self._bad_cost, groups)
        finally:
            slot.cancellable = False

    def _bad_cost(self, job: Job, error: Exception) -> None:
        self._record(envelopes.bad_cost(job, error), job)

    def input_failed(self) -> None:
        self._stopper.stopping = True
        self._wake()

    def spawn(self) -> None:
        assert self._loop is not None
        assert self._run is not None
        slot = Slot(self._run)
        self._slots.append(slot)
        self._live.add(slot)
        # Each worker runs in a fresh copy of the caller's context (see _runner).
        slot.task = self._loop.create_task(self._worker(slot), context=self._base_context.copy())

    def _grow(self) -> None:
        """An unsized input had one more item: start one more worker, up to the limit."""
        if len(self._slots) < self._p.slots and not self._stopper.stopping and self.work_left():
            self.spawn()

    async def _worker(self, slot: Slot) -> None:
        _SLOT.set(slot)  # this task's own context: what current_attempt() reads
        slot.baseline = contextvars.copy_context()
        try:
            await self._work(slot)
        except asyncio.CancelledError:
            if not (self._stopper.stopping and slot.cancels):
                raise
            # Ours: the run is stopping. The job this worker held (waiting for a limiter,
            # a backoff, room) never started again: give it its envelope.
        except BaseException as e:  # a BaseException from fn: the run ends with it
            self.fatal.append(e)
            self._stopper.halt()
        finally:
            if not slot.abandoned:
                job, slot.job = slot.job, None
                if job is not None:
                    self.stopped(job, running=False)
            self._live.discard(slot)
            self.check_quiet()

    async def _work(self, slot: Slot) -> None:
        """Take the next job (a ready retry, else a new item), run it, repeat. The first
        attempt's success is handled here, inline: it is what nearly every item does, and a
        call level costs about 5% of the per-item overhead. The parts are read through
        locals: an attribute of a local costs what an attribute of ``self`` does."""
        intake, ledger, stopper, waits = self._intake, self._ledger, self._stopper, self._waits
        grow = intake.total is None
        picks = self._picks
        plain = intake.it is not None and self._p.cost is None and picks is None
        pull_now = intake.pull_now if plain else None
        room = None if self._sink.keeps else self._sink.room  # a batch never waits for room
        retries = self.retries
        heap = retries.heap
        loop = self._loop
        assert loop is not None
        run = self._runner.run if self._runner is not None else None
        assert run is not None
        wake_after = self._p.retry is not None
        clock = waits.clock
        put_success = self._put_success
        pick = picks.take if picks is not None else None
        while not stopper.stopping and not slot.abandoned:
            if picks is not None:
                await picks.round()  # the places of attempts ended this turn are back
            job = retries.ready(loop.time(), pick) if heap else None
            if job is None and (room is None or room(intake.next_index)):
                job = pull_now() if pull_now is not None else await self._pull(slot)
                if job is not None and grow:
                    self._grow()
                if self.journal is not None and job is not None and self.journal.takes(job, picks):
                    continue  # resumed (or a duplicate key): it does not run
            if job is None:
                if not await self._wait_for_work():
                    return
                continue
            slot.job = job
            self.active += 1
            result = await run(slot, job)
            if result.kind == "success" and not slot.abandoned:
                assert job.first_start is not None
                elapsed = result.ended - job.first_start
                if ledger.careful:
                    self.retries.succeeded(job, result)
                else:  # _succeeded's common case, inline: no envelope is built for a batch
                    ledger.finished += 1
                    put_success(job.item, result.value, job.index, job.attempt, elapsed)
            elif not slot.abandoned:
                await self.retries.run_job(slot, job, result)
            self.active -= 1
            slot.job = None
            if wake_after:
                self._wake()
            if (slot.polluted or slot.thread is not None) and not await self._carry_on(slot):
                return
            # Starvation guard: see waits.py.
            waits.budget -= 1
            if waits.budget <= 0 or clock() - waits.slice_start > YIELD_EVERY_SECONDS:
                await waits.pause()

    async def _carry_on(self, slot: Slot) -> bool:
        """After an item that set a context variable or ran in a thread: False if a fresh
        worker takes over (so the next item sees the caller's context); waits for a thread
        that outlived its timeout."""
        if slot.polluted:
            self.spawn()
            return False
        if slot.thread is not None and not slot.thread.done():
            await self._outlive(slot)
        return True

    async def _wait_for_work(self) -> bool:
        """Nothing to start now: wait for a retry, room or an item's end; False: leave."""
        if self._stopper.stopping:
            return False
        assert self._loop is not None
        heap = self.retries.heap
        no_room = not self._sink.room(self._intake.next_index)
        picks = self._picks
        if picks is not None and not no_room and picks.blocked():
            await self._waits.idle(picks.ready_at())
            return True
        more_retries = self._p.retry is not None and not self._p.retry.hold_slot and self.active
        if not (heap or no_room or more_retries):
            self._wake()  # others parked for retries: the input is done, so may they be
            return False
        if no_room and not heap:
            await self._waits.for_room()
            return True
        await self._waits.idle(self.retries.next_at())
        return True

    async def _outlive(self, slot: Slot) -> None:
        """A sync ``fn``'s thread outlived its timeout: it keeps counting against the
        concurrency until it returns — unless the run has nothing else left to do."""
        thread = slot.thread
        assert thread is not None
        assert self._loop is not None
        self._live.discard(slot)
        self._outliving += 1
        slot.cancellable = True
        self.check_quiet()
        try:
            await asyncio.wrap_future(thread, loop=self._loop)
        except asyncio.CancelledError:
            if not slot.cancels:
                raise
            slot.abandoned = True  # the run ended; the thread is counted in threads_running
        finally:
            slot.cancellable = False
            self._outliving -= 1
            if not slot.abandoned:
                self._live.add(slot)

    def _wake(self) -> None:
        self._waits.wake()

    def wake_all(self) -> None:
        """Every waiting worker, and a stream's consumer: the run is stopping."""
        self._wake()
        self._sink.wake()

    def check_quiet(self) -> None:
        """Resolve the supervisor's wait once no worker is left that could still do work."""
        fut = self.quiet
        if fut is None or fut.done() or self._live:
            return
        if self._outliving and not self._stopper.stopping and self.work_left():
            return  # every slot is held by a thread that outlived its timeout: wait for one
        self._stopper.quiet_slots()
        fut.set_result(None)

    def work_left(self) -> bool:
        return self._intake.more() or bool(self.retries.heap)

    def on_start(self, slot: Slot, job: Job, now: float) -> None:
        if self._ledger.emit_events:  # off once every observer was dropped mid-run
            self._ledger.item_started(job, self.in_flight(), now)

    def _record(self, outcome: Outcome[T, R], job: Job | None = None) -> None:
        """To the ledger (the sink, the observers, the counts); then act on the threshold
        it says was reached."""
        if self.hedges is not None and job is not None and not self.hedges.passes(outcome, job):
            return  # a member of a hedged item's pair: its twin decides, or the pair records
        reason = self._ledger.record(outcome, job)
        if reason is not None:
            self.stop(reason)

    def stopped(self, job: Job, *, running: bool) -> None:
        """The run stopped around ``job``: ``cancelled`` if it was running, else ``skipped``."""
        reason: StopReason = self._stopper.reason or "fail_fast"
        self._record(envelopes.stopped(job, reason, self._clock(), running=running), job)

    def stop(self, reason: StopReason) -> None:
        """Start nothing new and cancel what is in flight (the stopper decides, then acts)."""
        stopper = self._stopper
        if not stopper.takes(reason):
            return
        if self._ledger.emit_events and reason != "deadline":
            self._ledger.run_stopping(reason)
        stopper.no_more_starts(reason)
        stopper.halt()

    def abandon(self, slot: Slot) -> None:
        """Work that did not stop after two cancellations: give its item its envelope, list
        it in the report, and stop waiting for it."""
        slot.abandoned = True
        job, slot.job = slot.job, None
        stopper = self._stopper
        if job is not None:
            self.abandoned.append(job.index)
            out = envelopes.abandoned(job, slot.cancel_kind, self._p, stopper, self._clock())
            if out is None:  # the run's stop cut it
                self.stopped(job, running=slot.in_attempt)
            else:
                self._record(out, job)
        self._live.discard(slot)
        self.check_quiet()
        if not stopper.stopping:
            self.spawn()

    def _clock(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def in_flight(self) -> int:
        return self._runner.in_flight if self._runner is not None else 0
