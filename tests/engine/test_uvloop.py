"""The real-time core behaviours on uvloop too: timeouts, cancellation, contexts, limits.

Virtual time (looptime) needs asyncio's own loop, so these run in real time; every one is
ordered by events (never by a sleep and a margin) and runs on both loops, so a difference
between them shows as one failing parameter.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from batchkit import (
    Failure,
    ItemCancelled,
    ItemSkipped,
    ItemTimeout,
    Success,
    batch_process,
    stream,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine

uvloop = pytest.importorskip("uvloop")

pytestmark = pytest.mark.timeout(20)

T = TypeVar("T")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    factory = LOOPS[request.param]

    def run(main: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            if request.param == "uvloop":
                assert isinstance(runner.get_loop(), uvloop.Loop)
            return runner.run(main)

    return run


class Boom(Exception):
    pass


def test_a_hung_item_times_out_and_the_rest_succeed(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    cleaned: list[int] = []

    async def main() -> None:
        never = asyncio.Event()

        async def fn(i: int) -> int:
            if i == 2:
                try:
                    await never.wait()
                finally:
                    cleaned.append(i)
            return i

        report = await batch_process(range(6), fn, concurrency=3, timeout=0.05)
        timed_out = report[2]
        assert isinstance(timed_out, Failure)
        assert timed_out.kind == "timeout"
        assert isinstance(timed_out.error, ItemTimeout)
        assert report.values() == [0, 1, 3, 4, 5]
        assert cleaned == [2]

    run(main())


def test_the_callers_cancel_stops_every_item_and_starts_no_new_one(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def main() -> None:
        all_in = asyncio.Event()

        async def fn(i: int) -> int:
            started.append(i)
            if len(started) == 3:
                all_in.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(i)
                raise
            return i

        task = asyncio.ensure_future(batch_process(range(10), fn, concurrency=3))
        await all_in.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert sorted(started) == [0, 1, 2]
    assert sorted(cancelled) == [0, 1, 2]


def test_contexts_are_exited_on_success_error_and_timeout(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    opened: list[int] = []
    closed: list[int] = []

    async def main() -> None:
        counter = iter(range(100))

        @contextlib.asynccontextmanager
        async def session() -> AsyncIterator[int]:
            n = next(counter)
            opened.append(n)
            try:
                yield n
            finally:
                closed.append(n)

        async def fn(i: int, ctx: int) -> int:
            if i == 1:
                raise Boom(i)
            if i == 2:
                await asyncio.Event().wait()
            return i

        report = await batch_process(range(5), fn, concurrency=2, timeout=0.05, context=session)
        assert [o.kind if isinstance(o, Failure) else "ok" for o in report] == [
            "ok",
            "error",
            "timeout",
            "ok",
            "ok",
        ]

    run(main())
    assert sorted(opened) == sorted(closed) == list(range(5))


def test_the_concurrency_bound_is_reached_and_never_passed(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    peak = 0

    async def main() -> None:
        in_flight = 0
        full = asyncio.Event()

        async def fn(i: int) -> int:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            if in_flight == 4:
                full.set()
            await full.wait()  # the first 4 wait for each other; the rest pass through
            await asyncio.sleep(0)
            in_flight -= 1
            return i

        report = await batch_process(range(40), fn, concurrency=4)
        assert report.ok
        assert report.peak_concurrency == 4

    run(main())
    assert peak == 4


def test_an_external_limiter_bounds_the_attempts(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    peak = 0

    async def main() -> None:
        in_flight = 0
        limiter = _Limiter(2)

        async def fn(i: int) -> int:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            in_flight -= 1
            return i

        report = await batch_process(range(20), fn, concurrency=8, rate_limit=limiter)
        assert report.values() == list(range(20))

    run(main())
    assert peak == 2


class _Limiter:
    """A semaphore as batchkit's AsyncLimiter (``async with limiter:`` per attempt)."""

    def __init__(self, n: int) -> None:
        self._sem = asyncio.Semaphore(n)

    async def __aenter__(self) -> None:
        await self._sem.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._sem.release()


def test_a_deadline_cancels_what_runs_and_skips_the_rest(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    async def main() -> None:
        async def fn(i: int) -> int:
            await asyncio.Event().wait()
            return i

        report = await batch_process(range(1000), fn, concurrency=3, deadline=0.05)
        assert report.deadline_hit
        assert report.counts == {
            "success": 0,
            "error": 0,
            "timeout": 0,
            "cancelled": 3,
            "skipped": 997,
            "lost": 0,
        }
        first, last = report[0], report[-1]
        assert isinstance(first, Failure)
        assert isinstance(first.error, ItemCancelled)
        assert isinstance(last, Failure)
        assert isinstance(last.error, ItemSkipped)

    run(main())


def test_an_ordered_stream_left_early_exits_its_contexts(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    open_now: set[int] = set()

    async def main() -> None:
        counter = iter(range(100))

        @contextlib.asynccontextmanager
        async def session() -> AsyncIterator[int]:
            n = next(counter)
            open_now.add(n)
            try:
                yield n
            finally:
                open_now.discard(n)

        async def fn(i: int, ctx: int) -> int:
            if i % 2:
                await asyncio.sleep(0)
            return i

        got: list[int] = []
        async with stream(range(100), fn, concurrency=4, ordered=True, context=session) as out:
            async for o in out:
                assert isinstance(o, Success)
                got.append(o.value)
                if len(got) == 10:
                    break
        assert got == list(range(10))

    run(main())
    assert open_now == set()


def test_a_sync_fn_runs_in_threads(run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    threads: set[str] = set()

    def fn(i: int) -> int:
        threads.add(threading.current_thread().name)
        return i * 2

    async def main() -> None:
        report = await batch_process(range(10), fn, concurrency=2)
        assert report.values() == [i * 2 for i in range(10)]

    run(main())
    assert threads
    assert threading.main_thread().name not in threads
