"""``Adaptive(remember=Remembered(...))``: a run starts from the limit earlier runs ended at,
blended by ``weight``, within ``[min, max]``; the limit is written on every way out; a failing
store never fails the run. In virtual time on a MemoryStateStore (SQLite: tests/sqlalchemy)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from batchkit import (
    Adaptive,
    InvalidArgument,
    JsonValue,
    MemoryStateStore,
    Remembered,
    StateEntry,
    StateStore,
    batch_process,
    stream,
)

from ..helpers import Wrapped, now

pytestmark = pytest.mark.looptime

KEY = "batchkit/adaptive/prices"


class Busy(ConnectionError):
    """An overload signal (a 429)."""


async def one_second(i: int) -> int:
    await asyncio.sleep(1)
    return i


async def busy(i: int) -> int:
    await asyncio.sleep(1)
    raise Busy


def policy(store: Any, **kw: Any) -> Adaptive:
    weight = kw.pop("weight", 0.5)
    return Adaptive(
        remember=Remembered(store=store, name="prices", weight=weight), overload_on=Busy, **kw
    )


async def remembered(store: StateStore) -> JsonValue:
    entry = await store.get(KEY)
    assert entry is not None
    return entry.value


async def test_a_second_run_starts_from_the_first_runs_final_limit() -> None:
    store = MemoryStateStore()
    first = await batch_process(range(40), one_second, concurrency=policy(store, max=8))
    assert first.concurrency == 4
    # Slow start: +1 per success, 4 -> 8 at t=1.
    assert [(c.old, c.new, c.time) for c in first.limit_changes] == [
        (4, 5, 1.0),
        (5, 6, 1.0),
        (6, 7, 1.0),
        (7, 8, 1.0),
    ]
    assert await remembered(store) == {"limit": 8.0}  # nothing remembered: kept as it is

    starts: list[float] = []

    async def fn(i: int) -> int:
        starts.append(now())
        return await one_second(i)

    t0 = now()
    second = await batch_process(range(16), fn, concurrency=policy(store, max=8))
    assert second.concurrency == 8
    assert [t - t0 for t in starts] == [0.0] * 8 + [1.0] * 8
    assert second.wall_time == 2.0
    assert await remembered(store) == {"limit": 8.0}


async def test_a_remembered_limit_skips_slow_start() -> None:
    store = MemoryStateStore()
    await store.compare_and_set(KEY, {"limit": 4.0}, expected=0)
    report = await batch_process(range(40), one_second, concurrency=policy(store, max=16))
    # About +1 per round trip (4 successes of +1/limit each), not doubling to 8 at t=1.
    assert report.concurrency == 4
    assert [(c.old, c.new, c.time) for c in report.limit_changes[:4]] == [
        (4, 5, 2.0),
        (5, 6, 3.0),
        (6, 7, 4.0),
        (7, 8, 5.0),
    ]


async def test_one_bad_tick_moves_the_next_start_only_by_its_weight() -> None:
    store = MemoryStateStore()
    await store.compare_and_set(KEY, {"limit": 16.0}, expected=0)
    bad = await batch_process(range(200), busy, concurrency=policy(store, min=2, max=16))
    assert bad.concurrency == 16
    assert bad.limit_changes[-1].new == 2  # the outage cut it to min
    assert await remembered(store) == {"limit": 9.0}  # 16 + 0.5 * (2 - 16)

    after = await batch_process(range(4), one_second, concurrency=policy(store, min=2, max=16))
    assert after.concurrency == 9


async def test_weight_1_remembers_only_the_last_run() -> None:
    store = MemoryStateStore()
    await store.compare_and_set(KEY, {"limit": 16.0}, expected=0)
    await batch_process(range(200), busy, concurrency=policy(store, min=2, max=16, weight=1))
    assert await remembered(store) == {"limit": 2.0}


@pytest.mark.parametrize(
    ("stored", "start"),
    [({"limit": 100.0}, 8), ({"limit": 0.5}, 2), ({"limit": 5}, 5), ({"limit": 5.75}, 5)],
)
async def test_the_start_stays_within_min_and_max(stored: JsonValue, start: int) -> None:
    store = MemoryStateStore()
    await store.compare_and_set(KEY, stored, expected=0)
    no_items: list[int] = []
    report = await batch_process(no_items, one_second, concurrency=policy(store, min=2, max=8))
    assert report.concurrency == start


@pytest.mark.parametrize(
    "stored", [7, "8", {"limit": "8"}, {"limit": -1}, {"limit": True}, {"size": 8}, None]
)
async def test_a_value_that_is_not_a_limit_is_logged_and_replaced(
    stored: JsonValue, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStateStore()
    await store.compare_and_set(KEY, stored, expected=0)
    with caplog.at_level(logging.WARNING, logger="batchkit"):
        report = await batch_process(range(3), one_second, concurrency=policy(store, max=8))
    assert report.concurrency == 4
    assert [r.getMessage() for r in caplog.records] == [
        f"batchkit: the remembered limit {KEY!r} holds {stored!r}, not {{'limit': <number>}}; "
        "starting from initial"
    ]
    assert await remembered(store) == {"limit": 7.0}  # 3 successes in slow start from 4


async def test_a_stopped_run_writes_its_limit() -> None:
    store = MemoryStateStore()
    await store.compare_and_set(KEY, {"limit": 16.0}, expected=0)
    report = await batch_process(
        range(40), busy, concurrency=policy(store, min=2, max=16), max_failures=20
    )
    assert report.stop_reason == "max_failures"
    final = report.limit_changes[-1].new
    assert await remembered(store) == {"limit": 16 + 0.5 * (final - 16)}


async def test_a_cancelled_run_writes_its_limit_and_the_cancel_goes_on() -> None:
    store = MemoryStateStore()
    task = asyncio.create_task(
        batch_process(range(100), one_second, concurrency=policy(store, max=64))
    )
    await asyncio.sleep(2.5)  # slow start: 4 -> 8 at t=1 -> 16 at t=2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await remembered(store) == {"limit": 16.0}


async def test_a_stream_left_early_writes_its_limit() -> None:
    store = MemoryStateStore()
    read = 0
    async with stream(range(100), one_second, concurrency=policy(store, max=64)) as outcomes:
        async for _ in outcomes:
            read += 1
            if read == 10:  # at t=2: slow start has taken the limit 4 -> 8 -> 16
                break
    assert await remembered(store) == {"limit": 16.0}


class FailingStore(Wrapped):
    """A store whose reads or writes raise."""

    def __init__(self, *, reads: bool, writes: bool) -> None:
        super().__init__()
        self.reads, self.writes = reads, writes

    async def get(self, key: str) -> StateEntry | None:
        if self.reads:
            raise ConnectionError("the database is down")
        return await super().get(key)

    async def compare_and_set(
        self, key: str, value: JsonValue, *, expected: int
    ) -> StateEntry | None:
        if self.writes:
            raise ConnectionError("the database is down")
        return await super().compare_and_set(key, value, expected=expected)


async def test_a_store_that_fails_never_fails_the_run(caplog: pytest.LogCaptureFixture) -> None:
    store = FailingStore(reads=True, writes=False)
    with caplog.at_level(logging.WARNING, logger="batchkit"):
        report = await batch_process(range(8), one_second, concurrency=policy(store, max=8))
    assert report.concurrency == 4
    assert report.counts["success"] == 8
    down = "ConnectionError: the database is down"
    assert [r.getMessage() for r in caplog.records] == [
        f"batchkit: could not read the remembered limit {KEY!r} ({down}); starting from initial",
        f"batchkit: could not write the remembered limit {KEY!r} ({down})",
    ]
    store.reads = False
    assert await store.get(KEY) is None


async def test_a_write_that_loses_a_race_blends_with_the_winner() -> None:
    class Racing(Wrapped):
        """Another process writes 2.0 just before this run's first write."""

        raced = False

        async def compare_and_set(
            self, key: str, value: JsonValue, *, expected: int
        ) -> StateEntry | None:
            if not self.raced:
                self.raced = True
                await super().compare_and_set(key, {"limit": 2.0}, expected=expected)
            return await super().compare_and_set(key, value, expected=expected)

    store = Racing()
    await batch_process(range(40), one_second, concurrency=policy(store, max=8))
    entry = await store.get(KEY)
    assert entry is not None
    assert (entry.value, entry.version) == ({"limit": 5.0}, 2)  # 2 + 0.5 * (8 - 2)


