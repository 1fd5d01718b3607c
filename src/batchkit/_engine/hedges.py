"""Hedged attempts for stragglers (``hedge=Hedge(...)``): the window's part.

An attempt that runs longer than ``after`` (seconds, or a quantile of this run's successful
attempt durations once ``min_samples`` are seen) gets a *twin*: one more attempt of the same
item, queued where a ready retry waits, so an idle worker takes it before new input and it
goes through the same admission (limit groups, the adaptive gate, the rate limit, the
deadline) — it counts against every limit as any attempt does. At most ``budget`` times the items
started so far are ever queued.

The two attempts of an item form a :class:`Pair`; each *member* ends exactly once (its
attempt returned, it was stopped before it ran, or it was abandoned) through
:meth:`Hedges.settle`, and the item's one envelope is recorded when the pair is decided:

* the first success wins; the other member is cancelled (``CancelKind.HEDGE``: its context
  exits with the cancellation, a rollback) and the envelope waits for it, so that a loser
  already in its shielded commit, which finishes and succeeds, is recorded on the winner's
  envelope (``both_committed``);
* a member that fails while its twin is still live leaves its error in the shared history and
  lets the twin decide; the last one goes on alone (retries, the deadline, the stop) as any
  job, and its envelope says it was hedged.

A run without ``hedge=`` has none of this: no timer, no wrapper around the runner.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast, final

from .._model.attempt import AttemptResult, CancelKind, Job
from .._model.errors import ItemSkipped
from .._model.outcomes import make_success, set_hedged
from . import ledger
from .watchdog import SLACK, cancel_attempt, cancel_once

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Callable

    from .._model.attempt import AttemptKind, Slot
    from .._model.errors import SkipReason, StopReason
    from .._model.outcomes import HedgeWinner, Outcome
    from .._model.policies import Hedge
    from .retries import Retries
    from .runner import Runner

__all__ = ["SETTLED", "HedgeMeter", "Hedges", "Pair", "Watch"]

SAMPLES: Final = 1024
"""The quantile is taken over this many of the latest successful attempts (bounded memory)."""

COMPACT_AT: Final = 4096
"""Attempts watched (most of them ended) before the watch list is compacted."""

_SETTLED_AT = 0.0
SETTLED: Final = AttemptResult("settled", None, None, _SETTLED_AT, _SETTLED_AT)
"""What a member's attempt returns to its worker once the pair has taken it over: there is
nothing more for that worker to do with the item (its envelope is the pair's)."""


@final
class Pair:
    """An item's two attempts: ``first`` (its own job) and ``hedge`` (the twin)."""

    __slots__ = ("both", "cut", "done", "first", "hedge", "live", "queued", "started", "win")

    def __init__(self, first: Job, hedge: Job) -> None:
        self.first = first
        self.hedge = hedge
        self.live: list[Job] = [first, hedge]
        """Members that have not ended yet."""
        self.win: tuple[Job, AttemptResult] | None = None
        """The first success, held until the other member has ended too."""
        self.both = False
        """The loser succeeded too (it was already in its shielded commit)."""
        self.queued = True
        """The hedge waits in the retry heap (no worker took it yet)."""
        self.started = False
        """The hedge's attempt started: only then is the item's envelope marked ``hedged``."""
        self.cut = False
        """A member was cancelled in flight by the run's stop (the item was running)."""
        self.done = False
        """Decided with no winner: the last member goes on alone, as a plain job."""

    def other(self, job: Job) -> Job:
        return self.hedge if job is self.first else self.first

    def label(self, job: Job, ok: bool) -> HedgeWinner:
        if not ok:
            return "neither"
        return "first" if job is self.first else "hedge"


@final
class HedgeMeter:
    """The last meter with ``hedge=``: a member whose twin won while it waited for admission
    does not start (refused; its pair, not the retry logic, reads the refusal)."""

    __slots__ = ()

    async def wait_task_can_start(self, slot: Slot, job: Job) -> SkipReason | None:
        pair: Pair | None = getattr(job, "pair", None)
        if pair is not None and pair.win is not None and not pair.done:
            return "cancelled"
        return None

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        return None

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        return None


@final
class Watch:
    """Spots stragglers: a FIFO of running attempts ``(start, slot, gen, job)`` and one timer
    at the head's start + ``after`` (the watchdog's trick: the same ``after`` holds for every
    attempt at any moment). ``due`` hears of each attempt still running at its time."""

    __slots__ = (
        "_after",
        "_due",
        "_handle",
        "_loop",
        "_min_samples",
        "_quantile",
        "_samples",
        "_sorted",
        "_timers",
    )

    def __init__(
        self,
        policy: Hedge,
        loop: asyncio.AbstractEventLoop,
        due: Callable[[Slot, int, Job, float, float], None],
    ) -> None:
        self._loop = loop
        self._due = due
        self._quantile = policy.quantile
        self._after: float | None = None if self._quantile is not None else float(policy.after)
        self._min_samples = policy.min_samples
        self._samples: deque[float] = deque()
        self._sorted: list[float] = []
        self._timers: deque[tuple[float, Slot, int, Job]] = deque()
        self._handle: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._timers.clear()

    def watch(self, slot: Slot, job: Job, now: float) -> None:
        """An attempt of ``job`` starts in ``slot`` (its ``gen`` will be ``slot.gen + 1``)."""
        timers = self._timers
        if len(timers) > COMPACT_AT and self._handle is None:
            # No quantile yet, so no check drops the entries of ended attempts: here.
            self._timers = timers = deque(t for t in timers if t[1].gen == t[2])
        timers.append((now, slot, slot.gen + 1, job))
        if self._handle is None:
            self._arm()

    def _threshold(self) -> float | None:
        """Seconds after which a running attempt is hedged (None: not enough samples)."""
        if self._after is not None:
            return self._after
        ordered = self._sorted
        if len(ordered) < self._min_samples:
            return None
        q = self._quantile
        assert q is not None
        return ordered[max(1, math.ceil(q * len(ordered))) - 1]  # nearest rank, as latency()

    def sample(self, seconds: float) -> None:
        """A successful attempt took ``seconds``: one more sample for the quantile."""
        samples, ordered = self._samples, self._sorted
        samples.append(seconds)
        bisect.insort(ordered, seconds)
        if len(samples) > SAMPLES:
            del ordered[bisect.bisect_left(ordered, samples.popleft())]
        after = self._threshold()
        if after is None or not self._timers:
            return
        handle = self._handle
        if handle is None or self._timers[0][0] + after < handle.when():
            self._arm()  # the quantile fell (or became known): the head is due sooner

    def _arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        after = self._threshold()
        timers = self._timers  # a stale head (its attempt ended) is dropped when it is due
        if after is not None and timers:
            self._handle = self._loop.call_at(timers[0][0] + after, self._check)

    def _check(self) -> None:
        self._handle = None
        after = self._threshold()
        now = self._loop.time()
        timers = self._timers
        while after is not None and timers:
            started, slot, gen, job = timers[0]
            if slot.gen != gen or slot.job is not job:
                timers.popleft()
            elif started + after <= now + SLACK:
                timers.popleft()
                self._due(slot, gen, job, started, now)
            else:
                break
        self._arm()


@final
class Hedges:
    """The hedging of one run: the timer that spots stragglers, the budget, and the pairs."""

    __slots__ = (
        "_grace",
        "_loop",
        "_note",
        "_own",
        "_retries",
        "_room",
        "_timers",
        "_wake",
        "_watch",
        "_where",
        "abandon",
        "items",
        "on_start_next",
        "policy",
        "record",
        "run_next",
        "spawn",
        "spent",
        "started",
        "stopping",
    )

    def __init__(self, policy: Hedge, loop: asyncio.AbstractEventLoop, grace: float) -> None:
        self.policy = policy
        self._loop = loop
        self._grace = grace
        self._watch = Watch(policy, loop, self._hedge)
        self._timers: list[asyncio.TimerHandle] = []  # losers' escalations after ``grace``
        self._where: dict[Job, tuple[Slot, int]] = {}  # members in an attempt: slot, gen
        self.items = 0
        """Items whose first attempt started: what the budget is a share of."""
        self.spent = 0
        """Hedges queued (the budget's count; one never taken is given back)."""
        self.started = 0
        """Hedge attempts that started (``report.hedges``)."""
        self.on_start_next: Callable[[Slot, Job, float], None] | None = None
        """The runner's ``on_start`` without hedging (events), called after ours."""
        # Set by the window (connect):
        self.run_next: Callable[[Slot, Job], Awaitable[AttemptResult]]
        self._retries: Retries
        self._note: Callable[[Outcome[Any, Any]], None]
        self._own: Outcome[Any, Any] | None = None  # the pair's own envelope, being recorded
        self.record: Callable[[Outcome[Any, Any], Job], None]
        self.stopping: Callable[[], bool]
        self.spawn: Callable[[], None]
        self._room: Callable[[], bool]
        self.abandon: Callable[[Slot], None]
        self._wake: Callable[[], None]

    def connect(
        self,
        runner: Runner,
        retries: Retries,
        *,
        wake: Callable[[], None],
        record: Callable[[Outcome[Any, Any], Job], None],
        stopping: Callable[[], bool],
        spawn: Callable[[], None],
        room: Callable[[], bool],
        abandon: Callable[[Slot], None],
        note: Callable[[Outcome[Any, Any]], None],
    ) -> None:
        """The run's parts (the engine wires them before any worker starts): every attempt
        runs through :meth:`run` (the runner's ``run`` is replaced, so the workers' and the
        retries' attempts do); a hedge waits in the retry heap, where an idle worker takes it
        before new input; ``spawn`` starts one more worker when ``room`` says fewer than the
        limit run (workers leave when they find nothing to do)."""
        self.run_next = runner.run
        runner.run = self.run
        self._retries = retries
        self._wake = wake
        self.record = record
        self.stopping = stopping
        self.spawn = spawn
        self._room = room
        self.abandon = abandon
        self._note = note

    # -- spotting stragglers ---------------------------------------------------------
    def on_start(self, slot: Slot, job: Job, now: float) -> None:
        """The runner's ``on_start``: an attempt begins (its ``gen`` is ``slot.gen + 1``)."""
        pair: Pair | None = getattr(job, "pair", None)
        if pair is None:
            if job.attempt == 1:
                self.items += 1
            self._watch.watch(slot, job, now)
        elif not pair.done:
            self._where[job] = (slot, slot.gen + 1)
            if job is pair.hedge:
                pair.started = True
                self.started += 1
        if self.on_start_next is not None:
            self.on_start_next(slot, job, now)

    def _hedge(self, slot: Slot, gen: int, job: Job, started: float, now: float) -> None:
        """Queue a twin of ``job`` (running in ``slot`` since ``started``) if the budget
        allows. Under a deadline, a straggler whose expected finish would miss it is
        preferred: its twin goes ahead of the hedges (and retries) due now. In a heavy tail an
        attempt's expected remaining time grows with the time it has run; it is taken to be
        that time, so the expected finish is ``now + (now - started)``."""
        if self.stopping() or slot.cancel_gen == gen or getattr(job, "pair", None) is not None:
            return  # stopping, being cancelled already, or hedged before
        if self.spent + 1 > self.policy.budget * self.items + 1e-9:
            return
        self.spent += 1
        twin = Job(job.index, job.item, job.key)
        twin.attempt = job.attempt + 1
        twin.first_start = job.first_start
        if job.errors is None:
            job.errors = []
        twin.errors = job.errors  # one history: each member's error goes in it
        groups = getattr(job, "groups", None)
        if groups is not None:
            twin.groups = groups
        pair = Pair(job, twin)
        job.pair = twin.pair = pair
        self._where[job] = (slot, gen)
        deadline_at = slot.run.deadline_at
        misses = deadline_at is not None and 2 * now - started > deadline_at
        self._retries.park(twin, started if misses else now)
        self._wake()
        if self._room():
            self.spawn()

    # -- the two attempts of an item ---------------------------------------------------
    async def run(self, slot: Slot, job: Job) -> AttemptResult:
        """The runner's ``run`` with hedging: samples the attempt's duration, and hands a
        member's result to its pair."""
        pair: Pair | None = getattr(job, "pair", None)
        if pair is not None and job is pair.hedge:
            pair.queued = False
        result = await self.run_next(slot, job)
        if result.kind == "success":
            self._watch.sample(result.ended - result.started)
        pair = getattr(job, "pair", None)  # it may have been hedged while it ran
        if pair is None or slot.abandoned:
            return result
        self._where.pop(job, None)
        if pair.done:
            return self._alone(pair, job, result)
        return self.settle(pair, job, result)

    def _alone(self, pair: Pair, job: Job, result: AttemptResult) -> AttemptResult:
        """A hedged item's last member, after its twin ended without a success: a success is
        recorded here (marked hedged); anything else goes on as for any job."""
        if result.kind != "success":
            return result
        self._win(pair, job, result)
        return SETTLED

    def settle(self, pair: Pair, job: Job, result: AttemptResult) -> AttemptResult:
        """Member ``job`` ended with ``result``: ``SETTLED`` if the pair takes it from here,
        else the result its worker goes on with (the member is then the item, alone)."""
        if job not in pair.live:
            return SETTLED
        pair.live.remove(job)
        if result.kind == "success":
            if pair.win is None:
                pair.win = (job, result)
                self._cut(pair, pair.other(job))
            else:
                pair.both = True  # the loser was past its point of no return
        elif pair.win is None and pair.live:
            # The twin still runs: it decides; this error stays in the item's history.
            if result.kind == "cancelled":
                pair.cut = True
            elif result.error is not None and result.kind in ("error", "timeout"):
                job.errors = job.errors or []
                job.errors.append(result.error)
            return SETTLED
        if pair.win is not None:
            if not pair.live:
                self._win(pair, *pair.win)
            return SETTLED
        # Both ended, neither succeeded: this one goes on alone (a retry, or its end).
        pair.done = True
        job.attempt = max(pair.first.attempt, pair.hedge.attempt)
        return result

    def passes(self, outcome: Outcome[Any, Any], job: Job) -> bool:
        """Before ``job``'s envelope is recorded: False if its pair takes it over (a member
        the run stopped around, or abandoned, whose twin decides or whose pair records the
        item); else True, and the envelope is marked if its item ran a hedge."""
        pair: Pair | None = getattr(job, "pair", None)
        if pair is None:
            return True
        if outcome is not self._own and not pair.done:
            self._where.pop(job, None)
            kind: AttemptKind = "refused" if outcome.kind == "skipped" else "cancelled"
            error = None
            if outcome.kind == "timeout":  # abandoned after its timeout: that is its error
                kind, error = "timeout", outcome.error
            if self.settle(pair, job, AttemptResult(kind, None, error, 0.0, 0.0)) is SETTLED:
                return False
            if pair.cut and outcome.kind == "skipped":
                # Its twin was in flight when the run stopped: the item was running.
                assert isinstance(outcome.error, ItemSkipped)
                reason = cast("StopReason", outcome.error.reason)
                self.record(ledger.cancelled(job, reason, self._loop.time()), job)
                return False
        if pair.started:
            set_hedged(outcome, pair.label(job, outcome.ok), pair.both and outcome.ok)
            self._note(outcome)
        return True

    def _cut(self, pair: Pair, loser: Job) -> None:
        """The winner is in: the loser is cancelled, or dropped if no worker took it yet."""
        if pair.queued and loser is pair.hedge and unpark(self._retries.heap, loser):
            pair.queued = False
            pair.live.remove(loser)
            self.spent -= 1  # never ran: not an extra attempt
            return
        where = self._where.get(loser)
        if where is None:
            return  # waiting for admission: the hedge meter turns it away
        slot, gen = where
        if slot.gen == gen and cancel_once(slot, CancelKind.HEDGE):
            when = self._loop.time() + self._grace
            self._timers.append(self._loop.call_at(when, self._escalate, slot, gen))

    def close(self) -> None:
        """The run ended: no timer of its hedging outlives it."""
        self._watch.close()
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()

    def _escalate(self, slot: Slot, gen: int) -> None:
        """A loser still running ``grace`` after its cancellation: cancelled once more, then
        abandoned (its item's envelope is the winner's)."""
        if slot.gen == gen and not slot.abandoned:
            cancel_attempt(slot, CancelKind.HEDGE)
            self._loop.call_soon(self._abandon_if_stuck, slot, gen)

    def _abandon_if_stuck(self, slot: Slot, gen: int) -> None:
        if slot.gen == gen and not slot.abandoned:
            self.abandon(slot)

    def _win(self, pair: Pair, job: Job, result: AttemptResult) -> None:
        first = pair.first
        assert first.first_start is not None
        attempts = max(first.attempt, pair.hedge.attempt) if pair.started else job.attempt
        success = make_success(
            job.item, result.value, job.index, attempts, result.ended - first.first_start
        )
        self._own = success
        try:
            self.record(success, job)
        finally:
            self._own = None


def unpark(heap: list[Job], job: Job) -> bool:
    """Take ``job`` out of the retry heap; False if it is not there (a worker took it)."""
    for i, queued in enumerate(heap):
        if queued is job:
            heap[i] = heap[-1]
            heap.pop()
            heapq.heapify(heap)
            return True
    return False
