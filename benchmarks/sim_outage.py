"""``python -m benchmarks.sim_outage``: an upstream outage across cron ticks, with and without
a :class:`~batchkit.Breaker` (issue 26, item 3).

Five ticks, one a minute, each a ``batch_process`` of the same items with a per-attempt
timeout; the upstream is down (every attempt hangs until the timeout) during ticks 1 to 3 and
up in ticks 4 and 5. With a breaker, the ticks share its circuits through a state store: in
memory, or a ``SQLAlchemyStateStore`` on SQLite (or any URL given).

Every run happens in virtual time (``simulated.run_virtual``): ``fn`` sleeps on the loop's
clock, the breaker's and the store's clocks are the loop's, so the figures are exact. A SQL
store cannot run in virtual time (its driver's own timeouts would jump ahead while the
database works), so :class:`RealTimeStore` runs it on an event loop of its own in a thread,
in real time; the virtual loop waits for each call without moving its clock while it is
quick. No figure depends on when a write lands: a run holds its circuits in memory, reads
them once before its first item, and awaits its last write before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import batchkit
from batchkit import Breaker, ItemSkipped, MemoryStateStore, StateEntry, StateStore

from .simulated import run_virtual

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator, Mapping

    from batchkit import JsonValue

__all__ = [
    "CountingStore",
    "OutageRow",
    "RealTimeStore",
    "main",
    "markdown",
    "outage_rows",
    "recovery_tick",
    "sql_store",
]

T = TypeVar("T")

TICKS = 5
PERIOD_S = 60.0
"""The cron period: tick ``k`` (from 1) starts at ``(k - 1) * PERIOD_S``."""
DOWN_TICKS = frozenset({1, 2, 3})
ITEMS = 20
CONCURRENCY = 4
TIMEOUT_S = 5.0
OK_S = 0.5
"""A healthy attempt's latency (+-20 % jitter, seeded)."""
OPEN_AFTER = 5
COOL_DOWN_S = 30.0
"""Less than ``PERIOD_S``: each tick of an outage starts with the circuit half-open."""


