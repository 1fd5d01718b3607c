"""The HTTP service over a real loopback socket (uvicorn + httpx), on both databases."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from predictions.db import make_engine, make_session_factory
from predictions.pipeline import RunConfig
from predictions.service import create_app
from predictions.simulator import SimulatorConfig, serve_app
from predictions.testing import (
    WAIT,
    StderrLines,
    env,
    lease,
    predictions,
    runs,
    start,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
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
TOKEN = "s3cret-token"


@asynccontextmanager
async def http(app: Starlette, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` served by uvicorn on a free loopback port."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with serve_app(app) as base, httpx.AsyncClient(base_url=base, headers=headers) as c:
        yield c


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
            assert (body["status"], body["reason"]) == ("ok", "goal_met")
            assert body["total"] == 5
            assert body["counts"]["success"] == body["saved"] == 5
            assert len(body["markets"]) == 5
            assert all(0 < m["probability"] < 1 for m in body["markets"])
            assert body["config"]["limit"] == 5

            health = await svc.get("/health")
    assert health.status_code == 200
    h = health.json()
    assert (h["status"], h["reason"]) == ("ok", None)
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
    config = SimulatorConfig(time_factor=F, error_rate=1.0)  # every call answers 503
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
    body = response.json()
    assert (body["status"], body["reason"]) == ("failed", "upstream_unavailable")
    assert body["counts"]["error"] == 3
    assert body["goal_met"] is False
    assert health.json()["last_run"]["status"] == "failed"


async def test_an_empty_market_table_answers_503_empty(
    engine: AsyncEngine, simulate: Simulate
) -> None:
    """Item 2: nothing to do is not a 200."""
    async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
        app = create_app(engine=engine, session_factory=make_session_factory(engine), client=client)
        async with http(app) as svc:
            response = await svc.post("/predictions/generate")
    assert response.status_code == 503
    body = response.json()
    assert (body["status"], body["reason"], body["total"]) == ("empty", "no_active_markets", 0)


async def test_overlapping_trigger_is_refused(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], simulate: Simulate
) -> None:
    hang = SimulatorConfig(time_factor=F, hang_rate=1.0)  # the first run holds the lock
    async with simulate(hang) as (client, _):
        app = create_app(
            engine=engine, session_factory=session_factory, client=client, config=CONFIG
        )
        async with http(app) as svc:
            first = asyncio.ensure_future(svc.post("/predictions/generate?limit=2"))
            url = engine.url.render_as_string(hide_password=False)
            async with asyncio.timeout(WAIT):  # poll the lock row itself, with a deadline
                while True:
                    row = await asyncio.to_thread(lease, url)
                    if row is not None and row.expires_at is not None:
                        break
                    await asyncio.sleep(0.01)
            assert (await svc.get("/health")).json()["run_in_progress"] is True
            second = await svc.post("/predictions/generate?limit=2")
            assert second.status_code == 409, second.text
            assert second.json()["reason"] == "run_in_progress"
            assert "(predictions serve)" in second.json()["lock"]["holder"]
            app.state.stop_runs("test")  # what SIGTERM does: the first run records and ends
            response = await first
    assert response.status_code == 503
    assert (response.json()["status"], response.json()["interrupted_by"]) == (
        "interrupted", "test"
    )  # fmt: skip


async def test_health_shows_live_counts_while_a_run_goes(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], simulate: Simulate
) -> None:
    """The run record says "running" with zeros until the end; /health shows the counts so
    far: one market whose upstream is down has failed while the others hang in flight."""
    from predictions.pipeline import select_markets

    [first] = await select_markets(session_factory, 1)  # the first market a run takes
    sim = SimulatorConfig(
        time_factor=F, hang_rate=1.0, hang_seconds=1e6, down=frozenset({first.symbol})
    )
    config = RunConfig(concurrency=20, timeout=1000, deadline=3000, attempts=1, time_factor=F)
    async with simulate(sim) as (client, _):
        app = create_app(
            engine=engine, session_factory=session_factory, client=client, config=config
        )
        async with http(app) as svc:
            run = asyncio.ensure_future(svc.post("/predictions/generate?limit=4"))
            async with asyncio.timeout(WAIT):  # poll /health itself, with a deadline
                while True:
                    h = (await svc.get("/health")).json()
                    if h.get("current_run", {}).get("counts", {}).get("error") == 1:
                        break
                    assert not run.done(), run.result().text
                    await asyncio.sleep(0.01)
            app.state.stop_runs("test")
            response = await run
    assert h["run_in_progress"] is True
    assert h["current_run"]["total"] == 4
    assert h["current_run"]["in_flight"] == 3
    assert h["current_run"]["finished"] == 1
    assert h["last_run"]["status"] == "running"
    assert h["last_run"]["counts"]["error"] == 1  # not the record's 0
    assert response.json()["counts"]["error"] == 1
    assert app.state.interrupted is True


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("limit=-1", "invalid_parameter"),
        ("limit=abc", "invalid_parameter"),
        ("limit=100000", "invalid_parameter"),
        ("limit=2&limit=3", "repeated_parameter"),  # item 12
        ("limit=2&dry_run=1", "unknown_parameter"),
    ],
)
async def test_bad_query_is_400_json(
    engine: AsyncEngine,
    session_factory: async_sessionmaker[AsyncSession],
    simulate: Simulate,
    query: str,
    reason: str,
) -> None:
    async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
        app = create_app(engine=engine, session_factory=session_factory, client=client)
        async with http(app) as svc:
            response = await svc.post(f"/predictions/generate?{query}")
    assert response.status_code == 400
    assert (response.json()["status"], response.json()["reason"]) == ("bad_request", reason)
    assert runs(str(engine.url.render_as_string(hide_password=False))) == []


async def test_unknown_paths_and_methods_answer_json(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], simulate: Simulate
) -> None:
    """Item 11: 404 and 405 are JSON with a reason, like every other error."""
    async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
        app = create_app(engine=engine, session_factory=session_factory, client=client)
        async with http(app) as svc:
            missing = await svc.get("/nope")
            wrong = await svc.get("/predictions/generate")
    assert missing.status_code == 404
    assert missing.json()["reason"] == "not_found"
    assert wrong.status_code == 405
    assert wrong.json()["reason"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"


def _down(tmp_path: Path) -> str:
    """A PostgreSQL URL with a password whose unix socket does not exist: refused at once."""
    return f"postgresql+asyncpg://scott:tiger-pw@/nowhere?host={tmp_path / 'no-server'}"


async def test_a_database_outage_is_503_json_and_one_log_line(
    tmp_path: Path, simulate: Simulate, caplog: pytest.LogCaptureFixture
) -> None:
    """Items 11 and 14: JSON with a reason category; the detail only in the log, one line,
    no traceback, password hidden; unauthenticated callers get status and reason only."""
    engine = make_engine(_down(tmp_path))
    try:
        async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
            app = create_app(
                engine=engine,
                session_factory=make_session_factory(engine),
                client=client,
                token=TOKEN,
            )
            with caplog.at_level(logging.WARNING, logger="predictions"):
                async with http(app) as anonymous:
                    generate = await anonymous.post(
                        "/predictions/generate", headers={"authorization": f"Bearer {TOKEN}"}
                    )
                    health = await anonymous.get("/health")
                async with http(app, TOKEN) as operator:
                    detailed = await operator.get("/health")
    finally:
        await engine.dispose()
    assert generate.status_code == 503
    assert generate.json() == {"status": "unavailable", "reason": "database_unavailable"}
    assert health.status_code == 503
    assert health.json() == {"status": "unhealthy", "reason": "database_unreachable"}
    assert detailed.status_code == 503
    assert detailed.json()["reason"] == "database_unreachable"
    assert set(detailed.json()) >= {"pool", "last_run", "run_in_progress"}
    records = [r for r in caplog.records if r.name.startswith("predictions")]
    assert [r.getMessage().split(":")[0] for r in records] == [
        "POST /predictions/generate",
        "/health",
        "/health",
    ]
    for record in records:
        assert record.exc_info is None  # an expected outage: one line, not a traceback
        assert "\n" not in record.getMessage()
        assert "tiger-pw" not in record.getMessage()
    assert "scott:***@" in records[1].getMessage()


async def test_a_token_guards_generate_and_health_details(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], simulate: Simulate
) -> None:
    """Item 14: Bearer token, 401 JSON without it; /health gives anonymous callers less."""
    async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
        app = create_app(
            engine=engine,
            session_factory=session_factory,
            client=client,
            config=CONFIG,
            token=TOKEN,
        )
        async with http(app) as anonymous, http(app, TOKEN) as operator:
            missing = await anonymous.post("/predictions/generate?limit=1")
            wrong = await anonymous.post(
                "/predictions/generate?limit=1", headers={"authorization": "Bearer nope"}
            )
            basic = await anonymous.post(
                "/predictions/generate?limit=1", headers={"authorization": f"Basic {TOKEN}"}
            )
            public = await anonymous.get("/health")
            ok = await operator.post("/predictions/generate?limit=1")
            private = await operator.get("/health")
    for refused in (missing, wrong, basic):
        assert refused.status_code == 401
        assert refused.json()["reason"] == "missing_or_wrong_token"
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert ok.status_code == 200
    assert public.json() == {"status": "ok", "reason": None}
    assert private.json()["last_run"]["id"] == ok.json()["run_id"]
    assert len(runs(engine.url.render_as_string(hide_password=False))) == 1


async def test_health_does_not_wait_for_the_runs_pool(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession], simulate: Simulate
) -> None:
    """Item 13: with every connection of the run's pool checked out, /health still answers
    at once from its own small engine (it used to queue behind the markets for a connection)."""
    health_engine = make_engine(
        engine.url.render_as_string(hide_password=False), pool_size=1, max_overflow=0
    )
    held = [await engine.connect() for _ in range(5)]  # the whole pool (5, no overflow)
    try:
        async with simulate(SimulatorConfig(time_factor=F)) as (client, _):
            app = create_app(
                engine=engine,
                session_factory=session_factory,
                client=client,
                health_engine=health_engine,
                health_timeout=WAIT,  # a wait for the pool would fail the test, not pass it
            )
            async with http(app) as svc:
                response = await svc.get("/health")
    finally:
        for conn in held:
            await conn.close()
        await health_engine.dispose()
    assert response.status_code == 200
    assert response.json()["pool"]["checked_out"] == 5


def test_serve_as_deployed_token_health_and_sigterm(db_url: str, tmp_path: Path) -> None:
    """The real ``predictions serve --log`` and ``predictions simulator`` processes: a token
    run, then SIGTERM during a run: the run records its partial result, the POST answers, the
    lock is released, the log says so, and the server exits 1 (interrupted, as ``run``)."""
    assert predictions("--database-url", db_url, "seed", "--markets", "3").returncode == 0
    upstream = start(
        "simulator", "--port", "0", "--time-factor", "1",
        "--error-rate", "0", "--rate-limit-rate", "0", "--hang-rate", "1",
        stdout=False,
    )  # fmt: skip
    upstream_lines = StderrLines(upstream)
    try:
        sim_url = upstream_lines.wait_for("upstream: simulator on ").split()[3]
        server = start(
            "--database-url", db_url, "serve", "--port", "0", "--upstream-url", sim_url,
            "--timeout", "600", "--deadline", "900", "--attempts", "1", "--log",
            environ=env(PREDICTIONS_TOKEN=TOKEN), stdout=False,
        )  # fmt: skip
        lines = StderrLines(server)
        try:
            base = lines.wait_for("serving on ").split()[2]
            assert "token required" in "".join(lines.lines)
            public = httpx.get(f"{base}/health", timeout=WAIT)
            assert public.json() == {"status": "ok", "reason": None}
            refused = httpx.post(f"{base}/predictions/generate", timeout=WAIT)
            assert refused.status_code == 401

            answer: list[httpx.Response] = []

            def trigger() -> None:
                answer.append(
                    httpx.post(
                        f"{base}/predictions/generate",
                        headers={"authorization": f"Bearer {TOKEN}"},
                        timeout=WAIT,
                    )
                )

            poster = threading.Thread(target=trigger)
            poster.start()

            def server_holds_the_lock() -> bool:
                row = lease(db_url)
                return row is not None and row.expires_at is not None

            wait_until("the served run to hold the lock", server_holds_the_lock)
            lines.wait_for("INFO batchkit: batch started name=predictions total=3")
            server.send_signal(signal.SIGTERM)
            poster.join(timeout=WAIT)
            assert server.wait(timeout=WAIT) == 1
        finally:
            if server.poll() is None:
                server.kill()
            server.wait(timeout=WAIT)
            lines.text()
    finally:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait(timeout=WAIT)
        upstream_lines.text()
    assert upstream.returncode == 0
    [response] = answer
    assert response.status_code == 503
    body: dict[str, Any] = response.json()
    assert (body["status"], body["interrupted_by"]) == ("interrupted", "SIGTERM")
    assert [r.status for r in runs(db_url)] == ["interrupted"]
    row = lease(db_url)
    assert row is not None
    assert row.expires_at is None
    log = lines.text()
    assert "Traceback" not in log
    assert "WARNING predictions.service: SIGTERM: stopping the run in progress" in log
    assert "run 1 finished: status interrupted, reason interrupted; 0 of 3 predicted" in log
    assert all(m["elapsed"] > 0 for m in body["markets"] if m["outcome"] == "cancelled")
    json.dumps(body)  # stays JSON-safe


def test_serve_log_names_failed_markets_and_an_idle_sigterm_exits_0(tmp_path: Path) -> None:
    """``serve --log`` logs like ``run --log``: the run started and finished, every failed
    market; SIGTERM with no run in progress is a clean shutdown (exit 0)."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert predictions("--database-url", url, "seed", "--markets", "2").returncode == 0
    server = start(
        "--database-url",
        url,
        "serve",
        "--port",
        "0",
        "--upstream-url",
        "http://127.0.0.1:9",
        "--attempts",
        "1",
        "--log",
        stdout=False,
    )  # fmt: skip  (nothing listens on port 9: every call is refused)
    lines = StderrLines(server)
    try:
        base = lines.wait_for("serving on ").split()[2]
        response = httpx.post(f"{base}/predictions/generate", timeout=WAIT)
        assert response.status_code == 503
        lines.wait_for("run 1 finished: status failed")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=WAIT) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=WAIT)
    log = lines.text()
    assert "INFO batchkit: batch started name=predictions total=2" in log
    assert log.count("WARNING batchkit: item failed name=predictions") == 2
    assert "outcome=error" in log
    assert "ConnectError" in log
    assert "INFO batchkit: batch finished name=predictions total=2 success=0 error=2" in log
    assert "WARNING predictions.service: run 1 finished: status failed" in log
    assert "INFO predictions.service: SIGTERM: no run in progress; shutting down" in log
    assert "Traceback" not in log


