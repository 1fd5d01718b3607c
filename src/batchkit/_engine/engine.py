"""The local sliding-window scheduler, built from parts.

Workers — one task per concurrency slot, started lazily, never more than there is work for —
pull the next item the moment their previous one ends: no barrier, no task per item. The
parts, each with one job: the :class:`~batchkit._engine.intake.Intake` takes items (keys,
the ``cost=`` read-ahead, closing the input); each attempt goes through the
:class:`~batchkit._engine.runner.Runner` (admission, context, ``fn``, timeout); what follows a
failed attempt is the pure :func:`~batchkit._engine.decide.next_retry`; the
:class:`~batchkit._engine.ledger.Ledger` counts, builds envelopes, records them to the sink and
the observers and says when a threshold is reached; the
:class:`~batchkit._engine.stopper.Stopper` ends the run (a threshold, the deadline, the
caller's cancel): it cancels what runs, waits at most ``grace``, cancels once more and abandons
what still runs, so the call always returns. The first attempt's success stays inline here.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._model.attempt import _SLOT, AttemptResult, CancelKind, Job, RunInfo, Slot
from .._model.outcomes import make_success
from .._model.report import BatchReport, InputFailed
from . import ledger as envelopes
from .decide import too_late
from .intake import Intake
from .ledger import Ledger
from .meters import open_meters
from .retries import Retries
from .runner import Runner, loop_clock
from .sinks import BatchSink, Sink
from .stopper import Stopper
from .waits import YIELD_EVERY_SECONDS, Waits
from .watchdog import Watchdog

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from .._model.errors import StopReason
    from .._model.outcomes import Outcome
    from .meters.adaptive import AdaptiveMeter
    from .meters.base import Meter
    from .meters.deadline import DeadlineMeter
    from .plan import Plan

__all__ = ["Engine"]

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger("batchkit")


class Engine(Generic[T, R]):
    """Runs one batch. Create, then ``await run()`` exactly once."""

    def __init__(self, plan: Plan, items: Any, sink: Sink[T, R] | None = None) -> None:
        self._p = plan
        self._sink: Sink[T, R] = sink if sink is not None else BatchSink()
        self._intake: Intake[T] = Intake(
            items, key=plan.key, keep_keys=self._sink.keeps, cost=plan.cost,
            read_ahead=plan.read_ahead,
        )  # fmt: skip
        self._intake.on_error = self._input_failed
        self._ledger: Ledger[T, R] = Ledger(
            put=self._sink.put, name=plan.name, fail_fast=plan.fail_fast,
            max_failures=plan.max_failures, max_failure_ratio=plan.max_failure_ratio,
            observers=plan.observers, clock=self._now, in_flight=self._in_flight_now,
        )  # fmt: skip
        self._put_success = self._sink.success_writer()
        self._slots: list[Slot] = []
        self._stopper = Stopper(self._slots, plan.grace, wake=self._wake_all, abandon=self._abandon)
        self._waits = Waits(plan.slots, self._sink)
        self._sink.wake_producers = self._waits.room_made
        self._retries = Retries(plan.retry)
        self._active = 0  # jobs held by workers (in an attempt, a backoff or a meter)
        self._live: set[Slot] = set()  # workers that may still do work (not ended, abandoned
        # or waiting only for a thread that outlived its timeout)
        self._outliving = 0  # workers waiting for a timed-out thread to return
        self._quiet: asyncio.Future[None] | None = None
        self._abandoned: list[int] = []
        self._fatal: list[BaseException] = []
        self._ended = False
        self._executor: ThreadPoolExecutor | None = None
        self._deadline: DeadlineMeter | None = None
        self._adaptive: AdaptiveMeter | None = None
        self._start = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._base_context = contextvars.copy_context()
        self._runner: Runner | None = None
        self._run: RunInfo | None = None

    # ----------------------------------------------------------------------- setup
    def _setup(self, loop: asyncio.AbstractEventLoop) -> tuple[Meter, ...]:
        p = self._p
        self._start = start = loop.time()
        self._stopper.loop = loop
        self._waits.start(loop, loop_clock(loop))
        deadline_at = start + p.deadline_seconds if p.deadline_seconds is not None else None
        deadline_at = p.deadline_at if p.deadline_at is not None else deadline_at
        # A random run id, as uuid4().hex[:12] would give, without importing uuid (start-up).
        self._run = RunInfo(os.urandom(6).hex(), p.timeout, deadline_at, loop.time)
        meters = open_meters(p, loop, deadline_at, self._ledger.limit_changed)
        self._adaptive, self._deadline = meters.adaptive, meters.deadline
        if not p.fn_is_async:
            from concurrent.futures import ThreadPoolExecutor  # lazy: start-up time

            self._executor = ThreadPoolExecutor(
                max_workers=p.slots, thread_name_prefix=f"batchkit-{p.name or 'run'}"
            )
        if not self._intake.open():
            self._stopper.stopping = True
        return meters.all

    # ------------------------------------------------------------------------- run
    async def run(self) -> BatchReport[T, R]:
        p = self._p
        loop = self._loop = asyncio.get_running_loop()
        self._base_context = contextvars.copy_context()
        meters = self._setup(loop)
        assert self._run is not None
        watchdog = None
        if p.timeout is not None:
            watchdog = Watchdog(loop, p.timeout, p.grace, self._abandon)
        ledger = self._ledger
        self._runner = Runner(
            p, loop, meters=meters, watchdog=watchdog, executor=self._executor,
            on_start=self._on_start if ledger.emit_events else None,
        )  # fmt: skip
        if ledger.emit_events:
            limit = self._adaptive.limit if self._adaptive else p.slots
            ledger.run_started(limit, self._intake.total, self._start)
        if self._run.deadline_at is not None:
            self._stopper.arm_deadline(self._run.deadline_at, self._on_deadline)
        watch_task = loop.create_task(watchdog.run()) if watchdog is not None else None
        completed = False
        try:
            await self._supervise(loop)
            completed = True
        finally:
            await self._teardown(watch_task, completed)
        return self._finish()

    async def _supervise(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the workers and wait until every one has ended or been abandoned."""
        self._quiet = loop.create_future()
        total = self._intake.total
        first = self._p.slots if total is None else min(self._p.slots, total)
        for _ in range(max(1, first) if total is not None else 1):
            self._spawn()
        self._check_quiet()
        try:
            await asyncio.shield(self._quiet)
        except asyncio.CancelledError:
            # The caller cancels: start nothing more, cancel what runs, and wait for it at
            # most ``grace`` (then it is abandoned) before the cancellation goes on. Every
            # item still gets its envelope, so RunFinished and a stream's report tell it all.
            stopper = self._stopper
            if stopper.reason is None and (self._active or self._work_left()):
                stopper.reason = "cancelled"  # (not when every item had already ended)
            stopper.halt()
            await asyncio.shield(self._quiet)
            raise
        if self._fatal:
            raise (
                self._fatal[0]
                if len(self._fatal) == 1
                else BaseExceptionGroup("batchkit: fn raised BaseExceptions", self._fatal)
            )

    async def _teardown(self, watch: asyncio.Task[None] | None, completed: bool) -> None:
        self._ended = True
        self._stopper.close()
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if self._executor is not None:
            # A thread cannot be interrupted; do not wait for one that timed out.
            self._executor.shutdown(wait=False, cancel_futures=True)
        await self._intake.close(self._p.grace)
        if not completed:
            # Cancelled (or a stream left early, or fn raised a BaseException): every item
            # still gets its envelope, and observers hear the end with all of them.
            self._finish_unstarted()
            self._run_finished(self._report())

    def _finish(self) -> BatchReport[T, R]:
        self._finish_unstarted()
        report = self._report()
        self._run_finished(report)
        intake = self._intake
        if intake.error is not None:
            raise InputFailed(report, intake.next_index) from intake.error
        return report

    def _run_finished(self, report: BatchReport[T, R]) -> None:
        if self._ledger.emit_events:
            self._ledger.run_finished(report)

    def _report(self) -> BatchReport[T, R]:
        runner = self._runner
        # Before the run's task first ran (a stream's report read at once), nothing happened.
        wall = self._loop.time() - self._start if self._loop is not None else 0.0
        return BatchReport(
            outcomes=self._sink.outcomes(),
            wall_time=wall,
            concurrency=self._p.adaptive.initial if self._p.adaptive else self._p.slots,
            peak_concurrency=runner.peak if runner else 0,
            stop_reason=self._stopper.reason,
            input_exhausted=self._intake.exhausted,
            limit_changes=tuple(self._ledger.limit_changes),
            name=self._p.name,
            key=self._p.key,
            abandoned=tuple(sorted(self._abandoned)),
            threads_running=sum(1 for t in runner.threads if not t.done()) if runner else 0,
            keys=self._intake.keys,
            tally=self._sink.tally(),
        )

    def partial_report(self) -> BatchReport[T, R]:
        """What a stream produced so far."""
        return self._report()

    def drain_one(self) -> Outcome[T, R] | None:
        """After a stopped stream's run: the next unread item of a sized input, as skipped."""
        return self._intake.drain_one(self._stopper.reason)

    # ------------------------------------------------------------------------- input
    async def _pull(self, slot: Slot) -> Job | None:
        """The next item to start (waiting for an async input is cancellable by a stop)."""
        slot.cancellable = True
        try:
            return await self._intake.pull(self._bad_cost)
        finally:
            slot.cancellable = False

    def _bad_cost(self, job: Job, error: Exception) -> None:
        self._record(envelopes.bad_cost(job, error), job)

    def _input_failed(self) -> None:
        self._stopper.stopping = True
        self._wake()

    # ---------------------------------------------------------------------- workers
    def _spawn(self) -> None:
        assert self._loop is not None
        assert self._run is not None
        slot = Slot(self._run)
        self._slots.append(slot)
        self._live.add(slot)
        # Each worker runs in a fresh copy of the caller's context (see _runner).
        slot.task = self._loop.create_task(self._worker(slot), context=self._base_context.copy())

    def _grow(self) -> None:
        """An unsized input had one more item: start one more worker, up to the limit."""
        if len(self._slots) < self._p.slots and not self._stopper.stopping and self._work_left():
            self._spawn()

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
            self._fatal.append(e)
            self._stopper.halt()
        finally:
            if not slot.abandoned:
                job, slot.job = slot.job, None
                if job is not None:
                    self._stopped(job, running=False)
            self._live.discard(slot)
            self._check_quiet()

    async def _work(self, slot: Slot) -> None:
        """Take the next job (a ready retry, else a new item), run it, repeat. The first
        attempt's success is handled here, inline: it is what nearly every item does, and a
        call level costs about 5% of the per-item overhead. The parts are read through
        locals: an attribute of a local costs what an attribute of ``self`` does."""
        intake, ledger, stopper, waits = self._intake, self._ledger, self._stopper, self._waits
        grow = intake.total is None
        pull_now = intake.pull_now if intake.it is not None and self._p.cost is None else None
        room = None if self._sink.keeps else self._sink.room  # a batch never waits for room
        retries = self._retries
        heap = retries.heap
        loop = self._loop
        assert loop is not None
        run = self._runner.run if self._runner is not None else None
        assert run is not None
        wake_after = self._p.retry is not None
        clock = waits.clock
        put_success = self._put_success
        while not stopper.stopping and not slot.abandoned:
            job = retries.ready(loop.time()) if heap else None
            if job is None and (room is None or room(intake.next_index)):
                job = pull_now() if pull_now is not None else await self._pull(slot)
                if job is not None and grow:
                    self._grow()
            if job is None:
                if not await self._wait_for_work():
                    return
                continue
            slot.job = job
            self._active += 1
            result = await run(slot, job)
            if result.kind == "success" and not slot.abandoned:
                assert job.first_start is not None
                elapsed = result.ended - job.first_start
                if ledger.careful:
                    self._succeeded(job, result)
                else:  # _succeeded's common case, inline: no envelope is built for a batch
                    ledger.finished += 1
                    put_success(job.item, result.value, job.index, job.attempt, elapsed)
            elif not slot.abandoned:
                await self._run_job(slot, job, result)
            self._active -= 1
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
            self._spawn()
            return False
        if slot.thread is not None and not slot.thread.done():
            await self._outlive(slot)
        return True

    async def _wait_for_work(self) -> bool:
        """Nothing to start now: wait for a retry, room or an item's end; False: leave."""
        if self._stopper.stopping:
            return False
        assert self._loop is not None
        heap = self._retries.heap
        no_room = not self._sink.room(self._intake.next_index)
        more_retries = self._p.retry is not None and not self._p.retry.hold_slot and self._active
        if not (heap or no_room or more_retries):
            self._wake()  # others parked for retries: the input is done, so may they be
            return False
        if no_room and not heap:
            await self._waits.for_room()
            return True
        await self._waits.idle(self._retries.next_at())
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
        self._check_quiet()
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

    def _wake_all(self) -> None:
        """Every waiting worker, and a stream's consumer: the run is stopping."""
        self._wake()
        self._sink.wake()

    def _check_quiet(self) -> None:
        """Resolve the supervisor's wait once no worker is left that could still do work."""
        fut = self._quiet
        if fut is None or fut.done() or self._live:
            return
        if self._outliving and not self._stopper.stopping and self._work_left():
            return  # every slot is held by a thread that outlived its timeout: wait for one
        self._stopper.quiet_slots()
        fut.set_result(None)

    def _work_left(self) -> bool:
        return self._intake.more() or bool(self._retries.heap)

    # ----------------------------------------------------------------------- one item
    async def _run_job(self, slot: Slot, job: Job, result: AttemptResult) -> None:
        """After a first attempt that did not succeed: the retries of the item until it ends
        or is released to the retry heap."""
        runner = self._runner
        assert runner is not None
        while True:
            if result.kind == "success":
                self._succeeded(job, result)
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
        assert self._p.retry is not None
        assert self._loop is not None
        if not self._p.retry.hold_slot:
            self._retries.park(job, self._loop.time() + delay)
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

    def _succeeded(self, job: Job, result: AttemptResult) -> None:
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
            if result.reason == "out_of_time" and self._another_fits():
                self._skip(job, "out_of_time")  # this item's own cost= does not fit: only it
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
        delay = self._retries.delay(job, kind, error) if not self._stopper.stopping else None
        deadline = self._deadline
        dropped = (
            delay is not None
            and deadline is not None
            and too_late(
                delay, now=result.ended, deadline_at=deadline.deadline_at,
                expected=deadline.expected(job),
            )
        )  # fmt: skip
        if dropped:
            delay = None  # AttemptFailed does not announce a retry that will not happen
        if self._ledger.emit_events:
            self._ledger.attempt_failed(job, error, kind, delay, result.ended)
        if dropped:
            self._skip(job, "out_of_time")
        elif delay is None:
            self._record(envelopes.last_error(job, result.ended), job)
        return delay

    def _another_fits(self) -> bool:
        """An item was refused for ``out_of_time`` by its own ``cost=`` hint: whether an item
        read ahead (or waiting to retry) may still fit. Then only that item is skipped; else
        nothing more fits, judged on what was read (``batch_size=`` items ahead)."""
        deadline = self._deadline
        if deadline is None or not deadline.by_hint:
            return False  # by the run's observed durations: nothing fits
        fits = deadline.fits
        return any(fits(-cost) for cost, _, _ in self._intake.buffer) or any(
            fits(deadline.expected(job)) for job in self._retries.heap
        )

    def _on_start(self, slot: Slot, job: Job, now: float) -> None:
        if self._ledger.emit_events:
            self._ledger.item_started(job, self._in_flight_now(), now)

    # ------------------------------------------------------------------ outcomes
    def _record(self, outcome: Outcome[T, R], job: Job | None = None) -> None:
        """To the ledger (the sink, the observers, the counts); then act on the threshold
        it says was reached."""
        reason = self._ledger.record(outcome, job)
        if reason is not None:
            self._stop(reason)

    def _skip(self, job: Job, reason: StopReason) -> None:
        """``job``'s next attempt does not start (its cost, or its retry, does not fit before
        the deadline)."""
        self._record(envelopes.skipped(job, reason, self._now()), job)

    def _stopped(self, job: Job, *, running: bool) -> None:
        """The run stopped around ``job``: ``cancelled`` if it was running, else ``skipped``."""
        reason: StopReason = self._stopper.reason or "fail_fast"
        self._record(envelopes.stopped(job, reason, self._now(), running=running), job)

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _in_flight_now(self) -> int:
        return self._runner.in_flight if self._runner is not None else 0

    def _finish_unstarted(self) -> None:
        """After the workers ended: give every item that never started its envelope."""
        for job in self._retries.drain():
            self._stopped(job, running=False)
        for job in self._intake.unstarted():
            self._stopped(job, running=False)
        intake, reason = self._intake, self._stopper.reason
        if reason is None or not intake.rest_is_known():
            return
        # Sized inputs (lists, ranges, ...) get an envelope for every item; unsized ones may
        # be endless or slow and are left unread (input_exhausted=False). Observers hear of
        # the rest in one ItemsSkipped event; a stream builds the envelopes as they are read.
        if not self._sink.keeps:
            rest = intake.rest()
            self._sink.count_skipped(len(rest))  # built as the consumer reads them
        else:
            rest = intake.skip_rest(self._sink, reason)
            self._ledger.count_skipped(len(rest))
        if self._ledger.emit_events and rest:
            self._ledger.items_skipped(reason, rest)

    # ------------------------------------------------------------------- stopping
    def _stop(self, reason: StopReason) -> None:
        """Start nothing new and cancel what is in flight (the stopper decides, then acts)."""
        stopper = self._stopper
        if not stopper.takes(reason):
            return
        if self._ledger.emit_events and reason != "deadline":
            self._ledger.run_stopping(reason)
        stopper.no_more_starts(reason)
        stopper.halt()

    def _abandon(self, slot: Slot) -> None:
        """Work that did not stop after two cancellations: give its item its envelope, list
        it in the report, and stop waiting for it."""
        slot.abandoned = True
        job, slot.job = slot.job, None
        stopper = self._stopper
        if job is not None:
            self._abandoned.append(job.index)
            _log.warning(
                "batchkit: item #%d did not stop after being cancelled twice; abandoned", job.index
            )
            if slot.cancel_kind is CancelKind.STOP or stopper.stopping or self._p.timeout is None:
                self._stopped(job, running=slot.in_attempt)
            else:
                self._record(envelopes.timed_out(job, self._p.timeout, self._now()), job)
        self._live.discard(slot)
        self._check_quiet()
        if not stopper.stopping:
            self._spawn()

    def _on_deadline(self) -> None:
        if self._ended:
            return  # the run ended in the loop turns since the deadline's timer
        if self._ledger.emit_events:
            self._ledger.deadline_hit()
        self._stop("deadline")
