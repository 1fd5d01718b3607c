"""The schema and helpers the integration tests share."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from batchkit import BatchReport, Failure, Success

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Iterator

T = TypeVar("T")

metadata = sa.MetaData()
rows = sa.Table(
    "rows",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item", sa.Integer, nullable=False),
    sa.Column("note", sa.String(50), nullable=False, default=""),
)


def make_engine(
    url: str, *, pool_size: int = 2, max_overflow: int = 0, pool_timeout: float = 5.0
) -> AsyncEngine:
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout
    )


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        await conn.run_sync(metadata.create_all)


async def committed_items(engine: AsyncEngine) -> list[int]:
    """The ``item`` of every committed row, sorted (read on a connection of its own)."""
    async with engine.connect() as conn:
        result = await conn.execute(sa.select(rows.c.item).order_by(rows.c.item))
        return list(result.scalars())


async def insert(session: AsyncSession, item: int, note: str = "") -> None:
    await session.execute(sa.insert(rows).values(item=item, note=note))


def checked_out(engine: AsyncEngine) -> int:
    pool = engine.sync_engine.pool
    assert isinstance(pool, sa.pool.QueuePool)
    return pool.checkedout()


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and its causes/contexts, each once."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def pool_timeouts(report: BatchReport[Any, Any]) -> list[Failure[Any]]:
    """Failures caused by waiting too long for a pooled connection."""
    return [
        f
        for f in report.failures
        for err in (f.errors or (f.error,))
        if any(isinstance(e, sa.exc.TimeoutError) for e in error_chain(err))
    ]


def success_indexes(report: BatchReport[Any, Any]) -> list[int]:
    return sorted(o.index for o in report if isinstance(o, Success))


@contextlib.asynccontextmanager
async def fresh_engine(url: str, **kw: Any) -> AsyncIterator[AsyncEngine]:
    """``make_engine(url, **kw)`` with the schema created, disposed on the way out."""
    engine = make_engine(url, **kw)
    try:
        await create_schema(engine)
        yield engine
    finally:
        await engine.dispose()


def run_fresh(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on a new event loop and close it (for synchronous Hypothesis tests).

    Not ``asyncio.run``: it resets the thread's current loop, which leaves the loop
    pytest-asyncio installed unclosed (a ResourceWarning, an error under ``-W error``).
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
