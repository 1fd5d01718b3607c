"""The process the kill -9 test kills (test_journal.py).

``python _journal_child.py URL ITEMS CONCURRENCY SEED``: runs items ``0 .. ITEMS-1`` with a
transactional journal named ``kill``: each item inserts one row ``(item)`` into ``results`` in
its own session (``sessions(...)``) and waits a few milliseconds. If it is not killed first,
it prints one JSON line: the keys it resumed, the keys it ran to success, and the rest.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from batchkit import Journal, batch_process
from batchkit.sqlalchemy import SQLAlchemyStateStore, sessions

results = sa.Table(
    "results",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item", sa.Integer, nullable=False),  # not unique: a second row would show
)


async def main(url: str, items: int, concurrency: int, seed: int) -> None:
    rng = random.Random(seed)
    delays = [rng.uniform(0.002, 0.02) for _ in range(items)]
    # SQLite's busy timeout is only a hang guard: each transaction is two short statements.
    connect_args = {"timeout": 60} if url.startswith("sqlite") else {}
    engine = create_async_engine(
        url, pool_size=concurrency + 1, max_overflow=0, connect_args=connect_args
    )
    store = SQLAlchemyStateStore(engine)
    journal = Journal(store, "kill", mode="transactional")

    async def fn(i: int, session: AsyncSession) -> int:
        await session.execute(sa.insert(results).values(item=i))
        await asyncio.sleep(delays[i])
        return i

    try:
        report = await batch_process(
            range(items),
            fn,
            context=sessions(async_sessionmaker(engine)),
            key=str,
            journal=journal,
            concurrency=concurrency,
        )
    finally:
        await engine.dispose()
    resumed = [o.index for o in report.successes if o.resumed]
    ran = [o.index for o in report.successes if not o.resumed]
    failed = [o.index for o in report.failures]
    print(json.dumps({"resumed": resumed, "ran": ran, "failed": failed}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
