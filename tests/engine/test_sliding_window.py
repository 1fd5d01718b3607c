"""batch_process: sliding window, timeouts, contexts, isolation, cancellation (virtual time)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from typing import TYPE_CHECKING, Any

import pytest

from batchkit import (
    BatchReport,
    Failure,
    InputFailed,
    ItemSkipped,
    ItemTimeout,
    Success,
    batch_process,
)
from batchkit.testing import run_virtual

from ..helpers import Recorder, now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.looptime


async def test_seed_call_shape_is_a_sliding_window_not_batches() -> None:
    """20 items x 15 s, concurrency 3, batch_size 5: 7 waves = 105 s, not the barrier's 120 s."""
    rec = Recorder()

    async def process_single_market(i: int) -> int:
        rec.enter(i)
        await asyncio.sleep(15)
        rec.exit(i)
        return i

    report = await batch_process(range(20), process_single_market, batch_size=5, concurrency=3)
    assert report.wall_time == 105
    assert now() == 105
    assert rec.peak == 3
    assert report.values() == list(range(20))
    # Item 5 starts at 15 s with the second wave; a barrier would start it at 30 s.
    assert rec.starts[5] == [15.0]
    assert report.ideal_time == 100  # 300 s of work / 3
    assert report.peak_concurrency == 3


async def test_next_item_starts_the_moment_a_slot_frees() -> None:
    starts: dict[int, float] = {}

    async def fn(i: int) -> None:
        starts[i] = now()
        await asyncio.sleep([10, 1, 1, 1, 1][i])

    await batch_process(range(5), fn, concurrency=2)
    # The slow item 0 holds one slot; the other slot runs 1..4 back to back.
    assert starts == {0: 0, 1: 0, 2: 1, 3: 2, 4: 3}


async def test_hung_items_time_out_at_the_timeout() -> None:
    async def fn(i: int) -> int:
        if i % 3 == 0:
            await asyncio.Event().wait()  # never finishes
        await asyncio.sleep(1)
        return i

    report = await batch_process(range(9), fn, concurrency=9, timeout=5)
    assert report.wall_time == 5
    for o in report:
        if o.index % 3 == 0:
            assert isinstance(o, Failure)
            assert o.kind == "timeout"
            assert isinstance(o.error, ItemTimeout)
            assert isinstance(o.error, TimeoutError)
            assert o.elapsed == 5
        else:
            assert isinstance(o, Success)
            assert o.elapsed == 1


async def test_timeout_really_cancels_and_frees_the_slot_at_once() -> None:
    cancelled: list[tuple[int, float]] = []
    starts: dict[int, float] = {}

    async def fn(i: int) -> None:
        starts[i] = now()
        try:
            await asyncio.sleep(100 if i == 0 else 1)
        except asyncio.CancelledError:
            cancelled.append((i, now()))
            raise

    report = await batch_process(range(3), fn, concurrency=1, timeout=3)
    assert cancelled == [(0, 3.0)]
    assert starts == {0: 0, 1: 3, 2: 4}
    assert report.wall_time == 5
    assert report.counts["timeout"] == 1


async def test_errors_are_isolated_and_recorded() -> None:
    boom = ValueError("boom")

    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        if i == 2:
            raise boom
        return i * 10

    report = await batch_process(range(5), fn, concurrency=2)
    assert report.values() == [0, 10, 30, 40]
    (failure,) = report.failures
    assert failure.error is boom
    assert failure.kind == "error"
    assert failure.index == 2
    assert failure.item == 2
    assert failure.attempts == 1
    assert failure.errors == (boom,)
    assert report.counts == {
        "success": 4,
        "error": 1,
        "timeout": 0,
        "cancelled": 0,
        "skipped": 0,
        "lost": 0,
    }
    assert not report.ok


async def test_outcomes_are_in_input_order_even_when_completion_is_not() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(10 - i)
        return i

    report = await batch_process(range(10), fn, concurrency=10)
    assert [o.index for o in report] == list(range(10))
    assert [o.item for o in report.outcomes] == list(range(10))
    assert report[3].index == 3
    assert len(report) == 10
    assert report.wall_time == 10


async def test_empty_input() -> None:
    async def fn(i: int) -> int:
        raise AssertionError("never called")

    report: BatchReport[int, int] = await batch_process([], fn)
    assert len(report) == 0
    assert report.ok
    assert report.wall_time == 0


