"""The per-worker resource pattern: one AsyncEngine per worker and run, a session per item."""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

import pytest

import batchkit
from batchkit.dask import DaskBackend, per_worker

from . import _work

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(90)

sqlalchemy = pytest.importorskip("sqlalchemy")


@pytest.fixture(autouse=True)
async def _fresh_state(client: Any) -> None:
    await client.run(_work.reset_state)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def _db(url: str) -> str:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER)"))
    await engine.dispose()
    return url


async def _rows(url: str) -> list[int]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.connect() as conn:
        rows = [r[0] for r in await conn.execute(text("SELECT x FROM t ORDER BY x"))]
    await engine.dispose()
    return rows


async def _state(client: Any) -> dict[str, dict[str, int]]:
    states: dict[str, dict[str, int]] = await client.run(_work.get_state)
    return states


async def test_one_engine_per_worker_a_session_per_item(client: Any, db_url: str) -> None:
    url = await _db(db_url)
    engine = per_worker(functools.partial(_work.make_engine, url), dispose=_work.dispose_engine)
    report = await batchkit.batch_process(
        range(60),
        _work.insert,
        concurrency=8,
        context=functools.partial(_work.CountingSession, engine),
        backend=DaskBackend(client, per_worker=4, chunk_size=10),
    )
    assert report.ok
    assert await _rows(url) == list(range(60))
    states = (await _state(client)).values()
    assert sum(s.get("sessions", 0) for s in states) == 60
    assert sum(s.get("closed", 0) for s in states) == 60
    # One engine per worker that ran items, each disposed when the run ended.
    for s in states:
        assert s.get("engines", 0) in (0, 1)
        assert s.get("disposed", 0) == s.get("engines", 0)


async def test_cancelled_items_roll_back_and_close_their_sessions(client: Any, db_url: str) -> None:
    url = await _db(db_url)
    engine = per_worker(functools.partial(_work.make_engine, url), dispose=_work.dispose_engine)
    task = asyncio.ensure_future(
        batchkit.batch_process(
            range(5),
            _work.insert_then_hang,
            concurrency=1,
            context=functools.partial(_work.CountingSession, engine),
            backend=DaskBackend(client, per_worker=1, chunk_size=1),
        )
    )
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while sum(s.get("inserted", 0) for s in (await _state(client)).values()) < 1:
        assert loop.time() < end, "the first item never inserted"
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    states = (await _state(client)).values()
    assert sum(s.get("sessions", 0) for s in states) == 1
    assert sum(s.get("closed", 0) for s in states) == 1
    assert sum(s.get("disposed", 0) for s in states) == sum(s.get("engines", 0) for s in states)
    assert await _rows(url) == []  # rolled back


async def test_with_batchkit_sqlalchemy_sessions(client: Any, tmp_path: Path) -> None:
    """``batchkit.sqlalchemy.sessions()`` over the per-worker engine: commit on success."""
    from batchkit.sqlalchemy import sessions

    url = await _db(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    engine = per_worker(functools.partial(_work.make_engine, url), dispose=_work.dispose_engine)
    report = await batchkit.batch_process(
        range(30),
        _work.insert_no_commit,
        concurrency=8,
        context=sessions(functools.partial(_work.new_session, engine)),
        backend=DaskBackend(client, per_worker=4, chunk_size=10),
    )
    assert report.ok
    assert await _rows(url) == list(range(30))
