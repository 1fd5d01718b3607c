"""The local engine: one run, built from parts.

The parts, each with one job: the :class:`~batchkit._engine.intake.Intake` takes items (keys,
the ``cost=`` read-ahead, closing the input); the :class:`~batchkit._engine.window.Window`
runs the workers (each attempt through the :class:`~batchkit._engine.runner.Runner`, the
first attempt's success inline, retries through
:class:`~batchkit._engine.retries.Retries`); the :class:`~batchkit._engine.ledger.Ledger`
counts, builds envelopes, records them to the sink and the observers and says when a threshold
is reached; the :class:`~batchkit._engine.stopper.Stopper` ends the run (a threshold, the
deadline, the caller's cancel): it cancels what runs, waits at most ``grace``, cancels once
more and abandons what still runs, so the call always returns. The :class:`Engine` wires them,
starts the run, waits for the workers, and builds the report.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._model.attempt import RunInfo, Slot
from .._model.report import BatchReport, InputFailed
from .intake import Intake
from .ledger import Ledger
from .meters import open_meters
from .runner import Runner, loop_clock, open_hooks
from .sinks import BatchSink, Sink
from .stopper import Stopper
from .stored import Stored
from .waits import Waits
from .watchdog import Watchdog
from .window import Window

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from .._model.outcomes import Outcome
    from .hedges import Hedges
    from .journal import RunJournal
    from .meters.adaptive import AdaptiveMeter
    from .meters.base import Meter
    from .meters.breaker import BreakerMeter, Circuits
    from .meters.budget import BudgetMeter
    from .meters.deadline import DeadlineMeter
    from .meters.groups import Groups
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
        self._hooks, observers = open_hooks(plan)
        self._ledger: Ledger[T, R] = Ledger(
            put=self._sink.put, name=plan.name, fail_fast=plan.fail_fast,
            max_failures=plan.max_failures, max_failure_ratio=plan.max_failure_ratio,
            observers=observers, clock=self._now, in_flight=self._in_flight_now,
        )  # fmt: skip
        slots: list[Slot] = []
        self._stopper = Stopper(slots, plan.grace)
        waits = Waits(plan.slots, self._sink)
        self._sink.wake_producers = waits.room_made
        self._window: Window[T, R] = Window(
            plan, self._sink, self._intake, self._ledger, self._stopper, waits,
            slots,
        )  # fmt: skip
        self._waits = waits
        self._stopper.connect(wake=self._window.wake_all, abandon=self._window.abandon)
        self._intake.on_error = self._window.input_failed
        self._ended = False
        self._executor: ThreadPoolExecutor | None = None
        self._deadline: DeadlineMeter | None = None
        self._adaptive: AdaptiveMeter | None = None
        self._first_limit = plan.adaptive.initial if plan.adaptive else plan.slots
        self._start = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Runner | None = None
        self._run: RunInfo | None = None
        self.groups: Groups | None = None
        self._budget: BudgetMeter | None = None
        self._breaker: BreakerMeter | None = None
        self._journal: RunJournal | None = None
        self._hedges: Hedges | None = None

    def _setup(
        self, loop: asyncio.AbstractEventLoop, circuits: Circuits | None = None
    ) -> tuple[Meter, ...]:
        p = self._p
        self._start = start = loop.time()
        self._stopper.loop = loop
        self._waits.start(loop, loop_clock(loop))
        deadline_at = start + p.deadline_seconds if p.deadline_seconds is not None else None
        deadline_at = p.deadline_at if p.deadline_at is not None else deadline_at
        # A random run id, as uuid4().hex[:12] would give, without importing uuid (start-up).
        self._run = RunInfo(os.urandom(6).hex(), p.timeout, deadline_at, loop.time)
        if p.call_groups:
            from .meters.call_groups import CallGroups  # lazy: start-up time

            self._run.limits = CallGroups(p.call_groups, loop)
        meters, self._adaptive, self._deadline = open_meters(
            p, loop, deadline_at, self._ledger.limit_changed
        )
        if circuits is not None:
            from .meters.breaker import BreakerMeter  # lazy: start-up time

            # Before the run's own limits: an item of an open circuit waits for none of them
            # and takes no rate-limit turn.
            self._breaker = BreakerMeter(circuits, loop)
            meters = (self._breaker, *meters)
        if p.groups:
            from .meters.groups import SHARED, Groups  # lazy: start-up time

            # First of all: a picked item already holds its groups' places, so the groups
            # meter must be among the admitted ones whatever refuses next (else a breaker's
            # refusal would keep its places for good). A Dask chunk's engine is handed its
            # worker's groups, shared with the run's other chunks there (``_dask/groups.py``).
            shared = SHARED.get()
            self.groups = shared if shared is not None else Groups(p.groups, loop, self._deadline)
            meters = (self.groups, *meters)
        if p.item_budget is not None:
            from .meters.budget import BudgetMeter  # lazy: start-up time

            # Last: after every wait, an attempt whose budget is spent does not start.
            self._budget = BudgetMeter(p.item_budget, loop, p.grace, self._window.abandon)
            meters = (*meters, self._budget)
        if p.hedge is not None:
            from .hedges import HedgeMeter  # lazy: start-up time

            # Last: a hedge whose twin won while it waited for admission does not start.
            meters = (*meters, HedgeMeter())
        if not p.fn_is_async:
            from concurrent.futures import ThreadPoolExecutor  # lazy: start-up time

            self._executor = ThreadPoolExecutor(
                max_workers=p.slots, thread_name_prefix=f"batchkit-{p.name or 'run'}"
            )
        if not self._intake.open():
            self._stopper.stopping = True
        return meters

    async def run(self) -> BatchReport[T, R]:
        p = self._p
        stored = Stored()
        await stored.load(p)  # before any item starts
        journal = self._journal = stored.journal
        if journal is not None:
            journal.record, self._window.journal = self._window._record, journal
            self._ledger.journal, self._ledger.careful = journal, True  # every success: a row
        loop = self._loop = asyncio.get_running_loop()
        meters = self._setup(loop, stored.circuits)
        if stored.remembered is not None:
            from .meters.adaptive_math import resumed

            assert self._adaptive is not None
            assert p.adaptive is not None
            self._adaptive.resume(resumed(p.adaptive, stored.remembered))
            self._first_limit = self._adaptive.limit
        window = self._window
        assert self._run is not None
        watchdog = None
        if p.timeout is not None:
            watchdog = Watchdog(loop, p.timeout, p.grace, window.abandon)
        ledger = self._ledger
        on_start = window.on_start if ledger.emit_events else None
        hedges = None
        if p.hedge is not None:
            from .hedges import Hedges  # lazy: start-up time

            hedges = self._hedges = Hedges(p.hedge, loop, p.grace)
            hedges.on_start_next, on_start = on_start, hedges.on_start
        self._runner = Runner(
            p, loop, meters=meters, watchdog=watchdog, executor=self._executor,
            on_start=on_start, hooks=self._hooks,
        )  # fmt: skip
        if hedges is not None:
            window.hedges, stopper = hedges, self._stopper
            hedges.connect(
                self._runner, window.retries, wake=self._waits.wake, record=window._record,
                stopping=lambda: stopper.stopping, abandon=window.abandon, spawn=window.spawn,
                room=lambda: len(window._live) + window._outliving < p.slots,
                note=self._sink.note_hedge,
            )  # fmt: skip
        window.start(loop, self._run, self._runner, self._deadline, self.groups, self._budget)
        if journal is not None and journal.transactional:
            self._runner.journal_tx = journal.write_in_session
        if ledger.emit_events:
            limit = self._adaptive.limit if self._adaptive else p.slots
            ledger.run_started(limit, self._intake.total, self._start)
        if self._run.deadline_at is not None:
            self._stopper.arm_deadline(self._run.deadline_at, self._on_deadline)
        watch_task = loop.create_task(watchdog.run()) if watchdog is not None else None
        completed = False
        try:
            await self._supervise()
            completed = True
        finally:
            try:
                await self._teardown(watch_task, completed)
            finally:
                intake = self._intake
                whole = intake.exhausted and intake.error is None and not self._window.fatal
                whole = whole and completed and self._stopper.reason is None
                await stored.save(p, self._adaptive, self._breaker, whole)
        return self._finish()

    async def _supervise(self) -> None:
        """Start the workers and wait until every one has ended or been abandoned."""
        window = self._window
        assert window.quiet is not None
        total = self._intake.total
        first = self._p.slots if total is None else min(self._p.slots, total)
        for _ in range(max(1, first) if total is not None else 1):
            window.spawn()
        window.check_quiet()
        try:
            await asyncio.shield(window.quiet)
        except asyncio.CancelledError:
            # The caller cancels: start nothing more, cancel what runs, and wait for it at
            # most ``grace`` (then it is abandoned) before the cancellation goes on. Every
            # item still gets its envelope, so RunFinished and a stream's report tell it all.
            stopper = self._stopper
            if stopper.reason is None and (window.active or window.work_left()):
                stopper.reason = "cancelled"  # (not when every item had already ended)
            stopper.halt()
            await asyncio.shield(window.quiet)
            raise
        fatal = window.fatal
        if fatal:
            raise (
                fatal[0]
                if len(fatal) == 1
                else BaseExceptionGroup("batchkit: fn raised BaseExceptions", fatal)
            )

    async def _teardown(self, watch: asyncio.Task[None] | None, completed: bool) -> None:
        self._ended = True
        if self.groups is not None:
            self.groups.detach(self._run)
        if self._hedges is not None:
            self._hedges.close()
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
            concurrency=self._first_limit,
            peak_concurrency=runner.peak if runner else 0,
            stop_reason=self._stopper.reason,
            input_exhausted=self._intake.exhausted,
            limit_changes=tuple(self._ledger.limit_changes),
            name=self._p.name,
            key=self._p.key,
            abandoned=tuple(sorted(self._window.abandoned)),
            threads_running=sum(1 for t in runner.threads if not t.done()) if runner else 0,
            keys=self._intake.keys,
            tally=self._sink.tally(),
            resumed=self._journal.resumed if self._journal is not None else 0,
            hedges=self._hedges.started if self._hedges is not None else 0,
        )

    def partial_report(self) -> BatchReport[T, R]:
        """What a stream produced so far."""
        return self._report()

    def drain_one(self) -> Outcome[T, R] | None:
        """After a stopped stream's run: the next unread item of a sized input, as skipped."""
        return self._intake.drain_one(self._stopper.reason)

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _in_flight_now(self) -> int:
        return self._window.in_flight()

    def _finish_unstarted(self) -> None:
        """After the workers ended: give every item that never started its envelope."""
        stopped = self._window.stopped
        for job in self._window.retries.drain():
            stopped(job, running=False)
        for job in self._intake.unstarted():
            stopped(job, running=False)
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

    def _on_deadline(self) -> None:
        if self._ended:
            return  # the run ended in the loop turns since the deadline's timer
        if self._ledger.emit_events:
            self._ledger.deadline_hit()
        self._window.stop("deadline")
