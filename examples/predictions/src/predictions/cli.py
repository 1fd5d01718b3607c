"""``predictions``: init-db, seed, run, report, serve, demo, simulator.

Stdout carries a command's result only (a table, or JSON with ``--json``); every other line
(where the upstream is, which database, progress, logs) goes to stderr.

Exit codes: 0 done (a run met its goal; ``demo``: both ticks ran, goal met or not); 1 a run
missed its goal or was interrupted; 2 bad input (one line naming the option and its valid
range; nothing was created); 3 nothing to do (no active market); 69 the database is
unavailable; 75 another run holds the lock (try again later). A run stopped by SIGTERM/SIGINT
records its partial result and releases the lock first.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import signal
import sys
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy.exc
from sqlalchemy import inspect, select
from sqlalchemy.engine import make_url

import batchkit

from .db import database_url, hide_password, make_engine, make_session_factory
from .lock import LEASE_SECONDS, LeaseLost, RunInProgress, default_holder
from .models import Run, count_markets, create_schema, seed_markets
from .pipeline import RunConfig, RunResult, Stop, describe_error, run_job
from .simulator import SimulatorConfig, create_simulator, serve_simulator
from .telemetry import telemetry
from .upstream import SignalsUnavailable, UpstreamClient, UpstreamURLs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from starlette.applications import Starlette

__all__ = ["EXIT", "main"]

log = logging.getLogger("predictions")

UPSTREAM_ENV = "PREDICTIONS_UPSTREAM_URL"
TOKEN_ENV = "PREDICTIONS_TOKEN"
DEMO_DATABASE = "predictions-demo.db"
MAX_LIMIT = 1000
DEFAULTS = RunConfig()

EXIT = {
    "ok": 0,
    "failed": 1,
    "interrupted": 1,
    "usage": 2,
    "empty": 3,
    "unavailable": 69,  # sysexits EX_UNAVAILABLE
    "busy": 75,  # sysexits EX_TEMPFAIL: another run holds the lock, try again later
}


# ------------------------------------------------------------------------------ arguments
class _Parser(argparse.ArgumentParser):
    """Bad input is one line (``predictions run: error: argument --limit: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(
    kind: type[int] | type[float], low: float | None, high: float | None, *, open_low: bool = False
) -> Callable[[str], Any]:
    """An argparse type: ``kind`` within [low, high] (``(low, high]`` with ``open_low``)."""
    if low is None:
        valid = f"<= {high:g}"
    elif high is None:
        valid = f"{'>' if open_low else '>='} {low:g}"
    else:
        valid = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} {valid}, got {text!r}") from None
        too_low = low is not None and (value <= low if open_low else value < low)
        if too_low or (high is not None and value > high) or value != value:
            raise argparse.ArgumentTypeError(f"must be {what} {valid}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


POSITIVE = _number(float, 0, None, open_low=True)
RATE = _number(float, 0, 1)


def _subparser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    # Also accepted after the command (``demo --database-url ...``); SUPPRESS keeps the
    # global option's value when it is not given here.
    p.add_argument("--database-url", default=argparse.SUPPRESS, help="as the global option")
    return p


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="predictions",
        description="Market predictions from slow, flaky upstream APIs, on batchkit.",
        epilog="Exit codes: 0 ok (demo: both ticks ran), 1 goal missed or interrupted, "
        "2 bad input, 3 no active market, 69 database unavailable, 75 another run holds "
        "the lock.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="SQLAlchemy URL; if not given: $DATABASE_URL, else sqlite in ./predictions.db",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    _subparser(sub, "init-db", "create the tables")

    seed = _subparser(sub, "seed", "insert a realistic set of markets")
    seed.add_argument("--markets", type=_number(int, 1, 100_000), default=20, help="how many")

    run = _subparser(sub, "run", "run the job once and print its summary")
    _run_args(run)
    _upstream_args(run)
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    _log_args(run)

    report = _subparser(sub, "report", "the last runs")
    report.add_argument("--last", type=_number(int, 1, 10_000), default=10, help="how many runs")

    serve = _subparser(sub, "serve", "HTTP service: POST /predictions/generate, GET /health")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_number(int, 0, 65535), default=8000, help="port")
    serve.add_argument(
        "--insecure-no-token",
        action="store_true",
        help=f"serve on a non-loopback host without ${TOKEN_ENV} (anyone who reaches the "
        "port may start runs; only behind an authenticating proxy)",
    )
    _run_args(serve)
    _upstream_args(serve)
    _log_args(serve)

    demo = _subparser(
        sub, "demo", "everything, embedded: a fresh SQLite file, the simulated upstream"
    )
    demo.add_argument("--markets", type=_number(int, 1, 1000), default=20, help="how many")
    demo.add_argument(
        "--time-factor",
        type=POSITIVE,
        default=0.2,
        help="scale real-world durations (10-15 s calls, 55 s deadline)",
    )
    demo.add_argument(
        "--seed", type=_number(int, 0, None), default=None, help="simulator seed; default: new"
    )
    demo.add_argument("--json", action="store_true", help="print both runs as JSON on stdout")

    simulator = _subparser(sub, "simulator", "serve the simulated upstream on its own")
    simulator.add_argument("--host", default="127.0.0.1", help="address to listen on")
    simulator.add_argument(
        "--port", type=_number(int, 0, 65535), default=8001, help="port (0: any free one)"
    )
    _simulator_args(simulator)
    return p


