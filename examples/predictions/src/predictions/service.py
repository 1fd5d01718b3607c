"""The HTTP service: the cron trigger and a health check (Starlette; ``serve`` runs it on uvicorn).

- ``POST /predictions/generate?limit=20``: run one batch within the deadline and answer its
  summary as JSON: 200 when the run met its goal; 503 when it did not (``status`` ``failed``,
  ``reason`` ``goal_missed`` or ``upstream_unavailable``), when there was nothing to predict
  (``empty`` / ``no_active_markets``) or when the database is down (``unavailable`` /
  ``database_unavailable``); 409 when a run is already in progress in any process
  (``busy`` / ``run_in_progress``, with who holds the lock since when). So ``curl --fail`` in a
  cron job notices everything but a good run.
- ``GET /health``: 200 ``{"status": "ok"}`` when the database answers, else 503 with a
  ``reason`` category (``database_unreachable``, ``database_timeout``). Callers with the token
  (or every caller when no token is configured) also get the pool, the last run and whether
  a run is in progress. The database error itself goes to the log, never into the answer.

Every error answer is JSON with ``status`` and ``reason``. With a token configured
(``PREDICTIONS_TOKEN``), ``POST /predictions/generate`` needs ``Authorization: Bearer <token>``
(401 otherwise); the token is compared in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import signal
import socket
from typing import TYPE_CHECKING, Any

import sqlalchemy.exc
import uvicorn
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Route

from batchkit.sqlalchemy import pool_stats

from .db import hide_password
from .lock import LEASE_SECONDS, LeaseLost, RunInProgress, default_holder
from .models import Run, utcnow
from .pipeline import LiveCounts, RunConfig, Stop, run_job

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Sequence
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
    from starlette.requests import Request
    from starlette.responses import Response

    from batchkit import Observer

    from .upstream import UpstreamClient
    from .worker import RunThread

__all__ = ["create_app", "last_run_status", "serve"]

log = logging.getLogger("predictions.service")

MAX_LIMIT = 1000
_DATABASE_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, OSError)


def _answer(status_code: int, status: str, reason: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"status": status, "reason": reason, **extra}, status_code=status_code)


_LAST_RUN = (
    select(
        Run.id,
        Run.status,
        Run.started_at,
        Run.finished_at,
        Run.success,
        Run.error,
        Run.timed_out,
        Run.cancelled,
        Run.skipped,
        Run.deadline_hit,
    )
    .order_by(Run.id.desc())
    .limit(1)
)


async def last_run_status(
    engine: AsyncEngine | AsyncConnection, now: datetime | None = None
) -> dict[str, Any] | None:
    """The last run's status and age, from one small query (no ORM objects)."""
    if isinstance(engine, AsyncConnection):
        row = (await engine.execute(_LAST_RUN)).first()
    else:
        async with engine.connect() as conn:
            row = (await conn.execute(_LAST_RUN)).first()
    if row is None:
        return None
    now = now or utcnow()
    return {
        "id": row.id,
        "status": row.status,
        "started_at": row.started_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "age_seconds": round((now - (row.finished_at or row.started_at)).total_seconds(), 3),
        "counts": {
            "success": row.success,
            "error": row.error,
            "timeout": row.timed_out,
            "cancelled": row.cancelled,
            "skipped": row.skipped,
        },
        "deadline_hit": row.deadline_hit,
    }


def _one_line(error: BaseException, url: str) -> str:
    """The error on one line, with the database password masked wherever it appears."""
    orig = getattr(error, "orig", None) or error
    text = f"{type(orig).__name__}: {orig}".replace("\n", " ")
    password = sqlalchemy.engine.make_url(url).password
    if password:
        text = text.replace(str(password), "***")
    return text[:300]


