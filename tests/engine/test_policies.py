"""Retries, rate limits, the whole-run deadline, failure thresholds, adaptive concurrency.

Async behaviour in virtual time with exact timestamps; the math in test_policy_math.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest

from batchkit import (
    Adaptive,
    Backoff,
    BatchReport,
    Deadline,
    Failure,
    FailureRatio,
    ItemCancelled,
    ItemSkipped,
    ItemTimeout,
    RateLimit,
    Retry,
    Success,
    batch_process,
    stream,
)
from batchkit.testing import run_virtual

from ..helpers import now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.looptime

STEADY = Backoff(initial=1, maximum=100, multiplier=2, jitter=False)


class Flaky(ConnectionError):
    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("flaky")
        self.retry_after = retry_after


class Fatal(Exception):
    pass


# -- retries ---------------------------------------------------------------------------
async def test_retry_with_exponential_backoff_at_exact_times() -> None:
    starts: list[float] = []

    async def fn(i: int) -> str:
        starts.append(now())
        await asyncio.sleep(1)
        if len(starts) < 3:
            raise Flaky
        return "ok"

    report = await batch_process([0], fn, retry=Retry(attempts=5, backoff=STEADY))
    # attempt 1 at 0 (fails at 1), waits 1; attempt 2 at 2 (fails at 3), waits 2; attempt 3 at 5.
    assert starts == [0, 2, 5]
    (success,) = report.successes
    assert success.attempts == 3
    assert success.elapsed == 6
    assert report.retries == 2


async def test_every_attempts_error_is_kept_when_retries_run_out() -> None:
    errors = [Flaky(), Flaky(), Flaky()]

    async def fn(i: int) -> str:
        raise errors.pop(0)

    report = await batch_process([0], fn, retry=Retry(attempts=3, backoff=STEADY))
    (failure,) = report.failures
    assert failure.attempts == 3
    assert len(failure.errors) == 3
    assert failure.error is failure.errors[-1]
    assert failure.kind == "error"
    assert report.wall_time == 1 + 2


async def test_retry_after_hint_is_honoured() -> None:
    starts: list[float] = []

    async def fn(i: int) -> str:
        starts.append(now())
        if len(starts) == 1:
            raise Flaky(retry_after=30)
        return "ok"

    await batch_process([0], fn, retry=Retry(attempts=2, backoff=STEADY))
    assert starts == [0, 30]


async def test_retry_on_types_and_predicates() -> None:
    calls: dict[str, int] = {"flaky": 0, "fatal": 0}

    async def fn(kind: str) -> str:
        calls[kind] += 1
        raise Flaky if kind == "flaky" else Fatal

    retry = Retry(attempts=3, backoff=STEADY, retry_on=Flaky)
    await batch_process(["flaky", "fatal"], fn, retry=retry)
    assert calls == {"flaky": 3, "fatal": 1}

    calls = {"flaky": 0, "fatal": 0}
    retry = Retry(attempts=3, backoff=STEADY, retry_on=lambda e: isinstance(e, Fatal))
    await batch_process(["flaky", "fatal"], fn, retry=retry)
    assert calls == {"flaky": 1, "fatal": 3}


async def test_the_timeout_applies_to_each_attempt_and_timeouts_retry_by_choice() -> None:
    starts: list[float] = []

    async def fn(i: int) -> str:
        starts.append(now())
        await asyncio.sleep(100 if len(starts) < 3 else 1)
        return "ok"

    report = await batch_process([0], fn, timeout=5, retry=Retry(attempts=3, backoff=STEADY))
    assert starts == [0, 6, 13]
    assert report.values() == ["ok"]
    (o,) = report
    assert o.attempts == 3

    starts.clear()
    no_retry = Retry(attempts=3, backoff=STEADY, timeouts=False)
    report = await batch_process([0], fn, timeout=5, retry=no_retry)
    (failure,) = report.failures
    assert failure.kind == "timeout"
    assert isinstance(failure.error, ItemTimeout)
    assert failure.attempts == 1


async def test_freed_slot_runs_other_items_during_backoff() -> None:
    starts: list[tuple[int, float]] = []

    async def fn(i: int) -> int:
        starts.append((i, now()))
        await asyncio.sleep(1)
        if i == 0 and len([s for s in starts if s[0] == 0]) == 1:
            raise Flaky
        return i

    report = await batch_process(
        range(4),
        fn,
        concurrency=1,
        retry=Retry(attempts=2, backoff=Backoff(initial=3, jitter=False)),
    )
    # Item 0 fails at 1 and waits until 4; items 1..3 use the slot meanwhile (1, 2, 3).
    assert starts == [(0, 0), (1, 1), (2, 2), (3, 3), (0, 4)]
    assert report.wall_time == 5
    assert report.values() == [0, 1, 2, 3]


async def test_hold_slot_keeps_the_slot_during_backoff() -> None:
    starts: list[tuple[int, float]] = []

    async def fn(i: int) -> int:
        starts.append((i, now()))
        await asyncio.sleep(1)
        if i == 0 and len([s for s in starts if s[0] == 0]) == 1:
            raise Flaky
        return i

    retry = Retry(attempts=2, backoff=Backoff(initial=3, jitter=False), hold_slot=True)
    report = await batch_process(range(3), fn, concurrency=1, retry=retry)
    assert starts == [(0, 0), (0, 4), (1, 5), (2, 6)]
    assert report.wall_time == 7


async def test_cancelled_error_is_never_retried() -> None:
    attempts = 0

    async def fn(i: int) -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(100)
        return i

    task = asyncio.create_task(batch_process([0], fn, retry=Retry(attempts=5)))
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert attempts == 1


@pytest.mark.parametrize("hold_slot", [False, True])
async def test_cancellation_during_backoff_closes_contexts_and_leaks_nothing(
    hold_slot: bool,
) -> None:
    opened = 0
    closed = 0

    @contextlib.asynccontextmanager
    async def ctx() -> AsyncIterator[None]:
        nonlocal opened, closed
        opened += 1
        try:
            yield None
        finally:
            closed += 1

    async def fn(i: int, _: None) -> int:
        raise Flaky

    before = asyncio.all_tasks()
    retry = Retry(attempts=5, backoff=Backoff(initial=10, jitter=False), hold_slot=hold_slot)
    task = asyncio.create_task(batch_process(range(3), fn, context=ctx, retry=retry))
    await asyncio.sleep(5)  # everyone is waiting out a backoff now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert opened == closed == 3
    assert asyncio.all_tasks() == before


# -- rate limits -----------------------------------------------------------------------
async def test_rate_limit_spaces_starts_with_no_startup_burst() -> None:
    starts: list[float] = []

    async def fn(i: int) -> int:
        starts.append(now())
        await asyncio.sleep(10)
        return i

    await batch_process(range(5), fn, concurrency=5, rate_limit=RateLimit(per_second=2))
    assert starts == [0, 0.5, 1.0, 1.5, 2.0]


async def test_rate_limit_burst_then_steady_rate() -> None:
    starts: list[float] = []

    async def fn(i: int) -> int:
        starts.append(now())
        return i

    await batch_process(range(6), fn, concurrency=6, rate_limit=RateLimit(per_second=1, burst=3))
    assert starts == [0, 0, 0, 1, 2, 3]


async def test_rate_limit_holds_on_actual_starts_after_a_stalled_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loop stalled from t=1.0 to t=1.5 (every sleep due then ends at 1.5) must not release
    the turns reserved for that half second at once: starts stay spaced by the rate on the
    times they really happen, never more than ``burst`` together."""
    real_sleep = asyncio.sleep

    async def stalled_sleep(delay: float, result: Any = None) -> Any:
        due = now() + delay
        if 1.0 <= due < 1.5:
            delay = 1.5 - now()
        return await real_sleep(delay, result)

    monkeypatch.setattr(asyncio, "sleep", stalled_sleep)
    starts: list[float] = []

    async def fn(i: int) -> int:
        starts.append(now())
        return i

    await batch_process(range(20), fn, concurrency=20, rate_limit=RateLimit(per_second=10))
    assert max(Counter(starts).values()) == 1  # burst=1: never two starts at one instant
    # burst=1: consecutive starts at least one interval apart, on their real times.
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.1 - 1e-9
    assert not [t for t in starts if 1.0 + 1e-6 < t < 1.5]  # nothing ran during the stall
    after = [t for t in starts if t >= 1.5]
    assert after == pytest.approx([1.5 + 0.1 * k for k in range(len(after))])  # paced from 1.5


