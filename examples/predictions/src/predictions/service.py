"""The HTTP service: the cron trigger and a health check (Starlette; ``serve`` runs it on uvicorn).

- ``POST /predictions/generate?limit=20``: run one batch within the deadline and answer its
  summary as JSON: 200 when the run met its goal, 503 when it did not (so ``curl --fail`` in
  a cron job reports it), 409 when a run is already in progress (overlapping cron ticks).
- ``GET /health``: database reachable, pool size / checked out / usage %, last run status and
  age. 200 when the database answers, 503 when it does not.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from batchkit.sqlalchemy import pool_stats

from .models import Run, utcnow
from .pipeline import RunConfig, run_job

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
    from starlette.requests import Request

    from .upstream import UpstreamClient

__all__ = ["create_app", "last_run_status"]

MAX_LIMIT = 1000


async def last_run_status(
    session_factory: async_sessionmaker[AsyncSession], now: datetime | None = None
) -> dict[str, Any] | None:
    async with session_factory() as session:
        run = await session.scalar(select(Run).order_by(Run.id.desc()).limit(1))
    if run is None:
        return None
    now = now or utcnow()
    return {
        "id": run.id,
        "status": run.status,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "age_seconds": round((now - (run.finished_at or run.started_at)).total_seconds(), 3),
        "counts": run.counts,
        "deadline_hit": run.deadline_hit,
    }


def create_app(
    *,
    engine: AsyncEngine,
    session_factory: async_sessionmaker[AsyncSession],
    client: UpstreamClient,
    config: RunConfig | None = None,
    health_timeout: float = 2.0,
) -> Starlette:
    """The service over resources the caller owns (and closes): engine, sessions, client."""
    config = config if config is not None else RunConfig()
    running = asyncio.Lock()

    async def generate(request: Request) -> JSONResponse:
        try:
            limit = int(request.query_params.get("limit", config.limit))
        except ValueError:
            return JSONResponse({"error": "limit must be an integer"}, status_code=400)
        if not 0 <= limit <= MAX_LIMIT:
            return JSONResponse(
                {"error": f"limit must be between 0 and {MAX_LIMIT}"}, status_code=400
            )
        if running.locked():
            # Two overlapping runs would fight over the same markets and the pool.
            return JSONResponse({"error": "a run is already in progress"}, status_code=409)
        async with running:
            result = await run_job(
                session_factory, client, dataclasses.replace(config, limit=limit)
            )
        body = result.to_dict()
        return JSONResponse(body, status_code=200 if result.goal_met else 503)

    async def health(request: Request) -> JSONResponse:
        body: dict[str, Any] = {"database": "ok"}
        try:
            async with asyncio.timeout(health_timeout), engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            body["last_run"] = await last_run_status(session_factory)
        except Exception as e:  # the point of a health check: report, do not crash
            body["database"] = f"unreachable: {type(e).__name__}: {e}"
            body["last_run"] = None
        body["pool"] = pool_stats(engine).to_dict()
        body["run_in_progress"] = running.locked()
        body["status"] = "ok" if body["database"] == "ok" else "unhealthy"
        return JSONResponse(body, status_code=200 if body["database"] == "ok" else 503)

    return Starlette(
        routes=[
            Route("/predictions/generate", generate, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ]
    )
