"""sessions() and release() against SQLite and a real PostgreSQL: the same suite on both.

These tests run in real time (a database needs it); Hypothesis drives each example with a
fresh event loop from a synchronous test.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import TYPE_CHECKING, Any, Literal

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from batchkit import (
    Backoff,
    Failure,
    InvalidArgument,
    ItemTimeout,
    Retry,
    Success,
    batch_process,
    stream,
)
from batchkit.sqlalchemy import Sessions, release, sessions

from ._db import (
    HANG_GUARD,
    checked_out,
    committed_items,
    create_schema,
    dispose,
    example_url,
    fresh_engine,
    insert,
    make_engine,
    pool_timeouts,
    rows,
    run_fresh,
    success_indexes,
)

if TYPE_CHECKING:
    from pathlib import Path


class Boom(Exception):
    pass


# ------------------------------------------------------------------ property: truthfulness
Behaviour = Literal["ok", "error_before_write", "error_after_write", "hang_outside", "hang_written"]
BEHAVIOURS: tuple[Behaviour, ...] = (
    "ok",
    "error_before_write",
    "error_after_write",
    "hang_outside",
    "hang_written",
)
ITEM_TIMEOUT = 0.25


async def _truthfulness_run(
    url: str, plan: list[Behaviour], max_failures: int | None, concurrency: int
) -> None:
    # A file of its own per example: what a previous example left cannot lock this one.
    engine = make_engine(example_url(url), pool_size=2, max_overflow=0)
    try:
        await create_schema(engine)
        factory = async_sessionmaker(engine)

        async def fn(i: int, session: AsyncSession) -> int:
            behaviour = plan[i]
            # Read, then give the connection back before the "external call".
            await session.execute(sa.select(sa.func.count()).select_from(rows))
            await release(session)
            await asyncio.sleep(0.002)
            if behaviour == "error_before_write":
                raise Boom(i)
            if behaviour == "hang_outside":
                await asyncio.sleep(30)
            await insert(session, i)
            if behaviour == "error_after_write":
                raise Boom(i)
            if behaviour == "hang_written":
                await asyncio.sleep(30)  # holds the connection with an uncommitted row
            return i

        report = await batch_process(
            range(len(plan)),
            fn,
            context=sessions(factory),
            concurrency=concurrency,
            timeout=ITEM_TIMEOUT,
            max_failures=max_failures,
        )
        assert len(report) == len(plan)
        # The envelopes match the database: a row for every success, none for a failure.
        assert await committed_items(engine) == success_indexes(report)
        assert checked_out(engine) == 0
        for o in report:
            if isinstance(o, Success):
                assert plan[o.index] == "ok"
                assert o.value == o.index
            elif plan[o.index].startswith("error") and o.kind == "error":
                assert isinstance(o.error, Boom)
            elif plan[o.index].startswith("hang") and o.kind == "timeout":
                assert isinstance(o.error, ItemTimeout)
        if max_failures is None and "hang_written" not in plan:
            # No lock or connection held through a timeout: a good item is not stopped by
            # the others. It may still overrun its own 0.25 s timeout on a busy machine
            # (real time): then it is a truthful timeout, with nothing committed.
            for o in report:
                if plan[o.index] == "ok" and not isinstance(o, Success):
                    assert o.kind == "timeout", o
            assert report.counts["cancelled"] == report.counts["skipped"] == 0
        if max_failures is not None and report.stop_reason is not None:
            assert report.stop_reason == "max_failures"
    finally:
        await dispose(engine)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plan=st.lists(
        st.sampled_from(BEHAVIOURS),
        min_size=1,
        max_size=12,
    ),
    max_failures=st.none() | st.integers(1, 3),
    concurrency=st.sampled_from([1, 3, 8]),
)
# The run stops (max_failures) while timed-out items roll back. It hung every time on SQLite
# before the engine stopped cancelling a cleanup twice: cut, aiosqlite's close never ends.
@example(
    plan=["hang_written", "hang_written", "error_after_write"] * 2,
    max_failures=3,
    concurrency=3,
)
def test_envelopes_match_committed_rows(
    db_url: str, plan: list[Behaviour], max_failures: int | None, concurrency: int
) -> None:
    """Random success/error/timeout/cancel patterns: every success committed, no failure
    visible, no connection left checked out."""
    run_fresh(lambda: _truthfulness_run(db_url, plan, max_failures, concurrency))


# ------------------------------------------------------------------ property: pool pressure
async def _pool_run(
    url: str, delays_ms: list[int], hold: bool, pool_timeout: float
) -> tuple[int, int, int, list[bool]]:
    """Concurrency 8 on a pool of 2; items sleep ``delay`` as the slow external call, with
    (``hold``) or without the connection checked out meanwhile. Also returns, per item,
    whether its session held a connection (was in a transaction) during the call."""
    engine = make_engine(example_url(url), pool_size=2, max_overflow=0, pool_timeout=pool_timeout)
    held: list[bool] = []
    try:
        await create_schema(engine)
        factory = async_sessionmaker(engine)

        async def fn(i: int, session: AsyncSession) -> int:
            n = await session.scalar(sa.select(sa.func.count()).select_from(rows))
            if not hold:
                await release(session)
            held.append(session.in_transaction())
            await asyncio.sleep(delays_ms[i] / 1000)
            await insert(session, i, note=f"saw {n}")
            return i

        report = await batch_process(
            range(len(delays_ms)), fn, context=sessions(factory), concurrency=8
        )
        committed = await committed_items(engine)
        assert committed == success_indexes(report)
        assert checked_out(engine) == 0
        return len(report.successes), len(pool_timeouts(report)), len(report.failures), held
    finally:
        await dispose(engine)


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(delays_ms=st.lists(st.integers(1, 10), min_size=8, max_size=32))
def test_release_pattern_never_runs_the_pool_dry(db_url: str, delays_ms: list[int]) -> None:
    """Concurrency 4x the pool: with read -> release -> call -> write, no connection is held
    through the call, and every item gets its connections.

    Judged by what each session holds during the call, not by a pool timeout racing a busy
    machine: the pool's timeout here is only a hang guard."""
    ok, timeouts, failures, held = run_fresh(
        lambda: _pool_run(db_url, delays_ms, hold=False, pool_timeout=HANG_GUARD)
    )
    assert held == [False] * len(delays_ms)
    assert (ok, timeouts, failures) == (len(delays_ms), 0, 0)