class CountingStore:
    """A :class:`~batchkit.StateStore` that counts the calls made to the one it wraps."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.calls = Counter[str]()

    async def _call(self, name: str, coro: Coroutine[Any, Any, T]) -> T:
        self.calls[name] += 1
        return await self._on_store(coro)

    async def _on_store(self, coro: Coroutine[Any, Any, T]) -> T:
        return await coro

    async def peek(self, key: str) -> StateEntry | None:
        """The key's entry, not counted (the scenario's own look)."""
        return await self._on_store(self.inner.get(key))

    async def get(self, key: str) -> StateEntry | None:
        return await self._call("get", self.inner.get(key))

    async def compare_and_set(
        self, key: str, value: JsonValue, *, expected: int
    ) -> StateEntry | None:
        return await self._call(
            "compare_and_set", self.inner.compare_and_set(key, value, expected=expected)
        )

    async def set_many(self, values: Mapping[str, JsonValue]) -> None:
        await self._call("set_many", self.inner.set_many(values))

    async def scan(self, prefix: str) -> list[StateEntry]:
        return await self._call("scan", self.inner.scan(prefix))

    async def prune(self, older_than: float, *, prefix: str = "") -> int:
        return await self._call("prune", self.inner.prune(older_than, prefix=prefix))


class RealTimeStore(CountingStore):
    """A counted store whose calls run in real time on an event loop of its own, in a
    thread: for a SQL store used from a run in virtual time.

    The virtual loop awaits each call through ``run_in_executor``, which looptime waits for
    in real time without moving its clock while the call is quick (a call taking longer
    than most of the time to the loop's next timer would move it).
    """

    def __init__(self, make: Callable[[], StateStore]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        super().__init__(self._run(_made(make)))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _on_store(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, self._run, coro)

    def close(self, cleanup: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        """Run ``cleanup`` (e.g. disposing of the engine) on the store's loop, then stop it."""
        try:
            if cleanup is not None:
                self._run(cleanup())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


async def _made(make: Callable[[], T]) -> T:
    return make()  # on the store's loop: an async engine binds to the loop it is made on


@contextlib.contextmanager
def sql_store(url: str, clock: Callable[[], float]) -> Iterator[RealTimeStore]:
    """A ``SQLAlchemyStateStore`` on ``url`` in real time, its ``updated_at`` on ``clock``."""
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

    from batchkit.sqlalchemy import SQLAlchemyStateStore

    engines: list[AsyncEngine] = []

    def make() -> StateStore:
        engines.append(create_async_engine(url, pool_size=1, max_overflow=0))
        return SQLAlchemyStateStore(engines[0], clock=clock)

    store = RealTimeStore(make)
    try:
        yield store
    finally:
        store.close(engines[0].dispose)


# -- the scenario --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutageRow:
    setup: str
    tick: int
    down: bool
    attempts: int
    timeouts: int
    probes: int
    """Attempts of a tick that began with the circuit open: its first attempt is the probe."""
    skipped: int
    """Items skipped ``circuit_open``."""
    succeeded: int
    seconds: float
    """The tick's wall time (virtual)."""
    circuit: str
    """The circuit when the tick ended, as the store holds it: ``open`` or ``closed``."""
    store_calls: int


def latencies(seed: int = 26) -> list[list[float]]:
    """Each tick's healthy latency per item."""
    rng = random.Random(seed)
    return [[OK_S * rng.uniform(0.8, 1.2) for _ in range(ITEMS)] for _ in range(TICKS)]


def _is_open(entry: StateEntry | None) -> bool:
    value = entry.value if entry is not None else None
    c = value.get("") if isinstance(value, dict) else None
    return isinstance(c, dict) and c.get("opened_at") is not None


async def _ticks(setup: str, store: CountingStore | None) -> list[OutageRow]:
    loop = asyncio.get_running_loop()
    rows = []
    for tick, lat in enumerate(latencies(), start=1):
        await asyncio.sleep((tick - 1) * PERIOD_S - loop.time())
        down = tick in DOWN_TICKS
        attempts = 0

        async def fn(i: int, lat: list[float] = lat, down: bool = down) -> int:
            nonlocal attempts
            attempts += 1
            await asyncio.sleep(3600 if down else lat[i])  # down: hangs until the timeout
            return i

        options: dict[str, Any] = {"concurrency": CONCURRENCY, "timeout": TIMEOUT_S}
        was_open = False
        calls_before = 0
        if store is not None:
            key = "batchkit/breaker/upstream"
            was_open = _is_open(await store.peek(key))
            calls_before = store.calls.total()
            options["breaker"] = Breaker(
                store,
                name="upstream",
                open_after=OPEN_AFTER,
                cool_down=COOL_DOWN_S,
                clock=loop.time,
            )
        start = loop.time()
        report = await batchkit.batch_process(range(ITEMS), fn, **options)
        seconds = loop.time() - start
        calls = store.calls.total() - calls_before if store is not None else 0
        is_open = store is not None and _is_open(await store.peek(key))
        kinds = Counter(o.kind for o in report)
        skipped = sum(
            1
            for f in report.failures
            if isinstance(f.error, ItemSkipped) and f.error.reason == "circuit_open"
        )
        rows.append(
            OutageRow(
                setup=setup,
                tick=tick,
                down=down,
                attempts=attempts,
                timeouts=kinds["timeout"],
                probes=min(attempts, 1) if was_open else 0,
                skipped=skipped,
                succeeded=kinds["success"],
                seconds=seconds,
                circuit="open" if is_open else "closed",
                store_calls=calls,
            )
        )
    return rows


async def _run(setup: str, url: str | None) -> list[OutageRow]:
    if setup == "none":
        return await _ticks(setup, None)
    if setup == "memory":
        return await _ticks(setup, CountingStore(MemoryStateStore(clock=time_of_loop())))
    assert url is not None
    with sql_store(url, time_of_loop()) as store:
        return await _ticks(setup, store)


def time_of_loop() -> Callable[[], float]:
    return asyncio.get_running_loop().time


SETUPS = {
    "none": "no breaker",
    "memory": "Breaker, MemoryStateStore",
    "sql": "Breaker, SQLAlchemyStateStore",
}


def outage_rows(setup: str, url: str | None = None) -> list[OutageRow]:
    """One setup's ticks; ``"sql"`` needs a database ``url`` (``sqlite+aiosqlite:///...``)."""
    return run_virtual(functools.partial(_run, setup, url))  # type: ignore[no-any-return]


def recovery_tick(rows: list[OutageRow]) -> int | None:
    """The first tick after the outage that ended with the circuit closed and an item done."""
    last_down = max(DOWN_TICKS)
    return next(
        (r.tick for r in rows if r.tick > last_down and r.circuit == "closed" and r.succeeded),
        None,
    )


# -- the report ----------------------------------------------------------------------------
def markdown(rows: list[OutageRow], sql_name: str = "SQLite") -> str:
    out = [
        f"**An upstream outage across cron ticks** ({TICKS} ticks {PERIOD_S:g} s apart, "
        f"{ITEMS} items each, concurrency={CONCURRENCY}, timeout={TIMEOUT_S:g} s; the upstream "
        f"hangs in ticks {min(DOWN_TICKS)} to {max(DOWN_TICKS)} and answers in {OK_S:g} s after; "
        f"`Breaker(open_after={OPEN_AFTER}, cool_down={COOL_DOWN_S:g})`):",
        "",
        "| setup | tick | upstream | attempts | timeouts | of them probes "
        "| skipped `circuit_open` | succeeded | tick time (s) | circuit after | store calls |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        setup = SETUPS[r.setup].replace(
            "Store", "Store" if r.setup == "memory" else f"Store ({sql_name})"
        )
        stored = r.setup != "none"
        out.append(
            f"| {setup} | {r.tick} | {'down' if r.down else 'up'} | {r.attempts} | {r.timeouts} "
            f"| {r.probes if stored else '-'} | {r.skipped} | {r.succeeded} | {r.seconds:.2f} "
            f"| {r.circuit if stored else '-'} | {r.store_calls if stored else '-'} |"
        )
    setups = dict.fromkeys(r.setup for r in rows)
    recovered = ", ".join(
        f"{SETUPS[s]}: tick {recovery_tick([r for r in rows if r.setup == s])}"
        for s in setups
        if s != "none"
    )
    out += ["", f"Recovery detected (the circuit closed) in: {recovered}."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim_outage", description=__doc__)
    parser.add_argument("--url", help="a database URL for the SQL store (default: SQLite file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite+aiosqlite:///{Path(tmp) / 'state.db'}"
        rows = [r for s in SETUPS for r in outage_rows(s, url)]
    name = "SQLite" if url.startswith("sqlite") else url.split("+")[0].split(":")[0]
    print(markdown(rows, name), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
