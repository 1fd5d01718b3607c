"""The Dask backend on a LocalCluster of two worker processes, in real time.

Assertions use what was recorded (timestamps taken inside ``fn`` on the workers, worker-side
counters read back with ``client.run``), never a sleep with a margin.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import pytest

import batchkit
from batchkit import Failure, InvalidArgument, RateLimit, Retry, Success
from batchkit._model.errors import RemoteError
from batchkit.dask import DaskBackend

from . import _work
from ._spans import peak

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

pytestmark = pytest.mark.timeout(90)


async def _states(client: Any) -> dict[str, dict[str, int]]:
    states: dict[str, dict[str, int]] = await client.run(_work.get_state)
    return states


async def _total(client: Any, name: str) -> int:
    return sum(s.get(name, 0) for s in (await _states(client)).values())


async def _running_chunks(client: Any) -> int:
    from batchkit._dask.worker import running_chunks

    counts: dict[str, int] = await client.run(running_chunks)
    return sum(counts.values())


async def _wait_for(check: Callable[[], Awaitable[bool]], what: str, within: float = 30) -> None:
    """Poll the thing itself (a worker-side counter) until it holds; fail with a message."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not await check():
        if loop.time() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
async def _fresh_state(client: Any) -> None:
    await client.run(_work.reset_state)


@pytest.mark.parametrize(
    ("concurrency", "per_worker"), [(64, 4), (6, 16)], ids=["per-worker-bound", "global-bound"]
)
async def test_limits_held_and_contexts_closed(
    client: Any, concurrency: int, per_worker: int
) -> None:
    report = await batchkit.batch_process(
        range(300),
        _work.timed_in_context,
        concurrency=concurrency,
        context=_work.counting,
        backend=DaskBackend(client, per_worker=per_worker, chunk_size=25),
    )
    assert report.ok
    assert [o.index for o in report] == list(range(300))
    spans = [(v[1], v[2]) for v in report.values()]
    by_worker: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for pid, start, end in report.values():
        by_worker[pid].append((start, end))
    assert len(by_worker) == 2  # both workers took part
    assert max(peak(s) for s in by_worker.values()) <= per_worker
    assert peak(spans) <= concurrency
    assert report.peak_concurrency <= concurrency
    assert await _total(client, "entered") == 300
    assert await _total(client, "exited") == 300


async def test_adaptive_runs_per_chunk_within_the_global_and_per_worker_limits(
    client: Any,
) -> None:
    """What holds for ``Adaptive`` on a cluster (see the how-to): each chunk adapts on its own
    worker, capped at its share, so ``max`` and ``per_worker`` hold; no global history."""
    report = await batchkit.batch_process(
        range(200),
        _work.timed,
        concurrency=batchkit.Adaptive(initial=2, min=1, max=6),
        backend=DaskBackend(client, per_worker=2, chunk_size=10),
    )
    assert report.ok
    assert [o.index for o in report] == list(range(200))
    by_worker: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for pid, start, end in report.values():
        by_worker[pid].append((start, end))
    assert max(peak(s) for s in by_worker.values()) <= 2
    assert peak([(v[1], v[2]) for v in report.values()]) <= 6
    # The effective limit: min(max, workers x per_worker), each chunk starting at min(2, 2).
    assert report.concurrency == 4
    assert report.limit_changes == ()


async def test_ten_thousand_items(client: Any) -> None:
    report = await batchkit.batch_process(
        range(10_000), _work.quick, concurrency=64, backend=DaskBackend(client)
    )
    assert len(report) == 10_000
    assert report.values() == list(range(10_000))
    assert [o.index for o in report] == list(range(10_000))


