"""One of the processes that contend on a SQLAlchemyStateStore (test_state_store.py).

``python _contend.py URL INCREMENTS ROUNDS SEED``: opens the store (creating its table if it is
missing, as the other process may do at the same moment), prints ``ready``, waits for a line
on stdin (the parent's ``go``, sent once both processes are ready), then

* adds 1 to the key ``counter`` ``INCREMENTS`` times by read + compare_and_set, reading again
  after every lost race, and
* ``ROUNDS`` times writes the keys ``k/0`` .. ``k/9`` with one set_many, handing them over in
  a shuffled order,

interleaved, and prints one JSON line: ``{"conflicts": <lost compare_and_set races>}``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

from sqlalchemy.ext.asyncio import create_async_engine

from batchkit.sqlalchemy import SQLAlchemyStateStore

KEYS = [f"k/{i}" for i in range(10)]


async def increment(store: SQLAlchemyStateStore) -> int:
    """Add 1 to ``counter``; return how many races were lost on the way."""
    lost = 0
    while True:
        entry = await store.get("counter")
        current = 0 if entry is None else entry.value
        assert isinstance(current, int)
        won = await store.compare_and_set(
            "counter", current + 1, expected=0 if entry is None else entry.version
        )
        if won is not None:
            return lost
        lost += 1


async def main(url: str, increments: int, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    # SQLite's busy timeout is only a hang guard here: every transaction is a few statements.
    connect_args = {"timeout": 60} if url.startswith("sqlite") else {}
    engine = create_async_engine(url, pool_size=1, max_overflow=0, connect_args=connect_args)
    try:
        store = SQLAlchemyStateStore(engine)
        await store.get("counter")  # creates the table if it is not there yet
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        conflicts = 0
        steps = ["inc"] * increments + ["set"] * rounds
        rng.shuffle(steps)
        for step in steps:
            if step == "inc":
                conflicts += await increment(store)
            else:
                keys = KEYS[:]
                rng.shuffle(keys)
                await store.set_many(dict.fromkeys(keys, seed))
        print(json.dumps({"conflicts": conflicts}), flush=True)
    finally:
        await engine.dispose()


if __name__ == "__main__":
    url, increments, rounds, seed = sys.argv[1], *map(int, sys.argv[2:5])
    asyncio.run(main(url, increments, rounds, seed))
