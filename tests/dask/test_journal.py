"""``journal=`` on the Dask backend: read and written by the driver, in batched mode.

The driver is in the test's process, so a ``MemoryStateStore`` is shared by a Dask run and a
local one; a SQLAlchemy store on a SQLite file is the same across processes.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import pytest

import batchkit
from batchkit import Failure, InvalidArgument, Journal, MemoryStateStore, Success
from batchkit.dask import DaskBackend

from . import _work

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.timeout(90)

N = 40


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryStateStore()
        return
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import create_async_engine

    from batchkit.sqlalchemy import SQLAlchemyStateStore

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'journal.db'}")
    try:
        yield SQLAlchemyStateStore(engine)
    finally:
        await engine.dispose()


def one_each(report: batchkit.BatchReport[Any, Any], n: int) -> None:
    """Exactly one envelope per item."""
    assert sorted(o.index for o in report.outcomes) == list(range(n))


async def test_a_stopped_run_is_resumed_by_the_next_call(client: Any, store: Any) -> None:
    journal = Journal(store, "stopped", flush_every=7)
    backend = DaskBackend(client, per_worker=2, chunk_size=5)
    first = await batchkit.batch_process(
        range(N), _work.fail_odd, key=str, journal=journal, max_failures=3, backend=backend
    )
    assert first.stop_reason == "max_failures"
    one_each(first, N)
    done = {o.index for o in first.outcomes if type(o) is Success}
    failed = {o.index for o in first.outcomes if type(o) is Failure and o.kind == "error"}
    assert done
    assert len(done) + len(failed) < N  # it stopped partway
    # Only items that ended (a success or an error) have a row; skipped/cancelled ones none.
    kinds = await journal.kinds()
    assert kinds == {str(i): "success" for i in done} | {str(i): "error" for i in failed}

    second = await batchkit.batch_process(
        range(N), _work.quick, key=str, journal=journal, backend=backend
    )
    one_each(second, N)
    assert second.ok
    assert second.resumed == len(done)
    resumed = {o.index for o in second.outcomes if type(o) is Success and o.resumed}
    assert resumed == done  # only the rest ran
    assert all(o.value == o.index for o in second.outcomes if type(o) is Success)
    assert await journal.kinds() == {}  # every item succeeded: the journal is cleared


async def test_a_dask_runs_journal_is_resumed_by_a_local_run(client: Any, store: Any) -> None:
    journal = Journal(store, "to-local")
    first = await batchkit.batch_process(
        range(N), _work.fail_odd, key=str, journal=journal, backend=DaskBackend(client)
    )
    one_each(first, N)
    ran: list[int] = []

    async def record(x: int) -> int:
        ran.append(x)
        return x

    second = await batchkit.batch_process(range(N), record, key=str, journal=journal)
    assert sorted(ran) == list(range(1, N, 2))  # the failures only
    assert second.ok
    assert second.resumed == N // 2
    assert [o.value for o in second.outcomes if type(o) is Success] == list(range(N))


async def test_a_local_runs_journal_is_resumed_on_dask(client: Any, store: Any) -> None:
    journal = Journal(store, "from-local")
    first = await batchkit.batch_process(range(N), _work.fail_odd, key=str, journal=journal)
    assert len(first.failures) == N // 2
    events: list[Any] = []
    second = await batchkit.batch_process(
        range(N),
        _work.quick,
        key=str,
        journal=journal,
        observers=[events.append],
        backend=DaskBackend(client, chunk_size=4),
    )
    one_each(second, N)
    assert second.ok
    assert second.resumed == N // 2
    resumed = [o for o in second.outcomes if type(o) is Success and o.resumed]
    assert [o.index for o in resumed] == list(range(0, N, 2))
    # The stored values came back.
    assert [o.value for o in second.outcomes if type(o) is Success] == list(range(N))
    finished = [e for e in events if type(e) is batchkit.ItemFinished]
    assert sum(bool(getattr(e.outcome, "resumed", False)) for e in finished) == N // 2
    assert len(finished) == N


async def test_duplicate_keys_of_an_iterator_fail_on_dask(client: Any) -> None:
    journal = Journal(MemoryStateStore(), "dupes")
    report = await batchkit.batch_process(
        iter([1, 2, 1, 3]), _work.quick, key=str, journal=journal, backend=DaskBackend(client)
    )
    one_each(report, 4)
    third = report.outcomes[2]
    assert type(third) is Failure
    assert isinstance(third.error, InvalidArgument)
    assert "duplicate key '1'" in str(third.error)
    assert [o.value for o in report.outcomes if type(o) is Success] == [1, 2, 3]
    with pytest.raises(InvalidArgument, match="duplicate key"):  # a sequence: at the call
        await batchkit.batch_process(
            [1, 1], _work.quick, key=str, journal=journal, backend=DaskBackend(client)
        )


async def test_items_lost_with_their_worker_have_no_row(client: Any, cluster: Any) -> None:
    journal = Journal(MemoryStateStore(), "lost")
    backend = DaskBackend(client, per_worker=4, chunk_size=5)
    scheduler = cluster.scheduler
    allowed = scheduler.allowed_failures
    scheduler.allowed_failures = 0
    try:
        first = await batchkit.batch_process(
            range(20), _work.kill_worker_always, key=str, journal=journal, backend=backend
        )
    finally:
        scheduler.allowed_failures = allowed
    lost = [o.index for o in first.outcomes if type(o) is Failure and o.kind == "lost"]
    assert lost == [5, 6, 7, 8, 9]
    # Lost items are neither successes nor failures in the journal: they run again.
    assert await journal.kinds() == {str(i): "success" for i in range(20) if i not in lost}
    await client.wait_for_workers(2)
    second = await batchkit.batch_process(
        range(20), _work.quick, key=str, journal=journal, backend=backend
    )
    one_each(second, 20)
    assert second.resumed == 15
    assert [o.index for o in second.outcomes if type(o) is Success and not o.resumed] == lost


async def test_rows_are_written_when_a_stream_is_left_early(client: Any) -> None:
    # Nothing is flushed while the run goes on (flush_every, flush_after): the way out does.
    journal = Journal(MemoryStateStore(), "left", flush_every=1000, flush_after=3600.0)
    got = 0
    async with batchkit.stream(
        range(1000),
        _work.hang_unless_small,
        key=str,
        journal=journal,
        concurrency=8,
        backend=DaskBackend(client, per_worker=4, chunk_size=5),
    ) as outcomes:
        async for outcome in outcomes:
            assert outcome.ok
            got += 1
            if got == 5:
                break
        assert await journal.kinds() == {}
    assert await journal.kinds() == {str(i): "success" for i in range(5)}


def lock_or_int(x: Any) -> str:
    return str(x) if isinstance(x, int) else "lock"


async def test_resumed_items_and_an_unpicklable_one_in_a_chunk(client: Any) -> None:
    """The items left in a chunk are sent as one task; the resumed ones and the one that does
    not pickle each end on the driver, one envelope per item, in input order."""
    journal = Journal(MemoryStateStore(), "mixed")
    items: list[Any] = [0, 1, 2, threading.Lock(), 4, 5, 6]

    async def even_ints(x: Any) -> int:
        if not isinstance(x, int) or x % 2:
            raise ValueError(x)
        return x

    await batchkit.batch_process(items, even_ints, key=lock_or_int, journal=journal)
    report = await batchkit.batch_process(
        items,
        _work.quick,
        key=lock_or_int,
        journal=journal,
        backend=DaskBackend(client, chunk_size=7),
    )
    assert [o.index for o in report.outcomes] == list(range(7))
    assert [type(o) is Success and o.resumed for o in report.outcomes] == [
        True, False, True, False, True, False, True
    ]  # fmt: skip
    assert [o.value for o in report.outcomes if type(o) is Success] == [0, 1, 2, 4, 5, 6]
    lock = report.outcomes[3]
    assert type(lock) is Failure
    assert lock.kind == "error"
