"""One process running a batch behind a Breaker kept in a SQLAlchemyStateStore
(test_breaker_processes.py).

``python _breaker_run.py URL CIRCUITS UPSTREAM``: opens the store, prints ``ready``, waits
for a line on stdin (the parent's ``go``, so two processes can start at once), then runs 6
items of each circuit in ``CIRCUITS`` (comma-separated) through ``batch_process`` with
``Breaker(store, name="up", by=circuit, open_after=3, cool_down=3600)``, against an upstream
that is ``down`` (every call raises) or ``up``, and prints one JSON line: each item's
``[circuit, kind, skip reason or null]``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from sqlalchemy.ext.asyncio import create_async_engine

from batchkit import Breaker, Failure, ItemSkipped, Outcome, batch_process
from batchkit.sqlalchemy import SQLAlchemyStateStore


def _reason(outcome: Outcome[object, object]) -> str | None:
    if isinstance(outcome, Failure) and isinstance(outcome.error, ItemSkipped):
        return outcome.error.reason
    return None


async def main(url: str, circuits: list[str], upstream: str) -> None:
    connect_args = {"timeout": 60} if url.startswith("sqlite") else {}  # a hang guard only
    engine = create_async_engine(url, pool_size=1, max_overflow=0, connect_args=connect_args)
    try:
        store = SQLAlchemyStateStore(engine)
        await store.get("batchkit/breaker/up")  # creates the table if it is not there yet
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)

        async def call(item: tuple[str, int]) -> int:
            if upstream == "down":
                raise ConnectionError(item)
            return item[1]

        breaker = Breaker(store, name="up", by=lambda it: it[0], open_after=3, cool_down=3600)
        items = [(c, i) for i in range(6) for c in circuits]
        report = await batch_process(items, call, concurrency=1, breaker=breaker)
        out = [[c, o.kind, _reason(o)] for (c, _), o in zip(items, report, strict=True)]
        print(json.dumps(out), flush=True)
    finally:
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2].split(","), sys.argv[3]))
