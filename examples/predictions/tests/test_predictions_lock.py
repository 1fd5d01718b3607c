"""One run at a time across processes (item 5): two real processes, on SQLite and PostgreSQL.

A "hanging" run is a real ``predictions run`` whose simulated upstream never answers (hang
rate 1, a 600 s timeout), so it holds the lock until the test signals it. Every wait polls the
lease row or the process itself, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from datetime import timedelta
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import text, update

from predictions.cli import EXIT
from predictions.db import make_engine, make_session_factory
from predictions.lock import LeaseLost, RunInProgress, fence, hold_run_lock
from predictions.models import RunLease, utcnow
from predictions.pipeline import RunConfig
from predictions.service import create_app
from predictions.simulator import serve_app
from predictions.testing import (
    FAST,
    QUIET_SIM,
    WAIT,
    StderrLines,
    in_thread,
    lease,
    predictions,
    runs,
    start,
    wait_until,
)
from predictions.upstream import UpstreamClient, UpstreamURLs

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.timeout(300)

HANG = [
    "--time-factor", "1", "--error-rate", "0", "--rate-limit-rate", "0", "--hang-rate", "1",
    "--timeout", "600", "--deadline", "900", "--attempts", "1",
]  # fmt: skip
QUICK = ["run", *FAST, *QUIET_SIM, "--limit", "1", "--json"]


def seed(url: str, markets: int = 3) -> None:
    done = predictions("--database-url", url, "seed", "--markets", str(markets))
    assert done.returncode == 0, done.stderr


def hanging_run(url: str, *extra: str) -> subprocess.Popen[str]:
    """A ``predictions run`` that holds the lock until signalled; returns once it holds it."""
    process = start("--database-url", url, "run", *HANG, "--json", *extra)

    def holds() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the run exited early: {process.communicate()}")
        row = lease(url)
        if row is None or row.expires_at is None or f"pid {process.pid} " not in (row.holder or ""):
            return False
        # ... and its run record is written (it comes right after the lock).
        return any(r.status == "running" for r in runs(url))

    wait_until(f"pid {process.pid} to hold the run lock and record its run", holds)
    return process


def post_generate(url: str) -> httpx.Response:
    """POST /predictions/generate to a service of this process, over a real socket."""

    async def post() -> httpx.Response:
        engine = make_engine(url)
        try:
            async with UpstreamClient(UpstreamURLs.single("http://127.0.0.1:9")) as client:
                app = create_app(
                    engine=engine, session_factory=make_session_factory(engine), client=client
                )
                async with serve_app(app) as base, httpx.AsyncClient(base_url=base) as http:
                    return await http.post("/predictions/generate")
        finally:
            await engine.dispose()

    return in_thread(post)


def test_a_second_run_is_refused_until_the_first_is_stopped(db_url: str) -> None:
    seed(db_url)
    first = hanging_run(db_url)
    try:
        # A second process: exit 75, one line naming the holder and since when.
        second = predictions("--database-url", db_url, *QUICK)
        assert second.returncode == EXIT["busy"] == 75
        assert second.stdout == ""
        last = second.stderr.splitlines()[-1]  # after the line saying where the upstream is
        assert last.startswith("predictions: another run is in progress: held by "), last
        assert f" pid {first.pid} (predictions run) since " in last
        # The service in this process: 409, JSON naming the holder.
        response = post_generate(db_url)
        assert response.status_code == 409
        body = response.json()
        assert (body["status"], body["reason"]) == ("busy", "run_in_progress")
        assert f" pid {first.pid} (predictions run)" in body["lock"]["holder"]
        assert body["lock"]["since"]
    finally:
        # SIGTERM: stop starting markets, cancel those in flight, record, release, exit.
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=WAIT)
    assert first.returncode == EXIT["interrupted"] == 1, err
    result = json.loads(out)
    assert (result["status"], result["reason"]) == ("interrupted", "interrupted")
    assert result["interrupted_by"] == "SIGTERM"
    assert result["counts"]["success"] == 0
    assert sum(result["counts"].values()) == result["total"] == 3
    # Markets cancelled in flight ran until the signal: their time is what they ran, not 0.
    cancelled = [m for m in result["markets"] if m["outcome"] == "cancelled"]
    assert cancelled
    assert all(m["elapsed"] > 0 for m in cancelled), cancelled
    [record] = runs(db_url)
    assert record.status == "interrupted"
    assert record.finished_at is not None
    row = lease(db_url)
    assert row is not None
    assert row.expires_at is None  # released before the process exited
    after = predictions("--database-url", db_url, *QUICK)
    assert after.returncode == 0, after.stderr


_FIELD = re.compile(r"(\w+)=(\S+)")


def test_the_sigterm_log_line_agrees_with_the_table(tmp_path: Path) -> None:
    """``run --log`` stopped by SIGTERM: batchkit's ``batch finished`` line counts what the
    app's summary counts (every market, cancelled in flight or skipped) and names a stop
    reason (it said ``total=0 ... stop_reason=None`` before the caller's cancel was told)."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    seed(url, markets=12)
    process = start("--database-url", url, "run", *HANG, "--concurrency", "4", "--json", "--log")
    lines = StderrLines(process)
    try:
        lines.wait_for("INFO batchkit: batch started name=predictions total=12")
        wait_until("the run's record", lambda: any(r.status == "running" for r in runs(url)))
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=WAIT)
        assert process.stdout is not None
        with process.stdout:
            out = process.stdout.read()  # a small JSON document: the pipe's buffer held it
    assert process.returncode == EXIT["interrupted"]
    table = json.loads(out)
    finished = lines.wait_for("batchkit: batch finished name=predictions")
    fields = dict(_FIELD.findall(finished.split("batch finished", 1)[1]))
    assert int(fields["total"]) == table["total"] == 12
    for kind, count in table["counts"].items():
        assert int(fields[kind]) == count, (kind, finished)
    assert fields["stop_reason"] != "None", finished


