"""SQLAlchemy integration: a session per item, pool awareness, and holding a connection only
for the database work. Needs the ``sqlalchemy`` extra (``pip install 'aio-batchkit[sqlalchemy]'``).

* :func:`sessions` — ``context=sessions(async_sessionmaker(engine))`` gives every attempt a
  fresh :class:`~sqlalchemy.ext.asyncio.AsyncSession`, committed when ``fn`` returns, rolled
  back when it raises, times out or is cancelled, and closed on every path.
* :func:`pool_stats` and :func:`check_pool` — how full the connection pool is, and a warning
  (or an error) when ``concurrency`` can ask for more connections than the pool can give.
* :func:`release` — end the session's transaction so its connection goes back to the pool
  before a slow external call; the session checks a connection out again for the writes.
* :class:`SQLAlchemyStateStore` — a :class:`~batchkit.StateStore` in a table of your own
  database (SQLite or PostgreSQL), safe for several processes at once; :func:`state_table`
  declares that table for your own migrations.

The commit is the point of no return
------------------------------------
Cleanup after ``fn`` (commit and close, or rollback and close) runs in a shielded task and is
always waited for, so a timeout or a cancellation can never leave a connection checked out or
a ``COMMIT`` in flight whose result nobody knows. When such a cancellation lands *after* ``fn``
returned — during the commit or the close — the outcome follows the database:

* the commit succeeded: the rows are durable, so the item is a :class:`~batchkit.Success`
  (whose ``elapsed`` may exceed ``timeout`` by the commit's duration). batchkit's own
  cancellation (per-item timeout, a run stopping on a deadline or a failure threshold) is
  absorbed; a cancellation from outside the run (the caller cancelling ``batch_process``, a
  ``stream`` block left early) is delivered again at the worker's next ``await``, so the run
  still stops.
* the commit failed: the transaction is rolled back, and the item fails — with the commit's
  error, or as ``timeout``/``cancelled`` if a cancellation arrived meanwhile.

Before ``fn`` returns nothing is committed, so any failure rolls everything back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

from ._model.errors import InvalidArgument, MissingExtra
from ._model.policies import Adaptive
from ._model.state import (
    JsonValue,
    StateEntry,
    check_expected,
    check_key,
    check_prefix,
    check_time,
    decode,
    encode,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping
    from types import TracebackType

try:
    import sqlalchemy as sa
    from sqlalchemy import Engine
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.pool import (
        AssertionPool,
        NullPool,
        Pool,
        QueuePool,
        SingletonThreadPool,
        StaticPool,
    )
except ImportError as e:  # sqlalchemy itself, or its asyncio support (greenlet)
    raise MissingExtra("batchkit.sqlalchemy", "sqlalchemy", "sqlalchemy") from e

__all__ = [
    "PoolStats",
    "PoolTooSmall",
    "SQLAlchemyStateStore",
    "SessionScope",
    "Sessions",
    "check_pool",
    "pool_stats",
    "release",
    "sessions",
    "state_table",
]

S = TypeVar("S", bound=AsyncSession)
T = TypeVar("T")


# ---------------------------------------------------------------------------------- cleanup
async def _to_the_end(
    coro: Coroutine[Any, Any, T],
) -> tuple[T | None, BaseException | None, asyncio.CancelledError | None]:
    """Run ``coro`` in its own task and wait for it to finish even if we are cancelled.

    Returns ``(result, error, cancellation)``: what ``coro`` returned or raised, and the
    cancellation that landed on us meanwhile (``None`` if none did). Waiting is bounded by the
    driver's own timeouts; giving up early is what would leave a connection checked out.
    """
    task = asyncio.ensure_future(coro)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            # wait() never cancels what it waits for: the cleanup goes on if we are cancelled.
            await asyncio.wait((task,))
        except asyncio.CancelledError as e:
            cancelled = cancelled or e
    if task.cancelled():  # only the loop shutting down cancels the cleanup itself
        raise asyncio.CancelledError
    error = task.exception()
    return (task.result() if error is None else None), error, cancelled


def _redeliver_if_unclaimed(task: asyncio.Task[Any], before: int) -> None:
    """After absorbing a cancellation, hand it back to ``task`` unless its sender claimed it.

    batchkit's engine calls ``Task.uncancel()`` on its own request as soon as the attempt
    returns (synchronously, before the loop runs callbacks); a request still counted on the
    next loop turn came from outside the run and must not be lost.
    """
    if not task.done() and task.cancelling() > before:
        task.cancel()


async def _commit_and_close(session: AsyncSession, commit: bool) -> None:
    try:
        if commit:
            try:
                await session.commit()
            except BaseException:
                # A COMMIT that fails can leave the transaction open (SQLite's "database is
                # locked"), and close() alone returns the connection to the pool without a
                # ROLLBACK, still holding the lock. The commit's error is the one to report.
                with contextlib.suppress(Exception):
                    await session.rollback()
                raise
    finally:
        await session.close()


async def _rollback_and_close(session: AsyncSession) -> None:
    try:
        await session.rollback()
    finally:
        await session.close()


# ---------------------------------------------------------------------------------- sessions
@final
class SessionScope(Generic[S]):
    """One attempt's session: ``async with scope as session``. Made by :class:`Sessions`."""

    __slots__ = ("_commit", "_factory", "_session")

    def __init__(self, factory: Callable[[], S], commit: bool) -> None:
        self._factory = factory
        self._commit = commit
        self._session: S | None = None

    async def __aenter__(self) -> S:
        # An AsyncSession checks a connection out lazily, at its first statement.
        self._session = self._factory()
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session = self._session
        assert session is not None, "__aexit__ without __aenter__"
        self._session = None
        if exc_type is not None:
            # fn failed, timed out or was cancelled: nothing of it may stay.
            _, error, cancelled = await _to_the_end(_rollback_and_close(session))
            if cancelled is not None:
                raise cancelled
            if error is not None:
                raise error
            return  # never suppress fn's exception
        task = asyncio.current_task()
        before = task.cancelling() if task is not None else 0
        _, error, cancelled = await _to_the_end(_commit_and_close(session, self._commit))
        if error is not None:
            # Not committed (the database rolled back): the item fails, with the
            # cancellation if one arrived, so a cancellation is never turned into an error.
            if cancelled is not None:
                raise cancelled from error
            raise error
        if cancelled is not None and task is not None:
            if before:
                # The task was already being cancelled when the commit began: not ours
                # to decide; the rows are committed, the run is going away.
                raise cancelled
            # Committed: the item succeeded. Absorb the cancellation; see the module docs.
            asyncio.get_running_loop().call_soon(_redeliver_if_unclaimed, task, before)


