"""The run journal on SQLite and a real PostgreSQL: batched and transactional rows, resuming,
and the kill -9 loop — a process running items in transactional mode is killed at random
points, then resumed, and every item has exactly one committed row and is accounted for once.

In real time (a database needs it); every wait on the database or a process is bounded by
``HANG_GUARD`` and fails with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from batchkit import InvalidArgument, Journal, MemoryStateStore, batch_process
from batchkit.sqlalchemy import SQLAlchemyStateStore, sessions

from ._db import HANG_GUARD, committed_items, dispose, insert, make_engine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncEngine


@pytest.fixture
async def store(engine: AsyncEngine) -> SQLAlchemyStateStore:
    return SQLAlchemyStateStore(engine)


async def journal_kinds(store: SQLAlchemyStateStore, name: str) -> dict[str, str]:
    return await Journal(store, name).kinds()


async def test_batched_journal_resumes_on_sql(store: SQLAlchemyStateStore) -> None:
    journal = Journal(store, "b")
    calls: list[int] = []
    failing = {0, 4, 8}

    async def fn(i: int) -> dict[str, int]:
        calls.append(i)
        if i in failing:
            raise ValueError(i)
        return {"i": i}

    first = await batch_process(range(10), fn, key=str, journal=journal, concurrency=3)
    assert first.counts["error"] == 3
    assert sorted(k for k, v in (await journal_kinds(store, "b")).items() if v == "error") == [
        "0",
        "4",
        "8",
    ]
    calls.clear()
    failing.clear()
    second = await batch_process(range(10), fn, key=str, journal=journal, concurrency=3)
    assert sorted(calls) == [0, 4, 8]
    assert second.ok
    assert second.resumed == 7
    assert second.values()[1] == {"i": 1}  # read back from the database
    assert await journal_kinds(store, "b") == {}  # every item succeeded: cleared


async def test_transactional_rows_commit_with_the_item(
    engine: AsyncEngine, store: SQLAlchemyStateStore
) -> None:
    journal = Journal(store, "t", mode="transactional")

    async def fn(i: int, session: AsyncSession) -> int:
        await insert(session, i)
        if i == 3:
            raise ValueError(i)  # rolled back: its row and its journal row alike
        return i

    report = await batch_process(
        range(6),
        fn,
        key=str,
        journal=journal,
        context=sessions(async_sessionmaker(engine)),
        concurrency=2,
    )
    assert report.counts["error"] == 1
    assert await committed_items(engine) == [0, 1, 2, 4, 5]
    kinds = await journal_kinds(store, "t")
    assert kinds == {"0": "success", "1": "success", "2": "success", "3": "error",
                     "4": "success", "5": "success"}  # fmt: skip


async def test_transactional_row_is_rolled_back_when_the_commit_fails(
    engine: AsyncEngine, store: SQLAlchemyStateStore
) -> None:
    """The item's commit fails after the journal row was written in its session: neither
    the item's row nor the journal's success is committed."""
    journal = Journal(store, "c", mode="transactional")

    @contextlib.asynccontextmanager
    async def failing_commit() -> AsyncIterator[AsyncSession]:
        async with async_sessionmaker(engine)() as session:
            yield session
            await session.execute(sa.text("SELECT 1"))
            await session.rollback()  # what a failed COMMIT leaves behind
            raise ConnectionError("commit failed")

    async def fn(i: int, session: AsyncSession) -> int:
        await insert(session, i)
        return i

    report = await batch_process(range(2), fn, key=str, journal=journal, context=failing_commit)
    assert report.counts["error"] == 2
    assert await committed_items(engine) == []
    assert await journal_kinds(store, "c") == {"0": "error", "1": "error"}


async def test_transactional_needs_a_session_and_a_context(
    engine: AsyncEngine, store: SQLAlchemyStateStore
) -> None:
    journal = Journal(store, "s", mode="transactional")

    async def fn(i: int, ctx: Any = None) -> int:
        return i

    with pytest.raises(InvalidArgument, match="needs context="):
        await batch_process(range(2), fn, key=str, journal=journal)

    @contextlib.asynccontextmanager
    async def not_a_session() -> AsyncIterator[object]:
        yield object()

    report = await batch_process(range(2), fn, key=str, journal=journal, context=not_a_session)
    assert [o.kind for o in report] == ["error", "error"]
    assert "writes in the item's AsyncSession" in str(report.failures[0].error)
    with pytest.raises(InvalidArgument, match="needs a store that writes in a session"):
        Journal(MemoryStateStore(), "s", mode="transactional")


# -------------------------------------------------------------------------- kill -9 loop
CHILD = Path(__file__).with_name("_journal_child.py")


async def _committed_count(engine: AsyncEngine) -> int:
    """Rows committed so far; -1 while SQLite's writer locks the file (poll again)."""
    try:
        async with engine.connect() as conn:
            n = await conn.scalar(sa.text("SELECT count(*) FROM results"))
    except sa.exc.OperationalError:
        return -1
    return int(n or 0)


