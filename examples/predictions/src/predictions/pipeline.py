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

A market holds a database connection only for database work: read the prior, give the
connection back (``batchkit.sqlalchemy.release``), make the slow upstream calls with no
connection held, then write and commit. So ``concurrency`` is bounded by the upstream, not
by the pool: 10 markets in flight need about one connection, not ten. On SQLite the writes
are queued in-process (one writer at a time is all SQLite allows).

The run record is written after ``batch_process`` returns, from its report, in one
transaction: counts by outcome kind, retries, whether the deadline stopped the run, and the
config. A prediction row exists for a run exactly when the report says the market succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, final

from sqlalchemy import delete, select, update

import batchkit
from batchkit import Backoff, BatchReport, Observer, Retry
from batchkit.sqlalchemy import release, sessions

from .forecast import Forecast, forecast
from .models import Market, Prediction, Run, utcnow
from .upstream import UpstreamClient, is_retryable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

__all__ = [
    "MarketRef",
    "RunConfig",
    "RunResult",
    "generate_predictions",
    "select_markets",
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

    ``time_factor`` scales every duration (timeout, deadline, backoff) when the upstream is
    the simulator running at the same factor; it is 1 against real APIs.
    ``min_success_ratio`` is the run's goal: the share of selected markets that must end with
    a saved prediction (markets skipped by the deadline count against it).
    """

    limit: int = 20
    concurrency: int = 3
    timeout: float = 30.0
    deadline: float = 55.0
    attempts: int = 3
    backoff_initial: float = 1.0
    backoff_max: float = 8.0
    min_success_ratio: float = 0.9
    time_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if not 0 <= self.min_success_ratio <= 1:
            raise ValueError(f"min_success_ratio must be in [0, 1], got {self.min_success_ratio}")
        if self.time_factor <= 0:
            raise ValueError(f"time_factor must be > 0, got {self.time_factor}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """A finished run: its database id, batchkit's report, and whether it met its goal."""

    run_id: int
    config: RunConfig
    report: BatchReport[MarketRef, Forecast]
    goal_met: bool
    saved: int
    """Predictions in the database for this run (equal to the report's successes)."""

    @property
    def status(self) -> str:
        return "ok" if self.goal_met else "failed"

    def to_dict(self) -> dict[str, Any]:
        report = self.report
        f = self.config.time_factor
        return {
            "run_id": self.run_id,
            "status": self.status,
            "goal_met": self.goal_met,
            "goal": f"success ratio >= {self.config.min_success_ratio:g}",
            "total": len(report),
            "counts": report.counts,
            "saved": self.saved,
            "retries": report.retries,
            "deadline_hit": report.deadline_hit,
            "wall_time": round(report.wall_time, 4),
            "real_world_wall_time": round(report.wall_time / f, 2),
            "peak_concurrency": report.peak_concurrency,
            "config": self.config.as_dict(),
            "markets": [
                {
                    "market": o.item.symbol,
                    "outcome": "success" if isinstance(o, batchkit.Success) else o.kind,
                    "attempts": o.attempts,
                    "elapsed": round(o.elapsed, 4),
                    **(
                        {"probability": o.value.probability, "confidence": o.value.confidence}
                        if isinstance(o, batchkit.Success)
                        else {"error": f"{type(o.error).__name__}: {o.error}"}
                    ),
                }
                for o in report
            ],
        }


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
    client: UpstreamClient, run_id: int, write_lock: asyncio.Lock | None = None
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
        async with write_lock or contextlib.nullcontext():
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
    concurrency: int = 3,
    timeout: float = 30.0,
    deadline: float = 55.0,
    attempts: int = 3,
    min_success_ratio: float = 0.9,
    time_factor: float = 1.0,
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
    )
    return await run_job(session_factory, client, config, observers=observers, progress=progress)


async def run_job(
    session_factory: async_sessionmaker[AsyncSession],
    client: UpstreamClient,
    config: RunConfig,
    *,
    observers: Sequence[Observer] = (),
    progress: bool = False,
) -> RunResult:
    f = config.time_factor
    started = time.monotonic()
    async with session_factory() as session, session.begin():
        run = Run(config=config.as_dict(), status="running", started_at=utcnow())
        session.add(run)
        await session.flush()
        run_id = run.id
    try:
        markets = await select_markets(session_factory, config.limit)
        # The deadline counts from the run's start, not from batch_process's: the queries
        # above took some of the cron's budget too.
        remaining = config.deadline * f - (time.monotonic() - started)
        report = await batchkit.batch_process(
            markets,
            _predict_one(client, run_id, _write_lock(session_factory)),
            context=sessions(session_factory),
            key=lambda m: m.symbol,
            concurrency=config.concurrency,
            timeout=config.timeout * f,
            deadline=batchkit.Deadline(seconds=max(remaining, 1e-3)),
            retry=Retry(
                attempts=config.attempts,
                backoff=Backoff(initial=config.backoff_initial * f, maximum=config.backoff_max * f),
                retry_on=is_retryable,
            ),
            observers=observers,
            progress=progress,
            name="predictions",
        )
    except Exception:
        async with session_factory() as session, session.begin():
            await session.execute(
                update(Run).where(Run.id == run_id).values(status="crashed", finished_at=utcnow())
            )
        raise
    return await _record(session_factory, run_id, config, report)


async def _record(
    session_factory: async_sessionmaker[AsyncSession],
    run_id: int,
    config: RunConfig,
    report: BatchReport[MarketRef, Forecast],
) -> RunResult:
    """Make the database agree with the report, in one transaction, and close the run record."""
    counts = report.counts
    total = len(report)
    goal_met = total == 0 or counts["success"] / total >= config.min_success_ratio
    not_saved = [o.item.id for o in report.failures]
    casualties = [o.item.id for o in report.failures if o.kind in ("skipped", "cancelled")]
    async with session_factory() as session, session.begin():
        if not_saved:
            # A market cancelled by the deadline right after its commit has a row but no
            # success; the report is the truth, so such a row goes (and the market is redone).
            await session.execute(
                delete(Prediction).where(
                    Prediction.run_id == run_id, Prediction.market_id.in_(not_saved)
                )
            )
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
                status="ok" if goal_met else "failed",
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
    return RunResult(run_id=run_id, config=config, report=report, goal_met=goal_met, saved=saved)
