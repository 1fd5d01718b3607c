"""``python -m benchmarks.journal``: what a run journal (``journal=Journal(...)``) costs.

Issue 26, item 2. Each figure is the median of ``--reps`` runs, in this process, of the
same call with and without a journal on a SQLite file store (a fresh file per run):

- overhead_immediate's run (``fn`` returns at once, C=100, ``key=str``): batched mode, and a
  batched journal on the in-memory store for comparison; then a resumed call (every item
  read from the journal, none run);
- transactional mode needs a session per item, so it is measured against the same call with
  ``context=sessions(...)`` on the same SQLite file and no journal, each item inserting one
  row (fewer items: a SQLite commit per item is the cost of that baseline);
- the seed's case x100 (20 items x 150 ms, C=3) with a batched SQLite journal: the share of
  the makespan the journal adds.

Wall time, on a shared machine: compare the rows of one sitting, not across sittings.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchkit import Journal, MemoryStateStore, batch_process

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["main"]


async def _immediate(i: int) -> int:
    return i


async def _with_session(i: int, session: Any) -> int:
    from sqlalchemy import text

    await session.execute(text("INSERT INTO bench_rows (item) VALUES (:i)"), {"i": i})
    return i


async def _seed_item(i: int) -> int:
    await asyncio.sleep(0.15)
    return i


def _sqlite(tmp: Path) -> tuple[Any, Any]:
    from sqlalchemy.ext.asyncio import create_async_engine

    from batchkit.sqlalchemy import SQLAlchemyStateStore

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp / f'j{time.monotonic_ns()}.db'}")
    return engine, SQLAlchemyStateStore(engine)


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def _one(case: str, n: int, tmp: Path) -> float:
    """One run of ``case``: its wall time in seconds (the store's set-up not counted)."""
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from batchkit.sqlalchemy import sessions

    engine, store = _sqlite(tmp)
    try:
        await store.scan("")  # creates the table: not part of any figure
        async with engine.begin() as conn:
            from sqlalchemy import text

            await conn.execute(text("CREATE TABLE bench_rows (item INTEGER NOT NULL)"))
        kw: dict[str, Any] = {"key": str, "concurrency": 100}
        if case == "plain":
            return await _timed(lambda: batch_process(range(n), _immediate, **kw))
        if case == "memory":
            j = Journal(MemoryStateStore(), "bench")
            return await _timed(lambda: batch_process(range(n), _immediate, journal=j, **kw))
        if case == "batched":
            j = Journal(store, "bench")
            return await _timed(lambda: batch_process(range(n), _immediate, journal=j, **kw))
        if case == "resumed":
            j = Journal(store, "bench")
            await store.set_many(
                {f"batchkit/journal/bench/{i}": {"kind": "success", "attempts": 1, "value": i}
                 for i in range(n)}
            )  # fmt: skip
            return await _timed(lambda: batch_process(range(n), _immediate, journal=j, **kw))
        ctx = sessions(async_sessionmaker(engine))
        kw["concurrency"] = 1  # SQLite: one writer at a time
        if case == "sessions":
            return await _timed(lambda: batch_process(range(n), _with_session, context=ctx, **kw))
        if case == "transactional":
            j = Journal(store, "bench", mode="transactional")
            return await _timed(
                lambda: batch_process(range(n), _with_session, context=ctx, journal=j, **kw)
            )
        kw["concurrency"] = 3
        if case == "seed":
            return await _timed(lambda: batch_process(range(20), _seed_item, **kw))
        if case == "seed_journal":
            j = Journal(store, "bench")
            return await _timed(lambda: batch_process(range(20), _seed_item, journal=j, **kw))
        raise ValueError(case)
    finally:
        await engine.dispose()


def _median(case: str, n: int, reps: int, tmp: Path) -> float:
    return statistics.median(asyncio.run(_one(case, n, tmp)) for _ in range(reps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.journal")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n", type=int, default=100_000, help="items of the batched rows")
    parser.add_argument("--n-tx", type=int, default=2_000, help="items of the session rows")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        us = {c: _median(c, args.n, args.reps, tmp) / args.n * 1e6
              for c in ("plain", "memory", "batched", "resumed")}  # fmt: skip
        tx = {c: _median(c, args.n_tx, args.reps, tmp) / args.n_tx * 1e6
              for c in ("sessions", "transactional")}  # fmt: skip
        seed = {c: _median(c, 20, args.reps, tmp) for c in ("seed", "seed_journal")}
    print("| call | µs/item | journal's cost, µs/item |\n|---|--:|--:|")
    print(f"| overhead_immediate, `key=str`, no journal | {us['plain']:.2f} | |")
    for c, label in (("memory", "batched, `MemoryStateStore`"), ("batched", "batched, SQLite")):
        print(f"| overhead_immediate, {label} | {us[c]:.2f} | {us[c] - us['plain']:+.2f} |")
    print(f"| every item resumed from a SQLite journal | {us['resumed']:.2f} | |")
    print(f"| `context=sessions(...)` on SQLite, C=1, no journal | {tx['sessions']:.1f} | |")
    print(
        f"| the same, transactional journal | {tx['transactional']:.1f} | "
        f"{tx['transactional'] - tx['sessions']:+.1f} |"
    )
    share = (seed["seed_journal"] / seed["seed"] - 1) * 100
    print(
        f"\nseed x100: {seed['seed']:.4f} s without, {seed['seed_journal']:.4f} s with a "
        f"batched SQLite journal ({share:+.2f} %)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