def test_holding_the_connection_through_the_call_does_run_the_pool_dry(db_url: str) -> None:
    """The control: the same load holding connections through a 250 ms call times out.

    With 2 connections each held for at least 250 ms, the 7th and 8th of 8 concurrent items
    cannot get one within 0.5 s: a busy machine only makes the holds longer."""
    ok, timeouts, _, held = run_fresh(
        lambda: _pool_run(db_url, [250] * 16, hold=True, pool_timeout=0.5)
    )
    assert len(held) > 0
    assert all(held)
    assert timeouts > 0
    assert ok < 16


# ------------------------------------------------------------------ semantics, one by one
async def test_success_commits_and_closes(engine: AsyncEngine) -> None:
    seen: list[AsyncSession] = []

    async def fn(i: int, session: AsyncSession) -> int:
        seen.append(session)
        await insert(session, i)
        return i

    report = await batch_process(range(5), fn, context=sessions(async_sessionmaker(engine)))
    assert report.ok
    assert await committed_items(engine) == [0, 1, 2, 3, 4]
    assert len({id(s) for s in seen}) == 5  # a fresh session per item
    assert not any(s.in_transaction() for s in seen)
    assert checked_out(engine) == 0


async def test_error_rolls_back_and_keeps_the_original_exception(engine: AsyncEngine) -> None:
    boom = Boom()

    async def fn(i: int, session: AsyncSession) -> int:
        await insert(session, i)
        if i == 1:
            raise boom
        return i

    report = await batch_process(range(3), fn, context=sessions(async_sessionmaker(engine)))
    failure = report[1]
    assert isinstance(failure, Failure)
    assert failure.error is boom
    assert failure.kind == "error"
    assert await committed_items(engine) == [0, 2]
    assert checked_out(engine) == 0


