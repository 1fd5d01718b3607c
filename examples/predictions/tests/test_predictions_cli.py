"""The command line, called in-process: ``main(argv)`` returns the exit code."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from typing import TYPE_CHECKING, TypeVar

import pytest
from sqlalchemy import select

from predictions.cli import main
from predictions.db import database_url, make_engine, make_session_factory
from predictions.models import Run

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

T = TypeVar("T")

QUIET_SIM = ["--error-rate", "0", "--rate-limit-rate", "0", "--hang-rate", "0"]
# Over loopback HTTP each request costs a few ms of CPU in this one process; a time factor of
# 0.05 (calls of 0.5-0.75 s) keeps that small next to the simulated latency.
FAST = ["--time-factor", "0.05", "--concurrency", "4", "--timeout", "60", "--deadline", "300"]


def in_thread(fn: Callable[[], T]) -> T:
    """Call ``fn`` on a thread of its own: ``main()`` runs ``asyncio.run``, which on the test's
    thread would replace (and orphan) the event loop pytest-asyncio keeps there."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(fn())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = in_thread(lambda: main(list(argv), out=out))
    return code, out.getvalue()


def runs(url: str) -> list[Run]:
    async def fetch() -> list[Run]:
        engine = make_engine(url)
        try:
            async with make_session_factory(engine)() as session:
                return list((await session.scalars(select(Run).order_by(Run.id))).all())
        finally:
            await engine.dispose()

    return in_thread(lambda: asyncio.run(fetch()))


def test_init_seed_run_report(db_url: str) -> None:
    assert cli("--database-url", db_url, "init-db") == (
        0,
        f"schema ready in {make_engine(db_url).url.render_as_string(hide_password=True)}\n",
    )
    code, out = cli("--database-url", db_url, "seed", "--markets", "25")
    assert (code, out) == (0, "seeded 25 market(s); 25 in total\n")
    assert cli("--database-url", db_url, "seed", "--markets", "25")[1].startswith("seeded 0 ")
    assert cli("--database-url", db_url, "report") == (0, "no runs yet\n")

    # The simulator is started in-process, over real loopback HTTP.
    code, out = cli("--database-url", db_url, "run", "--limit", "4", *FAST, *QUIET_SIM)
    assert code == 0, out
    assert "upstream: simulator on http://127.0.0.1:" in out
    assert "outcomes: 4 success; retries 0; saved predictions 4" in out
    assert "goal (>= 90% predicted): MET" in out
    [run] = runs(db_url)
    assert (run.status, run.total, run.success) == ("ok", 4, 4)

    code, out = cli("--database-url", db_url, "report", "--last", "5")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["run", "started", "(UTC)"]
    assert row.split()[0] == str(run.id)
    assert " ok " in row
    assert "c=4 t=60.0 d=300.0 x0.05" in row


def test_run_json_and_a_missed_goal_exits_1(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"
    assert cli("--database-url", url, "seed", "--markets", "3")[0] == 0
    # Nothing listens on port 9 of loopback: every call is refused (transient, retried).
    code, out = cli(
        "--database-url", url, "run", *FAST, "--attempts", "2", "--json",
        "--upstream-url", "http://127.0.0.1:9",
    )  # fmt: skip
    assert code == 1
    body = json.loads(out)
    assert body["status"] == "failed"
    assert body["counts"]["error"] == 3
    assert all(m["attempts"] == 2 for m in body["markets"])
    assert all("ConnectError" in m["error"] for m in body["markets"])
    assert [r.status for r in runs(url)] == ["failed"]


def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions-demo.db").write_text("stale")  # replaced, not reused
    code, out = cli("demo", "--time-factor", "0.02", "--markets", "12")
    assert "-- cron tick 1, the old settings" in out
    assert "-- cron tick 2, settings that fit a 60 s cron" in out
    assert "summary: tick 1 predicted " in out
    first, second = runs("sqlite+aiosqlite:///predictions-demo.db")
    assert first.total == second.total == 12
    assert first.config["concurrency"] == 3
    assert second.config["concurrency"] == 10
    # The exit code is the last run's goal, as recorded.
    assert code == (0 if second.status == "ok" else 1)
    assert f"goal of the last run: {'MET' if code == 0 else 'MISSED'}" in out


def test_database_url_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert database_url() == "sqlite+aiosqlite:///predictions.db"
    assert database_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db:5432/app")
    assert database_url() == "postgresql+asyncpg://u:p@db:5432/app"
    assert database_url("postgresql://h/d") == "postgresql+asyncpg://h/d"


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        cli()
    assert info.value.code == 2