async def test_async_iterable_input_is_pulled_lazily() -> None:
    pulled: list[int] = []
    rec = Recorder()

    async def pages() -> AsyncIterator[int]:
        for i in range(12):
            if i % 4 == 0:
                await asyncio.sleep(1)  # a page fetch
            pulled.append(i)
            yield i

    async def fn(i: int) -> int:
        rec.enter(i)
        # Never more than concurrency items pulled beyond those finished.
        assert len(pulled) - len(rec.ends) <= 2
        await asyncio.sleep(2)
        rec.exit(i)
        return i

    report = await batch_process(pages(), fn, concurrency=2)
    assert report.values() == list(range(12))
    assert rec.peak == 2
    assert report.input_exhausted


async def test_sync_functions_run_in_worker_threads() -> None:
    main = threading.get_ident()
    threads: set[int] = set()

    def fn(i: int) -> int:
        threads.add(threading.get_ident())
        return i * 2

    report = await batch_process(range(20), fn, concurrency=4)
    assert report.values() == [i * 2 for i in range(20)]
    assert main not in threads


async def test_plain_function_returning_a_coroutine_is_awaited() -> None:
    async def double(i: int) -> int:
        await asyncio.sleep(1)
        return i * 2

    report = await batch_process(range(3), lambda i: double(i), concurrency=3)
    assert report.values() == [0, 2, 4]
    # The coroutine's sleep ran (in virtual time). No exact wall time: the lambda runs in a
    # worker thread, and a thread that starts late on a busy machine lets virtual time jump
    # to the first item's wake-up before the next item's sleep begins.
    assert all(o.elapsed >= 1 for o in report)
    assert report.peak_concurrency == 3


async def test_sync_function_errors_are_recorded() -> None:
    def fn(i: int) -> int:
        if i == 1:
            raise KeyError(i)
        return i

    report = await batch_process(range(3), fn, concurrency=2)
    assert [type(o) for o in report] == [Success, Failure, Success]


class _Ctx:
    """A context factory that records every enter and exit."""

    def __init__(self, *, fail_exit: bool = False, fail_enter: bool = False) -> None:
        self.entered = 0
        self.exited: list[type[BaseException] | None] = []
        self.fail_exit = fail_exit
        self.fail_enter = fail_enter

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[str]:
        if self.fail_enter:
            raise ConnectionError("pool exhausted")
        self.entered += 1
        try:
            yield f"session-{self.entered}"
        except BaseException as e:
            self.exited.append(type(e))
            raise
        else:
            self.exited.append(None)
            if self.fail_exit:
                raise RuntimeError("commit failed")


async def test_context_is_entered_and_exited_on_every_path() -> None:
    ctx = _Ctx()
    seen: list[str] = []

    async def fn(i: int, session: str) -> int:
        seen.append(session)
        if i == 1:
            raise ValueError(i)
        if i == 2:
            await asyncio.sleep(100)  # times out
        await asyncio.sleep(1)
        return i

    report = await batch_process(range(4), fn, concurrency=2, context=ctx, timeout=10)
    assert ctx.entered == 4
    assert sorted(ctx.exited, key=str) == sorted(
        [None, None, ValueError, asyncio.CancelledError], key=str
    )
    assert len(set(seen)) == 4  # a fresh context per item
    assert [o.ok for o in report] == [True, False, False, True]
    assert report[2].kind == "timeout"


async def test_error_while_exiting_the_context_is_the_items_error() -> None:
    ctx = _Ctx(fail_exit=True)

    async def fn(i: int, session: str) -> int:
        return i

    report = await batch_process(range(3), fn, context=ctx)
    assert all(isinstance(o, Failure) for o in report)
    failure = report.failures[0]
    assert isinstance(failure.error, RuntimeError)
    assert str(failure.error) == "commit failed"
    assert failure.kind == "error"


async def test_error_while_exiting_after_fn_failed_keeps_both() -> None:
    class BadExit:
        async def __aenter__(self) -> str:
            return "s"

        async def __aexit__(self, *exc: object) -> bool:
            raise RuntimeError("rollback failed")

    async def fn(i: int, session: str) -> int:
        raise ValueError("fn failed")

    report = await batch_process([1], fn, context=BadExit)
    (failure,) = report.failures
    assert isinstance(failure.error, ValueError)
    assert any("rollback failed" in note for note in failure.error.__notes__)


async def test_a_suppressing_context_does_not_turn_a_failure_into_success() -> None:
    class Suppress:
        async def __aenter__(self) -> None:
            return None

        async def __aexit__(self, *exc: object) -> bool:
            return True

    async def fn(i: int, ctx: None) -> int:
        raise ValueError(i)

    report = await batch_process([1, 2], fn, context=Suppress)
    assert [o.kind for o in report.failures] == ["error", "error"]


async def test_error_entering_the_context_is_the_items_error() -> None:
    async def fn(i: int, session: str) -> int:
        return i

    report = await batch_process(range(2), fn, context=_Ctx(fail_enter=True))
    assert [type(f.error) for f in report.failures] == [ConnectionError, ConnectionError]