@final
@dataclass(frozen=True, slots=True)
class Sessions(Generic[S]):
    """A context factory for ``batch_process(..., context=...)``; see :func:`sessions`."""

    factory: Callable[[], S]
    commit: bool = True

    def __call__(self) -> SessionScope[S]:
        return SessionScope(self.factory, self.commit)


def sessions(factory: Callable[[], S], *, commit: bool = True) -> Sessions[S]:
    """A session per attempt: ``batch_process(items, fn, context=sessions(Session))``.

    ``factory`` is an :class:`~sqlalchemy.ext.asyncio.async_sessionmaker` (or any zero-argument
    callable returning an ``AsyncSession``). Each attempt gets a fresh session; when ``fn``
    returns it is committed (if ``commit``) and closed; when ``fn`` raises, times out or is
    cancelled it is rolled back and closed. Its connection goes back to the pool on every
    path. With ``commit=False`` nothing is committed for you: commit inside ``fn``.

    Passing ``async_sessionmaker(engine)`` itself as ``context=`` works too, but then the
    session is only closed, never committed, and its cleanup is not shielded.
    """
    if not callable(factory):
        raise InvalidArgument(
            f"sessions() needs a session factory such as async_sessionmaker(engine), "
            f"got {factory!r}"
        )
    if not isinstance(commit, bool):
        raise InvalidArgument(f"commit must be a bool, got {commit!r}")
    return Sessions(factory, commit)


async def release(session: AsyncSession) -> None:
    """Commit the session's transaction now, so its connection goes back to the pool.

    For the *read → release → slow call → write* pattern: a connection is held only while
    the session has a transaction, so release it before a slow external call and the next
    statement checks one out again. What was written before ``release`` is committed and
    stays, even if the item fails later — release after reads, write after the call.

    Objects you loaded stay loaded (not expired) whatever ``expire_on_commit`` says, so they
    can be read after the release without touching the database. A cancellation that lands
    during the commit is delivered once the commit has finished.
    """
    if not session.in_transaction():
        return
    sync = session.sync_session
    expire = sync.expire_on_commit
    sync.expire_on_commit = False
    try:
        _, error, cancelled = await _to_the_end(session.commit())
    finally:
        sync.expire_on_commit = expire
    if cancelled is not None:
        raise cancelled
    if error is not None:
        raise error


# ------------------------------------------------------------------------------- pool stats
@final
@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStats:
    """A snapshot of a connection pool, e.g. for a ``GET /health`` endpoint.

    ``None`` means "this pool has no such number": no limit (``capacity``), or a pool that does
    not count its connections (``checked_out`` for ``NullPool``, ``StaticPool``).
    """

    pool: str
    """The pool's class name, e.g. ``AsyncAdaptedQueuePool``."""
    size: int
    """Connections the pool keeps open (``pool_size``)."""
    checked_out: int | None
    """Connections lent out right now."""
    overflow: int
    """Connections open beyond ``size`` right now."""
    max_overflow: int | None
    """How many connections may be opened beyond ``size``; ``None``: no limit."""
    capacity: int | None
    """The most connections that can be checked out at once; ``None``: no limit."""
    usage: float | None
    """``100 * checked_out / capacity``; ``None`` without a limit or without a count."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the fields."""
        return asdict(self)


def _pool_of(engine: object) -> Pool:
    if isinstance(engine, AsyncEngine):
        return engine.sync_engine.pool
    if isinstance(engine, Engine):
        return engine.pool
    if isinstance(engine, Pool):
        return engine
    raise InvalidArgument(
        f"expected an AsyncEngine, an Engine or a Pool, got {type(engine).__name__}\n"
        "HINT: pass the engine, e.g. pool_stats(session_factory.kw['bind'])"
    )


def pool_stats(engine: AsyncEngine | Engine | Pool) -> PoolStats:
    """How full ``engine``'s connection pool is right now."""
    pool = _pool_of(engine)
    name = type(pool).__name__
    if isinstance(pool, QueuePool):
        size = pool.size()
        # QueuePool keeps its limit privately; -1 (also forced by pool_size=0) is "no limit".
        raw_max: int = getattr(pool, "_max_overflow", -1)
        max_overflow = None if raw_max < 0 else raw_max
        capacity = None if max_overflow is None else size + max_overflow
        checked_out = pool.checkedout()
        usage = None if not capacity else 100.0 * checked_out / capacity
        return PoolStats(
            pool=name,
            size=size,
            checked_out=checked_out,
            # Negative while fewer than pool_size connections have been opened.
            overflow=max(0, pool.overflow()),
            max_overflow=max_overflow,
            capacity=capacity,
            usage=usage,
        )
    if isinstance(pool, NullPool):
        # A new connection per checkout, closed on return: nothing kept, nothing to run out.
        return PoolStats(
            pool=name, size=0, checked_out=None, overflow=0, max_overflow=None,
            capacity=None, usage=None,
        )  # fmt: skip
    if isinstance(pool, StaticPool | SingletonThreadPool | AssertionPool):
        # One connection (per thread): concurrent sessions share it (Static, SingletonThread)
        # or the second checkout fails (Assertion). Either way one at a time is the limit.
        size = pool.size if isinstance(pool, SingletonThreadPool) else 1
        return PoolStats(
            pool=name, size=size, checked_out=None, overflow=0, max_overflow=0,
            capacity=1, usage=None,
        )  # fmt: skip
    return PoolStats(  # a third-party pool: claim nothing
        pool=name, size=0, checked_out=None, overflow=0, max_overflow=None,
        capacity=None, usage=None,
    )  # fmt: skip


