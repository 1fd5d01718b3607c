"""Engine and session factory from ``DATABASE_URL`` (SQLite file by default, or PostgreSQL)."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

__all__ = [
    "DEFAULT_DATABASE_URL",
    "database_url",
    "hide_password",
    "make_engine",
    "make_session_factory",
]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///predictions.db"


def database_url(explicit: str | None = None) -> str:
    """``explicit``, else ``$DATABASE_URL``, else a SQLite file in the current directory.

    Hosting platforms hand out ``postgres://`` / ``postgresql://`` URLs; they are mapped to
    the asyncpg driver, since the job is async.
    """
    url = explicit or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url


def hide_password(url: str) -> str:
    """``url`` with its password as ``***``, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: show nothing that could be a secret
        return "<unparsable database URL>"


def make_engine(
    url: str | None = None,
    *,
    pool_size: int = 5,
    max_overflow: int = 5,
    pool_timeout: float = 10.0,
    pre_ping: bool = True,
) -> AsyncEngine:
    """An engine with a bounded pool: ``pool_size + max_overflow`` connections at most.

    ``pre_ping=False`` skips the test query on each checkout (for an engine whose every use
    is itself a one-query test, such as ``/health``'s).
    """
    url = database_url(url)
    kwargs: dict[str, Any] = {}
    parsed = make_url(url)
    in_memory = parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")
    if not in_memory:  # in-memory SQLite has a single-connection StaticPool
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout)
    engine = create_async_engine(url, pool_pre_ping=pre_ping, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets readers run next to the one writer; busy_timeout makes concurrent
            # writers wait for the lock instead of failing with "database is locked".
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: objects stay readable after a commit without a new query.
    return async_sessionmaker(engine, expire_on_commit=False)
