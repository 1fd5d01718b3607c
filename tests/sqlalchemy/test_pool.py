"""pool_stats(), check_pool() and the error when SQLAlchemy is missing."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import AssertionPool, NullPool, StaticPool

import batchkit
from batchkit import Adaptive, InvalidArgument, MissingExtra
from batchkit.sqlalchemy import PoolStats, PoolTooSmall, check_pool, pool_stats

from ._db import dispose

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine


async def test_pool_stats_count_checked_out_and_overflow(db_url: str) -> None:
    engine = create_async_engine(db_url, pool_size=2, max_overflow=2)
    try:
        assert pool_stats(engine) == PoolStats(
            pool="AsyncAdaptedQueuePool", size=2, checked_out=0, overflow=0, max_overflow=2,
            capacity=4, usage=0.0,
        )  # fmt: skip
        conns = [await engine.connect() for _ in range(3)]
        stats = pool_stats(engine)
        assert (stats.checked_out, stats.overflow, stats.capacity) == (3, 1, 4)
        assert stats.usage == 75.0
        for c in conns:
            await c.close()
        stats = pool_stats(engine)
        assert (stats.checked_out, stats.overflow, stats.usage) == (0, 0, 0.0)
        assert stats.to_dict()["capacity"] == 4
    finally:
        await dispose(engine)


def test_pool_stats_of_a_sync_engine_and_of_a_pool(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 's.db'}", pool_size=3, max_overflow=0)
    with engine.connect():
        stats = pool_stats(engine)
        assert (stats.pool, stats.size, stats.checked_out, stats.capacity) == ("QueuePool", 3, 1, 3)
        assert stats.usage == pytest.approx(100 / 3)
        assert pool_stats(engine.pool) == stats
    engine.dispose()


def test_pool_stats_without_limits_or_counts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    unlimited = sa.create_engine(url, pool_size=2, max_overflow=-1)
    zero = sa.create_engine(url, pool_size=0)  # QueuePool: pool_size=0 means no limit
    for engine in (unlimited, zero):
        stats = pool_stats(engine)
        assert (stats.max_overflow, stats.capacity, stats.usage) == (None, None, None)
        assert stats.checked_out == 0
    null = pool_stats(sa.create_engine(url, poolclass=NullPool))
    assert null == PoolStats(
        pool="NullPool", size=0, checked_out=None, overflow=0, max_overflow=None,
        capacity=None, usage=None,
    )  # fmt: skip
    static = pool_stats(sa.create_engine("sqlite://", poolclass=StaticPool))
    assert (static.size, static.checked_out, static.capacity) == (1, None, 1)
    assert pool_stats(sa.create_engine(url, poolclass=AssertionPool)).capacity == 1
    with pytest.raises(InvalidArgument, match="expected an AsyncEngine"):
        pool_stats("sqlite://")  # type: ignore[arg-type]


@pytest.fixture
def small_pool(tmp_path: Path) -> AsyncEngine:
    # Never connected: nothing to dispose of.
    return create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", pool_size=2, max_overflow=1
    )


def test_check_pool_is_quiet_when_the_pool_is_big_enough(small_pool: AsyncEngine) -> None:
    assert check_pool(small_pool, 3).capacity == 3
    assert check_pool(small_pool, Adaptive(initial=1, max=3), strict=True).capacity == 3


def test_check_pool_warns_with_a_hint(small_pool: AsyncEngine) -> None:
    with pytest.warns(PoolTooSmall, match=r"concurrency 4 can exceed .* capacity of 3") as rec:
        check_pool(small_pool, 4)
    message = str(rec[0].message)
    assert "pool_size=2 + max_overflow=1" in message
    assert "HINT: create_async_engine(url, pool_size=4, max_overflow=0)" in message
    assert rec[0].filename == __file__  # points at the caller
    # An adaptive limit counts with its maximum.
    with pytest.warns(PoolTooSmall, match="concurrency 64"):
        check_pool(small_pool, Adaptive())


def test_check_pool_strict_raises(small_pool: AsyncEngine) -> None:
    with pytest.raises(PoolTooSmall, match="HINT"):
        check_pool(small_pool, 10, strict=True)


def test_check_pool_on_pools_without_a_limit_or_with_one_connection() -> None:
    check_pool(sa.create_engine("sqlite://", poolclass=NullPool), 1000, strict=True)
    with pytest.raises(PoolTooSmall, match="StaticPool: it has one connection"):
        check_pool(sa.create_engine("sqlite://", poolclass=StaticPool), 2, strict=True)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "4", None])
def test_check_pool_rejects_bad_concurrency(small_pool: AsyncEngine, bad: object) -> None:
    with pytest.raises(InvalidArgument, match="concurrency must be"):
        check_pool(small_pool, bad)  # type: ignore[arg-type]


def test_check_pool_rejects_a_non_bool_strict(small_pool: AsyncEngine) -> None:
    with pytest.raises(InvalidArgument, match="strict must be a bool"):
        check_pool(small_pool, 2, strict=1)  # type: ignore[arg-type]


def test_missing_sqlalchemy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make "import sqlalchemy" fail, and import batchkit.sqlalchemy afresh.
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.delitem(sys.modules, "batchkit.sqlalchemy")
    monkeypatch.delattr(batchkit, "sqlalchemy", raising=False)
    with pytest.raises(MissingExtra) as info:
        importlib.import_module("batchkit.sqlalchemy")
    assert isinstance(info.value, ImportError)
    assert info.value.extra == "sqlalchemy"
    assert "HINT: pip install 'aio-batchkit[sqlalchemy]'" in str(info.value)
    assert "batchkit.sqlalchemy" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)
