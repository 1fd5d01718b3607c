"""``stream()``: outcomes as they complete, with bounded memory for any input length."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

from ._engine import Engine, Plan, _Sink

if TYPE_CHECKING:
    from types import TracebackType

    from ._outcomes import BatchReport, Outcome

__all__ = ["Stream"]

T = TypeVar("T")
R = TypeVar("R")


class _StreamSink(_Sink[T, R]):
    """Hands outcomes to the consumer. At most ``window`` items are ever pulled from the input
    but not yet taken by the consumer (in flight, waiting to be reordered, or ready)."""

    __slots__ = (
        "consumed",
        "consumer",
        "next_emit",
        "ordered",
        "pending",
        "producers",
        "ready",
        "window",
    )

    def __init__(self, *, ordered: bool, window: int) -> None:
        self.ordered = ordered
        self.window = window
        self.ready: deque[Outcome[T, R]] = deque()
        self.pending: dict[int, Outcome[T, R]] = {}
        self.next_emit = 0
        self.consumed = 0
        self.consumer: asyncio.Future[None] | None = None
        self.producers: list[asyncio.Future[None]] = []

    def put(self, outcome: Outcome[T, R]) -> None:
        if self.ordered:
            self.pending[outcome.index] = outcome
            pending, n = self.pending, self.next_emit
            while n in pending:
                self.ready.append(pending.pop(n))
                n += 1
            if n == self.next_emit:
                return
            self.next_emit = n
        else:
            self.ready.append(outcome)
        self.wake_consumer()

    def wake_consumer(self) -> None:
        fut = self.consumer
        if fut is not None and not fut.done():
            fut.set_result(None)

    def room(self, next_index: int) -> bool:
        return next_index - self.consumed < self.window

    async def wait_room(self, next_index: int) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.producers.append(fut)
        await fut

    def wake(self) -> None:
        producers, self.producers = self.producers, []
        for fut in producers:
            if not fut.done():
                fut.set_result(None)


@final
class Stream(Generic[T, R]):
    """An async context manager; entering it starts the run and gives an async iterator of
    outcomes. Leaving the block (normally, by ``break`` or by an error) cancels what is still
    running, exits every open context and waits for that cleanup, never for stragglers."""

    def __init__(self, plan: Plan, items: Any, *, ordered: bool, window: int) -> None:
        self._sink: _StreamSink[T, R] = _StreamSink(ordered=ordered, window=window)
        self._engine: Engine[T, R] = Engine(plan, items, self._sink)
        self._task: asyncio.Task[BatchReport[T, R]] | None = None
        self._entered = False

    async def __aenter__(self) -> Stream[T, R]:
        if self._entered:
            raise RuntimeError("a stream can be entered only once")
        self._entered = True
        self._task = asyncio.get_running_loop().create_task(self._engine.run())
        self._task.add_done_callback(lambda _: self._sink.wake_consumer())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self._task
        if task is None:  # pragma: no cover - __aexit__ without __aenter__
            return
        if not task.done():
            task.cancel()
        try:
            await _wait_cancelled(task)
        finally:
            self._sink.wake()

    def __aiter__(self) -> Stream[T, R]:
        return self

    async def __anext__(self) -> Outcome[T, R]:
        sink = self._sink
        task = self._task
        if task is None:
            raise RuntimeError("iterate a stream inside `async with stream(...) as outcomes:`")
        while True:
            if sink.ready:
                outcome = sink.ready.popleft()
                sink.consumed += 1
                if sink.producers:
                    sink.wake()
                return outcome
            if task.done():
                # Re-raises what the run raised (InputFailed, KeyboardInterrupt, ...).
                task.result()
                drained = self._engine.drain_one()
                if drained is not None:
                    return drained
                raise StopAsyncIteration
            fut = sink.consumer = asyncio.get_running_loop().create_future()
            try:
                await fut
            finally:
                sink.consumer = None

    @property
    def report(self) -> BatchReport[T, R]:
        """Counts and timings so far. A stream keeps no outcomes, so ``outcomes`` is empty."""
        return self._engine.partial_report()


async def _wait_cancelled(task: asyncio.Task[Any]) -> None:
    """Wait for ``task`` to end; its own cancellation is expected and not an error."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves
