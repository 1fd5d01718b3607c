"""The schema and helpers the integration tests share."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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


# How long any wait on the database may take before a test fails with a message: a hang
# guard, never a margin a test relies on (a busy machine may be slow, not this slow).
HANG_GUARD = 30.0


def make_engine(
    url: str, *, pool_size: int = 2, max_overflow: int = 0, pool_timeout: float = HANG_GUARD
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


async def settle(what: str = "SQLAlchemy", timeout: float = HANG_GUARD) -> None:
    """Wait until every other task on this loop has ended, or fail saying which did not.

    A connection cancelled in the middle of a statement is invalidated, and SQLAlchemy closes
    it in a task of its own (aiosqlite's ``_terminate_graceful_close``, shielded) that nobody
    awaits. Left running when the test ends, the loop's teardown cancels it half-way: the
    driver thread keeps the database file open (and locked), or teardown waits on it for
    good. Dispose the engine, then ``await settle()``.
    """
    me = asyncio.current_task()
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not left:
            return
        if loop.time() >= end:
            raise AssertionError(
                f"hang: {len(left)} task(s) left by {what} still running after {timeout:g} s: "
                + ", ".join(repr(t.get_coro()) for t in left)
            )
        await asyncio.wait(left, timeout=end - loop.time())


async def dispose(engine: AsyncEngine) -> None:
    """Close every pooled connection and wait for connections being closed in the background."""
    try:
        async with asyncio.timeout(HANG_GUARD):
            await engine.dispose()
    except TimeoutError:
        raise AssertionError(f"hang: engine.dispose() took over {HANG_GUARD:g} s") from None
    await settle(f"disposing {engine.url}")


_sqlite_files = itertools.count()


def example_url(url: str) -> str:
    """A database of its own for one Hypothesis example: SQLite gets a new file (nothing the
    previous example left open can lock it); PostgreSQL keeps the test's database, whose
    schema ``create_schema`` recreates."""
    if not url.startswith("sqlite"):
        return url
    return url.removesuffix(".db") + f"-{next(_sqlite_files)}.db"


@contextlib.asynccontextmanager
async def fresh_engine(url: str, **kw: Any) -> AsyncIterator[AsyncEngine]:
    """``make_engine(url, **kw)`` with the schema created, disposed (and settled) after."""
    engine = make_engine(url, **kw)
    try:
        await create_schema(engine)
        yield engine
    finally:
        await dispose(engine)


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
            # What main() left running ends on its own first (see settle); only then is the
            # rest cancelled, so a half-closed connection never outlives the example.
            loop.run_until_complete(settle("the example"))
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