class PoolTooSmall(UserWarning):
    """``concurrency`` can ask for more connections than the pool can give at once.

    :func:`check_pool` warns with it, or raises it with ``strict=True``.
    """


def check_pool(
    engine: AsyncEngine | Engine | Pool, concurrency: int | Adaptive, *, strict: bool = False
) -> PoolStats:
    """Warn (or raise, with ``strict``) if ``concurrency`` sessions can exhaust the pool.

    With a session held for a whole item, ``concurrency`` items need ``concurrency``
    connections; beyond ``pool_size + max_overflow`` they wait ``pool_timeout`` seconds and
    then fail with ``sqlalchemy.exc.TimeoutError``. For an :class:`~batchkit.Adaptive` limit
    its ``max`` counts. Returns the pool's :func:`pool_stats`.
    """
    given: object = concurrency  # checked at run time: callers need not be typed
    if isinstance(given, Adaptive):
        wanted = given.max
    elif isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise InvalidArgument(
            f"concurrency must be an int >= 1 or batchkit.Adaptive(...), got {given!r}"
        )
    else:
        wanted = given
    if not isinstance(strict, bool):
        raise InvalidArgument(f"strict must be a bool, got {strict!r}")
    stats = pool_stats(engine)
    capacity = stats.capacity
    if capacity is None or wanted <= capacity:
        return stats
    if stats.pool in ("StaticPool", "SingletonThreadPool", "AssertionPool"):
        message = (
            f"concurrency {wanted} with a {stats.pool}: it has one connection, so concurrent "
            "sessions share it (one transaction for all) or cannot get one\n"
            "HINT: use a file database with the default pool (AsyncAdaptedQueuePool), "
            "or concurrency=1"
        )
    else:
        message = (
            f"concurrency {wanted} can exceed the pool's capacity of {capacity} connections "
            f"(pool_size={stats.size} + max_overflow={stats.max_overflow}): items beyond "
            f"{capacity} wait for a connection and fail after pool_timeout\n"
            f"HINT: create_async_engine(url, pool_size={wanted}, max_overflow=0), or "
            f"concurrency={capacity}, or hold a connection only for the database work "
            "(batchkit.sqlalchemy.release) and check that pool_timeout covers the wait"
        )
    if strict:
        raise PoolTooSmall(message)
    warnings.warn(message, PoolTooSmall, stacklevel=2)
    return stats


# ---------------------------------------------------------------------------------- state
def state_table(
    metadata: sa.MetaData, name: str = "batchkit_state", *, schema: str | None = None
) -> sa.Table:
    """The table a :class:`SQLAlchemyStateStore` keeps its entries in, added to ``metadata``.

    For your own migrations (Alembic's autogenerate sees it once it is in your metadata);
    then pass the table to the store with ``create=False``. One row per key: ``key``
    (``VARCHAR(512)``, the primary key), ``value`` (JSON text), ``version`` and
    ``updated_at`` (seconds since the epoch, indexed for pruning).
    """
    return sa.Table(
        name,
        metadata,
        sa.Column("key", sa.String(512), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False, index=True),
        schema=schema,
    )


_Upsert = postgresql.Insert | sqlite.Insert
_DIALECTS: dict[str, Callable[[sa.Table], _Upsert]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}

# Rows per INSERT in set_many: four parameters each stays far below SQLite's 32766 and
# PostgreSQL's 32767 bind parameters per statement.
_ROWS_PER_STATEMENT = 500