async def _results(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return list(await conn.scalars(sa.text("SELECT item FROM results ORDER BY item")))


async def _until(what: str, check: Any) -> None:
    """Poll the database itself until ``check()`` is true; a hang guard, not a margin."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + HANG_GUARD
    while not await check():
        if loop.time() > give_up:
            pytest.fail(f"kill -9 loop: waited {HANG_GUARD:g} s for {what}")
        await asyncio.sleep(0.002)


async def _start(url: str, items: int, concurrency: int, seed: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), url, str(items), str(concurrency), str(seed),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("db", "items", "kills", "concurrency"),
    [
        pytest.param("postgres", 200, 20, 4, id="postgres", marks=pytest.mark.postgres),
        pytest.param("sqlite", 60, 8, 1, id="sqlite"),
    ],
)
async def test_kill_9_then_resume_commits_every_item_exactly_once(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    db: str,
    items: int,
    kills: int,
    concurrency: int,
) -> None:
    """Transactional mode. A child process is killed (SIGKILL) each time the committed rows
    have grown by a random 1..12 (a seeded RNG), at least ``kills`` times; after every kill
    the journal's successes are exactly the committed rows; then a last child runs to the
    end, and the rows, the journal and its report account for every item exactly once."""
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'kill.db'}"
        if db == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = make_engine(url)
    rng = random.Random(9)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("DROP TABLE IF EXISTS results"))
            await conn.execute(
                sa.text(
                    "CREATE TABLE results (id INTEGER PRIMARY KEY, item INTEGER NOT NULL)"
                    if db == "sqlite"
                    else "CREATE TABLE results (id SERIAL PRIMARY KEY, item INTEGER NOT NULL)"
                )
            )
        store = SQLAlchemyStateStore(engine)
        await store.prune(sys.float_info.max, prefix="batchkit/journal/kill/")
        done = 0
        last = items * 4 // 5  # the kills stop here: the last child has work left to do
        for round_ in range(kills):
            step = max(1, min(12, (last - done) // (kills - round_)))
            target = done + rng.randint(1, step)
            child = await _start(url, items, concurrency, seed=round_)

            async def grown(target: int = target) -> bool:
                return await _committed_count(engine) >= target

            await _until(f"{target} committed rows (round {round_})", grown)
            assert child.returncode is None, "the child ended before it was killed"
            child.kill()  # SIGKILL: no cleanup, no flush, no rollback by the process
            await asyncio.wait_for(child.wait(), HANG_GUARD)
            committed = await _results(engine)
            done = len(committed)
            assert len(committed) == len(set(committed)), "an item committed twice"
            successes = {k for k, v in (await journal_kinds(store, "kill")).items()
                         if v == "success"}  # fmt: skip
            # Transactional: the journal says success exactly for the committed rows.
            assert successes == {str(i) for i in committed}, f"round {round_}"
        assert done < items
        before = set(await _results(engine))
        child = await _start(url, items, concurrency, seed=99)
        out, err = await asyncio.wait_for(child.communicate(), HANG_GUARD * 2)
        assert child.returncode == 0, err.decode()
        final = json.loads(out)
        assert final["failed"] == []
        assert set(final["resumed"]) == before  # resumed: exactly what was committed before
        assert sorted(final["resumed"] + final["ran"]) == list(range(items))  # each once
        assert Counter(await _results(engine)) == Counter(range(items))  # one row each
        assert await journal_kinds(store, "kill") == {}  # a whole success clears it
    finally:
        await dispose(engine)