async def test_without_remember_a_run_starts_at_initial_with_slow_start() -> None:
    report = await batch_process(range(40), one_second, concurrency=Adaptive(max=8))
    assert report.concurrency == 4
    assert [(c.old, c.new, c.time) for c in report.limit_changes] == [
        (4, 5, 1.0),
        (5, 6, 1.0),
        (6, 7, 1.0),
        (7, 8, 1.0),
    ]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"store": object(), "name": "a"}, "Remembered.store must be a StateStore"),
        ({"name": ""}, "Remembered.name must be a non-empty str"),
        ({"name": 3}, "Remembered.name must be a non-empty str"),
        ({"name": "x" * 600}, "a state key must be a str of 1 to 512"),
        ({"name": "a", "weight": 0}, r"Remembered.weight must be a number in \(0, 1\]"),
        ({"name": "a", "weight": 1.5}, r"Remembered.weight must be a number in \(0, 1\]"),
        ({"name": "a", "weight": True}, r"Remembered.weight must be a number in \(0, 1\]"),
    ],
)
def test_remembered_validates_its_arguments(kw: dict[str, Any], match: str) -> None:
    kw.setdefault("store", MemoryStateStore())
    with pytest.raises(InvalidArgument, match=match):
        Remembered(**kw)


def test_adaptive_remember_must_be_a_remembered() -> None:
    with pytest.raises(InvalidArgument, match=r"Adaptive\.remember must be a Remembered"):
        Adaptive(remember=MemoryStateStore())  # type: ignore[arg-type]
