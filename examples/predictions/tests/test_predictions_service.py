"""The HTTP service through a real client (httpx over the ASGI app), on both databases."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httpx
import pytest

from predictions.db import make_engine, make_session_factory
from predictions.pipeline import RunConfig
from predictions.service import create_app
from predictions.simulator import SimulatorConfig

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
    from starlette.applications import Starlette

    from predictions.upstream import UpstreamClient

    Simulate = Callable[
        [SimulatorConfig], AbstractAsyncContextManager[tuple[UpstreamClient, Starlette]]
    ]

F = 0.01
CONFIG = RunConfig(concurrency=10, timeout=100, deadline=300, time_factor=F)


def http(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc")


async def test_generate_then_health(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], simulate: Simulate
) -> None:
    async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
        app = create_app(
            engine=engine, session_factory=session_factory, client=client, config=CONFIG
        )
        async with http(app) as svc:
            before = await svc.get("/health")
            assert before.status_code == 200
            assert before.json()["last_run"] is None

            response = await svc.post("/predictions/generate", params={"limit": 5})
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "ok"
            assert body["total"] == 5
            assert body["counts"]["success"] == body["saved"] == 5
            assert len(body["markets"]) == 5
            assert all(0 < m["probability"] < 1 for m in body["markets"])
            assert body["config"]["limit"] == 5

            health = await svc.get("/health")
    assert health.status_code == 200
    h = health.json()
    assert h["status"] == "ok"
    assert h["database"] == "ok"
    assert h["run_in_progress"] is False
    assert h["last_run"]["id"] == body["run_id"]
    assert h["last_run"]["status"] == "ok"
    assert h["last_run"]["counts"]["success"] == 5
    assert 0 <= h["last_run"]["age_seconds"] < 60
    pool = h["pool"]
    assert pool["size"] == 5
    assert pool["checked_out"] == 0  # nothing held between requests
    assert pool["usage"] == 0.0


async def test_a_run_that_misses_its_goal_answers_503(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], simulate: Simulate
) -> None:
    config = SimulatorConfig(time_factor=F, error_rate=1.0)  # every call fails
    async with simulate(config) as (client, _):
        app = create_app(
            engine=engine,
            session_factory=session_factory,
            client=client,
            config=RunConfig(concurrency=10, timeout=100, deadline=300, attempts=1, time_factor=F),
        )
        async with http(app) as svc:
            response = await svc.post("/predictions/generate?limit=3")
            health = await svc.get("/health")
    assert response.status_code == 503
    assert response.json()["counts"]["error"] == 3
    assert response.json()["goal_met"] is False
    assert health.json()["last_run"]["status"] == "failed"


async def test_overlapping_trigger_is_refused(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], simulate: Simulate
) -> None:
    async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
        app = create_app(
            engine=engine, session_factory=session_factory, client=client, config=CONFIG
        )
        async with http(app) as svc:
            first = asyncio.create_task(svc.post("/predictions/generate?limit=2"))
            while True:  # wait until the first run is under way
                health = (await svc.get("/health")).json()
                if health["run_in_progress"]:
                    break
                await asyncio.sleep(0.005)
            second = await svc.post("/predictions/generate?limit=2")
            assert second.status_code == 409
            assert (await first).status_code == 200


@pytest.mark.parametrize("limit", ["-1", "abc", "100000"])
async def test_bad_limit_is_400(
    engine: AsyncEngine,
    session_factory: async_sessionmaker[AsyncSession],
    simulate: Simulate,
    limit: str,
) -> None:
    async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
        app = create_app(engine=engine, session_factory=session_factory, client=client)
        async with http(app) as svc:
            response = await svc.post("/predictions/generate", params={"limit": limit})
    assert response.status_code == 400
    assert "limit" in response.json()["error"]


async def test_health_reports_an_unreachable_database(tmp_path: Path, simulate: Simulate) -> None:
    # A PostgreSQL URL whose unix socket does not exist: refused at once.
    engine = make_engine(f"postgresql+asyncpg://nobody@/nowhere?host={tmp_path / 'no-server'}")
    try:
        async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
            app = create_app(
                engine=engine, session_factory=make_session_factory(engine), client=client
            )
            async with http(app) as svc:
                response = await svc.get("/health")
    finally:
        await engine.dispose()
    assert response.status_code == 503
    assert response.json()["status"] == "unhealthy"
    assert response.json()["database"].startswith("unreachable: ")