def _run_args(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("run", "durations in real-world seconds (see --time-factor)")
    g.add_argument(
        "--limit", type=_number(int, 1, MAX_LIMIT), default=d.limit, help="markets per run"
    )
    g.add_argument(
        "--concurrency", type=_number(int, 1, 1000), default=d.concurrency, help="markets in flight"
    )
    g.add_argument("--timeout", type=POSITIVE, default=d.timeout, help="per market, seconds")
    g.add_argument("--deadline", type=POSITIVE, default=d.deadline, help="whole run, seconds")
    g.add_argument(
        "--attempts",
        type=_number(int, 1, 100),
        default=d.attempts,
        help="per market, retries included",
    )
    g.add_argument(
        "--min-success",
        type=RATE,
        default=d.min_success_ratio,
        help="the goal: share of markets predicted, else exit code 1",
    )
    g.add_argument(
        "--upstream-concurrency",
        type=_number(int, 1, 1000),
        default=d.upstream_concurrency,
        help="markets in flight per upstream host (a limit group each); default: no such limit",
    )
    g.add_argument(
        "--adaptive-max",
        type=_number(int, 1, 1000),
        default=d.adaptive_max,
        help="adapt markets in flight from --concurrency up to this, the limit remembered in "
        "the database between runs; default: --concurrency is fixed",
    )
    g.add_argument(
        "--breaker-open-after",
        type=_number(int, 0, 1000),
        default=d.breaker_open_after,
        help="failed attempts in a row that open the upstream's circuit, kept in the database "
        "across runs (its markets are then skipped); 0 (default): no breaker",
    )
    g.add_argument(
        "--breaker-cool-down",
        type=_number(float, 0, None),
        default=d.breaker_cool_down,
        help="seconds an open circuit skips markets before one probe",
    )
    g.add_argument(
        "--no-journal",
        dest="journal",
        action="store_false",
        help="keep no journal: a tick that did not finish (killed, interrupted) is not resumed "
        "by the next, which predicts all its markets again",
    )
    g.add_argument(
        "--lease-seconds",
        type=POSITIVE,
        default=LEASE_SECONDS,
        help="SQLite: the run lock's lease, renewed by the run; a crashed run blocks no longer",
    )


def _simulator_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("simulated upstream")
    g.add_argument("--time-factor", type=POSITIVE, default=1.0, help="scale real-world durations")
    g.add_argument("--error-rate", type=RATE, default=0.02, help="share of calls answering 503")
    g.add_argument("--rate-limit-rate", type=RATE, default=0.03, help="share answering 429")
    g.add_argument("--hang-rate", type=RATE, default=0.01, help="share that hang")
    g.add_argument(
        "--seed", type=_number(int, 0, None), default=None, help="random seed; default: new per run"
    )


def _upstream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upstream-url",
        default=None,
        # Read from the environment after parsing, so --help never prints its value.
        help=f"base URL of the APIs; if not given: ${UPSTREAM_ENV}, else start the simulator",
    )
    _simulator_args(p)


