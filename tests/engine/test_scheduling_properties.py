"""Scheduling properties over random inputs, each example run in virtual time.

The strongest one: with integer latencies and virtual time, every item starts exactly when
the overhead-free greedy in-input-order schedule says it should (the sliding window), so
peak, work conservation and the makespan all follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypothesis import given, settings
from hypothesis import strategies as st

from batchkit import Failure, Success, batch_process, stream
from batchkit.testing import run_virtual

from ..helpers import Recorder, now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

HANG = -1


@dataclass(frozen=True)
class Case:
    latencies: list[int]  # HANG: never finishes
    failing: frozenset[int]
    concurrency: int
    timeout: int | None


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(0, 30))
    timeout = draw(st.one_of(st.none(), st.integers(3, 12)))
    lat = st.integers(1, 15) if timeout is None else st.one_of(st.integers(1, 15), st.just(HANG))
    # A latency equal to the timeout is a tie between two timers: either may win.
    latencies = [x + 1 if x == timeout else x for x in draw(st.lists(lat, min_size=n, max_size=n))]
    failing = draw(st.frozensets(st.integers(0, max(n - 1, 0)), max_size=n))
    concurrency = draw(st.integers(1, 8))
    return Case(latencies, failing if n else frozenset(), concurrency, timeout)


def greedy_starts(durations: list[float], concurrency: int) -> list[float]:
    """The start times of list scheduling in input order with no overhead."""
    free = [0.0] * concurrency
    starts = []
    for d in durations:
        t = heapq.heappop(free)
        starts.append(t)
        heapq.heappush(free, t + d)
    return starts


class Contexts:
    def __init__(self) -> None:
        self.entered = 0
        self.exited = 0
        self.open = 0

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[int]:
        self.entered += 1
        self.open += 1
        try:
            yield self.entered
        finally:
            self.open -= 1
            self.exited += 1


def durations_of(case: Case) -> list[float]:
    out: list[float] = []
    for lat in case.latencies:
        if lat == HANG or (case.timeout is not None and lat > case.timeout):
            assert case.timeout is not None
            out.append(float(case.timeout))
        else:
            out.append(float(lat))
    return out


@settings(max_examples=150, deadline=None)
@given(cases())
def test_sliding_window_schedule_is_exactly_greedy(case: Case) -> None:
    rec = Recorder()
    ctxs = Contexts()

    async def fn(i: int, ctx: int) -> int:
        rec.enter(i)
        try:
            lat = case.latencies[i]
            if lat == HANG:
                await asyncio.Event().wait()
            await asyncio.sleep(lat)
            if i in case.failing:
                raise ValueError(i)
            return i * 2
        finally:
            rec.exit(i)

    async def main() -> None:
        before = asyncio.all_tasks()
        report = await batch_process(
            range(len(case.latencies)), fn, concurrency=case.concurrency,
            timeout=case.timeout, context=ctxs,
        )  # fmt: skip
        assert asyncio.all_tasks() == before  # no task outlives the call

        durations = durations_of(case)
        expected = greedy_starts(durations, case.concurrency)
        assert [rec.starts[i] for i in range(len(durations))] == [[s] for s in expected]
        makespan = max((s + d for s, d in zip(expected, durations, strict=True)), default=0.0)
        assert report.wall_time == makespan
        assert rec.peak <= case.concurrency
        assert report.peak_concurrency == min(case.concurrency, len(durations))
        # Exactly one outcome per item, in input order, with the right kind.
        assert [o.index for o in report] == list(range(len(durations)))
        for i, o in enumerate(report):
            timed_out = case.latencies[i] == HANG or (
                case.timeout is not None and case.latencies[i] > case.timeout
            )
            if timed_out:
                assert isinstance(o, Failure)
                assert o.kind == "timeout"
            elif i in case.failing:
                assert isinstance(o, Failure)
                assert o.kind == "error"
            else:
                assert isinstance(o, Success)
                assert o.value == i * 2
            assert o.elapsed == durations[i]
        assert ctxs.entered == ctxs.exited == len(durations)
        assert ctxs.open == 0

    run_virtual(main)


@settings(max_examples=80, deadline=None)
@given(cases(), st.integers(0, 40))
def test_cancelling_the_caller_at_any_time_cleans_up(case: Case, cancel_at: int) -> None:
    ctxs = Contexts()

    async def fn(i: int, ctx: int) -> int:
        lat = case.latencies[i]
        if lat == HANG:
            await asyncio.Event().wait()
        await asyncio.sleep(lat)
        return i

    async def main() -> None:
        before = asyncio.all_tasks()
        task = asyncio.create_task(
            batch_process(
                range(len(case.latencies)),
                fn,
                concurrency=case.concurrency,
                timeout=case.timeout,
                context=ctxs,
            )
        )
        await asyncio.sleep(cancel_at)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            assert now() == cancel_at
        assert asyncio.all_tasks() == before
        assert ctxs.entered == ctxs.exited
        assert ctxs.open == 0

    run_virtual(main)


@settings(max_examples=80, deadline=None)
@given(cases())
def test_fail_fast_gives_every_item_one_envelope_and_cleans_up(case: Case) -> None:
    ctxs = Contexts()
    rec = Recorder()

    async def fn(i: int, ctx: int) -> int:
        rec.enter(i)
        try:
            lat = case.latencies[i]
            if lat == HANG:
                await asyncio.Event().wait()
            await asyncio.sleep(lat)
            if i in case.failing:
                raise ValueError(i)
            return i
        finally:
            rec.exit(i)

    async def main() -> None:
        before = asyncio.all_tasks()
        n = len(case.latencies)
        report = await batch_process(
            range(n), fn, concurrency=case.concurrency, timeout=case.timeout,
            context=ctxs, fail_fast=True,
        )  # fmt: skip
        assert asyncio.all_tasks() == before
        assert [o.index for o in report] == list(range(n))
        assert ctxs.entered == ctxs.exited
        assert ctxs.open == 0
        # An envelope says "skipped" exactly when fn never ran for the item.
        for o in report:
            skipped = isinstance(o, Failure) and o.kind == "skipped"
            assert skipped == (o.index not in rec.starts), o
            assert skipped == (o.attempts == 0), o
        hard = [o for o in report if isinstance(o, Failure) and o.kind in ("error", "timeout")]
        if report.stop_reason is None:
            assert hard == []
            return
        assert report.stop_reason == "fail_fast"
        assert len(hard) >= 1
        # The first hard failure ended at first_end: nothing started after it, what was in
        # flight was cancelled at that instant, and the call returned then.
        first_end = min(rec.ends[o.index] for o in hard)
        assert max(s for starts in rec.starts.values() for s in starts) <= first_end
        assert all(end <= first_end for end in rec.ends.values())
        assert report.wall_time == first_end

    run_virtual(main)


@settings(max_examples=80, deadline=None)
@given(cases(), st.booleans(), st.integers(1, 4))
def test_stream_yields_each_item_once_within_its_window(
    case: Case, ordered: bool, buffer: int
) -> None:
    pulled = 0

    def items() -> object:
        nonlocal pulled
        for i in range(len(case.latencies)):
            pulled += 1
            yield i

    async def fn(i: int) -> int:
        lat = case.latencies[i]
        if lat == HANG:
            await asyncio.Event().wait()
        await asyncio.sleep(lat)
        return i

    async def main() -> None:
        before = asyncio.all_tasks()
        seen: list[int] = []
        async with stream(
            items(), fn, concurrency=case.concurrency, timeout=case.timeout,  # type: ignore[call-overload]
            ordered=ordered, buffer=buffer,
        ) as outcomes:  # fmt: skip
            async for o in outcomes:
                # Memory bound: pulled but not yet consumed <= concurrency + buffer.
                assert pulled - len(seen) <= case.concurrency + buffer
                seen.append(o.index)
                await asyncio.sleep(1)  # a slow consumer
        assert sorted(seen) == list(range(len(case.latencies)))
        if ordered:
            assert seen == sorted(seen)
        assert asyncio.all_tasks() == before

    run_virtual(main)
