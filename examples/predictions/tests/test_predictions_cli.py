"""The command line, as an operator runs it: the real ``predictions`` script in a subprocess."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest

from predictions.cli import EXIT, _demo_exit_code, _parser
from predictions.db import database_url
from predictions.testing import FAST, PREDICTIONS, QUIET_SIM, env, predictions, runs

if TYPE_CHECKING:
    from collections.abc import Iterator

    from predictions.pipeline import RunResult

README = Path(__file__).parents[1] / "README.md"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty working directory: commands must create nothing they were not asked to."""
    path = tmp_path / "cwd"
    path.mkdir()
    return path


def test_init_seed_run_report(db_url: str, workdir: Path) -> None:
    done = predictions("--database-url", db_url, "init-db", cwd=workdir)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("schema ready in ")
    done = predictions("--database-url", db_url, "seed", "--markets", "25", cwd=workdir)
    assert (done.returncode, done.stdout) == (0, "seeded 25 market(s); 25 in total\n")
    done = predictions("report", "--database-url", db_url, cwd=workdir)  # after the command too
    assert (done.returncode, done.stdout) == (0, "no runs yet\n")

    done = predictions("--database-url", db_url, "run", "--limit", "4", *FAST, *QUIET_SIM)
    assert done.returncode == 0, done.stderr
    # Stdout: the table only. Stderr: where the upstream is.
    assert "upstream: simulator on http://127.0.0.1:" in done.stderr
    assert "upstream:" not in done.stdout
    assert "outcomes: 4 success; retries 0; saved predictions 4" in done.stdout
    assert "goal (>= 90% predicted): MET; status ok, reason goal_met" in done.stdout
    [run] = runs(db_url)
    assert (run.status, run.total, run.success) == ("ok", 4, 4)

    done = predictions("--database-url", db_url, "report", "--last", "5")
    assert done.returncode == 0
    header, row = done.stdout.splitlines()
    assert header.split()[:3] == ["run", "started", "(UTC)"]
    assert "wall (s)" in header
    assert row.split()[0] == str(run.id)
    assert " ok " in row
    assert "c=10 t=60.0 d=300.0 x0.02" in row


def test_defaults_are_the_settings_that_fit_the_cron(workdir: Path) -> None:
    """Item 1: ``run`` and ``serve`` default to what ``demo`` uses, not the old 3/30/55."""
    url = f"sqlite:///{workdir / 'p.db'}"
    assert predictions("--database-url", url, "seed", "--markets", "2").returncode == 0
    done = predictions("--database-url", url, "run", "--time-factor", "0.02", *QUIET_SIM, "--json")
    # 0 or 1: at this time factor a busy machine may time a market out; not the point here.
    assert done.returncode in (0, 1), done.stderr
    config = json.loads(done.stdout)["config"]
    assert (config["concurrency"], config["timeout"], config["deadline"]) == (10, 20.0, 55.0)
    for command in ("run", "serve"):
        text = " ".join(predictions(command, "--help").stdout.split())
        assert "markets in flight (default: 10)" in text
        assert "per market, seconds (default: 20.0)" in text
        assert "whole run, seconds (default: 55.0)" in text


def test_run_json_is_the_only_thing_on_stdout_and_a_missed_goal_exits_1(tmp_path: Path) -> None:
    """Item 7; and an upstream that refuses every call is named as the reason."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"
    assert predictions("--database-url", url, "seed", "--markets", "3").returncode == 0
    # Nothing listens on port 9 of loopback: every call is refused (transient, retried).
    done = predictions(
        "--database-url", url, "run", *FAST, "--attempts", "2", "--json",
        "--upstream-url", "http://127.0.0.1:9",
    )  # fmt: skip
    assert done.returncode == EXIT["failed"] == 1
    body = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert (body["status"], body["reason"]) == ("failed", "upstream_unavailable")
    assert body["counts"]["error"] == 3
    assert all(m["attempts"] == 2 for m in body["markets"])
    assert all("ConnectError" in m["error"] for m in body["markets"])
    assert done.stderr.startswith("upstream: http://127.0.0.1:9")
    assert [r.status for r in runs(url)] == ["failed"]


def test_the_upstream_url_from_the_environment_is_never_printed_whole(tmp_path: Path) -> None:
    """``--help`` names ``$PREDICTIONS_UPSTREAM_URL`` but never shows its value; the run's
    stderr line hides the URL's user and password."""
    secret = env(PREDICTIONS_UPSTREAM_URL="http://user:s3cret@127.0.0.1:9")
    helped = predictions("run", "--help", environ=secret)
    assert "$PREDICTIONS_UPSTREAM_URL" in helped.stdout
    assert "s3cret" not in helped.stdout
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert predictions("--database-url", url, "seed", "--markets", "1").returncode == 0
    done = predictions("--database-url", url, "run", *FAST, "--attempts", "1", environ=secret)
    assert done.returncode == EXIT["failed"], done.stderr  # nothing listens on port 9
    assert done.stderr.startswith("upstream: http://***@127.0.0.1:9"), done.stderr
    assert "s3cret" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("status", "code"), [("ok", 0), ("failed", 0), ("interrupted", 1), ("empty", 3)]
)
def test_the_demo_exits_0_on_a_missed_goal_but_not_when_interrupted(status: str, code: int) -> None:
    """A slow machine may miss the demo's goal: that is in its summary, not its exit code
    (``run`` still exits 1 for it)."""
    assert _demo_exit_code(cast("RunResult", SimpleNamespace(status=status))) == code