def test_a_killed_run_blocks_no_longer_than_its_lease(db_url: str) -> None:
    seed(db_url)
    killed = hanging_run(db_url, "--lease-seconds", "20")
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=WAIT)
    if db_url.startswith("sqlite"):
        # Its lease (20 s, no longer renewed) still holds: refused, naming the dead holder.
        refused = predictions("--database-url", db_url, *QUICK)
        assert refused.returncode == EXIT["busy"], refused.stderr
        assert f"pid {killed.pid} (predictions run)" in refused.stderr
    # PostgreSQL drops the advisory lock with the dead process's connection; SQLite's lease
    # expires. Then a run goes through, and marks the dead run's record as crashed.
    outcome: list[subprocess.CompletedProcess[str]] = []

    def next_run_goes() -> bool:
        outcome[:] = [predictions("--database-url", db_url, *QUICK)]
        return outcome[0].returncode != EXIT["busy"]

    wait_until("a run after the killed one's lease", next_run_goes, timeout=WAIT + 20)
    assert outcome[0].returncode == 0, outcome[0].stderr
    assert [r.status for r in runs(db_url)] == ["crashed", "ok"]


async def _lose_the_lock(engine: AsyncEngine) -> None:
    """What a stalled or disconnected holder goes through, made to happen now."""
    if engine.dialect.name == "sqlite":  # the lease expired while the holder stalled
        async with engine.begin() as conn:
            await conn.execute(update(RunLease).values(expires_at=utcnow() - timedelta(seconds=1)))
    else:  # the lock's connection dropped: the server released the advisory lock
        granted = "FROM pg_locks WHERE locktype = 'advisory' AND granted"
        async with engine.begin() as conn:
            await conn.execute(text(f"SELECT pg_terminate_backend(pid) {granted}"))
        # pg_terminate_backend only signals the backend: it, and its lock, go a moment later
        # (a CI run's next pg_try_advisory_lock still found it held). Wait for that itself.
        async with asyncio.timeout(WAIT):
            while True:
                async with engine.connect() as conn:
                    if not await conn.scalar(text(f"SELECT count(*) {granted}")):
                        return
                await asyncio.sleep(0.02)


async def test_a_holder_that_lost_its_lock_cannot_write(engine: AsyncEngine) -> None:
    """The fencing token: once another run took over, the old holder's writes are refused."""
    sessions = make_session_factory(engine)
    async with hold_run_lock(engine, holder="old", lease_seconds=60) as old:
        with pytest.raises(RunInProgress, match="held by old since "):
            async with hold_run_lock(engine, holder="new"):
                pass
        await _lose_the_lock(engine)
        async with hold_run_lock(engine, holder="new") as new:
            assert new.token == old.token + 1
            async with sessions() as session, session.begin():
                await fence(session, new)
            async with sessions() as session, session.begin():
                with pytest.raises(LeaseLost):
                    await fence(session, old)
            assert old.lost.is_set()


async def test_a_lost_lease_stops_the_run(engine: AsyncEngine) -> None:
    """A renewal that finds another holder's token sets ``lost``; the run stops on it."""
    async with hold_run_lock(engine, holder="old", lease_seconds=0.3) as old:
        if engine.dialect.name == "sqlite":
            async with engine.begin() as conn:
                await conn.execute(update(RunLease).values(token=RunLease.token + 1))
        else:
            await _lose_the_lock(engine)
            async with hold_run_lock(engine, holder="new"):
                pass
        async with asyncio.timeout(WAIT):
            await old.lost.wait()


def test_run_config_defaults_are_the_cron_fit() -> None:
    assert (RunConfig().concurrency, RunConfig().timeout, RunConfig().deadline) == (10, 20, 55)
