"""``python -m predictions``: init-db, seed, run, report, serve, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sqlalchemy import select

import batchkit

from .db import database_url, make_engine, make_session_factory
from .models import Run, count_markets, create_schema, seed_markets
from .pipeline import RunConfig, RunResult, run_job
from .simulator import SimulatorConfig, serve_simulator
from .upstream import SignalsUnavailable, UpstreamClient, UpstreamURLs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

__all__ = ["main"]

UPSTREAM_ENV = "PREDICTIONS_UPSTREAM_URL"
DEMO_DATABASE = "predictions-demo.db"

# The configuration that fits a 60 s cron (see docs/from-batches-to-batchkit.md): the
# seed job's concurrency=3, timeout=30 cannot fit 20 markets of 10-15 s into 55 s.
CRON_FIT = {"concurrency": 10, "timeout": 20.0, "deadline": 55.0}


# ------------------------------------------------------------------------------ arguments
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predictions",
        description="Market predictions from slow, flaky upstream APIs, on batchkit.",
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="SQLAlchemy URL (default: $DATABASE_URL, else sqlite in ./predictions.db)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("init-db", help="create the tables")

    seed = sub.add_parser("seed", help="insert a realistic set of markets")
    seed.add_argument("--markets", type=int, default=20, help="how many (default 20)")

    run = sub.add_parser("run", help="run the job once and print its summary")
    _run_args(run)
    _upstream_args(run)
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--log", action="store_true", help="log batchkit events (INFO)")

    report = sub.add_parser("report", help="the last runs")
    report.add_argument("--last", type=int, default=10)

    serve = sub.add_parser("serve", help="HTTP service: POST /predictions/generate, GET /health")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    _run_args(serve)
    _upstream_args(serve)

    demo = sub.add_parser("demo", help="everything, embedded: SQLite file, simulated upstream")
    demo.add_argument("--markets", type=int, default=20)
    demo.add_argument(
        "--time-factor",
        type=float,
        default=0.2,
        help="scale real-world durations (10-15 s calls, 55 s deadline); default 0.2",
    )
    demo.add_argument("--seed", type=int, default=1, help="the simulator's random seed")
    demo.add_argument("--json", action="store_true", help="print both runs as JSON")
    return p


def _run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run", "durations in real-world seconds (see --time-factor)")
    g.add_argument("--limit", type=int, default=20, help="markets per run (default 20)")
    g.add_argument("--concurrency", type=int, default=3, help="markets in flight (default 3)")
    g.add_argument("--timeout", type=float, default=30.0, help="per market (default 30)")
    g.add_argument("--deadline", type=float, default=55.0, help="whole run (default 55)")
    g.add_argument("--attempts", type=int, default=3, help="per market, retries included")
    g.add_argument(
        "--min-success",
        type=float,
        default=0.9,
        help="the goal: share of markets predicted, else exit code 1 (default 0.9)",
    )


def _upstream_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("upstream")
    g.add_argument(
        "--upstream-url",
        default=os.environ.get(UPSTREAM_ENV),
        help=f"base URL of the APIs (${UPSTREAM_ENV}); default: start the simulator",
    )
    g.add_argument("--time-factor", type=float, default=1.0, help="simulator speed-up")
    g.add_argument("--error-rate", type=float, default=0.02, help="simulator: 503 rate")
    g.add_argument("--rate-limit-rate", type=float, default=0.03, help="simulator: 429 rate")
    g.add_argument("--hang-rate", type=float, default=0.01, help="simulator: hang rate")
    g.add_argument("--seed", type=int, default=0, help="simulator: random seed")


def _config(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    values: dict[str, Any] = {
        "limit": args.limit,
        "concurrency": args.concurrency,
        "timeout": args.timeout,
        "deadline": args.deadline,
        "attempts": args.attempts,
        "min_success_ratio": args.min_success,
        "time_factor": args.time_factor,
    }
    values.update(overrides)
    return RunConfig(**values)


def _simulator(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(
        error_rate=args.error_rate,
        rate_limit_rate=args.rate_limit_rate,
        hang_rate=args.hang_rate,
        time_factor=args.time_factor,
        seed=args.seed,
    )


@asynccontextmanager
async def _upstream(
    args: argparse.Namespace, out: TextIO, simulator: SimulatorConfig | None = None
) -> AsyncIterator[UpstreamClient]:
    """A client for ``--upstream-url``, or for the simulator started here for the block."""
    async with AsyncExitStack() as stack:
        given: str | None = getattr(args, "upstream_url", None)
        if given is not None:
            base = given
        else:
            sim = simulator or _simulator(args)
            base, _app = await stack.enter_async_context(serve_simulator(sim))
            print(
                f"upstream: simulator on {base} (calls {sim.latency[0]:g}-{sim.latency[1]:g} s "
                f"x time factor {sim.time_factor:g}; 503 {sim.error_rate:.0%}, "
                f"429 {sim.rate_limit_rate:.0%}, hang {sim.hang_rate:.0%})",
                file=out,
            )
        yield await stack.enter_async_context(UpstreamClient(UpstreamURLs.single(base)))


def _observers(log: bool) -> list[batchkit.Observer]:
    if not log:
        return []
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return [batchkit.LoggingObserver()]


# ------------------------------------------------------------------------------- summary
def _describe(error: BaseException) -> str:
    if isinstance(error, batchkit.ItemSkipped | batchkit.ItemCancelled):
        return f"{error.reason}: first in line next run"
    if isinstance(error, SignalsUnavailable):
        return f"SignalsUnavailable: {error.message}"
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 70 else text[:67] + "..."


def format_result(result: RunResult, title: str = "") -> str:
    r = result.report
    c = result.config
    f = c.time_factor
    lines = [f"== run {result.run_id}{': ' + title if title else ''} =="]
    lines.append(
        f"config: limit={c.limit} concurrency={c.concurrency} timeout={c.timeout:g}s "
        f"deadline={c.deadline:g}s attempts={c.attempts}"
        + (f" (time factor {f:g})" if f != 1 else "")
    )
    lines.append(f"{'market':<24}{'outcome':<11}{'tries':>5}{'time':>9}  result")
    for o in r:
        if isinstance(o, batchkit.Success):
            outcome = "success"
            detail = f"p={o.value.probability:.3f} confidence={o.value.confidence:.2f}"
        else:
            outcome = o.kind
            detail = _describe(o.error)
        lines.append(
            f"{o.item.symbol:<24}{outcome:<11}{o.attempts:>5}{o.elapsed / f:>8.1f}s  {detail}"
        )
    counts = ", ".join(f"{v} {k}" for k, v in r.counts.items() if v) or "no markets"
    lines.append(f"outcomes: {counts}; retries {r.retries}; saved predictions {result.saved}")
    wall = f"{r.wall_time / f:.1f}s" + (
        f" (measured {r.wall_time:.2f}s at x{f:g})" if f != 1 else ""
    )
    lines.append(
        f"wall time: {wall} against a {c.deadline:g}s deadline"
        f"{' (the deadline stopped the run)' if r.deadline_hit else ''}; "
        f"sum of market times {r.item_time / f:.1f}s (what one market at a time would wait)"
    )
    if r.deadline_hit and r.counts["skipped"] and r.wall_time < c.deadline * f:
        lines.append(
            f"(no market may start after {c.deadline - c.timeout:g}s: its {c.timeout:g}s "
            "timeout would not fit before the deadline, so the rest were skipped)"
        )
    lines.append(
        f"goal (>= {c.min_success_ratio:.0%} predicted): "
        + ("MET" if result.goal_met else "MISSED")
        + (
            f"; {r.counts['skipped'] + r.counts['cancelled']} market(s) go first next run"
            if r.counts["skipped"] + r.counts["cancelled"]
            else ""
        )
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ commands
async def _init_db(url: str, out: TextIO) -> int:
    engine = make_engine(url)
    try:
        await create_schema(engine)
    finally:
        await engine.dispose()
    print(f"schema ready in {engine.url.render_as_string(hide_password=True)}", file=out)
    return 0


async def _seed(url: str, n: int, out: TextIO) -> int:
    engine = make_engine(url)
    try:
        await create_schema(engine)
        sf = make_session_factory(engine)
        added = await seed_markets(sf, n)
        total = await count_markets(sf)
    finally:
        await engine.dispose()
    print(f"seeded {added} market(s); {total} in total", file=out)
    return 0


async def _run(url: str, args: argparse.Namespace, out: TextIO) -> int:
    engine = make_engine(url)
    try:
        sf = make_session_factory(engine)
        await create_schema(engine)
        async with _upstream(args, out) as client:
            result = await run_job(
                sf,
                client,
                _config(args),
                observers=_observers(args.log),
                progress=sys.stderr.isatty(),
            )
    finally:
        await engine.dispose()
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result), file=out)
    return 0 if result.goal_met else 1


async def _report(url: str, last: int, out: TextIO) -> int:
    engine = make_engine(url)
    try:
        sf: async_sessionmaker[AsyncSession] = make_session_factory(engine)
        async with sf() as session:
            runs = (await session.scalars(select(Run).order_by(Run.id.desc()).limit(last))).all()
    finally:
        await engine.dispose()
    if not runs:
        print("no runs yet", file=out)
        return 0
    print(
        f"{'run':>4} {'started (UTC)':<20}{'status':<9}{'total':>6}{'ok':>5}{'err':>5}"
        f"{'t/o':>5}{'canc':>5}{'skip':>5}{'retry':>6}{'wall':>9}  deadline  config",
        file=out,
    )
    for run in runs:
        cfg = run.config
        f = float(cfg.get("time_factor", 1.0))
        wall = "-" if run.wall_time is None else f"{run.wall_time / f:.1f}s"
        print(
            f"{run.id:>4} {run.started_at:%Y-%m-%d %H:%M:%S} {run.status:<9}{run.total:>6}"
            f"{run.success:>5}{run.error:>5}{run.timed_out:>5}{run.cancelled:>5}{run.skipped:>5}"
            f"{run.retries:>6}{wall:>9}  {'hit' if run.deadline_hit else '-':<8}  "
            f"c={cfg.get('concurrency')} t={cfg.get('timeout')} d={cfg.get('deadline')}"
            + (f" x{f:g}" if f != 1 else ""),
            file=out,
        )
    return 0


async def _serve(url: str, args: argparse.Namespace, out: TextIO) -> int:
    from .service import create_app

    engine = make_engine(url)
    try:
        await create_schema(engine)
        sf = make_session_factory(engine)
        async with _upstream(args, out) as client:
            app = create_app(engine=engine, session_factory=sf, client=client, config=_config(args))
            import uvicorn

            server = uvicorn.Server(
                uvicorn.Config(app, host=args.host, port=args.port, log_level="info")
            )
            await server.serve()
    finally:
        await engine.dispose()
    return 0


async def _demo(args: argparse.Namespace, out: TextIO) -> int:
    db = Path(DEMO_DATABASE)
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.unlink(missing_ok=True)  # every demo starts from the same empty database
    url = f"sqlite+aiosqlite:///{db}"
    f = args.time_factor
    sim = SimulatorConfig(
        error_rate=0.02, rate_limit_rate=0.03, hang_rate=0.01, time_factor=f, seed=args.seed
    )
    engine = make_engine(url)
    results: list[tuple[str, RunResult]] = []
    try:
        await create_schema(engine)
        sf = make_session_factory(engine)
        await seed_markets(sf, args.markets)
        print(f"database: {db} ({args.markets} markets)", file=out)
        ns = argparse.Namespace(upstream_url=None)
        async with _upstream(ns, out, sim) as client:
            plan = [
                (
                    "cron tick 1, the old settings (concurrency 3, timeout 30)",
                    RunConfig(limit=args.markets, concurrency=3, timeout=30.0, time_factor=f),
                ),
                (
                    "cron tick 2, settings that fit a 60 s cron (concurrency 10, timeout 20)",
                    RunConfig(limit=args.markets, time_factor=f, **CRON_FIT),  # type: ignore[arg-type]
                ),
            ]
            for title, config in plan:
                print(f"\n-- {title} ...", file=out, flush=True)
                result = await run_job(sf, client, config, progress=sys.stderr.isatty())
                results.append((title, result))
                if not args.json:
                    print(format_result(result, title), file=out)
    finally:
        await engine.dispose()
    if args.json:
        print(json.dumps([r.to_dict() for _, r in results], indent=2), file=out)
    else:
        first, second = results[0][1], results[1][1]
        carried = first.report.counts["skipped"] + first.report.counts["cancelled"]
        print(
            f"\nsummary: tick 1 predicted {first.report.counts['success']}/{len(first.report)} "
            f"and ended on time; its {carried} unfinished market(s) went first in tick 2, "
            f"which predicted {second.report.counts['success']}/{len(second.report)} in "
            f"{second.report.wall_time / f:.1f}s (real-world seconds; measured "
            f"{second.report.wall_time:.2f}s at time factor {f:g}).\n"
            f"goal of the last run: {'MET' if second.goal_met else 'MISSED'}. "
            f"See the runs: python -m predictions --database-url sqlite:///{db} report",
            file=out,
        )
    return 0 if results[-1][1].goal_met else 1


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """The CLI. Returns the exit code: 0 when the command (and a run's goal) succeeded."""
    args = _parser().parse_args(argv)
    stdout = out if out is not None else sys.stdout
    url = database_url(args.database_url)
    command: str = args.command
    if command == "init-db":
        return asyncio.run(_init_db(url, stdout))
    if command == "seed":
        return asyncio.run(_seed(url, args.markets, stdout))
    if command == "run":
        return asyncio.run(_run(url, args, stdout))
    if command == "report":
        return asyncio.run(_report(url, args.last, stdout))
    if command == "serve":
        return asyncio.run(_serve(url, args, stdout))
    assert command == "demo"
    return asyncio.run(_demo(args, stdout))