async def test_retry_gets_a_fresh_session_and_only_the_last_attempt_commits(
    engine: AsyncEngine,
) -> None:
    attempts: list[int] = []

    async def fn(i: int, session: AsyncSession) -> int:
        attempts.append(i)
        await insert(session, i, note=f"attempt {len(attempts)}")
        if len(attempts) < 3:
            raise Boom
        return i

    report = await batch_process(
        [7],
        fn,
        context=sessions(async_sessionmaker(engine)),
        retry=Retry(
            attempts=3, backoff=Backoff(initial=0.001, maximum=0.001, jitter=False), retry_on=Boom
        ),
    )
    assert report.ok
    async with engine.connect() as conn:
        notes = (await conn.execute(sa.select(rows.c.note))).scalars().all()
    assert notes == ["attempt 3"]


async def test_timeout_rolls_back_a_flushed_write(engine: AsyncEngine) -> None:

    async def fn(i: int, session: AsyncSession) -> int:
        await insert(session, i)  # sent to the database, not committed
        if i == 0:
            await asyncio.sleep(30)
        return i

    report = await batch_process(
        range(2),
        fn,
        context=sessions(async_sessionmaker(engine)),
        timeout=TIMEOUT_IN_COMMIT,  # item 1's insert and commit take far less, even when busy
        concurrency=1,
    )
    assert [o.ok for o in report] == [False, True]
    assert isinstance(report[0], Failure)
    assert report[0].kind == "timeout"
    assert await committed_items(engine) == [1]
    assert checked_out(engine) == 0


async def test_run_stop_cancels_and_rolls_back_in_flight_items(engine: AsyncEngine) -> None:
    written = asyncio.Event()

    async def fn(i: int, session: AsyncSession) -> int:
        if i == 0:
            await written.wait()
            raise Boom
        await insert(session, i)
        written.set()
        await asyncio.sleep(30)  # holding an uncommitted row when the run stops
        return i

    report = await batch_process(
        range(6), fn, context=sessions(async_sessionmaker(engine)), concurrency=2, fail_fast=True
    )
    assert report.stop_reason == "fail_fast"
    assert report.counts == {
        "success": 0,
        "error": 1,
        "timeout": 0,
        "cancelled": 1,
        "skipped": 4,
        "lost": 0,
    }
    assert await committed_items(engine) == []
    assert checked_out(engine) == 0


async def test_commit_false_leaves_committing_to_fn(engine: AsyncEngine) -> None:

    async def fn(i: int, session: AsyncSession) -> int:
        await insert(session, i)
        if i % 2:
            await session.commit()
        return i

    report = await batch_process(
        range(4), fn, context=sessions(async_sessionmaker(engine), commit=False)
    )
    assert report.ok
    assert await committed_items(engine) == [1, 3]
    assert checked_out(engine) == 0


async def test_a_plain_sessionmaker_closes_but_does_not_commit(engine: AsyncEngine) -> None:
    """``context=async_sessionmaker(engine)`` works too: but nothing is committed for you."""

    async def fn(i: int, session: AsyncSession) -> int:
        await insert(session, i)
        return i

    report = await batch_process(range(3), fn, context=async_sessionmaker(engine))
    assert report.ok
    assert await committed_items(engine) == []
    assert checked_out(engine) == 0


