"""The database backends every integration test runs on: a SQLite file and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import inspect
import warnings
from typing import TYPE_CHECKING

import pytest

from ._db import create_schema, make_engine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine


@pytest.fixture(autouse=True)
def _close_implicit_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the event loop a plugin creates implicitly for a synchronous test.

    looptime's pytest hook calls ``policy.get_event_loop()`` before every test; for a sync
    test with no loop set, that creates one nobody closes, and its ResourceWarning surfaces
    (as an error) in whatever test runs when it is garbage collected.
    """
    yield
    if inspect.iscoroutinefunction(request.function):
        return  # pytest-asyncio owns that test's loop
    policy = asyncio.get_event_loop_policy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loop = policy.get_event_loop()
    except RuntimeError:
        return  # no loop set: nothing leaked
    if not loop.is_running() and not loop.is_closed():
        loop.close()
        policy.set_event_loop(None)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An async URL of an empty database: ``sqlite+aiosqlite`` file or ``postgresql+asyncpg``."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on ``db_url`` (pool of 2, no overflow) with the schema created; disposed after."""
    eng = make_engine(db_url)
    try:
        await create_schema(eng)
        yield eng
    finally:
        await eng.dispose()