async def test_runs_go_on_a_loop_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 13: ``serve`` runs jobs on a worker thread's loop (the HTTP loop only answers),
    and a stop set from the HTTP loop (SIGTERM) reaches the run there."""
    from predictions import worker
    from predictions.pipeline import Stop

    seen: dict[str, Any] = {}
    opened, started = threading.Event(), threading.Event()

    @asynccontextmanager
    async def resources() -> AsyncIterator[Any]:
        seen["resources"] = threading.get_ident()
        opened.set()
        yield "engine", "sessions", "client"
        seen["closed"] = threading.get_ident()

    async def fake_run_job(sessions: Any, client: Any, config: Any, **kwargs: Any) -> str:
        stop: Stop = kwargs["stop"]
        stop.attach()
        seen["run"] = threading.get_ident()
        started.set()
        await stop.event.wait()
        return f"stopped by {stop.reason} with {sessions} and {client}"

    monkeypatch.setattr(worker, "run_job", fake_run_job)
    here = threading.get_ident()
    async with worker.RunThread(resources) as runs:
        assert runs.engine == "engine"
        stop = Stop()
        run = asyncio.ensure_future(
            runs.run(RunConfig(), stop=stop, holder="test", lease_seconds=1)
        )
        assert await asyncio.to_thread(started.wait, WAIT), "the run did not start"
        stop.set("SIGTERM")  # from this loop, as the signal handler does
        async with asyncio.timeout(WAIT):
            assert await run == "stopped by SIGTERM with sessions and client"  # type: ignore[comparison-overlap]
    assert opened.is_set()
    assert seen["resources"] == seen["run"] == seen["closed"] != here
