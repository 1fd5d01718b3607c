"""The job: a fresh prediction for each active market, within the cron's deadline.

``generate_predictions`` is one ``batchkit.batch_process`` call. What each argument is for:

- ``context=sessions``: one database session per market (per attempt), committed when the
  market succeeds, rolled back when it fails, always closed — a failing market cannot poison
  another's transaction, and a slow one cannot hold a shared session open.
- ``timeout``: one market's three upstream calls together; a hung call ends there.
- ``concurrency``: markets in flight at once — a sliding window, not batches: a slot freed by a
  fast market starts the next one at once instead of waiting for the slowest of its batch.
- ``retry``: transient upstream errors (5xx, refused connections) and 429s, whose
  ``Retry-After`` batchkit honours; a retry's backoff frees the slot meanwhile.
- ``deadline``: below the cron limit. When it comes, in-flight markets are cancelled, the rest
  skipped, and the run still ends on time with an honest record; skipped markets go first next run.
- ``key``: the market symbol names items in logs, tables and the report.
- ``groups`` (``upstream_concurrency``): a limit group per upstream host, so one host's quota
  holds whatever the run's ``concurrency`` (off by default).
- ``breaker`` (``breaker_open_after``): one circuit per upstream, kept in the app's own
  database, so the ticks after an outage skip at once instead of rediscovering it (off by
  default).
- ``concurrency`` as an ``Adaptive`` limit remembered in the database (``adaptive_max``; off
  by default).
- ``journal`` (on by default): each market's outcome recorded by its symbol in the app's
  database as the run goes. A tick that did not finish (killed with ``SIGKILL``, interrupted,
  crashed) leaves its journal to the next tick, which **resumes** it: the markets it
  predicted are not predicted again (their rows move to the new run), its failed markets go
  first, and only the rest run. Batched mode: see ``_journal``.

A market holds a database connection only for database work: read the prior, give the
connection back (``batchkit.sqlalchemy.release``), make the slow upstream calls with no
connection held, then write and commit. So ``concurrency`` is bounded by the upstream, not
by the pool: 10 markets in flight need about one connection, not ten. On SQLite the writes
are queued in-process (one writer at a time is all SQLite allows).

The run record is written after ``batch_process`` returns, from its report, in one
transaction: counts by outcome kind, retries, whether the deadline stopped the run, and the
config. A prediction row exists for a run exactly when the report says the market succeeded
(a resumed market's row, written by the tick that did not finish, moves to the new run).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, final, get_args
from urllib.parse import urlsplit

from sqlalchemy import delete, select, update

import batchkit
from batchkit import (
    Adaptive,
    Backoff,
    BatchReport,
    Breaker,
    Failure,
    Journal,
    LimitGroup,
    Observer,
    Remembered,
    Retry,
)
from batchkit.sqlalchemy import SQLAlchemyStateStore, release, sessions

from .forecast import Forecast, forecast
from .lock import LEASE_SECONDS, Lease, fence, hold_run_lock
from .models import Market, Prediction, Run, utcnow
from .upstream import SignalsUnavailable, Unavailable, UpstreamClient, is_retryable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

    from batchkit import Event, JsonValue, Outcome

__all__ = [
    "LiveCounts",
    "MarketRef",
    "RunConfig",
    "RunInterrupted",
    "RunResult",
    "Stop",
    "describe_error",
    "generate_predictions",
    "journal_name",
    "run_job",
    "select_markets",
    "upstream_hosts",
]


@final
@dataclass(frozen=True, slots=True)
class MarketRef:
    """What a market's task needs to start: plain values, no ORM object shared across sessions."""

    id: int
    symbol: str


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """One run's settings, in real-world seconds; recorded with the run.

    The defaults fit 20 markets of 10-15 s into a 60 s cron (``concurrency=10, timeout=20,
    deadline=55``; see docs/from-batches-to-batchkit.md). The old job's settings
    (``concurrency=3, timeout=30``) cannot, and live on only in ``scripts/compare.py``.

    ``time_factor`` scales every duration (timeout, deadline, backoff) when the upstream is
    the simulator running at the same factor; it is 1 against real APIs.
    ``min_success_ratio`` is the run's goal: the share of selected markets that must end with
    a saved prediction (markets skipped by the deadline count against it).
    """

    limit: int = 20
    concurrency: int = 10
    timeout: float = 20.0
    deadline: float = 55.0
    attempts: int = 3
    backoff_initial: float = 1.0
    backoff_max: float = 8.0
    min_success_ratio: float = 0.9
    time_factor: float = 1.0
    upstream_concurrency: int | None = None
    """Markets in flight at once per upstream host (a limit group each); None: no such limit."""
    breaker_open_after: int = 0
    """Failed attempts in a row that open the upstream's circuit; 0: no breaker."""
    breaker_cool_down: float = 60.0
    """Seconds an open circuit skips markets before one probe goes through."""
    adaptive_max: int | None = None
    """If set, ``concurrency`` is where an adaptive limit starts (up to this), remembered in
    the database between runs; None: ``concurrency`` is fixed."""
    journal: bool = True
    """Record each market's outcome in a journal, so the next tick resumes a tick that did not
    finish; False: every tick predicts all its markets."""

    def __post_init__(self) -> None:
        if self.upstream_concurrency is not None and self.upstream_concurrency < 1:
            raise ValueError(f"upstream_concurrency must be >= 1, got {self.upstream_concurrency}")
        if self.breaker_open_after < 0:
            raise ValueError(f"breaker_open_after must be >= 0, got {self.breaker_open_after}")
        if self.adaptive_max is not None and self.adaptive_max < self.concurrency:
            raise ValueError(
                f"adaptive_max must be >= concurrency ({self.concurrency}), got {self.adaptive_max}"
            )
        if self.breaker_cool_down < 0:
            raise ValueError(f"breaker_cool_down must be >= 0, got {self.breaker_cool_down}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if not 0 <= self.min_success_ratio <= 1:
            raise ValueError(f"min_success_ratio must be in [0, 1], got {self.min_success_ratio}")
        if self.time_factor <= 0:
            raise ValueError(f"time_factor must be > 0, got {self.time_factor}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Status = Literal["ok", "failed", "empty", "interrupted"]
Reason = Literal[
    "goal_met", "goal_missed", "upstream_unavailable", "no_active_markets", "interrupted"
]


class RunInterrupted(Exception):
    """The process got SIGTERM/SIGINT: the market was cancelled in flight or never started."""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """A finished run: its database id, batchkit's report, and whether it met its goal.

    ``status`` and ``reason`` are what an alert matches on:

    ============  ========================  ==================================================
    status        reason                    meaning
    ============  ========================  ==================================================
    ok            goal_met                  at least ``min_success_ratio`` of markets predicted
    failed        goal_missed               too few predicted
    failed        upstream_unavailable      too few predicted, and every failure was a refused
                                            or dropped upstream connection or a 5xx
    empty         no_active_markets         nothing to predict: no active market in the table
    interrupted   interrupted               SIGTERM/SIGINT stopped the run; a partial record
    ============  ========================  ==================================================

    Only ``ok`` is success (exit code 0, HTTP 200).
    """

    run_id: int
    config: RunConfig
    report: BatchReport[MarketRef, Forecast]
    goal_met: bool
    saved: int
    """Predictions in the database for this run (equal to the report's successes)."""
    journal: str | None = None
    """The journal's name, or None when the run kept none."""
    resumed_from: int | None = None
    """The run (one that did not finish) whose journal this run resumed, or None."""
    interrupted: str | None = None
    """The signal that stopped the run (``SIGTERM``/``SIGINT``), or None."""

    @property
    def status(self) -> Status:
        if self.interrupted:
            return "interrupted"
        if not len(self.report):
            return "empty"
        return "ok" if self.goal_met else "failed"

    @property
    def reason(self) -> Reason:
        status = self.status
        if status == "interrupted":
            return "interrupted"
        if status == "empty":
            return "no_active_markets"
        if status == "ok":
            return "goal_met"
        failures = self.report.failures
        if failures and all(_upstream_down(f.error) for f in failures):
            return "upstream_unavailable"
        return "goal_missed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe. Every duration is in real-world seconds (measured / ``time_factor``)."""
        report = self.report
        f = self.config.time_factor
        return {
            "run_id": self.run_id,
            "status": self.status,
            "reason": self.reason,
            "goal_met": self.goal_met,
            "goal": f"success ratio >= {self.config.min_success_ratio:g}",
            "total": len(report),
            "counts": report.counts,
            "saved": self.saved,
            "resumed": report.resumed,
            "journal": self.journal,
            "resumed_from_run": self.resumed_from,
            "retries": report.retries,
            "deadline_hit": report.deadline_hit,
            "interrupted_by": self.interrupted,
            "units": "real-world seconds (measured seconds / time_factor)",
            "wall_time": round(report.wall_time / f, 3),
            "measured_wall_time": round(report.wall_time, 4),
            "peak_concurrency": report.peak_concurrency,
            "config": self.config.as_dict(),
            "markets": [
                {
                    "market": o.item.symbol,
                    "outcome": "success" if isinstance(o, batchkit.Success) else o.kind,
                    **({"resumed": True} if isinstance(o, batchkit.Success) and o.resumed else {}),
                    "attempts": o.attempts,
                    "elapsed": round(o.elapsed / f, 3),
                    **(
                        {"probability": o.value.probability, "confidence": o.value.confidence}
                        if isinstance(o, batchkit.Success)
                        else {"error": describe_error(o.error, self.config)}
                    ),
                }
                for o in report
            ],
        }


def describe_error(error: BaseException, config: RunConfig) -> str:
    """``Type: message``, with a timeout in the run's real-world seconds (batchkit's own
    message gives the measured, scaled seconds)."""
    if isinstance(error, batchkit.ItemTimeout):
        return f"ItemTimeout: timed out after {config.timeout:g} s"
    return f"{type(error).__name__}: {error}"


def _upstream_down(error: BaseException) -> bool:
    """A refused/dropped connection or a 5xx, alone or in every member of a group."""
    if isinstance(error, SignalsUnavailable):
        return all(_upstream_down(e) for e in error.exceptions)
    return isinstance(error, Unavailable)


async def select_markets(
    session_factory: async_sessionmaker[AsyncSession], limit: int
) -> list[MarketRef]:
    """The markets this run will do, most overdue first.

    Markets the last run's deadline skipped or cancelled (``needs_retry``) come first, then the
    ones whose last prediction is oldest (never-predicted first), so a run that could not
    finish is made up for by the next one instead of starving the same markets every time.
    """
    async with session_factory() as session:
        rows = await session.execute(
            select(Market.id, Market.symbol)
            .where(Market.active.is_(True))
            .order_by(
                Market.needs_retry.desc(),
                Market.last_predicted_at.asc().nulls_first(),
                Market.id,
            )
            .limit(limit)
        )
        return [MarketRef(id=r.id, symbol=r.symbol) for r in rows]


def _predict_one(
    client: UpstreamClient, run_id: int, lease: Lease, write_lock: asyncio.Lock | None = None
) -> Callable[[MarketRef, AsyncSession], Awaitable[Forecast]]:
    async def predict(market: MarketRef, session: AsyncSession) -> Forecast:
        # 1. Database: what we need from it (the previous forecast, a prior for smoothing).
        prior = await session.scalar(
            select(Prediction.probability)
            .where(Prediction.market_id == market.id)
            .order_by(Prediction.created_at.desc(), Prediction.id.desc())
            .limit(1)
        )
        await release(session)
        # 2. Upstream: seconds of network time, no database connection held.
        signals = await client.signals(market.symbol)
        result = forecast(signals, prior)
        # 3. Database again: write, and commit. Idempotent per (market, run): a retried
        #    attempt whose first try did commit updates that row instead of adding another.
        #    The fence first: a run that lost the lock must not write over the next one's work.
        async with write_lock or contextlib.nullcontext():
            await fence(session, lease)
            await _save(session, market, run_id, result)
            await release(session)  # commit inside the lock: it is the write
        return result

    return predict


async def _save(session: AsyncSession, market: MarketRef, run_id: int, result: Forecast) -> None:
    now = utcnow()
    existing = await session.scalar(
        select(Prediction).where(Prediction.market_id == market.id, Prediction.run_id == run_id)
    )
    if existing is None:
        session.add(
            Prediction(
                market_id=market.id,
                run_id=run_id,
                probability=result.probability,
                confidence=result.confidence,
                created_at=now,
            )
        )
    else:
        existing.probability = result.probability
        existing.confidence = result.confidence
        existing.created_at = now
    await session.execute(
        update(Market)
        .where(Market.id == market.id)
        .values(last_predicted_at=now, needs_retry=False)
    )


def _write_lock(session_factory: async_sessionmaker[AsyncSession]) -> asyncio.Lock | None:
    """SQLite has one writer at a time. Concurrent aiosqlite writers wait for its lock in their
    threads with back-off sleeps of up to 100 ms; queueing them here instead hands the lock
    over at once and keeps the write phase short. PostgreSQL needs no such thing."""
    bind = session_factory.kw.get("bind")
    if bind is not None and bind.dialect.name == "sqlite":
        return asyncio.Lock()
    return None


async def generate_predictions(
    session_factory: async_sessionmaker[AsyncSession],
    client: UpstreamClient,
    *,
    limit: int = 20,
    concurrency: int = 10,
    timeout: float = 20.0,
    deadline: float = 55.0,
    attempts: int = 3,
    min_success_ratio: float = 0.9,
    time_factor: float = 1.0,
    upstream_concurrency: int | None = None,
    breaker_open_after: int = 0,
    breaker_cool_down: float = 60.0,
    adaptive_max: int | None = None,
    journal: bool = True,
    observers: Sequence[Observer] = (),
    progress: bool = False,
) -> RunResult:
    """Run the job once and record it. Durations are real-world seconds times ``time_factor``."""
    config = RunConfig(
        limit=limit,
        concurrency=concurrency,
        timeout=timeout,
        deadline=deadline,
        attempts=attempts,
        min_success_ratio=min_success_ratio,
        time_factor=time_factor,
        upstream_concurrency=upstream_concurrency,
        breaker_open_after=breaker_open_after,
        breaker_cool_down=breaker_cool_down,
        adaptive_max=adaptive_max,
        journal=journal,
    )
    return await run_job(session_factory, client, config, observers=observers, progress=progress)


async def run_job(
    session_factory: async_sessionmaker[AsyncSession],
    client: UpstreamClient,
    config: RunConfig,
    *,
    observers: Sequence[Observer] = (),
    progress: bool = False,
    stop: Stop | None = None,
    holder: str | None = None,
    lease_seconds: float = LEASE_SECONDS,
) -> RunResult:
    """Run the job once under the run lock and record it.

    Raises :class:`~predictions.lock.RunInProgress` at once when another run (from any
    process) holds the lock. When ``stop`` is set (a signal), the run stops starting markets,
    cancels those in flight, records what it has (status ``interrupted``) and releases the lock.
    """
    if stop is not None:
        stop.attach()
    async with hold_run_lock(
        _bind(session_factory), holder=holder, lease_seconds=lease_seconds
    ) as lease:
        return await _run_locked(session_factory, client, config, lease, observers, progress, stop)


@final
class Stop:
    """Asks a run to stop (a signal handler calls :meth:`set`, from any thread); remembers why."""

    __slots__ = ("_loop", "event", "reason")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self) -> None:
        """Called by the run, on its loop: later :meth:`set` calls are handed to that loop."""
        self._loop = asyncio.get_running_loop()

    def set(self, reason: str) -> None:
        loop = self._loop
        if loop is not None:
            try:
                here = asyncio.get_running_loop()
            except RuntimeError:
                here = None
            if here is not loop:
                loop.call_soon_threadsafe(self._set, reason)
                return
        self._set(reason)

    def _set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


def _bind(session_factory: async_sessionmaker[AsyncSession]) -> AsyncEngine:
    bind = session_factory.kw.get("bind")
    if bind is None:
        raise TypeError("the session factory must be bound to an AsyncEngine")
    return cast("AsyncEngine", bind)


def upstream_hosts(client: UpstreamClient) -> list[str]:
    """The distinct hosts of the three upstream APIs, sorted (one for the bundled simulator)."""
    urls = client.urls
    return sorted({urlsplit(u).netloc for u in (urls.prices, urls.orderbook, urls.news)})


def _always(key: str) -> Callable[[MarketRef], str]:
    def by(_market: MarketRef) -> str:
        return key

    return by


def _upstream_groups(client: UpstreamClient, config: RunConfig) -> list[LimitGroup]:
    """One limit group per upstream host. Every market calls every upstream, so each market
    takes all the groups at once (batchkit's groups are per item, all or nothing)."""
    if config.upstream_concurrency is None:
        return []
    return [
        LimitGroup(by=_always(host), concurrency=config.upstream_concurrency)
        for host in upstream_hosts(client)
    ]


def _concurrency(
    session_factory: async_sessionmaker[AsyncSession], config: RunConfig
) -> int | Adaptive:
    """Fixed, or an adaptive limit that starts where the last run (any process) left it: each
    cron tick is a new process, and would otherwise learn the upstream again from scratch."""
    if config.adaptive_max is None:
        return config.concurrency
    return Adaptive(
        initial=config.concurrency,
        max=config.adaptive_max,
        remember=Remembered(
            store=SQLAlchemyStateStore(_bind(session_factory)), name="predictions-upstream"
        ),
    )


JOURNAL_RETAIN = 3600.0
"""Real-world seconds a journal row is kept: a tick that died longer ago than this is not
resumed (its predictions are stale by then), its markets simply run again."""


def journal_name(run_id: int) -> str:
    """A journal per tick that did not finish: named by the run that started it, kept by every
    run that resumes it (each such run records the name in its config)."""
    return f"predictions-run-{run_id}"


def _dump(value: Forecast) -> JsonValue:
    return {"probability": value.probability, "confidence": value.confidence}


def _load(stored: JsonValue) -> Forecast:
    fields = cast("dict[str, float]", stored)
    return Forecast(probability=fields["probability"], confidence=fields["confidence"])


def _journal(
    session_factory: async_sessionmaker[AsyncSession], config: RunConfig, name: str | None
) -> Journal | None:
    """The run's journal, in the app's database. Batched, not transactional: ``predict``
    commits its prediction itself, inside SQLite's write lock, so a journal row written in
    the same session would commit separately anyway. A journal row is written only after
    its market's prediction committed; a kill can lose the last second of rows (never a
    row whose prediction did not commit), and those markets are predicted again on resume,
    which the (market, run) upsert makes harmless."""
    if name is None:
        return None
    return Journal(
        SQLAlchemyStateStore(_bind(session_factory)),
        name,
        dump=_dump,
        load=_load,
        retain=JOURNAL_RETAIN * config.time_factor,
    )


def _failed_first(markets: list[MarketRef], kinds: dict[str, str]) -> list[MarketRef]:
    """The markets the resumed tick saw fail go first (a stable sort keeps the rest's order)."""
    return sorted(markets, key=lambda m: kinds.get(m.symbol) not in ("error", "timeout"))


def _upstream_breaker(
    session_factory: async_sessionmaker[AsyncSession], client: UpstreamClient, config: RunConfig
) -> Breaker | None:
    """A circuit for the upstream (named by its hosts), kept in the app's database: a cron
    tick is a new process, and must know the previous tick found the upstream down."""
    if not config.breaker_open_after:
        return None
    upstream = "+".join(upstream_hosts(client))
    return Breaker(
        SQLAlchemyStateStore(_bind(session_factory)),
        name="predictions-upstream",
        by=_always(upstream),
        open_after=config.breaker_open_after,
        cool_down=config.breaker_cool_down * config.time_factor,
    )


async def _run_locked(
    session_factory: async_sessionmaker[AsyncSession],
    client: UpstreamClient,
    config: RunConfig,
    lease: Lease,
    observers: Sequence[Observer],
    progress: bool,
    stop: Stop | None,
) -> RunResult:
    f = config.time_factor
    started = time.monotonic()
    async with session_factory() as session, session.begin():
        await fence(session, lease)
        # The last run did not finish (killed, interrupted, crashed): resume its journal.
        last = await session.scalar(select(Run).order_by(Run.id.desc()).limit(1))
        resumed_from = None
        name = None
        if config.journal and last is not None and last.status not in ("ok", "failed", "empty"):
            name = last.config.get("journal")
            resumed_from = last.id if name else None
        # We hold the only lock: a run still marked running died with its process.
        await session.execute(update(Run).where(Run.status == "running").values(status="crashed"))
        run = Run(config=config.as_dict(), status="running", started_at=utcnow())
        session.add(run)
        await session.flush()
        run_id = run.id
        if config.journal:
            name = name or journal_name(run_id)
            run.config = {**config.as_dict(), "journal": name}
    journal = _journal(session_factory, config, name)
    collector = _Collector()
    try:
        markets = await select_markets(session_factory, config.limit)
        if journal is not None and resumed_from is not None:
            markets = _failed_first(markets, await journal.kinds())
        # The deadline counts from the run's start, not from batch_process's: the queries
        # above took some of the cron's budget too.
        remaining = config.deadline * f - (time.monotonic() - started)
        batch = batchkit.batch_process(
            markets,
            _predict_one(client, run_id, lease, _write_lock(session_factory)),
            context=sessions(session_factory),
            key=lambda m: m.symbol,
            concurrency=_concurrency(session_factory, config),
            timeout=config.timeout * f,
            deadline=batchkit.Deadline(seconds=max(remaining, 1e-3)),
            retry=Retry(
                attempts=config.attempts,
                backoff=Backoff(initial=config.backoff_initial * f, maximum=config.backoff_max * f),
                retry_on=is_retryable,
            ),
            groups=_upstream_groups(client, config),
            breaker=_upstream_breaker(session_factory, client, config),
            journal=journal,
            observers=[*observers, collector],
            progress=progress,
            name="predictions",
        )
        report = await _until_stopped(batch, stop, lease)
    except Exception:
        with contextlib.suppress(Exception):  # the database may be why we failed
            async with session_factory() as session, session.begin():
                await fence(session, lease)
                await session.execute(
                    update(Run)
                    .where(Run.id == run_id)
                    .values(status="crashed", finished_at=utcnow())
                )
        raise
    interrupted = None
    if report is None:  # stopped: what finished, and the rest as cancelled or skipped
        report = collector.partial(markets, time.monotonic() - started, config.concurrency)
        interrupted = (stop.reason if stop is not None else "") or "lease lost"
    result = await _record(session_factory, run_id, config, report, lease, interrupted)
    return dataclasses.replace(result, journal=name, resumed_from=resumed_from)


async def _until_stopped(
    batch: Coroutine[Any, Any, BatchReport[MarketRef, Forecast]], stop: Stop | None, lease: Lease
) -> BatchReport[MarketRef, Forecast] | None:
    """The batch's report, or None when ``stop`` was set (or the lease lost) first: then the
    batch is cancelled (every in-flight market's session rolled back) before this returns."""
    task = asyncio.ensure_future(batch)
    waiters = [asyncio.ensure_future(lease.lost.wait())]
    if stop is not None:
        waiters.append(asyncio.ensure_future(stop.event.wait()))
    try:
        await asyncio.wait([task, *waiters], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        if not task.done():
            task.cancel()
        await asyncio.wait([task, *waiters])
    return None if task.cancelled() else task.result()


@final
class LiveCounts:
    """An observer: the run's counts by outcome kind while it goes (``/health`` shows them).

    Written by the run's loop and read from another thread: every key exists from the start,
    so a reader's copy never sees the dict change size.
    """

    __slots__ = ("counts", "in_flight", "total")

    def __init__(self) -> None:
        self.total: int | None = None
        self.in_flight = 0
        self.counts: dict[str, int] = dict.fromkeys(get_args(batchkit.OutcomeKind), 0)

    def __call__(self, event: Event) -> None:
        if isinstance(event, batchkit.RunStarted):
            self.total = event.total
        elif isinstance(event, batchkit.ItemStarted):
            self.in_flight = event.in_flight
        elif isinstance(event, batchkit.ItemFinished):
            self.in_flight = event.in_flight
            self.counts[event.outcome.kind] += 1
        elif isinstance(event, batchkit.ItemsSkipped):
            self.counts["skipped"] += len(event.indices)

    def to_dict(self) -> dict[str, Any]:
        counts = dict(self.counts)
        return {
            "total": self.total,
            "finished": sum(counts.values()),
            "in_flight": self.in_flight,
            "counts": counts,
        }


@final
class _Collector:
    """Keeps what a run did so far, for a partial record when a signal cuts it short."""

    __slots__ = ("attempts", "finished", "peak", "started")

    def __init__(self) -> None:
        self.started: dict[int, float] = {}  # index -> loop time of its first attempt
        self.attempts: dict[int, int] = {}
        self.finished: dict[int, Outcome[MarketRef, Forecast]] = {}
        self.peak = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, batchkit.ItemStarted):
            self.started.setdefault(event.index, event.time)
            self.attempts[event.index] = event.attempt
            self.peak = max(self.peak, event.in_flight)
        elif isinstance(event, batchkit.ItemFinished):
            self.finished[event.outcome.index] = event.outcome

    def partial(
        self, markets: Sequence[MarketRef], wall_time: float, concurrency: int
    ) -> BatchReport[MarketRef, Forecast]:
        """What finished, and the rest: cancelled in flight (with the time they ran, from
        their first attempt's start to now, as batchkit measures ``elapsed``) or skipped."""
        now = asyncio.get_running_loop().time()
        outcomes: list[Outcome[MarketRef, Forecast]] = []
        for i, market in enumerate(markets):
            done = self.finished.get(i)
            if done is not None:
                outcomes.append(done)
            elif i in self.started:
                error = RunInterrupted("cancelled in flight by a signal")
                elapsed = max(0.0, now - self.started[i])
                outcomes.append(
                    Failure(
                        market,
                        error,
                        "cancelled",
                        i,
                        attempts=self.attempts[i],
                        elapsed=elapsed,
                        errors=(error,),
                    )
                )
            else:
                error = RunInterrupted("not started: a signal stopped the run")
                outcomes.append(Failure(market, error, "skipped", i, attempts=0, errors=(error,)))
        return BatchReport(
            outcomes=outcomes,
            wall_time=wall_time,
            concurrency=concurrency,
            peak_concurrency=self.peak,
            name="predictions",
        )


async def _record(
    session_factory: async_sessionmaker[AsyncSession],
    run_id: int,
    config: RunConfig,
    report: BatchReport[MarketRef, Forecast],
    lease: Lease,
    interrupted: str | None = None,
) -> RunResult:
    """Make the database agree with the report, in one transaction, and close the run record."""
    counts = report.counts
    total = len(report)
    # Nothing to do is not success: an empty market table must not look like a good run.
    goal_met = total > 0 and counts["success"] / total >= config.min_success_ratio
    not_saved = [o.item.id for o in report.failures]
    casualties = [o.item.id for o in report.failures if o.kind in ("skipped", "cancelled")]
    resumed = [o.item.id for o in report.successes if o.resumed]
    result = RunResult(
        run_id=run_id,
        config=config,
        report=report,
        goal_met=goal_met,
        saved=0,
        interrupted=interrupted,
    )
    async with session_factory() as session, session.begin():
        await fence(session, lease)
        if not_saved:
            # A market cancelled by the deadline right after its commit has a row but no
            # success; the report is the truth, so such a row goes (and the market is redone).
            await session.execute(
                delete(Prediction).where(
                    Prediction.run_id == run_id, Prediction.market_id.in_(not_saved)
                )
            )
        if resumed:
            await _adopt(session, run_id, resumed)
        if casualties:
            await session.execute(
                update(Market).where(Market.id.in_(casualties)).values(needs_retry=True)
            )
        saved = len(
            (await session.scalars(select(Prediction.id).where(Prediction.run_id == run_id))).all()
        )
        await session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(
                status=result.status,
                finished_at=utcnow(),
                total=total,
                success=counts["success"],
                error=counts["error"],
                timed_out=counts["timeout"],
                cancelled=counts["cancelled"],
                skipped=counts["skipped"],
                retries=report.retries,
                deadline_hit=report.deadline_hit,
                wall_time=report.wall_time,
            )
        )
    return dataclasses.replace(result, saved=saved)


async def _adopt(session: AsyncSession, run_id: int, market_ids: list[int]) -> None:
    """A resumed market's prediction is the newest row its market has (written by the tick
    that did not finish); it becomes this run's, so a run's rows are still its successes."""
    rows = await session.execute(
        select(Prediction.id, Prediction.market_id)
        .where(Prediction.market_id.in_(market_ids))
        .order_by(Prediction.market_id, Prediction.id.desc())
    )
    newest: dict[int, int] = {}
    for row in rows:
        newest.setdefault(row.market_id, row.id)
    if newest:
        await session.execute(
            update(Prediction).where(Prediction.id.in_(newest.values())).values(run_id=run_id)
        )