def _log_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging (stderr)")
    g.add_argument(
        "--log", action="store_true", help="log the app's and batchkit's records at INFO"
    )
    g.add_argument(
        "--log-all", action="store_true", help="also other libraries' INFO records (httpx, ...)"
    )
    g.add_argument(
        "--otel",
        action="store_true",
        help="OpenTelemetry spans and metrics to stderr, or OTLP when OTEL_EXPORTER_OTLP_* is "
        "set (the app's otel extra)",
    )


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Checks across options, and the database URL: the resolved URL, or exit 2."""
    if hasattr(args, "error_rate"):
        total = args.error_rate + args.rate_limit_rate + args.hang_rate
        if total > 1:
            parser.error(
                f"--error-rate + --rate-limit-rate + --hang-rate must be <= 1, got {total:g}"
            )
    url = database_url(getattr(args, "database_url", None))
    try:
        backend = make_url(url).get_backend_name()
    except sqlalchemy.exc.ArgumentError:
        parser.error(f"--database-url: not a database URL: {hide_password(url)!r}")
    if backend not in ("sqlite", "postgresql"):
        parser.error(f"--database-url: must be a sqlite or postgresql URL, got {backend!r}")
    return url


def _config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        limit=args.limit,
        concurrency=args.concurrency,
        timeout=args.timeout,
        deadline=args.deadline,
        attempts=args.attempts,
        min_success_ratio=args.min_success,
        time_factor=args.time_factor,
        upstream_concurrency=args.upstream_concurrency,
        breaker_open_after=args.breaker_open_after,
        breaker_cool_down=args.breaker_cool_down,
        adaptive_max=args.adaptive_max,
        journal=args.journal,
    )


def _simulator(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(
        error_rate=args.error_rate,
        rate_limit_rate=args.rate_limit_rate,
        hang_rate=args.hang_rate,
        time_factor=args.time_factor,
        seed=args.seed if args.seed is not None else secrets.randbelow(2**31),
    )


def _describe_simulator(base: str, sim: SimulatorConfig) -> str:
    return (
        f"upstream: simulator on {base} (calls {sim.latency[0]:g}-{sim.latency[1]:g} s "
        f"x time factor {sim.time_factor:g}; 503 {sim.error_rate:.0%}, "
        f"429 {sim.rate_limit_rate:.0%}, hang {sim.hang_rate:.0%}; seed {sim.seed}, "
        "--seed to replay)"
    )


@asynccontextmanager
async def _upstream(args: argparse.Namespace, err: TextIO) -> AsyncIterator[UpstreamClient]:
    """A client for ``--upstream-url``, or for the simulator started here for the block."""
    async with AsyncExitStack() as stack:
        given: str | None = args.upstream_url or os.environ.get(UPSTREAM_ENV) or None
        if given is None:
            sim = _simulator(args)
            base, _app = await stack.enter_async_context(serve_simulator(sim))
            print(_describe_simulator(base, sim), file=err)
        else:
            base = given
            print(f"upstream: {_hide_userinfo(base)}", file=err)
        yield await stack.enter_async_context(UpstreamClient(UpstreamURLs.single(base)))


def _hide_userinfo(url: str) -> str:
    """``https://user:secret@host/`` -> ``https://***@host/``: stderr may end up in a CI log."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _configure_logging(args: argparse.Namespace) -> list[batchkit.Observer]:
    """WARNING and up from everyone on stderr; with ``--log`` the app's and batchkit's INFO
    records too (not httpx's one line per request, unless ``--log-all``)."""
    logging.basicConfig(
        level=logging.INFO if getattr(args, "log_all", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "log", False) and not getattr(args, "log_all", False):
        return []
    for name in ("predictions", "batchkit"):
        logging.getLogger(name).setLevel(logging.INFO)
    return [batchkit.LoggingObserver()]


@asynccontextmanager
async def _signals_stop(stop: Stop) -> AsyncIterator[None]:
    """SIGTERM/SIGINT ask the run to stop (and record what it has); a second one is final."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def handle(sig: signal.Signals) -> None:
        if stop.event.is_set() and main is not None:
            main.cancel()
            return
        print(f"\n{sig.name}: stopping the run (again to abort)", file=sys.stderr)
        stop.set(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


# ------------------------------------------------------------------------------- summary
def _describe(error: BaseException, config: RunConfig) -> str:
    if isinstance(error, batchkit.ItemSkipped | batchkit.ItemCancelled):
        return f"{error.reason}: first in line next run"
    if isinstance(error, SignalsUnavailable):
        return f"SignalsUnavailable: {error.message}"
    text = describe_error(error, config)
    return text if len(text) <= 70 else text[:67] + "..."


def format_result(result: RunResult, title: str = "") -> str:
    """The run as a table. Every time is in real-world seconds (measured / time factor)."""
    r = result.report
    c = result.config
    f = c.time_factor
    scaled = f" (measured seconds / time factor {f:g})" if f != 1 else ""
    lines = [f"== run {result.run_id}{': ' + title if title else ''} =="]
    lines.append(
        f"config: limit={c.limit} concurrency={c.concurrency} timeout={c.timeout:g} s "
        f"deadline={c.deadline:g} s attempts={c.attempts}; times in real-world seconds{scaled}"
    )
    if not len(r):
        lines.append(
            "no active market to predict: status empty, reason no_active_markets "
            "(seed markets: predictions seed)"
        )
        return "\n".join(lines)
    lines.append(f"{'market':<24}{'outcome':<11}{'tries':>5}{'time (s)':>10}  result")
    for o in r:
        if isinstance(o, batchkit.Success):
            outcome = "resumed" if o.resumed else "success"
            detail = f"p={o.value.probability:.3f} confidence={o.value.confidence:.2f}"
        else:
            outcome = o.kind
            detail = _describe(o.error, c)
        lines.append(
            f"{o.item.symbol:<24}{outcome:<11}{o.attempts:>5}{o.elapsed / f:>10.1f}  {detail}"
        )
    if result.resumed_from is not None:
        lines.append(
            f"resumed run {result.resumed_from} (it did not finish) from journal "
            f"{result.journal}: {r.resumed} market(s) already predicted there were not run "
            f"again, {len(r) - r.resumed} ran"
        )
    counts = ", ".join(f"{v} {k}" for k, v in r.counts.items() if v)
    lines.append(f"outcomes: {counts}; retries {r.retries}; saved predictions {result.saved}")
    measured = f" (measured {r.wall_time:.2f} s)" if f != 1 else ""
    lines.append(
        f"wall time: {r.wall_time / f:.1f} s{measured} against a {c.deadline:g} s deadline"
        f"{' (the deadline stopped the run)' if r.deadline_hit else ''}; "
        f"sum of market times {r.item_time / f:.1f} s (what one market at a time would wait)"
    )
    carried = r.counts["skipped"] + r.counts["cancelled"]
    if result.interrupted:
        lines.append(f"interrupted by {result.interrupted}: the record above is partial")
    lines.append(
        f"goal (>= {c.min_success_ratio:.0%} predicted): "
        + ("MET" if result.goal_met else "MISSED")
        + f"; status {result.status}, reason {result.reason}"
        + (f"; {carried} market(s) go first next run" if carried else "")
    )
    return "\n".join(lines)


def _units_note(f: float, what: str) -> str:
    """batchkit's own progress bar and log lines count measured seconds; the app's tables
    count real-world seconds. Say so once, on stderr, when they differ."""
    if f == 1:
        return f"batchkit's {what}: seconds"
    return (
        f"batchkit's {what}: measured seconds (time factor {f:g}: 1 measured s = "
        f"{1 / f:g} real-world s); the tables: real-world seconds"
    )


def _exit_code(result: RunResult) -> int:
    return EXIT[result.status]


# ------------------------------------------------------------------------------ commands
async def _init_db(url: str, out: TextIO) -> int:
    engine = make_engine(url)
    try:
        await create_schema(engine)
    finally:
        await engine.dispose()
    print(f"schema ready in {hide_password(url)}", file=out)
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


async def _run(url: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    observers = _configure_logging(args)
    with telemetry(args.otel, err) as traced:
        return await _run_with(url, args, out, err, observers, traced)


async def _run_with(
    url: str,
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    observers: list[batchkit.Observer],
    traced: list[batchkit.Observer],
) -> int:
    engine = make_engine(url)
    stop = Stop()
    try:
        sf = make_session_factory(engine)
        await create_schema(engine)
        async with _upstream(args, err) as client, _signals_stop(stop):
            bar, logs = ("progress bar", err.isatty()), ("log lines", bool(observers))
            shown = [what for what, on in (bar, logs) if on]
            if shown and args.time_factor != 1:
                print(_units_note(args.time_factor, " and ".join(shown)), file=err)
            result = await run_job(
                sf,
                client,
                _config(args),
                observers=[*observers, *traced],
                progress=err.isatty(),
                stop=stop,
                holder=default_holder("predictions run"),
                lease_seconds=args.lease_seconds,
            )
    finally:
        await engine.dispose()
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result), file=out)
    return _exit_code(result)


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


async def _report(url: str, last: int, out: TextIO) -> int:
    path = _sqlite_file(url)
    if path is not None and not path.exists():  # do not create an empty file by asking
        print(f"no runs yet (no database at {path})", file=out)
        return 0
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            has_runs = await conn.run_sync(lambda c: inspect(c).has_table(Run.__tablename__))
            runs = (
                (await conn.execute(select(Run).order_by(Run.id.desc()).limit(last))).all()
                if has_runs
                else []
            )
    finally:
        await engine.dispose()
    if not runs:
        print("no runs yet", file=out)
        return 0
    print(
        f"{'run':>4} {'started (UTC)':<20}{'status':<12}{'total':>6}{'ok':>5}{'err':>5}"
        f"{'t/o':>5}{'canc':>5}{'skip':>5}{'retry':>6}{'wall (s)':>9}  deadline  config (s)",
        file=out,
    )
    for run in runs:
        cfg = run.config
        f = float(cfg.get("time_factor", 1.0))
        wall = "-" if run.wall_time is None else f"{run.wall_time / f:.1f}"
        print(
            f"{run.id:>4} {run.started_at:%Y-%m-%d %H:%M:%S} {run.status:<12}{run.total:>6}"
            f"{run.success:>5}{run.error:>5}{run.timed_out:>5}{run.cancelled:>5}{run.skipped:>5}"
            f"{run.retries:>6}{wall:>9}  {'hit' if run.deadline_hit else '-':<8}  "
            f"c={cfg.get('concurrency')} t={cfg.get('timeout')} d={cfg.get('deadline')}"
            + (f" x{f:g}" if f != 1 else ""),
            file=out,
        )
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(url: str, args: argparse.Namespace, err: TextIO) -> int:
    observers = _configure_logging(args)
    with telemetry(args.otel, err) as traced:
        return await _serve_with(url, args, err, observers, traced)


async def _serve_with(
    url: str,
    args: argparse.Namespace,
    err: TextIO,
    observers: list[batchkit.Observer],
    traced: list[batchkit.Observer],
) -> int:
    from .service import create_app, serve
    from .worker import RunThread

    token = os.environ.get(TOKEN_ENV) or None

    @asynccontextmanager
    async def resources() -> AsyncIterator[tuple[Any, Any, UpstreamClient]]:
        """On the runs' own loop: the engine, sessions and upstream (or simulator) of runs."""
        engine = make_engine(url)
        try:
            await create_schema(engine)
            async with _upstream(args, err) as client:
                yield engine, make_session_factory(engine), client
        finally:
            await engine.dispose()

    # This loop serves HTTP only; /health has a small engine of its own.
    health_engine = make_engine(url, pool_size=1, max_overflow=1, pool_timeout=1.0, pre_ping=False)
    try:
        async with RunThread(resources) as runs:
            assert runs.engine is not None
            app = create_app(
                engine=runs.engine,
                session_factory=make_session_factory(health_engine),
                config=_config(args),
                token=token,
                health_engine=health_engine,
                lease_seconds=args.lease_seconds,
                runs=runs,
                observers=[*observers, *traced],
            )

            def started(base: str) -> None:
                print(
                    f"serving on {base} (database {hide_password(url)}; "
                    f"token {'required' if token else 'not required'})",
                    file=err,
                    flush=True,
                )

            if observers:
                print(_units_note(args.time_factor, "log lines"), file=err, flush=True)
            await serve(app, host=args.host, port=args.port, on_started=started)
    finally:
        await health_engine.dispose()
    # SIGTERM/SIGINT during a run: the run recorded its partial result; exit as `run` does.
    return EXIT["interrupted"] if app.state.interrupted else 0


async def _simulate(args: argparse.Namespace, err: TextIO) -> int:
    from .service import serve

    sim = _simulator(args)
    app: Starlette = create_simulator(sim)

    def started(url: str) -> None:
        print(_describe_simulator(url, sim), file=err, flush=True)

    await serve(app, host=args.host, port=args.port, on_started=started)
    return 0


async def _demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    given = getattr(args, "database_url", None) or os.environ.get("DATABASE_URL")
    human = err if args.json else out
    if given:
        url = database_url(given)
    else:
        db = Path(DEMO_DATABASE)
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            path.unlink(missing_ok=True)  # the default demo starts from an empty database
        url = f"sqlite+aiosqlite:///{db}"
    f = args.time_factor
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    # Tick 1 has an outage for one market (its APIs answer 503), over by tick 2.
    down = "BTC-100K-DEC"
    sim = SimulatorConfig(
        error_rate=0.02,
        rate_limit_rate=0.03,
        hang_rate=0.01,
        time_factor=f,
        seed=seed,
        down=frozenset({down}),
    )
    config = RunConfig(limit=args.markets, time_factor=f)
    engine = make_engine(url)
    stop = Stop()
    results: list[tuple[str, RunResult]] = []
    try:
        await create_schema(engine)
        sf = make_session_factory(engine)
        await seed_markets(sf, args.markets)
        print(f"database: {hide_password(url)} ({await count_markets(sf)} markets)", file=err)
        async with serve_simulator(sim) as (base, app), _signals_stop(stop):
            print(_describe_simulator(base, sim), file=err)
            if err.isatty():
                print(_units_note(f, "progress bar"), file=err)
            async with UpstreamClient(UpstreamURLs.single(base)) as client:
                plan = [
                    f"cron tick 1 (the upstream is down for {down})",
                    "cron tick 2 (the outage is over; the tick is killed with SIGKILL)",
                    "cron tick 3 (resumes the killed tick's journal)",
                ]
                for i, title in enumerate(plan):
                    print(f"\n-- {title} ...", file=human, flush=True)
                    if i == 1:
                        app.state.upstream.config = dataclasses.replace(sim, down=frozenset())
                        print(await _killed_tick(url, base, config, sf), file=human, flush=True)
                        continue
                    result = await _demo_tick(sf, client, config, stop, err.isatty())
                    results.append((title, result))
                    if not args.json:
                        print(format_result(result, title), file=out)
                    if result.interrupted:
                        break
    finally:
        await engine.dispose()
    if args.json:
        print(json.dumps([r.to_dict() for _, r in results], indent=2), file=out)
    elif len(results) == 2:
        print(_demo_summary(results[0][1], results[1][1], url, f), file=out)
    return _demo_exit_code(results[-1][1])


KILL_LEASE_SECONDS = 1.0
"""The killed tick's SQLite lease: the next tick waits for it to lapse (PostgreSQL: not at all)."""


async def _killed_tick(url: str, base: str, config: RunConfig, sf: Any) -> str:
    """A cron tick as a real ``predictions run`` process, killed with ``SIGKILL`` once its
    journal holds a third of the markets: nothing of it runs at the kill (no handler, no
    record), so whatever the next tick knows, the database told it. Says what was left."""
    argv = [
        sys.executable, "-m", "predictions", "run", "--database-url", url,
        "--upstream-url", base, "--time-factor", f"{config.time_factor:g}",
        "--limit", str(config.limit), "--lease-seconds", f"{KILL_LEASE_SECONDS:g}",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    want = max(1, config.limit // 3)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 30 + config.deadline * config.time_factor
    journaled = 0
    while proc.returncode is None and journaled < want and loop.time() < give_up:
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.05)
        journaled = len(await _journaled(sf))
    if proc.returncode is not None:
        return f"the tick ended (exit code {proc.returncode}) before it could be killed"
    proc.kill()
    await proc.wait()
    done = await _journaled(sf)
    return (
        f"killed with SIGKILL (pid {proc.pid}): {len(done)} market(s) predicted and in its "
        f"journal, the rest not; no record of the run was written"
    )


async def _journaled(sf: Any) -> list[str]:
    """The markets the running (or killed) run's journal says it predicted."""
    from batchkit import Journal
    from batchkit.sqlalchemy import SQLAlchemyStateStore

    async with sf() as session:
        run = await session.scalar(select(Run).where(Run.status == "running"))
    name = run.config.get("journal") if run is not None else None
    if not name:
        return []
    kinds = await Journal(SQLAlchemyStateStore(sf.kw["bind"]), name).kinds()
    return [k for k, kind in kinds.items() if kind == "success"]


async def _demo_tick(
    sf: Any, client: UpstreamClient, config: RunConfig, stop: Stop, progress: bool
) -> RunResult:
    """One tick in this process; waits (a few seconds at most) for a killed tick's lease."""
    for _ in range(40):
        with suppress(RunInProgress):
            return await run_job(
                sf,
                client,
                config,
                progress=progress,
                stop=stop,
                holder=default_holder("predictions demo"),
            )
        await asyncio.sleep(KILL_LEASE_SECONDS / 4)
    return await run_job(sf, client, config, stop=stop, holder=default_holder("predictions demo"))


def _demo_exit_code(last: RunResult) -> int:
    """The demo shows a run, it is not one: a missed goal (a slow machine's timeouts) is in
    its summary and exits 0; an interrupted demo or one with nothing to run does not."""
    return 0 if last.status == "failed" else _exit_code(last)


def _demo_summary(first: RunResult, second: RunResult, url: str, f: float) -> str:
    failed = {o.item.symbol for o in first.report.failures}
    recovered = sorted(failed & {o.item.symbol for o in second.report.successes})
    r = second.report
    resumed = (
        f"tick 3 resumed {r.resumed} market(s) from the killed tick 2's journal and ran only "
        f"the other {len(r) - r.resumed}.\n"
        if second.resumed_from is not None
        else "tick 3 resumed nothing: tick 2 ended before it could be killed.\n"
    )
    where = (
        f"--database-url {url}"
        if "predictions-demo.db" not in url
        else (f"--database-url sqlite:///{DEMO_DATABASE}")
    )
    return (
        f"\nsummary: tick 1 predicted {first.report.counts['success']}/{len(first.report)}; "
        f"tick 3 predicted {second.report.counts['success']}/{len(second.report)} in "
        f"{second.report.wall_time / f:.1f} s (real-world seconds; measured "
        f"{second.report.wall_time:.2f} s at time factor {f:g}).\n"
        f"{resumed}"
        f"failed in tick 1, predicted by tick 3: {', '.join(recovered) or 'none'}\n"
        f"goal of the last run: {'MET' if second.goal_met else 'MISSED'}. "
        f"See the runs: .venv/bin/predictions {where} report"
    )


def _dispatch(args: argparse.Namespace, url: str, out: TextIO, err: TextIO) -> int:
    command: str = args.command
    if command == "init-db":
        return asyncio.run(_init_db(url, out))
    if command == "seed":
        return asyncio.run(_seed(url, args.markets, out))
    if command == "run":
        return asyncio.run(_run(url, args, out, err))
    if command == "report":
        return asyncio.run(_report(url, args.last, out))
    if command == "serve":
        return asyncio.run(_serve(url, args, err))
    if command == "simulator":
        return asyncio.run(_simulate(args, err))
    assert command == "demo"
    return asyncio.run(_demo(args, out, err))


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """The CLI. Returns the exit code (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    url = _check(parser, args)
    insecure = args.command == "serve" and not _loopback(args.host)
    if insecure and not os.environ.get(TOKEN_ENV) and not args.insecure_no_token:
        parser.error(
            f"--host {args.host}: serving beyond loopback needs ${TOKEN_ENV} "
            "(or --insecure-no-token behind an authenticating proxy)"
        )
    stdout = out if out is not None else sys.stdout
    stderr = err if err is not None else sys.stderr
    try:
        return _dispatch(args, url, stdout, stderr)
    except RunInProgress as e:
        print(f"predictions: {e}", file=stderr)
        return EXIT["busy"]
    except LeaseLost as e:
        print(f"predictions: the run lost its lock: {e}", file=stderr)
        return EXIT["busy"]
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, OSError) as e:
        print(
            f"predictions: database unavailable ({hide_password(url)}): {_one_line(e)}", file=stderr
        )
        return EXIT["unavailable"]
    except KeyboardInterrupt:
        with suppress(Exception):
            print("predictions: aborted", file=stderr)
        return 130


def _one_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    text = f"{type(orig).__name__}: {orig}".splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."
