"""The database backends every integration test runs on: a SQLite file and a real PostgreSQL."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ._db import create_schema, dispose, make_engine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine


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
    """An engine on ``db_url`` (pool of 2, no overflow) with the schema created; disposed
    after, and every connection it was still closing in the background closed."""
    eng = make_engine(db_url)
    try:
        await create_schema(eng)
        yield eng
    finally:
        await dispose(eng)