def test_an_empty_market_table_is_not_success(db_url: str) -> None:
    """Item 2: status ``empty``, reason ``no_active_markets``, exit code 3."""
    assert predictions("--database-url", db_url, "init-db").returncode == 0
    done = predictions("--database-url", db_url, "run", *FAST, "--json")
    assert done.returncode == EXIT["empty"] == 3
    body = json.loads(done.stdout)
    assert (body["status"], body["reason"], body["goal_met"], body["total"]) == (
        "empty", "no_active_markets", False, 0
    )  # fmt: skip
    assert [r.status for r in runs(db_url)] == ["empty"]
    text = predictions("--database-url", db_url, "run", *FAST)
    assert "no active market to predict: status empty, reason no_active_markets" in text.stdout


def test_each_run_draws_its_own_seed_unless_given(tmp_path: Path) -> None:
    """Item 3: the simulator's seed is new per run (printed), or the one ``--seed`` gives."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert predictions("--database-url", url, "seed", "--markets", "1").returncode == 0
    seeds = []
    for extra in ([], [], ["--seed", "42"]):
        done = predictions("--database-url", url, "run", *FAST, *QUIET_SIM, *extra)
        assert done.returncode == 0, done.stderr
        match = re.search(r"seed (\d+), --seed to replay", done.stderr)
        assert match, done.stderr
        seeds.append(int(match[1]))
    assert seeds[0] != seeds[1]  # 1 in 2**31 to collide
    assert seeds[2] == 42


def test_times_are_real_world_seconds_labelled(tmp_path: Path) -> None:
    """Item 4: configured and measured times in one unit, real-world seconds, labelled."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert predictions("--database-url", url, "seed", "--markets", "1").returncode == 0
    hang = ["--error-rate", "0", "--rate-limit-rate", "0", "--hang-rate", "1"]
    argv = ["--database-url", url, "run", "--time-factor", "0.02", "--timeout", "20"]
    argv += ["--deadline", "300", "--attempts", "1", *hang]
    table = predictions(*argv)
    assert table.returncode == 1
    assert "times in real-world seconds (measured seconds / time factor 0.02)" in table.stdout
    assert "timeout=20 s" in table.stdout
    assert "ItemTimeout: timed out after 20 s" in table.stdout  # not the measured 0.4 s
    [row] = [line for line in table.stdout.splitlines() if " timeout " in line]
    assert float(row.split()[3]) >= 20.0  # the time column: real-world seconds too
    body = json.loads(predictions(*argv, "--json").stdout)
    assert body["units"] == "real-world seconds (measured seconds / time_factor)"
    [market] = body["markets"]
    assert market["error"] == "ItemTimeout: timed out after 20 s"
    assert market["elapsed"] >= 20.0
    assert body["wall_time"] >= 20.0 > body["measured_wall_time"]


