"""Where a worker with nothing to start waits, and the starvation guard's yield.

A stream's workers wait for room in its window: one future per worker, woken one per item the
consumer takes (a shared future would wake every waiting worker for each item: measured +40%
per item). Workers waiting for a retry's time or an item's end share one future. And every
worker counts down a shared budget (items, or loop time) and yields to the loop when it is
spent, so a ``fn`` that never awaits cannot starve the loop or the watchdog.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final, final

if TYPE_CHECKING:
    from collections.abc import Callable

    from .sinks import Sink

__all__ = ["YIELD_EVERY_SECONDS", "Waits"]

# Yield to the event loop after this much loop time (or, in virtual time, this many items
# per worker) without a suspension. The budget is shared and refilled once per loop
# iteration; once it is spent, every worker that comes round yields, so the count scales
# with the number of workers to keep those extra resumptions rare.
YIELD_EVERY_ITEMS_PER_WORKER: Final = 32
YIELD_EVERY_SECONDS: Final = 0.002


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@final
class Waits:
    """The waits of one run's ``slots`` workers; ``sink.producers_waiting`` tells a stream's
    consumer whether workers still wait for room (then it wakes the next)."""

    __slots__ = (
        "_idle",
        "_reset_pending",
        "_room",
        "budget",
        "budget_size",
        "clock",
        "loop",
        "sink",
        "slice_start",
    )

    def __init__(self, slots: int, sink: Sink[Any, Any]) -> None:
        self._room: deque[asyncio.Future[None]] = deque()
        self._idle: asyncio.Future[None] | None = None
        self.sink = sink
        self.budget_size = max(256, YIELD_EVERY_ITEMS_PER_WORKER * slots)
        self.budget = self.budget_size
        self.slice_start = 0.0
        self.clock: Callable[[], float] = time.monotonic
        self._reset_pending = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        """Time slices on ``clock`` (the loop's: in virtual time it stands still while the
        CPU works, so only the item budget applies and a test's schedule is exact)."""
        self.loop = loop
        self.clock = clock
        self.slice_start = clock()

    async def for_room(self) -> None:
        """Wait until the consumer takes an item (or the run wakes every worker)."""
        assert self.loop is not None
        fut = self.loop.create_future()
        self._room.append(fut)
        await fut

    def room_made(self) -> None:
        """The stream's consumer took an item: one waiting worker may pull the next."""
        waiters = self._room
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break
        self.sink.producers_waiting = bool(waiters)

    async def idle(self, until: float | None) -> None:
        """Wait until ``until`` (loop time; a retry's) or until :meth:`wake`."""
        loop = self.loop
        assert loop is not None
        fut = self._idle
        if fut is None or fut.done():
            fut = self._idle = loop.create_future()
        handle = loop.call_at(until, _resolve, fut) if until is not None else None
        try:
            await fut
        finally:
            if handle is not None:
                handle.cancel()

    def wake(self) -> None:
        """Every waiting worker: something changed (an item ended, a retry, a stop)."""
        waiters, self._room = self._room, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        fut = self._idle
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def pause(self) -> None:
        """The budget is spent: yield to the loop; it is refilled once per loop iteration."""
        if not self._reset_pending:
            self._reset_pending = True
            self.budget = 0
            assert self.loop is not None
            self.loop.call_soon(self._refill)
        await asyncio.sleep(0)

    def _refill(self) -> None:
        self._reset_pending = False
        self.budget = self.budget_size
        self.slice_start = self.clock()