@pytest.mark.parametrize(
    "fn",
    [_work.quick, _work.slow_head],
    ids=["quick", "behind_a_slow_head_chunk"],
)
async def test_ordered_stream_holds_chunks_in_flight_not_the_input(
    client: Any, fn: Callable[[int], Awaitable[int]]
) -> None:
    pulled = 0

    def items() -> Any:
        nonlocal pulled
        for i in range(3000):
            pulled += 1
            yield i

    seen: list[int] = []
    most_held = 0
    async with batchkit.stream(
        items(),
        fn,
        concurrency=64,
        ordered=True,
        backend=DaskBackend(client, per_worker=16, chunk_size=50),
    ) as outcomes:
        async for outcome in outcomes:
            seen.append(outcome.index)
            most_held = max(most_held, pulled - len(seen))
    assert seen == list(range(3000))
    # 4 chunks in flight + 4 buffered (reordered or waiting for the driver), one read ahead by
    # the driver's stream, and what is left of the chunk being handed out: 9 chunks of 50 + 49.
    # With slow_head, chunk 0 sleeps while the others finish and wait to be reordered: the
    # default ordered buffer (8 per slot, 36 chunks) held 1800 items here.
    assert most_held <= 9 * 50 + 49


async def test_cancelling_the_call_stops_the_coroutines_on_the_workers(client: Any) -> None:
    task = asyncio.ensure_future(
        batchkit.batch_process(
            range(100),
            _work.hang_in_context,
            concurrency=8,
            context=_work.counting,
            backend=DaskBackend(client, per_worker=4, chunk_size=10),
        )
    )

    async def all_running() -> bool:
        return await _total(client, "running") == 8

    await _wait_for(all_running, "8 items running on the workers")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The call has returned: nothing of it runs on any worker, every context was exited.
    assert await _total(client, "running") == 0
    assert await _total(client, "cancelled") == 8
    assert await _running_chunks(client) == 0
    assert await _total(client, "exited") == await _total(client, "entered") == 8


async def test_the_deadline_is_one_instant_on_every_worker(client: Any) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    report = await batchkit.batch_process(
        range(200),
        _work.hang,
        concurrency=8,
        deadline=2.0,
        backend=DaskBackend(client, per_worker=4, chunk_size=10),
    )
    returned = loop.time() - start
    assert report.deadline_hit
    assert len(report) == 200
    # What had started (on one or both workers, as the machine allowed) was cancelled there.
    cancelled = report.counts["cancelled"]
    assert 1 <= cancelled <= 8
    assert cancelled == await _total(client, "cancelled")
    assert report.counts["skipped"] == 200 - cancelled
    for o in report:
        assert isinstance(o, Failure)
        assert isinstance(o.error, batchkit.ItemCancelled | batchkit.ItemSkipped)
        assert o.error.reason == "deadline"
    # Returns within deadline + grace (1 s by default).
    assert returned <= 2.0 + 1.0
    assert await _total(client, "running") == 0
    assert await _running_chunks(client) == 0


async def test_fail_fast_cancels_what_runs_on_the_other_worker(client: Any) -> None:
    report = await batchkit.batch_process(
        range(40),
        _work.first_fails_rest_hang,
        concurrency=8,
        fail_fast=True,
        backend=DaskBackend(client, per_worker=4, chunk_size=4),
    )
    assert report.stop_reason == "fail_fast"
    assert report.counts["error"] == 1
    assert report.counts["success"] == 0
    assert report.counts["cancelled"] + report.counts["skipped"] == 39
    assert await _total(client, "running") == 0
    assert await _running_chunks(client) == 0


async def test_a_killed_worker_s_chunk_is_rerun_elsewhere(client: Any, tmp_path: Path) -> None:
    fn = functools.partial(_work.kill_worker_once, marker=str(tmp_path / "killed"))
    report = await batchkit.batch_process(
        range(40), fn, concurrency=8, backend=DaskBackend(client, per_worker=4, chunk_size=5)
    )
    assert (tmp_path / "killed").exists()  # a worker did die mid-batch
    assert report.ok
    assert [o.index for o in report] == list(range(40))
    await client.wait_for_workers(2)