async def test_cancelling_the_caller_cancels_items_exits_contexts_and_propagates() -> None:
    ctx = _Ctx()
    started = asyncio.Event()
    leftover: set[asyncio.Task[Any]] = set()

    async def fn(i: int, session: str) -> int:
        if i == 2:
            started.set()
        await asyncio.sleep(100)
        return i

    before = asyncio.all_tasks()
    task = asyncio.create_task(batch_process(range(10), fn, concurrency=3, context=ctx))
    await started.wait()
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ctx.entered == 3
    assert ctx.exited == [asyncio.CancelledError] * 3
    leftover = asyncio.all_tasks() - before - {task}
    assert leftover == set()
    assert now() == 1


async def test_fail_fast_stops_starting_cancels_in_flight_and_skips_the_rest() -> None:
    ctx = _Ctx()

    async def fn(i: int, session: str) -> int:
        await asyncio.sleep(5 if i == 1 else 10)
        if i == 1:
            raise ValueError("first failure")
        return i

    report = await batch_process(range(10), fn, concurrency=3, context=ctx, fail_fast=True)
    assert report.wall_time == 5
    assert report.stop_reason == "fail_fast"
    kinds = [o.kind if isinstance(o, Failure) else "success" for o in report]
    assert kinds == ["cancelled", "error", "cancelled"] + ["skipped"] * 7
    assert ctx.entered == 3
    assert len(ctx.exited) == 3
    skipped = report.failures[-1]
    assert isinstance(skipped.error, ItemSkipped)
    assert skipped.attempts == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_are_never_swallowed(
    exc: type[BaseException],
) -> None:
    # asyncio lets these escape the event loop itself, so run a loop of our own.
    async def fn(i: int) -> int:
        if i == 3:
            raise exc
        await asyncio.sleep(1)
        return i

    async def main() -> None:
        await batch_process(range(10), fn, concurrency=2)

    with pytest.raises(exc):
        run_virtual(main)
    # asyncio itself logs the escaped exception's task as "never retrieved" when collected;
    # collect now so that lands on this test (where it is expected), not a later one.
    gc.collect()


async def test_an_error_from_the_input_itself_is_raised_with_the_partial_report() -> None:
    def items() -> Any:
        yield 1
        yield 2
        raise OSError("page 3 failed")

    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        return i

    with pytest.raises(InputFailed) as info:
        await batch_process(items(), fn, concurrency=1)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.report.values() == [1, 2]


async def test_unsized_input_is_not_drained_after_a_stop() -> None:
    pulled: list[int] = []

    def items() -> Any:
        for i in range(1000):
            pulled.append(i)
            yield i

    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        raise ValueError(i)

    report = await batch_process(items(), fn, concurrency=2, fail_fast=True)
    assert not report.input_exhausted
    assert len(pulled) == 2
    assert len(report) == 2


async def test_report_views_and_output() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(i + 1)
        if i == 0:
            raise ValueError("zero")
        return i

    report: BatchReport[int, int] = await batch_process(
        range(4), fn, concurrency=2, key=lambda i: f"market-{i}", name="demo"
    )
    assert [s.value for s in report.successes] == [1, 2, 3]
    assert report.item_time == 1 + 2 + 3 + 4
    assert report.latency(0.5) == 2
    assert report.latency(1.0) == 4
    d = report.to_dict()
    assert d["counts"]["error"] == 1
    assert d["items"][0] == {
        "index": 0, "key": "market-0", "ok": False, "kind": "error", "attempts": 1,
        "elapsed": 1.0, "error": "ValueError: zero",
    }  # fmt: skip
    text = str(report)
    assert "market-3" in text
    assert "error" in text
    assert report.summary().startswith("4 items in 6.000s: 3 success, 1 error")
    with pytest.raises(ExceptionGroup) as info:
        report.raise_for_failures()
    (err,) = info.value.exceptions
    assert isinstance(err, ValueError)
    assert "batchkit: item index=0 key=market-0 kind=error" in err.__notes__


async def test_raise_for_failures_is_silent_when_all_succeeded() -> None:
    async def fn(i: int) -> int:
        return i

    report: BatchReport[int, int] = await batch_process(range(3), fn)
    report.raise_for_failures()
    assert report.ok


async def test_fn_that_never_awaits_does_not_starve_the_loop() -> None:
    """A heartbeat task must get to run while 20k instant items are processed."""
    beats = 0
    done = False

    async def heartbeat() -> None:
        nonlocal beats
        while not done:
            beats += 1
            await asyncio.sleep(0)

    async def fn(i: int) -> int:
        return i

    hb = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)
    report = await batch_process(range(20_000), fn, concurrency=4, timeout=1)
    done = True
    await hb
    assert len(report) == 20_000
    assert beats >= 20_000 // 256 // 2


