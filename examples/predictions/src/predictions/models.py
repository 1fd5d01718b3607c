"""The database: markets, their predictions, and one honest record per run.

SQLAlchemy 2.0 typed ORM. The same models work on SQLite (the default, a file) and on
PostgreSQL (``DATABASE_URL=postgresql+asyncpg://...``).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

__all__ = [
    "Base",
    "Market",
    "Prediction",
    "Run",
    "RunLease",
    "create_schema",
    "seed_markets",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no timezone type and hands back naive values; PostgreSQL's ``timestamptz``
    hands back aware ones. Normalising here keeps age computations (``/health``) correct on both.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: use predictions.models.utcnow()")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Market(Base):
    """A prediction market whose outcome we forecast on every cron tick."""

    __tablename__ = "markets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    symbol: Mapped[str] = mapped_column(String(64), unique=True)
    question: Mapped[str] = mapped_column(String(300))
    category: Mapped[str] = mapped_column(String(40))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    last_predicted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Set when a run's deadline skipped or cancelled this market; the next run takes it first.
    needs_retry: Mapped[bool] = mapped_column(Boolean, default=False)


class Prediction(Base):
    """One forecast for one market in one run. At most one per (market, run): idempotent."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("market_id", "run_id", name="uq_prediction_market_run"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    market_id: Mapped[int] = mapped_column(ForeignKey("markets.id"), index=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    probability: Mapped[float] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Run(Base):
    """One run of the job: what was asked, what happened, and whether it met its goal.

    The counts are copied from batchkit's report, so they always add up to ``total``.
    """

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    status: Mapped[str] = mapped_column(String(16), default="running")
    """``running``, then ``ok`` (goal met), ``failed`` (goal missed), ``empty`` (no active
    market to predict), ``interrupted`` (SIGTERM/SIGINT: a partial record) or ``crashed``
    (the run raised, or its process died: the next run marks it)."""
    total: Mapped[int] = mapped_column(Integer, default=0)
    success: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[int] = mapped_column(Integer, default=0)
    timed_out: Mapped[int] = mapped_column(Integer, default=0)
    cancelled: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    deadline_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    wall_time: Mapped[float | None] = mapped_column(Float, default=None)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    @property
    def counts(self) -> dict[str, int]:
        return {
            "success": self.success,
            "error": self.error,
            "timeout": self.timed_out,
            "cancelled": self.cancelled,
            "skipped": self.skipped,
        }


class RunLease(Base):
    """Who holds the run lock since when, and the fencing token (see ``predictions.lock``)."""

    __tablename__ = "run_lease"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    token: Mapped[int] = mapped_column(Integer, default=0)
    """Incremented by every new holder; a write whose token is not the current one is refused."""
    holder: Mapped[str | None] = mapped_column(String(200), default=None)
    acquired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    """NULL: released. SQLite: a holder that stops renewing loses the lease at this time."""


async def create_schema(engine: AsyncEngine) -> None:
    """Create the tables that do not exist yet (safe to run twice)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


# A realistic spread of questions; more than these get numbered variants.
_QUESTIONS: tuple[tuple[str, str, str], ...] = (
    ("BTC-100K-DEC", "Will Bitcoin close above $100k on 31 December?", "crypto"),
    ("ETH-ETF-FLOWS", "Will spot ETH ETFs see net inflows this month?", "crypto"),
    ("SOL-FLIP-BNB", "Will Solana's market cap exceed BNB's by the end of the quarter?", "crypto"),
    ("FED-CUT-SEP", "Will the Fed cut rates at its September meeting?", "economy"),
    ("US-CPI-3PCT", "Will US year-on-year CPI print below 3% next month?", "economy"),
    ("ECB-HOLD", "Will the ECB hold rates at its next meeting?", "economy"),
    ("OIL-90", "Will Brent crude trade above $90 this quarter?", "commodities"),
    ("GOLD-ATH", "Will gold set a new all-time high this month?", "commodities"),
    ("SPX-6000", "Will the S&P 500 close above 6,000 this year?", "stocks"),
    ("NVDA-EARN-BEAT", "Will Nvidia beat revenue estimates next quarter?", "stocks"),
    ("AAPL-AI-LAUNCH", "Will Apple ship an on-device LLM feature by WWDC?", "tech"),
    ("GPT-NEXT-Q3", "Will OpenAI release a new frontier model before Q3 ends?", "tech"),
    ("EU-AI-ACT-FINE", "Will the first EU AI Act fine be announced this year?", "politics"),
    ("UK-ELECTION-TURNOUT", "Will UK general election turnout exceed 65%?", "politics"),
    ("WORLD-CUP-HOST", "Will the next World Cup final sell out within a day?", "sports"),
    ("NBA-FINALS-G7", "Will the NBA Finals go to game 7?", "sports"),
    ("F1-TITLE-DECIDER", "Will the F1 title be decided at the final race?", "sports"),
    ("OSCARS-BEST-PIC", "Will the favourite win Best Picture at the Oscars?", "culture"),
    ("HURRICANE-CAT5", "Will a Category 5 hurricane make US landfall this season?", "weather"),
    ("STARSHIP-ORBIT", "Will Starship complete a full orbital flight this year?", "science"),
)


def market_rows(n: int, *, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` markets: the curated questions first, then numbered variants of them."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        symbol, question, category = _QUESTIONS[i % len(_QUESTIONS)]
        round_ = i // len(_QUESTIONS)
        if round_:
            symbol = f"{symbol}-{round_ + 1}"
            question = f"{question} (series {round_ + 1})"
        rows.append({"symbol": symbol, "question": question, "category": category, "active": True})
    rng.shuffle(rows)  # insertion order should not be the processing order by accident
    return rows


async def seed_markets(session_factory: async_sessionmaker[AsyncSession], n: int = 20) -> int:
    """Insert ``n`` markets, skipping symbols already present. Returns how many were added."""
    async with session_factory() as session, session.begin():
        existing = set((await session.scalars(select(Market.symbol))).all())
        added = 0
        for row in market_rows(n):
            if row["symbol"] not in existing:
                session.add(Market(**row))
                added += 1
    return added


async def count_markets(session_factory: async_sessionmaker[AsyncSession]) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(Market)) or 0)
