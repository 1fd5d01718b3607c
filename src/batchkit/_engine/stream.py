"""``stream()`` run here: outcomes as they complete, with bounded memory for any input length.

:class:`LocalStream` implements the :class:`~batchkit.Stream` protocol (``_model/seams.py``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

from .._model.errors import add_note, describe
from .engine import Engine
from .sinks import StreamSink

if TYPE_CHECKING:
    from types import TracebackType

    from .._model.outcomes import Outcome
    from .._model.report import BatchReport
    from .plan import Plan

__all__ = ["LocalStream"]

T = TypeVar("T")
R = TypeVar("R")


@final
class LocalStream(Generic[T, R]):
    """An async context manager; entering it starts the run and gives an async iterator of
    outcomes. Leaving the block (normally, by ``break`` or by an error) cancels what is still
    running, exits every open context and waits for that cleanup — at most the deadline's
    ``grace`` (1 s by default) before abandoning work that does not stop."""

    def __init__(self, plan: Plan, items: Any) -> None:
        self._sink: StreamSink[T, R] = StreamSink(ordered=plan.ordered, window=plan.window)
        self._sink.consumer = self._wake_consumer
        self._engine: Engine[T, R] = Engine(plan, items, self._sink)
        self._task: asyncio.Task[BatchReport[T, R]] | None = None
        self._consumer: asyncio.Future[None] | None = None
        self._entered = False
        self._delivered: BaseException | None = None
        """The run's error, once the consumer got it from ``__anext__``: it is handled there,
        and leaving the block does not raise it again."""

    def _wake_consumer(self) -> None:
        fut = self._consumer
        if fut is not None and not fut.done():
            fut.set_result(None)
        # Woken once is enough: the outcomes put before it runs need no call each.
        self._sink.consumer_waiting = False

    async def __aenter__(self) -> LocalStream[T, R]:
        if self._entered:
            raise RuntimeError("a stream can be entered only once")
        self._entered = True
        self._task = asyncio.get_running_loop().create_task(self._engine.run())
        self._task.add_done_callback(lambda _: self._wake_consumer())
        # Let the run start now: its report is then a run's (also after an empty block).
        try:
            await asyncio.sleep(0)
        except BaseException:
            # Cancelled on the way in: __aexit__ will not run, so end the run here.
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await _wait_cancelled(self._task)
            raise
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
        except BaseException as error:
            # What the block raised leaves it, and nothing it already handled: the run's
            # error is raised here only if the consumer never got it.
            cancelled = isinstance(error, asyncio.CancelledError)
            if (cancelled and _being_cancelled()) or (exc is None and error is not self._delivered):
                raise
            if exc is not None and not cancelled and error is not self._delivered:
                add_note(exc, f"batchkit: the stream's run also ended with {describe(error)}")

    def __aiter__(self) -> LocalStream[T, R]:
        return self

    async def __anext__(self) -> Outcome[T, R]:
        sink = self._sink
        task = self._task
        if task is None:
            raise RuntimeError("iterate a stream inside `async with stream(...) as outcomes:`")
        while True:
            if sink.ready:  # the sink's side of taking one, inline: once per item
                outcome = sink.ready.popleft()
                sink.consumed += 1
                if sink.producers_waiting:
                    sink.wake_producers()
                return outcome
            if task.done():
                # Re-raises what the run raised (InputFailed, KeyboardInterrupt, ...).
                if not task.cancelled() and task.exception() is not None:
                    self._delivered = task.exception()
                task.result()
                drained = self._engine.drain_one()
                if drained is not None:
                    sink.consumed += 1
                    return drained
                raise StopAsyncIteration
            if self._consumer is not None:
                raise RuntimeError(
                    "a stream has one consumer: another task is waiting for its next outcome\n"
                    "HINT: iterate it in one task and hand outcomes on (e.g. an asyncio.Queue)"
                )
            fut = self._consumer = asyncio.get_running_loop().create_future()
            sink.consumer_waiting = True  # only now do producers call _wake_consumer
            try:
                await fut
            finally:
                sink.consumer_waiting = False
                self._consumer = None

    @property
    def report(self) -> BatchReport[T, R]:
        """Counts and timings of every outcome produced so far (a stream keeps no outcomes,
        so ``outcomes`` is empty; ``counts``, ``total`` and ``ok`` count them all)."""
        if not self._entered:
            raise RuntimeError(
                "Stream.report was read before the stream started\n"
                "HINT: read it inside or after the `async with stream(...) as outcomes:` block"
            )
        return self._engine.partial_report()

    @property
    def consumed(self) -> int:
        """How many outcomes the consumer has taken."""
        return self._sink.consumed


def _being_cancelled() -> bool:
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0


async def _wait_cancelled(task: asyncio.Task[Any]) -> None:
    """Wait for ``task`` to end; its own cancellation is expected and not an error."""
    try:
        await task
    except asyncio.CancelledError:
        if _being_cancelled():
            raise  # we are being cancelled ourselves
