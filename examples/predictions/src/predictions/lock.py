"""One run at a time, across processes and hosts: a lock held in the database.

- **PostgreSQL**: a session-level advisory lock (``pg_try_advisory_lock``) on a connection of
  its own, held for the whole run. The server drops it when that connection closes, so a
  process that crashed or was killed frees it at once.
- **SQLite** (one file, one host): a lease row with an expiry that the holder renews every
  third of ``lease_seconds``. A run that crashed blocks the next one at most until its lease
  expires.

On both, the ``run_lease`` row says who holds the lock since when (for the 409 answer and the
CLI's message) and carries a **fencing token** that every new holder increments. Every write
of a run calls :func:`fence` first, inside the write's own transaction: a holder whose lease
lapsed (it stalled past its expiry and another run took over) or whose PostgreSQL lock
connection dropped gets :class:`LeaseLost` instead of writing over the new holder's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, final

from sqlalchemy import insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from .models import RunLease, utcnow

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

__all__ = [
    "LEASE_SECONDS",
    "Lease",
    "LeaseLost",
    "RunInProgress",
    "default_holder",
    "fence",
    "hold_run_lock",
]

LEASE_SECONDS = 15.0
"""SQLite: how long a lease lasts unless renewed (renewed every third of it)."""
LOCK_NAME = "predictions"


class RunInProgress(Exception):
    """Another run holds the lock. ``holder`` and ``since`` say who and since when."""

    def __init__(
        self, holder: str | None, since: datetime | None, expires_at: datetime | None
    ) -> None:
        self.holder = holder or "unknown"
        self.since = since
        self.expires_at = expires_at
        when = f" since {since:%Y-%m-%d %H:%M:%S} UTC" if since else ""
        super().__init__(f"another run is in progress: held by {self.holder}{when}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "holder": self.holder,
            "since": self.since.isoformat() if self.since else None,
            "lease_expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }


class LeaseLost(Exception):
    """This run no longer holds the lock (its lease expired and another run took over)."""


def default_holder(what: str = "") -> str:
    """``host pid 123 (run)``: enough to find the process that holds the lock."""
    return f"{socket.gethostname()} pid {os.getpid()}" + (f" ({what})" if what else "")


@final
@dataclass(slots=True, kw_only=True)
class Lease:
    """The lock as its holder sees it."""

    name: str
    token: int
    holder: str
    acquired_at: datetime
    dialect: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a renewal found another holder's token: stop, every write will fail."""


async def fence(session: AsyncSession, lease: Lease) -> None:
    """Call first in every write transaction of a run: raise :class:`LeaseLost` unless this
    run's token is still the current one, and keep it current until the transaction ends.

    SQLite: a no-op ``UPDATE`` of the lease row, which takes the database's one write lock at
    once, so nobody can take the lease over before this transaction commits.
    PostgreSQL: ``SELECT ... FOR SHARE`` of the lease row, which a takeover's ``UPDATE``
    must wait for, while concurrent writers of this run do not wait for each other.
    """
    if lease.dialect == "sqlite":
        result = await session.execute(
            update(RunLease)
            .where(RunLease.name == lease.name, RunLease.token == lease.token)
            .values(token=RunLease.token)
        )
        held = getattr(result, "rowcount", 0) == 1
    else:
        token = await session.scalar(
            select(RunLease.token).where(RunLease.name == lease.name).with_for_update(read=True)
        )
        held = token == lease.token
    if not held:
        lease.lost.set()
        raise LeaseLost(f"lease {lease.name!r} token {lease.token} is no longer current")


def _advisory_key(name: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
    )


async def _ensure_row(engine: AsyncEngine, name: str) -> None:
    """The lease row exists from the first run on (free: ``expires_at`` NULL)."""
    with contextlib.suppress(IntegrityError):  # another process inserted it first
        async with engine.begin() as conn:
            if await conn.scalar(select(RunLease.name).where(RunLease.name == name)) is None:
                await conn.execute(insert(RunLease).values(name=name, token=0))


async def _take_row(
    engine: AsyncEngine, name: str, holder: str, ttl: float, *, force: bool
) -> int | None:
    """Take the lease row if free or expired (any state when ``force``): the new token, or None.

    One ``UPDATE``: on SQLite it holds the write lock from its first step, so two processes
    cannot both see the lease free.
    """
    await _ensure_row(engine, name)
    now = utcnow()
    condition = [RunLease.name == name]
    if not force:
        condition.append(or_(RunLease.expires_at.is_(None), RunLease.expires_at <= now))
    async with engine.begin() as conn:
        token = await conn.scalar(
            update(RunLease)
            .where(*condition)
            .values(
                token=RunLease.token + 1,
                holder=holder,
                acquired_at=now,
                expires_at=now + timedelta(seconds=ttl),
            )
            .returning(RunLease.token)
        )
    return None if token is None else int(token)


async def _holder(engine: AsyncEngine, name: str) -> RunInProgress:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(RunLease.holder, RunLease.acquired_at, RunLease.expires_at).where(
                    RunLease.name == name
                )
            )
        ).first()
    if row is None:
        return RunInProgress(None, None, None)
    return RunInProgress(row.holder, row.acquired_at, row.expires_at)


async def _renew(engine: AsyncEngine, lease: Lease, ttl: float) -> None:
    """Push the expiry forward every ``ttl / 3`` s while the run goes; note a lost lease."""
    while True:
        await asyncio.sleep(ttl / 3)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(
                    update(RunLease)
                    .where(RunLease.name == lease.name, RunLease.token == lease.token)
                    .values(expires_at=utcnow() + timedelta(seconds=ttl))
                )
        except Exception:  # the database is briefly away: try again next time
            continue
        if getattr(result, "rowcount", 0) != 1:
            lease.lost.set()
            return


async def _release(engine: AsyncEngine, lease: Lease) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            update(RunLease)
            .where(RunLease.name == lease.name, RunLease.token == lease.token)
            .values(expires_at=None)
        )


@contextlib.asynccontextmanager
async def hold_run_lock(
    engine: AsyncEngine,
    *,
    holder: str | None = None,
    lease_seconds: float = LEASE_SECONDS,
    name: str = LOCK_NAME,
) -> AsyncIterator[Lease]:
    """Hold the run lock for the block, or raise :class:`RunInProgress` at once."""
    dialect = engine.dialect.name
    holder = holder or default_holder()
    async with contextlib.AsyncExitStack() as stack:
        if dialect == "postgresql":
            lock_conn = await stack.enter_async_context(engine.connect())
            await lock_conn.execution_options(isolation_level="AUTOCOMMIT")
            key = _advisory_key(name)
            if not await lock_conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}):
                raise await _holder(engine, name)

            async def unlock() -> None:
                with contextlib.suppress(Exception):  # a dropped connection dropped the lock
                    await lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})

            stack.push_async_callback(unlock)
        # Under the advisory lock the lock is ours whatever the row says (a holder that died
        # left it unreleased): take the row unconditionally.
        token = await _take_row(engine, name, holder, lease_seconds, force=dialect != "sqlite")
        if token is None:
            raise await _holder(engine, name)
        lease = Lease(name=name, token=token, holder=holder, acquired_at=utcnow(), dialect=dialect)
        renewer = asyncio.ensure_future(_renew(engine, lease, lease_seconds))

        async def stop_renewing() -> None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

        stack.push_async_callback(_release, engine, lease)  # runs after the renewer stopped
        stack.push_async_callback(stop_renewing)
        yield lease