async def test_a_chunk_that_keeps_killing_workers_ends_as_lost(client: Any, cluster: Any) -> None:
    scheduler = cluster.scheduler
    allowed = scheduler.allowed_failures
    scheduler.allowed_failures = 0
    try:
        report = await batchkit.batch_process(
            range(20),
            _work.kill_worker_always,
            concurrency=8,
            backend=DaskBackend(client, per_worker=4, chunk_size=5),
        )
    finally:
        scheduler.allowed_failures = allowed
    assert len(report) == 20
    lost = [o for o in report if isinstance(o, Failure) and o.kind == "lost"]
    assert [o.index for o in lost] == [5, 6, 7, 8, 9]
    assert report.counts["success"] == 15
    assert report.counts["lost"] == 5
    await client.wait_for_workers(2)


async def test_a_rate_limit_holds_across_the_cluster(client: Any) -> None:
    rate = 20.0
    report = await batchkit.batch_process(
        range(50),
        _work.timed,
        concurrency=16,
        rate_limit=RateLimit(per_second=rate),
        backend=DaskBackend(client, per_worker=8, chunk_size=5),
    )
    assert report.ok
    starts = sorted(v[1] for v in report.values())
    # No 1 s window holds more than the limit plus one token per worker.
    for i, t in enumerate(starts):
        in_window = sum(1 for u in starts[i:] if u < t + 1.0)
        assert in_window <= rate + 2


async def test_retries_happen_on_the_worker_with_their_history(client: Any) -> None:
    report = await batchkit.batch_process(
        range(20),
        _work.flaky,
        concurrency=8,
        retry=Retry(attempts=3, backoff=batchkit.Backoff(initial=0.0, maximum=0.0)),
        backend=DaskBackend(client, per_worker=4),
    )
    assert report.ok
    assert all(o.attempts == 2 for o in report)
    assert report.retries == 20