async def test_stream_left_early_returns_every_connection(db_url: str) -> None:
    async with fresh_engine(db_url, pool_size=4) as engine:
        holding = 0
        all_holding = asyncio.Event()
        never = asyncio.Event()

        async def fn(i: int, session: AsyncSession) -> int:
            nonlocal holding
            if i >= 4:
                # Started when item 0's slot freed: waits without touching the database.
                await never.wait()
            if i:
                await session.execute(sa.select(rows))  # holds a connection ...
                holding += 1
                if holding == 3:
                    all_holding.set()
                await never.wait()  # ... while the stream is left
            # Item 0 finishes only once items 1-3 hold their connections: the stream is left
            # while they wait, never while one is half-way through a statement (a busy
            # machine would otherwise decide which, and a connection cancelled mid-statement
            # is closed in the background; see _db.settle).
            await all_holding.wait()
            await insert(session, i)
            return i

        factory = async_sessionmaker(engine)
        async with asyncio.timeout(HANG_GUARD):
            async with stream(range(8), fn, context=sessions(factory), concurrency=4) as outcomes:
                async for o in outcomes:
                    assert o.ok
                    assert o.index == 0
                    break
        assert holding == 3
        assert await committed_items(engine) == [0]
        assert checked_out(engine) == 0


# ------------------------------------------------------------------ the commit is interrupted
# The per-item timeout of the tests whose timeout must land in the commit: what runs before
# the commit (an insert) must finish within it, so it is far longer than that takes.
TIMEOUT_IN_COMMIT = 1.0


async def until_cancelling(task: asyncio.Task[Any] | None) -> None:
    """Wait until ``task`` is being cancelled (a timeout, a run stopping, the caller)."""
    assert task is not None
    async with asyncio.timeout(HANG_GUARD):
        while not task.cancelling():
            await asyncio.sleep(0.005)


class SlowCommitSession(AsyncSession):
    """A session whose commit is still running when the attempt is cancelled: it waits until
    the task that made the session (the attempt's worker) is being cancelled, then really
    commits (or fails). So the cancellation lands in the commit however busy the machine,
    where a fixed 0.3 s commit raced a 0.1 s timeout."""

    fail = False
    wait_for_cancel = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = asyncio.current_task()

    async def commit(self) -> None:
        if self.wait_for_cancel:
            await until_cancelling(self.owner)
        if self.fail:
            raise Boom("commit failed")
        await super().commit()


class FailingSlowCommitSession(SlowCommitSession):
    fail = True


class FailingCommitSession(SlowCommitSession):
    fail = True
    wait_for_cancel = False


class CommitAtOnceSession(SlowCommitSession):
    wait_for_cancel = False


async def test_timeout_during_a_commit_that_succeeds_is_a_success(engine: AsyncEngine) -> None:

    async def fn(i: int, session: SlowCommitSession) -> int:
        await insert(session, i)
        return i

    factory = async_sessionmaker(engine, class_=SlowCommitSession)
    report = await batch_process(
        [0, 1], fn, context=sessions(factory), timeout=TIMEOUT_IN_COMMIT, concurrency=1
    )
    # The timeout fired in the commit; the commit finished, so the rows are there and the
    # items report what the database holds.
    assert [type(o) for o in report] == [Success, Success]
    assert all(o.elapsed >= TIMEOUT_IN_COMMIT for o in report)
    assert await committed_items(engine) == [0, 1]
    assert checked_out(engine) == 0
    # The run goes on normally after absorbing the timeout: nothing left cancelling.
    at_once = async_sessionmaker(engine, class_=CommitAtOnceSession)
    report2 = await batch_process([2], fn, context=sessions(at_once))
    assert report2.ok


async def test_timeout_during_a_commit_that_fails_is_a_timeout(engine: AsyncEngine) -> None:

    async def fn(i: int, session: FailingSlowCommitSession) -> int:
        await insert(session, i)
        return i

    factory = async_sessionmaker(engine, class_=FailingSlowCommitSession)
    report = await batch_process([0], fn, context=sessions(factory), timeout=TIMEOUT_IN_COMMIT)
    failure = report[0]
    assert isinstance(failure, Failure)
    assert failure.kind == "timeout"
    assert isinstance(failure.error.__cause__, asyncio.CancelledError)
    assert await committed_items(engine) == []
    assert checked_out(engine) == 0