BAD_INPUT = [
    (["run", "--limit", "-5"], "argument --limit: must be an integer in [1, 1000], got -5"),
    (["run", "--concurrency", "0"], "argument --concurrency: must be an integer in [1, 1000]"),
    (["run", "--timeout", "0"], "argument --timeout: must be a number > 0, got 0"),
    (["run", "--deadline", "-1"], "argument --deadline: must be a number > 0, got -1"),
    (["run", "--min-success", "2"], "argument --min-success: must be a number in [0, 1], got 2"),
    (["run", "--attempts", "x"], "argument --attempts: must be an integer in [1, 100], got 'x'"),
    (["run", "--error-rate", "0.6", "--hang-rate", "0.5"], "--error-rate + --rate-limit-rate"),
    (["serve", "--port", "70000"], "argument --port: must be an integer in [0, 65535]"),
    (["seed", "--markets", "0"], "argument --markets: must be an integer in [1, 100000]"),
    (["report", "--last", "0"], "argument --last: must be an integer in [1, 10000], got 0"),
    (["demo", "--time-factor", "0"], "argument --time-factor: must be a number > 0, got 0"),
    (["--database-url", "mysql://h/d", "report"], "--database-url: must be a sqlite or"),
    (["serve", "--host", "0.0.0.0"], "--host 0.0.0.0: serving beyond loopback needs"),
    (["run", "--unknown"], "unrecognized arguments: --unknown"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(
    argv: list[str], message: str, workdir: Path
) -> None:
    """Item 8: one line naming the option and its valid range, exit 2, no file created."""
    done = predictions(*argv, cwd=workdir)
    assert done.returncode == EXIT["usage"] == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert message in done.stderr
    assert list(workdir.iterdir()) == []


def test_report_on_a_fresh_database_creates_nothing(db_url: str, workdir: Path) -> None:
    """Item 8: no traceback, no empty ``predictions.db`` left behind."""
    done = predictions("report", cwd=workdir)  # the default database: ./predictions.db
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "no runs yet (no database at predictions.db)\n"
    assert list(workdir.iterdir()) == []
    done = predictions("--database-url", db_url, "report", cwd=workdir)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("no runs yet")
    assert list(workdir.iterdir()) == []


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql://nobody:s3cret@/nowhere?host={tmp_path / 'no-server'}"
    done = predictions("--database-url", url, "run", *FAST)
    assert done.returncode == EXIT["unavailable"] == 69
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("predictions: database unavailable (postgresql+asyncpg://")
    assert "s3cret" not in done.stderr


def _options(command: str) -> Iterator[tuple[str, object]]:
    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]  # type: ignore[index]
    for action in sub._actions:
        if action.option_strings and action.help and action.default is not None:
            yield action.option_strings[-1], action.default


@pytest.mark.parametrize("command", ["seed", "run", "report", "serve", "demo", "simulator"])
def test_every_help_shows_the_defaults(command: str) -> None:
    """Item 8: ``--help`` says the default of every option that has one."""
    text = " ".join(predictions(command, "--help").stdout.split())
    options = dict(_options(command))
    assert options
    for option, default in options.items():
        if option in ("--help", "--database-url") or default is False:
            continue
        assert re.search(rf"{option} \S+ .*?\(default: {re.escape(str(default))}\)", text), option


def test_log_shows_the_apps_and_batchkits_records_only(tmp_path: Path) -> None:
    """Item 9: ``--log`` is batchkit's events, not httpx's line per request."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert predictions("--database-url", url, "seed", "--markets", "2").returncode == 0
    done = predictions("--database-url", url, "run", *FAST, *QUIET_SIM, "--log")
    assert done.returncode == 0
    assert "INFO batchkit: batch started name=predictions total=2" in done.stderr
    assert "HTTP Request" not in done.stderr
    # batchkit's lines count measured seconds; the stderr says so beside the tables' unit.
    assert (
        "batchkit's log lines: measured seconds (time factor 0.02: 1 measured s = 50 "
        "real-world s); the tables: real-world seconds"
    ) in done.stderr
    everything = predictions("--database-url", url, "run", *FAST, *QUIET_SIM, "--log-all")
    assert "INFO httpx: HTTP Request: GET http://127.0.0.1:" in everything.stderr


def test_the_readme_commands_work_as_written() -> None:
    """Item 10: the README shows ``.venv/bin/predictions ...``; each parses, and it exists."""
    commands = [
        shlex.split(line.split("$ ", 1)[1].split("  #")[0])
        for line in README.read_text().splitlines()
        if line.startswith("$ .venv/bin/predictions")
    ]
    assert len(commands) >= 6
    assert PREDICTIONS.name == "predictions"
    assert PREDICTIONS.exists()
    seen = set()
    for argv in commands:
        args = _parser().parse_args(argv[1:])
        seen.add(args.command)
    assert {"init-db", "seed", "run", "report", "serve", "demo", "simulator"} <= seen
    assert predictions("--help").returncode == 0


def test_the_readmes_agree_on_the_demo_s_duration() -> None:
    """The repository's README and this app's say how long the demo takes: the same."""
    said = {}
    for readme in (README, README.parents[2] / "README.md"):
        found = re.findall(r"the demo takes\s+about (\d+) s", readme.read_text(), re.IGNORECASE)
        assert found, f"{readme} does not say how long the demo takes"
        said[readme.parent.name or "."] = set(found)
    assert len({frozenset(v) for v in said.values()}) == 1, said


def test_database_url_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert database_url() == "sqlite+aiosqlite:///predictions.db"
    assert database_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db:5432/app")
    assert database_url() == "postgresql+asyncpg://u:p@db:5432/app"
    assert database_url("postgresql://h/d") == "postgresql+asyncpg://h/d"


def test_demo_uses_the_given_database_and_shows_a_market_recover(
    db_url: str, workdir: Path
) -> None:
    """Items 1, 3, 6: the ticks on the defaults; the market down in tick 1 is predicted by
    tick 3, which resumes tick 2 (a real ``run`` process killed with SIGKILL) from its
    journal; ``--database-url`` is honoured (no ``predictions-demo.db`` appears)."""
    # The default time factor (0.2): a busy machine's HTTP overhead stays small next to it.
    argv = ["demo", "--database-url", db_url, "--markets", "6", "--seed", "3"]
    done = predictions(*argv, cwd=workdir)
    assert "-- cron tick 1 (the upstream is down for BTC-100K-DEC)" in done.stdout
    assert "-- cron tick 2 (the outage is over; the tick is killed with SIGKILL)" in done.stdout
    killed = re.search(r"killed with SIGKILL \(pid \d+\): (\d+) market\(s\) predicted", done.stdout)
    assert killed, done.stdout
    first, second, third = runs(db_url)
    assert second.status == "crashed"  # the kill left it running; tick 3 marked it
    assert first.total == third.total == 6
    assert first.config["concurrency"] == third.config["concurrency"] == 10
    assert first.config["timeout"] == third.config["timeout"] == 20
    # Tick 3 kept tick 2's journal and resumed what its journal held at the kill.
    assert third.config["journal"] == second.config["journal"] == f"predictions-run-{second.id}"
    resumed = int(killed[1])
    assert resumed >= 2  # a third of 6 markets, at least
    assert (
        f"tick 3 resumed {resumed} market(s) from the killed tick 2's journal and ran only "
        f"the other {6 - resumed}." in done.stdout
    )
    recovered = re.search(r"failed in tick 1, predicted by tick 3: (.*)", done.stdout)
    assert recovered, done.stdout
    assert "BTC-100K-DEC" in recovered[1].split(", ")
    assert done.returncode == 0, done.stderr  # goal met or missed: the demo ran
    assert list(workdir.iterdir()) == []


def test_demo_json_on_database_url_from_the_environment(workdir: Path) -> None:
    url = f"sqlite:///{workdir.parent / 'env.db'}"
    done = predictions(
        "demo", "--time-factor", "0.02", "--markets", "6", "--json",
        cwd=workdir, environ=env(DATABASE_URL=url),
    )  # fmt: skip
    body = json.loads(done.stdout)
    assert [b["total"] for b in body] == [6, 6]
    assert "database: sqlite+aiosqlite:///" in done.stderr
    assert len(runs(url)) == 3  # the killed tick's record too (or its finished one)
    assert list(workdir.iterdir()) == []


def test_otel_exports_batchkits_spans_and_metrics_to_stderr(tmp_path: Path) -> None:
    """``--otel`` with no OTLP environment: one JSON span or metrics batch a line on stderr;
    the run span's attempts are its children, and stdout stays the summary alone."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert predictions("--database-url", url, "seed", "--markets", "2").returncode == 0
    quiet = env(OTEL_EXPORTER_OTLP_ENDPOINT="", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="")
    done = predictions(
        "--database-url", url, "run", *FAST, *QUIET_SIM, "--otel", "--json", environ=quiet
    )
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)  # stdout is still the summary only
    assert "otel: spans and metrics to the console" in done.stderr
    docs = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    spans = [d for d in docs if "context" in d and "name" in d]
    (run,) = [s for s in spans if s["name"] == "batchkit.run predictions"]
    attempts = [s for s in spans if s["name"] == "batchkit.attempt"]
    assert len(attempts) >= 2
    assert {a["parent_id"] for a in attempts} == {run["context"]["span_id"]}
    assert run["attributes"]["batchkit.items.success"] == 2
    assert run["resource"]["attributes"]["service.name"] == "predictions"
    names = {
        m["name"]
        for d in docs
        for rm in d.get("resource_metrics", [])
        for sm in rm["scope_metrics"]
        for m in sm["metrics"]
    }
    assert {"batchkit.items", "batchkit.attempts", "batchkit.item.duration"} <= names
