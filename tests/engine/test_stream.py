"""stream(): outcomes as they complete, ordering, early exit, bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import TYPE_CHECKING

import pytest

from batchkit import Failure, InputFailed, Success, stream

from ..helpers import now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.looptime


async def test_unordered_yields_in_completion_order() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(5 - i)
        return i

    got: list[tuple[int, float]] = []
    async with stream(range(5), fn, concurrency=5) as outcomes:
        async for o in outcomes:
            assert isinstance(o, Success)
            got.append((o.value, now()))
    assert got == [(4, 1), (3, 2), (2, 3), (1, 4), (0, 5)]


async def test_ordered_yields_in_input_order_with_head_of_line_blocking() -> None:
    starts: dict[int, float] = {}

    async def fn(i: int) -> int:
        starts[i] = now()
        await asyncio.sleep(10 if i == 0 else 1)
        return i

    got: list[tuple[int, float]] = []
    async with stream(range(8), fn, concurrency=2, ordered=True, buffer=2) as outcomes:
        async for o in outcomes:
            got.append((o.index, now()))
    assert [i for i, _ in got] == list(range(8))
    # Item 0 holds the head for 10 s; the window (2 + 2) caps how far the others run ahead:
    # items 1..3 finish early, then nothing new starts until the head is consumed.
    assert starts[1] == 0
    assert starts[2] == 1
    assert starts[3] == 2
    assert starts[4] == 10
    assert got[0] == (0, 10)


async def test_leaving_early_cancels_everything_at_once() -> None:
    exits: list[float] = []
    enters = 0

    @contextlib.asynccontextmanager
    async def ctx() -> AsyncIterator[None]:
        nonlocal enters
        enters += 1
        try:
            yield None
        finally:
            exits.append(now())

    async def fn(i: int, _: None) -> int:
        await asyncio.sleep(1 if i == 0 else 1000)
        return i

    before = asyncio.all_tasks()
    async with stream(itertools.count(), fn, concurrency=4, context=ctx) as outcomes:
        async for o in outcomes:
            assert o.index == 0
            break
    # Stragglers were not awaited: everything ended at t=1.
    assert now() == 1
    # Items 0-3 started at 0; item 4 may take item 0's slot at 1 before the consumer leaves
    # (whether the worker yields first depends on its real-time slice). Either way every
    # context is exited, and at once.
    assert enters in (4, 5)
    assert exits == [1] * enters
    assert asyncio.all_tasks() == before


async def test_infinite_async_generator_with_bounded_memory() -> None:
    pulled = 0

    async def forever() -> AsyncIterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        return i

    count = 0
    async with stream(forever(), fn, concurrency=3, buffer=3) as outcomes:
        async for _ in outcomes:
            count += 1
            assert pulled - count <= 6
            if count == 100:
                break
    assert count == 100


async def test_errors_and_timeouts_are_envelopes() -> None:
    async def fn(i: int) -> int:
        if i == 1:
            raise ValueError(i)
        if i == 2:
            await asyncio.sleep(100)
        return i

    async with stream(range(3), fn, timeout=5, ordered=True) as outcomes:
        kinds = [o.kind if isinstance(o, Failure) else "ok" async for o in outcomes]
    assert kinds == ["ok", "error", "timeout"]


async def test_fail_fast_stream_drains_sized_input_as_skipped_lazily() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        raise ValueError(i)

    async with stream(list(range(50)), fn, concurrency=2, fail_fast=True) as outcomes:
        got = [o async for o in outcomes]
    assert sorted(o.index for o in got) == list(range(50))
    assert sum(1 for o in got if isinstance(o, Failure) and o.kind == "skipped") == 48


async def test_input_error_surfaces_from_the_stream() -> None:
    def items() -> object:
        yield 1
        raise OSError("source broke")

    async def fn(i: int) -> int:
        return i

    async def consume() -> None:
        async with stream(items(), fn) as outcomes:  # type: ignore[call-overload]
            async for _ in outcomes:
                pass

    with pytest.raises(InputFailed):
        await consume()


async def test_a_stream_is_entered_once_and_iterated_inside() -> None:
    async def fn(i: int) -> int:
        return i

    s = stream([1], fn)
    with pytest.raises(RuntimeError, match="inside"):
        await s.__anext__()
    async with s as outcomes:
        assert [o.index async for o in outcomes] == [0]
    with pytest.raises(RuntimeError, match="once"):
        await s.__aenter__()


async def test_cancelling_the_consumer_propagates_and_cleans_up() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(100)
        return i

    async def consume() -> None:
        async with stream(range(10), fn, concurrency=3) as outcomes:
            async for _ in outcomes:
                pass

    before = asyncio.all_tasks()
    task = asyncio.create_task(consume())
    await asyncio.sleep(5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.all_tasks() == before
    assert now() == 5