async def test_observers_and_worker_logs_reach_the_driver(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[batchkit.Event] = []
    with caplog.at_level(logging.WARNING, logger="tests.dask.app"):
        report = await batchkit.batch_process(
            range(10),
            _work.warns,
            concurrency=4,
            observers=[events.append],
            key=lambda x: f"item-{x}",
            backend=DaskBackend(client, per_worker=2),
        )
    assert report.ok
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted"
    assert kinds[-1] == "RunFinished"
    finished = [e for e in events if isinstance(e, batchkit.ItemFinished)]
    assert sorted(e.key for e in finished) == sorted(f"item-{i}" for i in range(10))
    assert kinds.count("ItemStarted") == 10
    messages = sorted(r.getMessage() for r in caplog.records if r.name == "tests.dask.app")
    assert messages == sorted(f"item {i} on the worker" for i in range(10))
    assert report.item_key(report[3]) == "item-3"


async def test_pickling_problems_are_named_or_become_envelopes(client: Any) -> None:
    import threading

    lock = threading.Lock()

    async def closes_over_a_lock(x: int) -> int:
        with lock:
            return x

    backend = DaskBackend(client)
    with pytest.raises(InvalidArgument, match="fn 'test_pickling_problems"):
        await batchkit.batch_process([1], closes_over_a_lock, backend=backend)

    def bad_context() -> Any:
        with lock:
            return _work.counting()

    with pytest.raises(InvalidArgument, match="the context factory"):
        await batchkit.batch_process(
            [1], _work.hang_in_context, context=bad_context, backend=backend
        )
    report = await batchkit.batch_process(range(3), _work.returns_lock, backend=backend)
    assert [o.ok for o in report] == [True, False, True]
    assert isinstance(report[1], Failure)
    assert isinstance(report[1].error, RemoteError)
    report = await batchkit.batch_process([5], _work.raises_unpicklable, backend=backend)
    err = report[0]
    assert isinstance(err, Failure)
    assert isinstance(err.error, RemoteError)
    assert err.error.type_name == "tests.dask._work.Unpicklable"
    assert err.error.message == "code 5"


async def test_a_sync_fn_runs_in_the_worker_s_thread_pool(client: Any) -> None:
    report = await batchkit.batch_process(
        range(20), _work.in_thread, concurrency=4, backend=DaskBackend(client, per_worker=2)
    )
    assert report.values() == [(i, True) for i in range(20)]
    assert all(isinstance(o, Success) for o in report)


async def test_failures_are_envelopes(client: Any) -> None:
    report = await batchkit.batch_process(
        range(20), _work.fail_odd, concurrency=8, backend=DaskBackend(client, per_worker=4)
    )
    assert report.counts["error"] == 10
    f = report[3]
    assert isinstance(f, Failure)
    assert isinstance(f.error, ValueError)
    assert str(f.error) == "odd 3"


async def test_max_failures_stops_the_whole_cluster(client: Any) -> None:
    report = await batchkit.batch_process(
        range(400),
        _work.fail_odd,
        concurrency=8,
        max_failures=3,
        backend=DaskBackend(client, per_worker=4, chunk_size=4),
    )
    assert report.stop_reason == "max_failures"
    assert len(report) == 400
    # Each chunk of 4 holds 2 failures; the driver sees them a chunk at a time.
    assert 3 <= report.counts["error"] <= 3 + 2 * 4
    assert report.counts["skipped"] > 300


async def test_an_unordered_stream_left_early_stops_the_workers(client: Any) -> None:
    got = 0
    # Outcomes come back a chunk at a time: the first chunk (items 0-4) ends, the others hang.
    async with batchkit.stream(
        range(1000),
        _work.hang_unless_small,
        concurrency=8,
        backend=DaskBackend(client, per_worker=4, chunk_size=5),
    ) as outcomes:
        async for outcome in outcomes:
            assert outcome.ok
            got += 1
            if got == 5:
                break
        assert outcomes.report.outcomes == []
    assert await _total(client, "running") == 0
    assert await _running_chunks(client) == 0


async def test_input_that_raises_is_input_failed_with_the_partial_report(client: Any) -> None:
    def items() -> Any:
        yield from range(30)
        raise RuntimeError("input broke")

    with pytest.raises(batchkit.InputFailed) as info:
        await batchkit.batch_process(
            items(), _work.quick, concurrency=8, backend=DaskBackend(client, chunk_size=7)
        )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.report.values() == list(range(30))


async def test_progress_and_the_logging_observer_work_unchanged(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="batchkit"):
        report = await batchkit.batch_process(
            range(30),
            _work.fail_odd,
            concurrency=8,
            progress=True,
            observers=[batchkit.LoggingObserver()],
            backend=DaskBackend(client, per_worker=4),
        )
    assert report.counts["error"] == 15
    finished = [r.getMessage() for r in caplog.records if "finished" in r.getMessage()]
    assert finished, [r.getMessage() for r in caplog.records]


async def test_the_rate_is_re_split_when_workers_join_and_leave(client: Any, cluster: Any) -> None:
    rate = 40.0
    task = asyncio.ensure_future(
        batchkit.batch_process(
            range(400),
            _work.timed,
            concurrency=48,
            rate_limit=RateLimit(per_second=rate),
            backend=DaskBackend(client, per_worker=8, chunk_size=5),
        )
    )
    joined = False
    try:
        await _wait_for(lambda: _started_at_least(client, 20), "the run to get going")
        cluster.scale(3)
        await _wait_for(lambda: _workers_are(client, 3), "a third worker to join")
        joined = True
        # Once the new worker has run some items, one worker leaves mid-run.
        await _wait_for(lambda: _every_worker_ran(client), "the new worker to take chunks")
        cluster.scale(2)
        report = await task
    finally:
        cluster.scale(2)
        if not task.done():
            task.cancel()
    assert report.ok
    assert [o.index for o in report] == list(range(400))  # one envelope per item
    pids = {v[0] for v in report.values()}
    starts = sorted(v[1] for v in report.values())
    for i, t in enumerate(starts):
        in_window = sum(1 for u in starts[i:] if u < t + 1.0)
        assert in_window <= rate + len(pids)
    assert joined
    await _wait_for(lambda: _workers_are(client, 2), "the cluster to be back to 2 workers")


async def _every_worker_ran(client: Any) -> bool:
    states = await _states(client)
    return len(states) == 3 and all(s.get("timed", 0) > 0 for s in states.values())


async def _started_at_least(client: Any, n: int) -> bool:
    return await _total(client, "timed") >= n


async def _workers_are(client: Any, n: int) -> bool:
    info = await client.scheduler.identity()
    return len(info["workers"]) == n


async def test_timeouts_are_per_attempt_on_the_worker_with_their_history(client: Any) -> None:
    report = await batchkit.batch_process(
        range(6),
        _work.hang,
        concurrency=8,
        timeout=0.2,
        retry=Retry(attempts=2, backoff=batchkit.Backoff(initial=0.0, maximum=0.0)),
        backend=DaskBackend(client, per_worker=4),
    )
    assert report.counts["timeout"] == 6
    for o in report:
        assert isinstance(o, Failure)
        assert o.attempts == 2
        assert [type(e) for e in o.errors] == [batchkit.ItemTimeout, batchkit.ItemTimeout]
        assert isinstance(o.error, batchkit.ItemTimeout)
        assert o.error.timeout == 0.2
    assert await _total(client, "running") == 0


async def test_an_item_budget_is_kept_on_the_worker_across_its_retries(client: Any) -> None:
    """item_budget= is per item: the chunk's engine keeps it on the worker. Backoffs of
    0.1 s inside a 0.5 s budget: at most 6 attempts, however loaded the machine, instead of
    the 1000 the retry policy allows; the budget's ItemTimeout crosses the wire."""
    report = await batchkit.batch_process(
        range(6),
        _work.always_down,
        concurrency=8,
        retry=Retry(
            attempts=1000, backoff=batchkit.Backoff(initial=0.1, maximum=0.1, jitter=False)
        ),
        item_budget=0.5,
        backend=DaskBackend(client, per_worker=4),
    )
    assert report.counts["timeout"] == 6
    for o in report:
        assert isinstance(o, Failure)
        assert 1 <= o.attempts <= 6
        assert isinstance(o.error, batchkit.ItemTimeout)
        assert o.error.budget
        assert o.error.timeout == 0.5
        assert any(isinstance(e, ConnectionError) for e in o.errors)


async def test_max_failures_counts_failures_of_chunks_still_running(client: Any) -> None:
    """Items 0 and 4 fail in two chunks whose other items hang: neither chunk ever ends on its
    own, yet the driver hears of both failures and stops the run. The 32 items never sent
    reach observers as one ``ItemsSkipped``, as on the local engine."""
    events: list[batchkit.Event] = []
    report = await batchkit.batch_process(
        range(40),
        _work.fail_0_and_4_rest_hang,
        concurrency=8,
        max_failures=2,
        backend=DaskBackend(client, per_worker=4, chunk_size=4),
        observers=[events.append],
    )
    assert report.stop_reason == "max_failures"
    assert report.counts["error"] == 2
    assert report.counts["cancelled"] == 6
    assert report.counts["skipped"] == 32
    [bulk] = [e for e in events if isinstance(e, batchkit.ItemsSkipped)]
    assert (bulk.indices, bulk.reason) == (range(8, 40), "max_failures")
    finished = [e.outcome.index for e in events if isinstance(e, batchkit.ItemFinished)]
    assert sorted(finished) == list(range(8))  # every item heard of exactly once
    assert isinstance(events[-1], batchkit.RunFinished)
    assert await _total(client, "running") == 0


async def test_idempotency_keys_are_input_indices_or_the_items_key(client: Any) -> None:
    backend = DaskBackend(client, per_worker=4, chunk_size=3)
    report = await batchkit.batch_process(
        range(10), _work.attempt_key, concurrency=8, backend=backend
    )
    run_ids = {v.rpartition(":")[0] for v in report.values()}
    assert len(run_ids) == 1  # one run id across chunks and workers
    assert [v.rpartition(":")[2] for v in report.values()] == [str(i) for i in range(10)]
    keyed = await batchkit.batch_process(
        range(10), _work.attempt_key, concurrency=8, key=lambda x: f"m{x}", backend=backend
    )
    assert keyed.values() == [f"m{i}" for i in range(10)]