async def test_a_failing_commit_without_timeout_is_an_error(engine: AsyncEngine) -> None:

    async def fn(i: int, session: FailingCommitSession) -> int:
        await insert(session, i)
        return i

    factory = async_sessionmaker(engine, class_=FailingCommitSession)
    report = await batch_process([0], fn, context=sessions(factory))
    failure = report[0]
    assert isinstance(failure, Failure)
    assert failure.kind == "error"
    assert isinstance(failure.error, Boom)
    assert await committed_items(engine) == []
    assert checked_out(engine) == 0


async def test_a_commit_failing_on_a_locked_sqlite_database_leaves_no_transaction_open(
    tmp_path: Path,
) -> None:
    """SQLite keeps the transaction open when its COMMIT fails with "database is locked",
    and SQLAlchemy's close() then returns the connection to the pool without a ROLLBACK: an
    idle pooled connection would hold the write lock. The scope rolls back a failed commit."""
    path = tmp_path / "locked.db"
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{path}",
        pool_size=2,
        max_overflow=0,
        connect_args={"timeout": 0.05},  # SQLite's busy wait: the commit fails quickly
    )
    try:
        await create_schema(engine)

        async def fn(i: int, session: AsyncSession) -> int:
            await insert(session, i)
            return i

        # A reader's shared lock: the writer's COMMIT cannot get its exclusive lock.
        reader = sqlite3.connect(path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM rows").fetchall()
            report = await batch_process([0], fn, context=sessions(async_sessionmaker(engine)))
            reader.execute("COMMIT")
        finally:
            reader.close()
        failure = report[0]
        assert isinstance(failure, Failure)
        assert failure.kind == "error"
        assert isinstance(failure.error, sa.exc.OperationalError)
        assert checked_out(engine) == 0
        # No pooled connection holds a lock: another writer gets the database at once.
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            assert other.execute("SELECT count(*) FROM rows").fetchone() == (0,)
            other.execute("ROLLBACK")
        finally:
            other.close()
    finally:
        await dispose(engine)


async def test_run_stopping_during_a_commit_keeps_the_committed_item(engine: AsyncEngine) -> None:

    in_commit = asyncio.Event()

    class SignallingSession(SlowCommitSession):
        async def commit(self) -> None:
            in_commit.set()
            await super().commit()

    async def fn(i: int, session: SignallingSession) -> int:
        if i == 1:
            await in_commit.wait()  # fails while item 0 is in its commit
            raise Boom
        await insert(session, i)
        return i

    factory = async_sessionmaker(engine, class_=SignallingSession)
    report = await batch_process(
        [0, 1], fn, context=sessions(factory), concurrency=2, fail_fast=True
    )
    assert report.stop_reason == "fail_fast"
    assert isinstance(report[0], Success)
    assert await committed_items(engine) == [0]
    assert checked_out(engine) == 0


async def test_outside_cancellation_during_a_commit_still_stops_the_run(db_url: str) -> None:
    """Cancelling the caller while a commit is in flight: the commit finishes (shielded),
    the cancellation is not lost, and no further item starts."""
    async with fresh_engine(db_url) as engine:
        await _outside_cancellation(engine)


async def _outside_cancellation(engine: AsyncEngine) -> None:
    started: list[int] = []
    in_commit = asyncio.Event()

    class SignallingSession(SlowCommitSession):
        async def commit(self) -> None:
            in_commit.set()
            await super().commit()

    async def fn(i: int, session: SignallingSession) -> int:
        started.append(i)
        await insert(session, i)
        return i

    factory = async_sessionmaker(engine, class_=SignallingSession)
    run = asyncio.create_task(
        batch_process(range(50), fn, context=sessions(factory), concurrency=1)
    )
    await in_commit.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert started[0] == 0
    assert len(started) <= 2  # the worker saw the cancellation again at its next await
    assert (await committed_items(engine))[:1] == [0]
    assert checked_out(engine) == 0


@pytest.mark.postgres
async def test_postgres_commit_that_is_slow_on_the_server(postgres_url: str) -> None:
    """A real slow COMMIT (a deferred trigger sleeps at commit time) after a timeout landed
    in the commit (the session holds its commit until then, see SlowCommitSession): the item
    is reported by what the server did."""
    engine = make_engine(postgres_url)
    try:
        await _slow_commit_on_the_server(engine)
    finally:
        await dispose(engine)


async def _slow_commit_on_the_server(engine: AsyncEngine) -> None:
    await create_schema(engine)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "CREATE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM pg_sleep(0.3); "
                "IF NEW.note = 'refuse' THEN RAISE EXCEPTION 'refused at commit'; END IF; "
                "RETURN NULL; END $$"
            )
        )
        await conn.execute(
            sa.text(
                "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON rows DEFERRABLE "
                "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_check()"
            )
        )

    async def fn(i: int, session: AsyncSession) -> int:
        await insert(session, i, note="refuse" if i == 1 else "")
        return i

    # The session holds its commit until the timeout fired; then the server's COMMIT is slow
    # (the trigger) and refuses item 1.
    factory = async_sessionmaker(engine, class_=SlowCommitSession)
    report = await batch_process(
        [0, 1], fn, context=sessions(factory), timeout=TIMEOUT_IN_COMMIT, concurrency=2
    )
    assert isinstance(report[0], Success)
    failure = report[1]
    assert isinstance(failure, Failure)
    assert failure.kind == "timeout"
    assert "refused at commit" in str(failure.error.__cause__.__cause__)  # type: ignore[union-attr]
    assert await committed_items(engine) == [0]
    assert checked_out(engine) == 0