async def test_rate_limit_and_concurrency_both_hold() -> None:
    starts: list[float] = []
    in_flight = peak = 0

    async def fn(i: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        starts.append(now())
        await asyncio.sleep(4)
        in_flight -= 1
        return i

    report = await batch_process(range(8), fn, concurrency=2, rate_limit=RateLimit(per_second=1))
    assert peak == 2
    # Concurrency is the binding limit here: two at a time, each 4 s.
    assert starts == [0, 1, 4, 5, 8, 9, 12, 13]
    assert report.wall_time == 17


async def test_rate_limit_applies_to_retries_too() -> None:
    starts: list[float] = []

    async def fn(i: int) -> int:
        starts.append(now())
        if len(starts) == 1:
            raise Flaky
        return i

    retry = Retry(attempts=2, backoff=Backoff(initial=0, maximum=0))
    await batch_process([0], fn, rate_limit=RateLimit(per_second=0.5), retry=retry)
    assert starts == [0, 2]


async def test_user_supplied_async_limiter() -> None:
    class Limiter:
        def __init__(self) -> None:
            self.inside = 0
            self.peak = 0
            self.sem = asyncio.Semaphore(2)

        async def __aenter__(self) -> None:
            await self.sem.acquire()
            self.inside += 1
            self.peak = max(self.peak, self.inside)

        async def __aexit__(self, *exc: object) -> None:
            self.inside -= 1
            self.sem.release()

    limiter = Limiter()

    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        return i

    report = await batch_process(range(6), fn, concurrency=6, rate_limit=limiter)
    assert limiter.peak == 2
    assert report.wall_time == 3
    assert report.values() == list(range(6))


# -- deadline --------------------------------------------------------------------------
async def test_deadline_returns_on_time_with_the_partial_report() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(60 if i < 3 else 15)
        return i

    report = await batch_process(range(20), fn, concurrency=3, deadline=50)
    # Nothing observed yet: the first wave starts, and is cancelled at 50.
    assert report.wall_time == 50
    assert report.deadline_hit
    assert report.stop_reason == "deadline"
    assert report.counts == {
        "success": 0, "error": 0, "timeout": 0, "cancelled": 3, "skipped": 17, "lost": 0
    }  # fmt: skip
    cancelled = [o for o in report.failures if o.kind == "cancelled"]
    assert all(isinstance(o.error, ItemCancelled) and o.elapsed == 50 for o in cancelled)
    skipped = [o for o in report.failures if o.kind == "skipped"]
    assert all(isinstance(o.error, ItemSkipped) and o.error.reason == "deadline" for o in skipped)


async def test_deadline_admission_by_observed_durations_stops_early() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(15)
        return i

    report = await batch_process(range(20), fn, concurrency=3, deadline=50)
    # Waves at 0, 15, 30 finish (9 items); at 45 a 15 s item cannot end by 50: the run stops
    # starting items and returns at 45, before the deadline, which it never reached.
    assert report.wall_time == 45
    assert not report.deadline_hit
    assert report.stop_reason == "out_of_time"
    assert report.counts["success"] == 9
    assert report.counts["skipped"] == 11
    skipped = [o for o in report.failures if o.kind == "skipped"]
    assert all(
        isinstance(o.error, ItemSkipped) and o.error.reason == "out_of_time" for o in skipped
    )


async def test_no_item_starts_if_its_timeout_cannot_fit() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(14)
        return i

    deadline = Deadline(seconds=55, fit_timeout=True)
    report = await batch_process(range(20), fn, concurrency=3, timeout=15, deadline=deadline)
    # At 42 a new item could only be sure to end by 57 > 55: nothing starts; the call ends.
    assert report.wall_time == 42
    assert report.stop_reason == "out_of_time"
    assert report.counts["success"] == 9
    assert report.counts["skipped"] == 11
    assert report.counts["cancelled"] == 0


async def test_deadline_at_an_absolute_loop_time() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(10)
        return i

    await asyncio.sleep(100)
    report = await batch_process(range(4), fn, concurrency=1, deadline=Deadline(at=125))
    # Items end at 110 and 120; a third (10 s observed) could not end by 125.
    assert now() == 120
    assert report.counts["success"] == 2
    assert report.stop_reason == "out_of_time"


async def test_backoff_never_sleeps_past_the_deadline() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        raise Flaky

    retry = Retry(attempts=10, backoff=Backoff(initial=4, maximum=100, jitter=False))
    report = await batch_process([0], fn, retry=retry, deadline=10)
    (failure,) = report.failures
    # Attempts at 0 and 5 (each fails 1 s later); the next would start at 14 > 10.
    assert failure.attempts == 2
    assert failure.kind == "skipped"  # the third attempt was dropped for the deadline
    assert [type(e).__name__ for e in failure.errors] == ["Flaky", "Flaky", "ItemSkipped"]
    assert report.wall_time == 6


async def test_retry_timeout_and_deadline_together() -> None:
    starts: list[float] = []

    async def fn(i: int) -> int:
        starts.append(now())
        await asyncio.sleep(100)
        return i

    report = await batch_process(
        [0], fn, timeout=10, deadline=35, retry=Retry(attempts=10, backoff=STEADY)
    )
    # 0-10 timeout, wait 1, 11-21 timeout, wait 2: 23 + 10 > 35? no -> 23-33, then 33+4+10 > 35.
    assert starts == [0, 11, 23]
    (failure,) = report.failures
    assert failure.kind == "skipped"  # the fourth attempt was dropped for the deadline
    assert isinstance(failure.error.__cause__, TimeoutError)
    assert failure.attempts == 3
    assert report.wall_time == 33


async def test_deadline_with_stream() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(10)
        return i

    async with stream(range(10), fn, concurrency=2, deadline=25) as outcomes:
        kinds = [o.kind if isinstance(o, Failure) else "ok" async for o in outcomes]
    assert now() == 20  # at 20 a 10 s item cannot end by 25: out of time
    assert kinds.count("ok") == 4
    assert kinds.count("skipped") == 6
    deadline = Deadline(seconds=25, fit_timeout=True)
    async with stream(range(10), fn, concurrency=2, timeout=4, deadline=deadline) as outcomes:
        kinds = [o.kind if isinstance(o, Failure) else "ok" async for o in outcomes]
    assert now() == 40  # each a 4 s timeout, 21 + 4 = 25: six waves of two
    assert kinds.count("timeout") == 10


# -- failure thresholds ----------------------------------------------------------------
async def test_max_failures_stops_the_run() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        if i % 2:
            raise Fatal
        return i

    report = await batch_process(range(20), fn, concurrency=1, max_failures=3)
    assert report.stop_reason == "max_failures"
    assert report.counts["error"] == 3
    assert report.counts["success"] == 3
    assert report.counts["skipped"] == 14
    assert report.wall_time == 6


async def test_max_failure_ratio_after_a_minimum_sample() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        if i < 3:  # 3 of the first 4 fail, but the sample is too small to judge
            raise Fatal
        if i >= 10:
            raise Fatal
        return i

    report = await batch_process(
        range(40), fn, concurrency=1, max_failure_ratio=FailureRatio(ratio=0.3, min_sample=10)
    )
    # After 10 items: 3 failed (0.3, not above). Items 10.. fail: at 11 finished 4/11 > 0.3.
    assert report.stop_reason == "max_failure_ratio"
    assert len([o for o in report if not (isinstance(o, Failure) and o.kind == "skipped")]) == 11
    assert report.counts["skipped"] == 29


async def test_a_float_ratio_uses_the_default_sample() -> None:
    async def fn(i: int) -> int:
        raise Fatal

    report = await batch_process(range(50), fn, concurrency=1, max_failure_ratio=0.5)
    assert report.stop_reason == "max_failure_ratio"
    assert report.counts["error"] == 10


async def test_timeouts_count_as_failures_for_thresholds() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(100)
        return i

    report = await batch_process(range(10), fn, concurrency=2, timeout=1, max_failures=2)
    assert report.counts["timeout"] == 2
    assert report.stop_reason == "max_failures"
    assert report.wall_time == 1


# -- adaptive concurrency --------------------------------------------------------------
def cliff_upstream(k: int) -> tuple[Any, list[int]]:
    """An upstream whose latency explodes (x10) for requests above ``k`` in flight."""
    in_flight = [0]

    async def call(i: int) -> int:
        in_flight[0] += 1
        try:
            await asyncio.sleep(1.0 if in_flight[0] <= k else 10.0)
        finally:
            in_flight[0] -= 1
        return i

    return call, in_flight


def run_cliff(k: int, concurrency: int | Adaptive) -> BatchReport[int, int]:
    call, _ = cliff_upstream(k)

    async def main() -> BatchReport[int, int]:
        return await batch_process(range(200 * k), call, concurrency=concurrency, timeout=3)

    return run_virtual(main)


def limit_over_time(report: BatchReport[Any, Any], start: float) -> list[tuple[float, int]]:
    """(duration, limit) pieces of the limit's trace from ``start`` to the end."""
    changes = report.limit_changes
    current = report.concurrency
    for c in changes:
        if c.time <= start:
            current = c.new
    pieces: list[tuple[float, int]] = []
    t = start
    for c in changes:
        if c.time > start:
            pieces.append((c.time - t, current))
            t, current = c.time, c.new
    pieces.append((report.wall_time - t, current))
    return pieces


@pytest.mark.parametrize("k", [5, 10, 20])
def test_adaptive_settles_near_the_cliff_with_good_throughput(k: int) -> None:
    adaptive = run_cliff(k, Adaptive(initial=1, min=1, max=4 * k))
    best = run_cliff(k, k)  # the best fixed limit, chosen in hindsight
    pieces = limit_over_time(adaptive, adaptive.wall_time / 2)
    total = sum(d for d, _ in pieces)
    mean = sum(d * lim for d, lim in pieces) / total
    assert k / 2 <= mean <= k
    assert min(lim for _, lim in pieces) >= k / 2
    # It only probes past the cliff briefly (that is how it finds it).
    above = sum(d for d, lim in pieces if lim > k)
    assert above / total <= 0.1
    rate = adaptive.counts["success"] / adaptive.wall_time
    best_rate = best.counts["success"] / best.wall_time
    assert rate >= 0.8 * best_rate


async def test_adaptive_limit_stays_within_bounds_and_is_recorded() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        if 100 <= i < 110:  # a burst of 429s
            raise Flaky
        return i

    policy = Adaptive(initial=2, min=2, max=6, overload_on=Flaky)
    report = await batch_process(range(300), fn, concurrency=policy)
    assert report.limit_changes
    assert all(2 <= c.new <= 6 for c in report.limit_changes)
    assert report.peak_concurrency <= 6
    reasons = {c.reason for c in report.limit_changes}
    assert "increase" in reasons
    assert "error" in reasons


async def test_adaptive_with_failures_that_are_not_overload() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        raise Fatal

    report = await batch_process(range(100), fn, concurrency=Adaptive(initial=4, max=8))
    # Ordinary errors do not cut the limit; latency stays flat, so it only grows.
    assert all(c.new > c.old for c in report.limit_changes)
    assert report.counts["error"] == 100


async def test_adaptive_peak_never_exceeds_the_current_limit() -> None:
    in_flight = 0
    violations: list[tuple[int, int]] = []
    limit = 3

    def observer(event: object) -> None:
        nonlocal limit
        from batchkit import LimitChanged

        if isinstance(event, LimitChanged):
            limit = event.new

    async def fn(i: int) -> int:
        nonlocal in_flight
        in_flight += 1
        if in_flight > limit:
            violations.append((in_flight, limit))
        try:
            await asyncio.sleep(1 if i % 5 else 3)
        finally:
            in_flight -= 1
        return i

    await batch_process(
        range(200), fn, concurrency=Adaptive(initial=3, min=1, max=12), timeout=2,
        observers=[observer],
    )  # fmt: skip
    assert violations == []


async def test_success_envelopes_after_retries() -> None:
    async def fn(i: int) -> int:
        return i

    report = await batch_process(range(3), fn, retry=Retry())
    assert all(isinstance(o, Success) and o.attempts == 1 for o in report)


async def test_stream_with_retries_rate_limit_and_adaptive_concurrency() -> None:
    attempts: dict[int, int] = {}
    starts: list[float] = []

    async def fn(i: int) -> int:
        attempts[i] = attempts.get(i, 0) + 1
        starts.append(now())
        await asyncio.sleep(1)
        if i % 3 == 0 and attempts[i] == 1:
            raise Flaky
        return i

    async with stream(
        range(12),
        fn,
        concurrency=Adaptive(initial=2, max=4),
        retry=Retry(attempts=2, backoff=STEADY),
        rate_limit=RateLimit(per_second=4),
        ordered=True,
    ) as outcomes:
        got = [o async for o in outcomes]
    assert [o.index for o in got] == list(range(12))
    assert all(isinstance(o, Success) for o in got)
    assert [o.attempts for o in got] == [2 if i % 3 == 0 else 1 for i in range(12)]
    # 16 attempt starts, never more than 4 per second, 0.25 s apart at the closest.
    assert len(starts) == 16
    assert all(b - a >= 0.25 for a, b in itertools.pairwise(sorted(starts)))
