"""The report's column-wise storage: same API as a list of envelopes, nothing kept per item
but primitives, unstarted items as one range (virtual time)."""

from __future__ import annotations

import asyncio
import gc
import json
import pickle
from typing import TYPE_CHECKING

import pytest

from batchkit import (
    BatchReport,
    Event,
    Failure,
    ItemFinished,
    ItemSkipped,
    ItemsSkipped,
    RunFinished,
    Success,
    batch_process,
)
from batchkit._model.store import OutcomeStore, OutcomeView

from ..helpers import now

if TYPE_CHECKING:
    from batchkit import Outcome

pytestmark = pytest.mark.looptime


class Boom(Exception):
    pass


async def mixed(i: int) -> int:
    """Item i sleeps i % 3 s; multiples of 4 fail, 7 hangs past the timeout."""
    if i == 7:
        await asyncio.sleep(100)
    await asyncio.sleep(i % 3)
    if i % 4 == 0:
        raise Boom(i)
    return i * 10


async def test_report_reads_like_the_list_of_envelopes_it_replaces() -> None:
    report = await batch_process(range(12), mixed, concurrency=3, timeout=5)
    envelopes = list(report)
    assert [o.index for o in envelopes] == list(range(12))
    assert len(report) == 12
    assert report[0] == envelopes[0]
    assert report[-1] == envelopes[11]
    assert report[2:5] == envelopes[2:5]
    assert report.outcomes == envelopes
    as_tuple: object = tuple(envelopes)
    assert report.outcomes == as_tuple
    assert report.outcomes != envelopes[:-1]
    with pytest.raises(IndexError):
        report[12]
    successes = [o for o in envelopes if isinstance(o, Success)]
    failures = [o for o in envelopes if isinstance(o, Failure)]
    assert report.successes == successes
    assert report.failures == failures
    assert report.values() == [o.value for o in successes]
    kinds = {k: sum(1 for f in failures if f.kind == k) for k in ("error", "timeout")}
    assert report.counts == {
        "success": len(successes),
        **kinds,
        "cancelled": 0,
        "skipped": 0,
        "lost": 0,
    }
    assert kinds == {"error": 3, "timeout": 1}
    assert report.item_time == sum(o.elapsed for o in envelopes)
    assert report.latency(1.0) == 5.0  # the timeout
    assert report.retries == 0
    timeout = report[7]
    assert isinstance(timeout, Failure)
    assert timeout.kind == "timeout"
    assert timeout.elapsed == 5.0
    assert "#7" in report.table(slowest=1)
    json.dumps(report.to_dict())


async def test_envelopes_are_built_per_read_around_the_stored_objects() -> None:
    values = [object() for _ in range(4)]

    async def fn(i: int) -> object:
        if i == 3:
            raise Boom(i)
        return values[i]

    report = await batch_process(range(4), fn, concurrency=2)
    first, again = report[0], report[0]
    assert first == again
    assert first is not again  # documented: a view builds a new envelope per read
    assert isinstance(first, Success)
    assert isinstance(again, Success)
    assert first.value is values[0] is again.value
    f1, f2 = report[3], report[3]
    assert isinstance(f1, Failure)
    assert isinstance(f2, Failure)
    assert f1.error is f2.error
    assert f1.errors == (f1.error,)


async def test_a_finished_run_keeps_no_envelope_objects() -> None:
    """What made the loop stall: 100k kept envelopes walked by every full GC pass."""

    async def fn(i: int) -> int:
        return i

    report = await batch_process(range(2_000), fn, concurrency=10)
    gc.collect()
    kept = sum(1 for o in gc.get_objects() if type(o) in (Success, Failure))
    assert kept == 0
    assert len(report) == 2_000


async def test_retries_and_attempts_come_from_the_columns() -> None:
    from batchkit import Retry

    tries: dict[int, int] = {}

    async def flaky(i: int) -> int:
        tries[i] = tries.get(i, 0) + 1
        if tries[i] <= i % 3:
            raise ConnectionError(i)
        return i

    report = await batch_process(range(6), flaky, retry=Retry(attempts=3))
    assert [o.attempts for o in report] == [1, 2, 3, 1, 2, 3]
    assert report.retries == 6
    last = report[5]
    assert isinstance(last, Success)
    assert last.attempts == 3


async def test_deadline_over_a_big_range_returns_on_time_with_one_skipped_range() -> None:
    events: list[Event] = []

    async def fn(i: int) -> int:
        # The first four set the observed duration (1 s) that admits the next four at t=1;
        # those take 2 s and are cut by the deadline at 2.5.
        await asyncio.sleep(1 if i < 4 else 2)
        return i

    n = 1_000_000
    report = await batch_process(
        range(n), fn, concurrency=4, deadline=2.5, observers=[events.append]
    )
    assert now() == 2.5
    assert len(report) == n
    assert report.counts == {
        "success": 4,
        "error": 0,
        "timeout": 0,
        "cancelled": 4,
        "skipped": n - 8,
        "lost": 0,
    }
    last = report[-1]
    assert isinstance(last, Failure)
    assert last.kind == "skipped"
    assert last.item == n - 1
    assert last.index == n - 1
    assert isinstance(last.error, ItemSkipped)
    assert last.errors == (last.error,)
    again = report[-1]
    assert isinstance(again, Failure)
    assert again.error is not last.error  # a bulk skip's error is built per read
    bulk = [e for e in events if isinstance(e, ItemsSkipped)]
    assert len(bulk) == 1
    assert bulk[0].reason == "deadline"
    # Every envelope reaches observers exactly once: in its own ItemFinished or in the range.
    finished = [e.outcome.index for e in events if isinstance(e, ItemFinished)]
    assert sorted(finished) == list(range(8))
    assert bulk[0].indices == range(8, n)
    assert isinstance(events[-1], RunFinished)
    assert report.latency(1.0) == 1.5
    assert [o.index for o in report[n - 2 :]] == [n - 2, n - 1]
    assert "skipped" in report.table(slowest=20)