async def test_cost_hints_start_the_most_expensive_first_within_the_read_ahead() -> None:
    durations = [1, 1, 1, 8, 1, 1, 1, 9]
    starts: dict[int, float] = {}

    async def fn(i: int) -> int:
        starts[i] = now()
        await asyncio.sleep(durations[i])
        return i

    report = await batch_process(range(8), fn, concurrency=2, cost=lambda i: durations[i])
    # Longest first: 9 and 8 start at once, the six short items fill in behind them.
    assert starts[7] == 0
    assert starts[3] == 0
    assert report.wall_time == 12  # the optimum: 23 s of work on 2 slots
    assert [o.index for o in report] == list(range(8))  # the report keeps input order

    # In input order (no hints) the same batch takes longer: 8 and 9 start late.
    plain = await batch_process(range(8), fn, concurrency=2)
    assert plain.wall_time > report.wall_time


async def test_batch_size_bounds_the_cost_read_ahead() -> None:
    durations = [1, 1, 1, 8, 1, 1, 1, 9]
    starts: dict[int, float] = {}

    async def fn(i: int) -> int:
        starts[i] = now()
        await asyncio.sleep(durations[i])
        return i

    await batch_process(range(8), fn, concurrency=1, cost=lambda i: durations[i], batch_size=4)
    # Only 4 items are looked at: item 3 (cost 8) goes first, item 7 is not yet read.
    assert starts[3] == 0
    assert starts[7] > 0


async def test_a_broken_cost_hint_fails_only_that_item() -> None:
    async def fn(i: int) -> int:
        return i

    def cost(i: int) -> float:
        if i == 2:
            raise KeyError(i)
        return float(i)

    report = await batch_process(range(5), fn, cost=cost)
    assert [o.ok for o in report] == [True, True, False, True, True]
    assert isinstance(report[2], Failure)
    assert isinstance(report[2].error, KeyError)


async def test_cost_hints_with_an_async_source() -> None:
    async def source() -> AsyncIterator[int]:
        for i in range(6):
            yield i

    async def fn(i: int) -> int:
        await asyncio.sleep(i)
        return i

    report = await batch_process(source(), fn, concurrency=2, cost=float)
    assert report.values() == list(range(6))
    assert report.wall_time == 8  # longest first: 5+2+1 on one slot, 4+3+0 on the other


def test_a_timer_due_within_the_clock_resolution_fires() -> None:
    """0.131 + 2.0 == 2.1310000000000002: asyncio runs that timer at 2.131, and the watchdog
    must then see the attempt as due (it once re-armed forever, freezing virtual time)."""

    async def fn(x: float) -> float:
        await asyncio.sleep(x)
        return x

    async def main() -> BatchReport[float, float]:
        return await batch_process([0.131, 60.0], fn, concurrency=1, timeout=2.0)

    report = run_virtual(main)
    assert report.wall_time == 2.131
    assert report.counts["timeout"] == 1


async def test_a_task_group_failing_inside_fn_does_not_confuse_timeouts() -> None:
    """On 3.11 a TaskGroup whose child fails leaves a cancel request on the task that runs
    it; batchkit's own timeout must still be told apart from the caller cancelling."""

    async def fn(i: int) -> int:
        async def fail() -> None:
            await asyncio.sleep(0.01)
            raise ValueError(i)

        async with asyncio.TaskGroup() as tg:
            if i == 1:
                tg.create_task(fail())
                tg.create_task(asyncio.sleep(0.05))
            else:
                tg.create_task(asyncio.sleep(10))
        return i

    report = await batch_process([0, 1, 0], fn, concurrency=2, timeout=0.2)
    assert [o.kind for o in report.failures] == ["timeout", "error", "timeout"]
    assert report.wall_time == 0.21  # item 2 starts when item 1 fails at 0.01


async def test_a_cancelled_run_still_tells_observers_what_finished() -> None:
    from batchkit import Event, RunFinished

    seen: list[Event] = []

    async def fn(i: int) -> int:
        await asyncio.sleep(1 if i < 2 else 100)
        return i

    task = asyncio.create_task(batch_process(range(5), fn, concurrency=3, observers=[seen.append]))
    await asyncio.sleep(5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = seen[-1]
    assert isinstance(last, RunFinished)
    # Every item is counted: the caller's cancel cut items 2-4 in flight.
    assert [o.kind for o in last.report] == ["success"] * 2 + ["cancelled"] * 3
    assert last.report.stop_reason == "cancelled"
    assert last.report.wall_time == 5
