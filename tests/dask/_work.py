"""Functions the Dask tests ship to worker processes (importable there, module-level state).

``STATE`` lives in each worker process; tests read it with ``client.run(get_state)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import batchkit

STATE: dict[str, int] = {}
SPANS: list[tuple[int, int, float, float]] = []
"""(pid, index, start, end) in wall-clock time of every attempt of ``planned`` here."""
_lock = threading.Lock()


def _add(name: str, n: int = 1) -> None:
    with _lock:
        STATE[name] = STATE.get(name, 0) + n


def reset_state() -> None:
    STATE.clear()
    SPANS.clear()


def get_state() -> dict[str, int]:
    return dict(STATE)


async def timed(x: int, delay: float = 0.02) -> tuple[int, float, float]:
    """(worker pid, start, end) in wall-clock time, comparable across local processes."""
    _add("timed")
    start = time.time()
    await asyncio.sleep(delay)
    return os.getpid(), start, time.time()


async def quick(x: int) -> int:
    return x


async def hang(x: int) -> int:
    """Never ends by itself; counts how many run now and how many were cancelled."""
    _add("running")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        _add("cancelled")
        raise
    finally:
        _add("running", -1)
    return x


async def first_fails_rest_hang(x: int) -> int:
    if x == 0:
        raise ValueError("boom")
    return await hang(x)


class Counting:
    """A context that counts its enters and exits in the worker."""

    async def __aenter__(self) -> str:
        _add("entered")
        return "ctx"

    async def __aexit__(self, *exc: object) -> None:
        _add("exited")


def counting() -> Counting:
    return Counting()


async def hang_in_context(x: int, ctx: str) -> int:
    return await hang(x)


async def timed_in_context(x: int, ctx: str) -> tuple[int, float, float]:
    return await timed(x)


async def kill_worker_once(x: int, marker: str) -> int:
    """The first item 7 to run anywhere kills its worker process; the re-run succeeds."""
    if x == 7:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os._exit(1)
    await asyncio.sleep(0.01)
    return x


async def kill_worker_always(x: int) -> int:
    if x == 7:
        await asyncio.sleep(0.05)  # let the chunk's other items start first
        os._exit(1)
    await asyncio.sleep(0.01)
    return x


_tries: dict[int, int] = {}


async def flaky(x: int) -> int:
    """Fails the first attempt of every item on the worker that runs it."""
    n = _tries[x] = _tries.get(x, 0) + 1
    if n == 1:
        raise ConnectionError(f"flaky {x}")
    return x


async def warns(x: int) -> int:
    logging.getLogger("tests.dask.app").warning("item %d on the worker", x)
    return x


def in_thread(x: int) -> tuple[int, bool]:
    return x, threading.current_thread() is not threading.main_thread()


class Unpicklable(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"code {code}")
        self.code = code


async def raises_unpicklable(x: int) -> int:
    raise Unpicklable(x)


async def returns_lock(x: int) -> Any:
    return threading.Lock() if x == 1 else x


# --------------------------------------------------------------- per-worker SQLAlchemy
def make_engine(url: str) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    _add("engines")
    return create_async_engine(url, connect_args={"timeout": 30})


async def dispose_engine(engine: Any) -> None:
    await engine.dispose()
    _add("disposed")


class CountingSession:
    """The context factory's product: a fresh session per item on the worker's engine."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._session: Any = None

    async def __aenter__(self) -> Any:
        from sqlalchemy.ext.asyncio import AsyncSession

        self._session = AsyncSession(self._engine.get())
        _add("sessions")
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()  # rolls back what was not committed
        _add("closed")


async def insert(x: int, session: Any) -> int:
    from sqlalchemy import text

    await session.execute(text("INSERT INTO t (x) VALUES (:x)"), {"x": x})
    await session.commit()
    return x


async def insert_then_hang(x: int, session: Any) -> int:
    from sqlalchemy import text

    await session.execute(text("INSERT INTO t (x) VALUES (:x)"), {"x": x})
    _add("inserted")
    await asyncio.sleep(3600)
    await session.commit()
    return x


async def fail_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


async def hang_unless_small(x: int) -> int:
    if x < 5:
        return x
    return await hang(x)


def new_session(engine: Any) -> Any:
    from sqlalchemy.ext.asyncio import AsyncSession

    return AsyncSession(engine.get(), expire_on_commit=False)


async def insert_no_commit(x: int, session: Any) -> int:
    from sqlalchemy import text

    await session.execute(text("INSERT INTO t (x) VALUES (:x)"), {"x": x})
    return x


async def fail_0_and_4_rest_hang(x: int) -> int:
    if x in (0, 4):
        raise ValueError(f"boom {x}")
    return await hang(x)


async def attempt_key(x: int) -> str:
    """The idempotency key batchkit gives this attempt on the worker."""
    return batchkit.current_attempt().idempotency_key


class PlannedError(Exception):
    """The error a ``planned`` item raises (picklable: one message argument)."""


def get_spans() -> list[tuple[int, int, float, float]]:
    return list(SPANS)


async def planned(item: tuple[int, str, float], ctx: str) -> int:
    """Item ``(index, behaviour, delay)``: ``ok`` sleeps ``delay`` and returns the index,
    ``error`` sleeps then raises ``PlannedError``, ``hang`` never ends by itself. Each attempt's
    span (also a cancelled one's) goes to ``SPANS``."""
    index, behaviour, delay = item
    start = time.time()
    try:
        if behaviour == "hang":
            await asyncio.sleep(3600)
        await asyncio.sleep(delay)
        if behaviour == "error":
            raise PlannedError(f"item {index}")
        return index
    finally:
        with _lock:
            SPANS.append((os.getpid(), index, start, time.time()))
