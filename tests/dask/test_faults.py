"""Faults on a cluster (issue 21): every item ends in exactly one truthful envelope, the call
returns on time, and the report says what the cluster did.

On the package's two-process ``LocalCluster``; the cases that kill every worker or the
scheduler run on CLI-deployed processes (``test_cli.py``). Ordering is by worker-side
counters, marker files and the scheduler's event log, never by sleeping a margin.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import threading
from typing import TYPE_CHECKING, Any

import pytest

import batchkit
from batchkit import Failure, Retry, Success
from batchkit.dask import ChunkRerun, DaskBackend

from . import _work

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.timeout(60)


async def _total(client: Any, name: str) -> int:
    states: dict[str, dict[str, int]] = await client.run(_work.get_state)
    return sum(s.get(name, 0) for s in states.values())


@pytest.fixture(autouse=True)
async def _fresh_state(client: Any) -> AsyncIterator[None]:
    await client.run(_work.reset_state)
    yield
    await client.wait_for_workers(2)


def _one_envelope_each(outcomes: Any, n: int) -> None:
    assert sorted(o.index for o in outcomes) == list(range(n))


# ------------------------------------------------------- 2. cleanup that outlasts grace
@pytest.mark.parametrize("entry", ["batch", "stream", "stream_ordered"])
async def test_items_whose_cleanup_outlasts_grace_still_get_one_envelope_each(
    client: Any, entry: str
) -> None:
    loop = asyncio.get_running_loop()
    options: dict[str, Any] = {
        "concurrency": 8,
        "deadline": batchkit.Deadline(seconds=1.0, grace=0.3),
        "backend": DaskBackend(client, per_worker=4, chunk_size=4),
    }
    start = loop.time()
    if entry == "batch":
        report = await batchkit.batch_process(range(20), _work.stubborn_cleanup, **options)
        outcomes = list(report)
    else:
        ordered = entry == "stream_ordered"
        async with batchkit.stream(
            range(20), _work.stubborn_cleanup, ordered=ordered, **options
        ) as out:
            outcomes = [o async for o in out]
        report = out.report
        if ordered:
            assert [o.index for o in outcomes] == list(range(20))
    returned = loop.time() - start
    _one_envelope_each(outcomes, 20)
    kinds = {o.kind for o in outcomes}
    assert kinds <= {"cancelled", "skipped"}, kinds
    started = [o.index for o in outcomes if o.kind == "cancelled"]
    assert started  # items were in flight at the deadline
    assert set(report.abandoned) <= set(started)
    assert returned <= 1.0 + 0.3 + DaskBackend.SLACK
    await _wait_for_stubborn(client)


async def _wait_for_stubborn(client: Any) -> None:
    while await _total(client, "stubborn"):
        await asyncio.sleep(0.05)


# --------------------------------------------------------- 3. one unpicklable item
async def test_an_unpicklable_item_is_its_own_failure_not_its_chunk_mates(client: Any) -> None:
    lock = threading.Lock()
    items: list[Any] = [0, 1, lock, 3, 4, 5]
    report = await batchkit.batch_process(
        items, _work.quick, concurrency=4, backend=DaskBackend(client, chunk_size=6)
    )
    _one_envelope_each(report, 6)
    assert report.values() == [0, 1, 3, 4, 5]
    bad = report[2]
    assert isinstance(bad, Failure)
    assert bad.kind == "error"
    assert isinstance(bad.error, TypeError)
    assert "pickle" in str(bad.error)


async def test_an_unpicklable_item_after_a_stop_has_one_envelope(client: Any) -> None:
    items: list[Any] = [threading.Lock() if i == 9 else i for i in range(12)]
    report = await batchkit.batch_process(
        items,
        _work.stubborn_cleanup,
        concurrency=8,
        deadline=batchkit.Deadline(seconds=1.0, grace=0.3),
        backend=DaskBackend(client, per_worker=4, chunk_size=4),
    )
    _one_envelope_each(report, 12)
    nine = report[9]
    assert isinstance(nine, Failure)
    assert nine.kind in ("error", "skipped")
    await _wait_for_stubborn(client)


# ------------------------------------------- 4. a result the driver cannot unpickle
async def test_a_result_that_does_not_load_on_the_driver_is_that_item_s_failure(
    client: Any,
) -> None:
    report = await batchkit.batch_process(
        range(4),
        _work.returns_driver_unloadable,
        concurrency=4,
        backend=DaskBackend(client, chunk_size=4),
    )
    _one_envelope_each(report, 4)
    assert [o.kind for o in report] == ["success", "error", "success", "success"]
    bad = report[1]
    assert isinstance(bad, Failure)
    assert "No worker found" in str(bad.error)
    assert report.values() == [0, 2, 3]


async def test_an_item_that_does_not_load_on_the_worker_is_its_own_failure(client: Any) -> None:
    items: list[Any] = [0, _work.WorkerUnloadable(1), 2, 3]
    report = await batchkit.batch_process(
        items, _work.quick, concurrency=4, backend=DaskBackend(client, chunk_size=4)
    )
    _one_envelope_each(report, 4)
    assert [o.kind for o in report] == ["success", "error", "success", "success"]
    bad = report[1]
    assert isinstance(bad, Failure)
    assert isinstance(bad.error, ImportError)
    assert bad.attempts == 0  # it never ran
    assert report.values() == [0, 2, 3]


# ------------------------------------------------ 5. failures of a re-run chunk, once
async def test_a_rerun_chunk_s_failures_count_once(client: Any, tmp_path: Path) -> None:
    fn = functools.partial(_work.fail_three_then_die_once, marker=str(tmp_path / "died"))
    report = await batchkit.batch_process(
        range(8),
        fn,
        concurrency=4,
        max_failures=4,
        backend=DaskBackend(client, per_worker=4, chunk_size=8),
    )
    assert (tmp_path / "died").exists()
    assert report.stop_reason is None
    assert report.counts["error"] == 3
    assert report.counts["success"] == 5
    assert all(o.reruns == 1 for o in report)


# ------------------------------------------------------ 6. an async input that stalls
async def test_a_stalled_async_input_s_items_run_and_the_rest_is_not_invented(
    client: Any,
) -> None:
    gave = asyncio.Event()

    async def items() -> AsyncIterator[int]:
        for i in range(5):
            yield i
        gave.set()
        await asyncio.Event().wait()  # stalls until closed
        yield 99  # pragma: no cover

    report = await batchkit.batch_process(
        items(),
        _work.quick,
        concurrency=8,
        deadline=batchkit.Deadline(seconds=2.0, grace=0.3),
        backend=DaskBackend(client, per_worker=4, chunk_size=50),
    )
    assert gave.is_set()
    assert report.values() == [0, 1, 2, 3, 4]
    assert not report.input_exhausted
    assert report.deadline_hit


# ---------------------------------------------------- 7. the report says what happened
async def test_a_worker_death_is_counted_told_and_logged(
    client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Any] = []
    fn = functools.partial(
        _work.die_once_after_others_finish, marker=str(tmp_path / "died"), others=3
    )
    with caplog.at_level(logging.WARNING, logger="batchkit.dask"):
        report = await batchkit.batch_process(
            range(8),
            fn,
            concurrency=4,
            observers=[events.append],
            backend=DaskBackend(client, per_worker=4, chunk_size=8),
        )
    assert (tmp_path / "died").exists()
    assert report.ok
    # The whole chunk ran again: 3 items had completed on the worker that died.
    assert [o.reruns for o in report] == [1] * 8
    assert report.reruns == 8
    assert report.to_dict()["reruns"] == 8
    assert report.to_dict()["items"][0]["reruns"] == 1
    [rerun] = [e for e in events if isinstance(e, ChunkRerun)]
    assert rerun.indices == range(8)
    assert rerun.reruns == 1
    assert rerun.lost != rerun.worker
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("re-run" in m and "8 item(s)" in m for m in warnings), warnings


async def test_peak_concurrency_counts_items_running_fn_not_waiting_out_a_backoff(
    client: Any,
) -> None:
    report = await batchkit.batch_process(
        range(8),
        _work.flaky,
        concurrency=2,
        retry=Retry(attempts=2, backoff=batchkit.Backoff(initial=0.3, maximum=0.3, jitter=False)),
        backend=DaskBackend(client, per_worker=1, chunk_size=4),
    )
    assert report.ok
    assert report.peak_concurrency <= 2


# ------------------------------------------------------------- the new field locally
def test_reruns_default_to_zero_and_round_trip() -> None:
    s = Success(1, 2, 0)
    f = Failure(1, ValueError("x"), "lost", 0, reruns=2)
    assert s.reruns == 0
    assert f.reruns == 2
    assert pickle.loads(pickle.dumps(f)).reruns == 2
    assert pickle.loads(pickle.dumps(s)).reruns == 0
    report = batchkit.BatchReport(
        outcomes=[s, Success(2, 3, 1, reruns=1)], wall_time=1.0, concurrency=1, peak_concurrency=1
    )
    assert [o.reruns for o in report] == [0, 1]
    assert report.reruns == 1
    assert pickle.loads(pickle.dumps(report)).reruns == 1


# ------------------------------------------- a caller's cancel is told, as on the local engine
async def _until_running(client: Any, n: int) -> None:
    while await _total(client, "running") < n:  # a condition on the workers, not a margin
        await asyncio.sleep(0.01)


async def test_a_callers_cancel_counts_every_item_with_stop_reason_cancelled(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Any] = []
    caplog.set_level(logging.INFO, logger="batchkit")
    call = asyncio.ensure_future(
        batchkit.batch_process(
            range(20),
            _work.hang,
            concurrency=4,
            backend=DaskBackend(client, per_worker=2, chunk_size=2),
            observers=[events.append, batchkit.LoggingObserver()],
        )
    )
    await _until_running(client, 4)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    (finished,) = [e for e in events if isinstance(e, batchkit.RunFinished)]
    report = finished.report
    _one_envelope_each(report, 20)
    assert report.stop_reason == "cancelled"
    assert report.counts["cancelled"] == 4
    assert report.counts["skipped"] == 16
    assert all(o.kind in ("cancelled", "skipped") for o in report)
    (line,) = [r for r in caplog.records if r.getMessage().startswith("batch finished")]
    assert line.levelno == logging.WARNING
    assert "total=20" in line.getMessage()
    assert "stop_reason=cancelled" in line.getMessage()
    assert "unfinished=20" in line.getMessage()


async def test_leaving_a_stream_early_counts_every_item_in_its_report(client: Any) -> None:
    async with batchkit.stream(
        range(20),
        _work.hang_unless_small,
        concurrency=4,
        backend=DaskBackend(client, per_worker=2, chunk_size=1),
    ) as outcomes:
        async for first in outcomes:
            assert first.ok
            break
    report = outcomes.report
    assert report.total == 20
    assert report.stop_reason == "cancelled"
    assert report.counts["success"] >= 1
    assert report.counts["cancelled"] + report.counts["skipped"] >= 15  # items 5-19 hang
    assert sum(report.counts.values()) == 20


async def test_leaving_a_stream_after_every_item_ended_is_no_cancel(client: Any) -> None:
    async with batchkit.stream(
        range(3), _work.quick, backend=DaskBackend(client, chunk_size=1)
    ) as outcomes:
        seen = [o async for o in outcomes]
    assert len(seen) == 3
    assert outcomes.report.stop_reason is None