def create_app(
    *,
    engine: AsyncEngine,
    session_factory: async_sessionmaker[AsyncSession],
    client: UpstreamClient | None = None,
    config: RunConfig | None = None,
    token: str | None = None,
    health_engine: AsyncEngine | None = None,
    health_timeout: float = 2.0,
    lease_seconds: float = LEASE_SECONDS,
    runs: RunThread | None = None,
    observers: Sequence[Observer] = (),
) -> Starlette:
    """The service over resources the caller owns (and closes): engines, sessions, client.

    ``health_engine``: a small engine of its own for ``/health``, so that a health check never
    queues for a connection behind a run's markets (default: ``engine``).
    ``runs``: run the job on the worker thread's loop and its resources (``serve`` does), so
    that a run's bursts of work never hold this loop; without it, runs go on this loop with
    ``session_factory`` and ``client``.
    ``observers``: for every run, e.g. ``batchkit.LoggingObserver()`` (``serve --log``).

    ``app.state.interrupted`` is true once SIGTERM/SIGINT (``app.state.stop_runs``) stopped
    a run in progress: ``serve`` then exits 1, as the CLI does for an interrupted run.
    """
    if client is None and runs is None:
        raise TypeError("create_app() needs client= (or runs=, which brings its own)")
    config = config if config is not None else RunConfig()
    health_db = health_engine if health_engine is not None else engine
    url = engine.url.render_as_string(hide_password=False)
    stops: dict[Stop, LiveCounts] = {}  # the runs in progress, and their counts so far
    expected = token.encode() if token else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)

    def query_limit(request: Request) -> int | JSONResponse:
        params = request.query_params
        unknown = sorted(set(params.keys()) - {"limit"})
        if unknown:
            return _answer(
                400,
                "bad_request",
                "unknown_parameter",
                error=f"unknown query parameter(s): {', '.join(unknown)}; only limit",
            )
        values = params.getlist("limit")
        if len(values) > 1:
            return _answer(
                400,
                "bad_request",
                "repeated_parameter",
                error=f"limit given {len(values)} times; give it once",
            )
        if not values:
            return config.limit
        try:
            limit = int(values[0])
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_LIMIT:
            return _answer(
                400,
                "bad_request",
                "invalid_parameter",
                error=f"limit must be an integer in [1, {MAX_LIMIT}], got {values[0]!r}",
            )
        return limit

    async def generate(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse(
                {
                    "status": "unauthorized",
                    "reason": "missing_or_wrong_token",
                    "error": "send Authorization: Bearer <token>",
                },
                status_code=401,
                headers={"www-authenticate": 'Bearer realm="predictions"'},
            )
        limit = query_limit(request)
        if isinstance(limit, JSONResponse):
            return limit
        stop = Stop()
        live = stops[stop] = LiveCounts()
        run_config = dataclasses.replace(config, limit=limit)
        holder = default_holder("predictions serve")
        run_observers = [*observers, live]
        try:
            if runs is not None:
                result = await runs.run(
                    run_config,
                    stop=stop,
                    holder=holder,
                    lease_seconds=lease_seconds,
                    observers=run_observers,
                )
            else:
                assert client is not None
                result = await run_job(
                    session_factory,
                    client,
                    run_config,
                    stop=stop,
                    holder=holder,
                    lease_seconds=lease_seconds,
                    observers=run_observers,
                )
        except RunInProgress as e:
            return _answer(409, "busy", "run_in_progress", error=str(e), lock=e.to_dict())
        except LeaseLost as e:
            log.warning("run lost its lock: %s", e)
            return _answer(409, "busy", "lease_lost", error=str(e))
        except _DATABASE_DOWN as e:
            log.error("POST /predictions/generate: database unavailable: %s", _one_line(e, url))
            return _answer(503, "unavailable", "database_unavailable")
        finally:
            stops.pop(stop, None)
        log.log(
            logging.INFO if result.status == "ok" else logging.WARNING,
            "run %d finished: status %s, reason %s; %d of %d predicted",
            result.run_id,
            result.status,
            result.reason,
            result.report.counts["success"],
            len(result.report),
        )
        return JSONResponse(result.to_dict(), status_code=200 if result.status == "ok" else 503)

    async def health(request: Request) -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "reason": None}
        last: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(health_timeout), health_db.connect() as conn:
                last = await last_run_status(conn)
        except TimeoutError:
            body.update(status="unhealthy", reason="database_timeout")
            log.warning(
                "/health: the database did not answer within %g s (%s)",
                health_timeout,
                hide_password(url),
            )
        except Exception as e:  # the point of a health check: report, do not crash
            body.update(status="unhealthy", reason="database_unreachable")
            log.warning(
                "/health: database unreachable (%s): %s", hide_password(url), _one_line(e, url)
            )
        if authorized(request):
            body["last_run"] = last
            run_engine = runs.engine if runs is not None and runs.engine is not None else engine
            body["pool"] = pool_stats(run_engine).to_dict()
            body["run_in_progress"] = bool(stops)
            current = [live.to_dict() for live in list(stops.values())]
            if current:
                # The record says "running" with zeros until the end: these are the live ones.
                body["current_run"] = current[0]
                if last is not None and last["status"] == "running":
                    last["counts"] = {k: current[0]["counts"].get(k, 0) for k in last["counts"]}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"status": "error", "reason": reason, "error": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, _DATABASE_DOWN):
            log.error(
                "%s %s: database unavailable: %s",
                request.method,
                request.url.path,
                _one_line(exc, url),
            )
            return _answer(503, "unavailable", "database_unavailable")
        log.exception("%s %s failed", request.method, request.url.path)
        return _answer(500, "error", "internal_error")

    app = Starlette(
        routes=[
            Route("/predictions/generate", generate, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )

    def stop_runs(reason: str) -> None:
        in_progress = list(stops)
        if in_progress:
            app.state.interrupted = True
            log.warning("%s: stopping the run in progress; it records what it has", reason)
        else:
            log.info("%s: no run in progress; shutting down", reason)
        for stop in in_progress:
            stop.set(reason)

    app.state.stop_runs = stop_runs
    app.state.interrupted = False
    return app


class _Server(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT first ask a run in progress to stop (it records what it
    has and releases the lock; its request answers), and the signal is not raised again."""

    on_exit: Callable[[str], None] = staticmethod(lambda reason: None)
    ready: asyncio.Event

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    def handle_exit(self, sig: int, frame: Any) -> None:
        with contextlib.suppress(ValueError):
            self.on_exit(signal.Signals(sig).name)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)


async def serve(
    app: Starlette,
    *,
    host: str,
    port: int,
    on_started: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT (port 0: a free one; ``on_started`` gets the URL)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # socket says it is TCP. Without it, Nagle's algorithm and delayed ACKs added ~40 ms to
    # every answer (measured: a 404 took 45 ms at p50 instead of 4 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = _Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=30
        )
    )
    server.ready = asyncio.Event()
    stop_runs = getattr(app.state, "stop_runs", None)
    if stop_runs is not None:
        server.on_exit = stop_runs
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        ready = asyncio.ensure_future(server.ready.wait())
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if server.started and on_started is not None:
            shown = f"[{host}]" if family == socket.AF_INET6 else host
            on_started(f"http://{shown}:{bound}")
        await task
    finally:
        if not task.done():
            server.should_exit = True
            await task
        sock.close()