async def test_skipped_items_of_a_list_are_the_items_at_the_stop() -> None:
    async def fn(s: str) -> str:
        raise Boom(s)

    items = ["a", "b", "c", "d", "e"]
    report = await batch_process(items, fn, concurrency=1, fail_fast=True)
    items[4] = "changed after the call"
    assert [o.item for o in report] == ["a", "b", "c", "d", "e"]
    assert report.counts["skipped"] == 4


async def test_skipped_rest_of_a_sized_non_sequence() -> None:
    async def fn(i: int) -> int:
        raise Boom(i)

    items = {10, 20, 30}
    report = await batch_process(items, fn, concurrency=1, fail_fast=True)
    assert sorted(o.item for o in report) == [10, 20, 30]
    assert [o.kind for o in report if isinstance(o, Failure)] == ["error", "skipped", "skipped"]


async def test_keys_are_computed_once_and_kept() -> None:
    calls: list[int] = []

    def key(i: int) -> str:
        calls.append(i)
        return f"k{i}"

    async def fn(i: int) -> int:
        return i

    report = await batch_process(range(5), fn, key=key)
    assert sorted(calls) == list(range(5))
    assert [report.item_key(o) for o in report] == ["k0", "k1", "k2", "k3", "k4"]
    assert len(calls) == 5


async def test_a_cancelled_run_reports_what_had_finished() -> None:
    reports: list[BatchReport[int, int]] = []

    def observe(event: Event) -> None:
        if isinstance(event, RunFinished):
            reports.append(event.report)

    async def fn(i: int) -> int:
        await asyncio.sleep(1 if i < 3 else 100)
        return i

    task = asyncio.create_task(batch_process(range(6), fn, concurrency=4, observers=[observe]))
    await asyncio.sleep(2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (partial,) = reports
    # Every item is counted: 3-5 were in flight when the caller cancelled.
    assert [o.index for o in partial] == [0, 1, 2, 3, 4, 5]
    assert partial.counts["success"] == 3
    assert partial.counts["cancelled"] == 3
    assert partial.values() == [0, 1, 2]


def test_a_report_built_by_hand_from_a_list() -> None:
    err = Boom("x")
    outcomes: list[Outcome[str, int]] = [
        Success("a", 1, 0, 1, 0.5),
        Failure("b", err, "error", 1, 2, 1.5, (err, err)),
    ]
    report = BatchReport(outcomes=outcomes, wall_time=2.0, concurrency=2, peak_concurrency=2)
    assert isinstance(report.outcomes, OutcomeView)
    assert list(report) == outcomes
    assert report.counts["error"] == 1
    assert report.retries == 1
    assert report.ideal_time == 1.5
    assert report.failures[0].error is err
    with pytest.raises(ExceptionGroup):
        report.raise_for_failures()


def test_a_report_built_by_hand_keeps_the_given_order_and_indices() -> None:
    outcomes: list[Outcome[str, int]] = [Success("x", 1, 7, 1, 0.0), Success("y", 2, 3, 1, 0.0)]
    report = BatchReport(outcomes=outcomes, wall_time=0.0, concurrency=1, peak_concurrency=1)
    assert list(report) == outcomes
    assert report.values() == [1, 2]
    assert [o.index for o in report.successes] == [7, 3]


def test_store_grows_past_its_chunk_out_of_order_and_pickles() -> None:
    store: OutcomeStore[int, int] = OutcomeStore()
    store.append(Success(9000, 1, 9000, 1, 0.25))
    assert not store.complete
    for i in range(9000):
        store.append(Success(i, i, i, 1, 0.0))
    store.skip_range(9001, 9003, "deadline", range(100_000), 9001)
    assert store.complete
    assert len(store) == 9003
    view = store.view()
    assert view[9000] == Success(9000, 1, 9000, 1, 0.25)
    assert [o.item for o in view[9001:]] == [9001, 9002]
    assert store.slowest(1) == [9000]
    again = pickle.loads(pickle.dumps(view))
    assert again[:9001] == view[:9001]
    # A bulk-skipped item's error is a new ItemSkipped on every read, so its envelopes are
    # equal field by field except for that error's identity.
    assert again[9002] != view[9002]
    assert [(o.item, o.kind) for o in again[9001:]] == [(9001, "skipped"), (9002, "skipped")]
    with pytest.raises(IndexError):
        store.outcome(9003)


async def test_a_report_pickles_with_computed_keys_not_the_key_function() -> None:
    """A lambda ``key=`` does not pickle; the report carries each item's key instead, the
    ones of items skipped in bulk included (computed lazily in process, at pickling here)."""
    report = await batch_process(
        range(6), asyncio.sleep, concurrency=1, deadline=2.5, key=lambda i: f"m{i}"
    )
    assert report.counts["skipped"] == 3
    names = [report.item_key(o) for o in report]
    assert names == ["m0", "m1", "m2", "m3", "m4", "m5"]
    again = pickle.loads(pickle.dumps(report))
    assert again.key is None
    assert [again.item_key(o) for o in again] == names

    def fields(r: BatchReport[int, None]) -> list[tuple[object, ...]]:
        return [
            (o.item, o.kind, o.index, o.attempts, o.elapsed, repr(getattr(o, "errors", ())))
            for o in r
        ]

    assert fields(again) == fields(report)
    assert again.counts == report.counts
    assert (again.stop_reason, again.input_exhausted) == ("deadline", True)