@final
class SQLAlchemyStateStore:
    """A :class:`~batchkit.StateStore` in a table of your own database, shared by every
    process that opens the same table: SQLite or PostgreSQL, through an async engine.

    Each method is one short transaction of its own, on a connection from ``engine``'s pool,
    so the store never holds a connection between calls. Two processes at once are safe:
    :meth:`compare_and_set` is a conditional ``UPDATE ... WHERE version = expected`` (or an
    ``INSERT ... ON CONFLICT DO NOTHING`` for ``expected=0``), so of two writers that read the
    same version exactly one wins; :meth:`set_many` upserts its keys in sorted order, so two
    transactions locking overlapping keys never wait on each other in a circle.

    Args:
        engine: An :class:`~sqlalchemy.ext.asyncio.AsyncEngine` on SQLite or PostgreSQL
            (tested with ``sqlite+aiosqlite`` and ``postgresql+asyncpg``).
        table: The table's name, or a table made by :func:`state_table`.
        create: Create the table (and its index) on first use if it does not exist. Pass
            ``False`` when your migrations create it.
        clock: Seconds since the epoch for ``updated_at`` (``time.time``). Processes sharing
            a store should share a clock: pruning compares their times.
    """

    __slots__ = ("_clock", "_create_lock", "_engine", "_insert", "_ready", "_table")

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        table: str | sa.Table = "batchkit_state",
        create: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise InvalidArgument(
                f"engine must be a sqlalchemy AsyncEngine, got {engine!r}\n"
                "HINT: sqlalchemy.ext.asyncio.create_async_engine('sqlite+aiosqlite:///state.db')"
            )
        insert = _DIALECTS.get(engine.dialect.name)
        if insert is None:
            raise InvalidArgument(
                f"SQLAlchemyStateStore supports SQLite and PostgreSQL, not "
                f"{engine.dialect.name!r}\n"
                "HINT: use a SQLite file or a PostgreSQL database for the state"
            )
        if isinstance(table, str):
            if not table:
                raise InvalidArgument("table must be a non-empty name or a Table")
            table = state_table(sa.MetaData(), table)
        elif not isinstance(table, sa.Table):
            raise InvalidArgument(
                f"table must be a name or a sqlalchemy Table from state_table(), got {table!r}"
            )
        if not isinstance(create, bool):
            raise InvalidArgument(f"create must be a bool, got {create!r}")
        if not callable(clock):
            raise InvalidArgument(f"clock must be a callable returning seconds, got {clock!r}")
        self._engine = engine
        self._table = table
        self._insert = insert
        self._clock = clock
        self._ready = not create
        self._create_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SQLAlchemyStateStore({self._engine.url!r}, table={self._table.fullname!r})"

    async def _ensure_table(self) -> None:
        if self._ready:
            return
        async with self._create_lock:
            if self._ready:
                return
            try:
                async with self._engine.begin() as conn:
                    await conn.run_sync(self._table.create, checkfirst=True)
            except sa.exc.DBAPIError:
                # Another process created it between our check and our CREATE TABLE.
                if not await self._table_exists():
                    raise
            self._ready = True

    async def _table_exists(self) -> bool:
        table = self._table
        async with self._engine.connect() as conn:
            exists: bool = await conn.run_sync(
                lambda c: sa.inspect(c).has_table(table.name, schema=table.schema)
            )
        return exists

    def _entry(self, row: sa.Row[Any]) -> StateEntry:
        return StateEntry(row.key, decode(row.value), row.version, row.updated_at)

    async def get(self, key: str) -> StateEntry | None:
        """See :meth:`batchkit.StateStore.get`."""
        check_key(key)
        await self._ensure_table()
        t = self._table
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(t).where(t.c.key == key))).one_or_none()
        return None if row is None else self._entry(row)

    async def compare_and_set(
        self, key: str, value: JsonValue, *, expected: int
    ) -> StateEntry | None:
        """See :meth:`batchkit.StateStore.compare_and_set`."""
        check_key(key)
        check_expected(expected)
        text = encode(value)
        await self._ensure_table()
        t = self._table
        now = float(self._clock())
        stmt: sa.Insert | sa.Update
        if expected == 0:
            stmt = (
                self._insert(t)
                .values(key=key, value=text, version=1, updated_at=now)
                .on_conflict_do_nothing(index_elements=[t.c.key])
            )
        else:
            # Under PostgreSQL's READ COMMITTED a concurrent writer waits for our row lock and
            # then re-checks the version, so it cannot overwrite what we wrote.
            stmt = (
                sa.update(t)
                .where(t.c.key == key, t.c.version == expected)
                .values(value=text, version=expected + 1, updated_at=now)
            )
        async with self._engine.begin() as conn:
            won = (await conn.execute(stmt.returning(t.c.version))).one_or_none()
        return None if won is None else StateEntry(key, decode(text), expected + 1, now)

    async def set_many(self, values: Mapping[str, JsonValue]) -> None:
        """See :meth:`batchkit.StateStore.set_many`."""
        # Every key and value is checked before the transaction: all or nothing.
        texts = {check_key(k): encode(v) for k, v in values.items()}
        if not texts:
            return
        await self._ensure_table()
        now = float(self._clock())
        rows = [
            {"key": k, "value": texts[k], "version": 1, "updated_at": now} for k in sorted(texts)
        ]
        async with self._engine.begin() as conn:
            # Sorted keys, in sorted chunks: every writer locks rows in the same order. (In
            # any other order two overlapping set_many deadlock on PostgreSQL.) One statement
            # for every chunk, its rows as parameters: compiled once, sent as multi-row
            # INSERTs by SQLAlchemy ("insertmanyvalues").
            for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                await conn.execute(self._upsert_stmt(), rows[start : start + _ROWS_PER_STATEMENT])

    async def _upsert_in(self, session: AsyncSession, texts: Mapping[str, str]) -> None:
        now = float(self._clock())
        rows = [
            {"key": k, "value": texts[k], "version": 1, "updated_at": now} for k in sorted(texts)
        ]
        await session.execute(self._upsert_stmt(), rows)

    def _upsert_stmt(self) -> Any:
        t = self._table
        ins = self._insert(t)
        return ins.on_conflict_do_update(
            index_elements=[t.c.key],
            set_={
                "value": ins.excluded.value,
                "version": t.c.version + 1,
                "updated_at": ins.excluded.updated_at,
            },
        )

    async def scan(self, prefix: str) -> list[StateEntry]:
        """See :meth:`batchkit.StateStore.scan`."""
        check_prefix(prefix)
        await self._ensure_table()
        t = self._table
        query = sa.select(t)
        if prefix:
            query = query.where(t.c.key.startswith(prefix, autoescape=True))
        async with self._engine.connect() as conn:
            found = (await conn.execute(query)).all()
        # SQLite's LIKE ignores ASCII case and each database sorts by its own collation: the
        # exact prefix and Python's order are applied here.
        return sorted(
            (self._entry(r) for r in found if r.key.startswith(prefix)), key=lambda e: e.key
        )

    async def prune(self, older_than: float, *, prefix: str = "") -> int:
        """See :meth:`batchkit.StateStore.prune`."""
        cutoff = check_time("older_than", older_than)
        check_prefix(prefix)
        await self._ensure_table()
        t = self._table
        stmt = sa.delete(t).where(t.c.updated_at < cutoff)
        if prefix:
            # Keys are compared exactly: LIKE ignores ASCII case on SQLite.
            stmt = stmt.where(
                t.c.key.startswith(prefix, autoescape=True),
                sa.func.substr(t.c.key, 1, len(prefix)) == prefix,
            )
        async with self._engine.begin() as conn:
            result = await conn.execute(stmt)
        return result.rowcount

    async def set_in_session(self, session: Any, values: Mapping[str, JsonValue]) -> None:
        """Write ``values`` as :meth:`set_many` does, inside ``session``'s transaction (an
        :class:`~sqlalchemy.ext.asyncio.AsyncSession` on the database that holds this
        store's table), without committing: the rows commit or roll back with the session.
        What ``Journal(mode="transactional")`` writes a success's row with."""
        if not isinstance(session, AsyncSession):
            raise InvalidArgument(
                f"a transactional journal writes in the item's AsyncSession, got {session!r}\n"
                "HINT: context=batchkit.sqlalchemy.sessions(async_sessionmaker(engine)), or "
                "Journal(mode='batched')"
            )
        texts = {check_key(k): encode(v) for k, v in values.items()}
        if not texts:
            return
        await self._ensure_table()
        await self._upsert_in(session, texts)
