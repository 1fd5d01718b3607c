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


async def slow_head(x: int) -> int:
    """Item 0 takes a second, the rest return at once: an ordered stream waits on its chunk."""
    if x == 0:
        await asyncio.sleep(1.0)
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


def first_time_anywhere(marker: str) -> bool:
    """True for the first caller in any process on this machine: it creates ``marker``
    atomically (a re-run on another worker finds it and behaves)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


async def kill_worker_once(x: int, marker: str) -> int:
    """The first item 7 to run anywhere kills its worker process; the re-run succeeds."""
    if x == 7 and first_time_anywhere(marker):
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


# ------------------------------------------------------------------ faults (issue 21)
async def stubborn_cleanup(x: int, cleanup: float = 3.0) -> int:
    """Runs until cancelled, then cleans up for ``cleanup`` seconds, ignoring cancellation."""
    _add("stubborn")
    try:
        await asyncio.sleep(3600)
    finally:
        loop = asyncio.get_running_loop()
        end = loop.time() + cleanup
        while loop.time() < end:
            try:
                await asyncio.sleep(end - loop.time())
            except asyncio.CancelledError:
                _add("stubborn_cancelled")
        _add("stubborn", -1)
    return x


def _rebuild_on_a_worker_only(x: int) -> DriverUnloadable:
    from distributed import get_worker

    get_worker()  # ValueError in the driver: "No worker found"
    return DriverUnloadable(x)


class DriverUnloadable:
    """Pickles anywhere; unpickles only inside a Dask worker (as a value of a class whose
    module only the workers have would)."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_on_a_worker_only, (self.x,))


async def returns_driver_unloadable(x: int) -> Any:
    return DriverUnloadable(x) if x == 1 else x


async def _failures_announced(n: int) -> None:
    """Wait until the scheduler holds ``n`` failure alerts of the current run's topic."""
    from distributed import get_worker

    from batchkit._dask.worker import current_run

    run = current_run()
    assert run is not None
    assert run.spec is not None
    topic = run.spec.topic
    worker = get_worker()
    while True:
        events = await worker.scheduler.events(topic=topic)
        if sum(1 for _, msg in events if msg.get("x")) >= n:
            return
        await asyncio.sleep(0.01)


async def fail_three_then_die_once(x: int, marker: str) -> int:
    """Items 0-2 fail; item 3, once the driver can have heard of those three failures,
    kills its worker the first time it runs anywhere; the rest succeed."""
    if x < 3:
        raise PlannedError(f"item {x}")
    if x == 3 and first_time_anywhere(marker):
        await _failures_announced(3)
        os._exit(1)
    return x


async def die_once_after_others_finish(x: int, marker: str, others: int) -> int:
    """The first run of item 0 anywhere waits until ``others`` items finished in this
    process, then kills its worker; every other run returns at once."""
    if x == 0 and first_time_anywhere(marker):
        while STATE.get("done", 0) < others:
            await asyncio.sleep(0.005)
        os._exit(1)
    _add("done")
    return x


async def slow(x: int, delay: float = 0.2) -> int:
    _add("started")
    await asyncio.sleep(delay)
    _add("done")
    return x


class Unsendable:
    """An item that cannot be pickled (it holds a lock)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.Lock()


async def chaotic(item: Any, ctx: str, marker: str = "") -> Any:
    """Item ``(index, behaviour)`` of the chaos suite: ``ok`` returns the index after a short
    sleep, ``error`` raises ``PlannedError``, ``hang`` never ends by itself, ``stubborn``
    never ends and cleans up for 1 s ignoring cancellation, ``unloadable`` returns a value
    the driver cannot unpickle, ``die`` kills its worker the first time it runs anywhere
    (``marker``), then returns its index."""
    index, behaviour = item
    if behaviour == "ok":
        await asyncio.sleep(0.005)
        return index
    if behaviour == "error":
        raise PlannedError(f"item {index}")
    if behaviour == "hang":
        return await hang(index)
    if behaviour == "stubborn":
        return await stubborn_cleanup(index, cleanup=1.0)
    if behaviour == "unloadable":
        return DriverUnloadable(index)
    assert behaviour == "die"
    if not first_time_anywhere(f"{marker}-{index}"):
        return index
    os._exit(1)


def _rebuild_on_the_driver_only(x: int) -> WorkerUnloadable:
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return WorkerUnloadable(x)
    raise ImportError(f"item {x}: its module is not installed on this worker")


class WorkerUnloadable:
    """An item that pickles on the driver and does not unpickle on a worker (as an item of a
    class whose module the workers lack would)."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_on_the_driver_only, (self.x,))


async def sees_a_span(x: int) -> bool:
    """Whether an OpenTelemetry span is current in ``fn`` on the worker."""
    from opentelemetry import trace

    return bool(trace.get_current_span().get_span_context().is_valid)


async def counted(x: int) -> int:
    """Counts the items that reached a worker (``ran``) and succeeds."""
    _add("ran")
    return x


async def counted_down(x: int) -> int:
    """Counts the items that reached a worker (``ran``) and fails: the upstream is down."""
    _add("ran")
    raise ConnectionError(f"down {x}")


async def always_down(x: int) -> int:
    """An upstream that is always down: each attempt fails after 20 ms."""
    _add("always_down")
    await asyncio.sleep(0.02)
    raise ConnectionError(f"down: {x}")


# ------------------------------------------------------------------ limit groups (issue 25)
def upstream(item: tuple[Any, ...]) -> str:
    """A ``LimitGroup.by``: the item's upstream."""
    return str(item[0])


Grouped = tuple[str, int, str, tuple[int, ...]]
"""(upstream, index, folder, the fast items a slow one waits for)."""


def _mark(folder: str, index: int) -> None:
    with open(os.path.join(folder, f"fast-{index}"), "w"):
        pass


def _marked(folder: str, indices: tuple[int, ...]) -> bool:
    return all(os.path.exists(os.path.join(folder, f"fast-{i}")) for i in indices)


async def grouped(item: Grouped, ctx: str) -> tuple[int, str, float, float]:
    """A ``fast`` item leaves its mark in ``folder``; a ``slow`` one waits until the fast
    items it names (those of its chunk) have left theirs, so it finishes only if they ran
    beside it (head-of-line blocking in the chunk would hang). Returns (pid, upstream,
    start, end), wall-clock times comparable across local processes."""
    name, index, folder, waits_for = item
    start = time.time()
    if name == "fast":
        _mark(folder, index)
    else:
        while not _marked(folder, waits_for):
            await asyncio.sleep(0.005)  # polls the thing itself (its files), no margin
        await asyncio.sleep(0.02)  # slow items overlap, if their limit lets them
    return os.getpid(), name, start, time.time()


def tokens(item: tuple[Any, ...]) -> int:
    """A ``RateLimit.weight``: the item's index is its weight."""
    return int(item[1])


async def weighed(item: tuple[Any, ...]) -> tuple[int, int, float]:
    """(pid, weight, start) in wall-clock time."""
    return os.getpid(), item[1], time.time()
