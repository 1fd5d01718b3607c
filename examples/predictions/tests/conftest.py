"""Fixtures for the predictions example: a database on each backend, a simulated upstream.

The tests run at a small time factor (``F = 0.01`` in each file): the simulator's 10-15 s calls
take 0.1-0.15 s, and the pipeline's timeout and deadline shrink by the same factor.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import httpx
import pytest

from predictions.db import make_engine, make_session_factory
from predictions.models import create_schema, seed_markets
from predictions.simulator import create_simulator
from predictions.upstream import UpstreamClient, UpstreamURLs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
    from starlette.applications import Starlette

    from predictions.simulator import SimulatorConfig


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, or a throwaway PostgreSQL database."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'predictions.db'}"


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    # A small pool and a short pool_timeout: exhausting it would fail a test, not hang it.
    engine = make_engine(db_url, pool_size=5, max_overflow=0, pool_timeout=2.0)
    await create_schema(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    factory = make_session_factory(engine)
    await seed_markets(factory, 20)
    return factory


@pytest.fixture
def simulate() -> Callable[
    [SimulatorConfig], AbstractAsyncContextManager[tuple[UpstreamClient, Starlette]]
]:
    """A client wired to an in-process simulator (ASGI transport: no sockets, fast)."""

    @asynccontextmanager
    async def make(
        config: SimulatorConfig,
    ) -> AsyncIterator[tuple[UpstreamClient, Starlette]]:
        app = create_simulator(config)
        transport = httpx.ASGITransport(app=app)
        urls = UpstreamURLs.single("http://simulator")
        async with UpstreamClient(urls, transport=transport) as client:
            yield client, app

    return make