# ------------------------------------------------------------------ release()
async def test_release_returns_the_connection_and_keeps_loaded_values(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.insert(rows).values(item=1, note="old"))
    factory = async_sessionmaker(engine)  # expire_on_commit=True, the default
    checkouts: list[int] = []

    async def fn(i: int, session: AsyncSession) -> str:
        await session.execute(sa.select(rows))
        checkouts.append(checked_out(engine))
        await release(session)
        checkouts.append(checked_out(engine))
        assert session.sync_session.expire_on_commit  # restored
        await release(session)  # nothing to release: no-op
        await session.execute(sa.update(rows).values(note="new"))
        checkouts.append(checked_out(engine))
        return "done"

    report = await batch_process([1], fn, context=sessions(factory))
    assert report.ok
    assert checkouts == [1, 0, 1]
    async with engine.connect() as conn:
        assert (await conn.execute(sa.select(rows.c.note))).scalar_one() == "new"


async def test_cancellation_during_release_is_delivered_after_it(engine: AsyncEngine) -> None:

    async def fn(i: int, session: SlowCommitSession) -> int:
        await insert(session, i, note="before release")  # committed by release, by design
        await release(session)
        await insert(session, i + 100)
        return i

    factory = async_sessionmaker(engine, class_=SlowCommitSession)
    report = await batch_process([0], fn, context=sessions(factory), timeout=TIMEOUT_IN_COMMIT)
    assert isinstance(report[0], Failure)
    assert report[0].kind == "timeout"
    assert await committed_items(engine) == [0]  # only what release() committed
    assert checked_out(engine) == 0


# ------------------------------------------------------------------ arguments and types
def test_sessions_checks_its_arguments() -> None:
    with pytest.raises(InvalidArgument, match="session factory"):
        sessions(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="commit must be a bool"):
        sessions(async_sessionmaker(), commit="yes")  # type: ignore[arg-type]
    s = sessions(async_sessionmaker())
    assert isinstance(s, Sessions)
    assert s.commit is True
    scope = s()
    assert scope is not s()  # a new scope per attempt


def _typing_check(factory: async_sessionmaker[SlowCommitSession]) -> None:
    # The session class flows through: fn receives a SlowCommitSession.
    scope: Sessions[SlowCommitSession] = sessions(factory)
    del scope
