"""Which chunk goes next: the input read into chunks (:class:`ChunkReader`), sized by the
run's :class:`~batchkit._dask.chunks.ChunkSizer`, for the stream that keeps chunks in flight.

A sized (or plain) iterable is sliced; an async input is read one item at a time, and a chunk
that holds one item waits at most ``PARTIAL_WAIT`` for the rest, so a stalled input's items
run instead of waiting for a full chunk.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any

from .chunks import PARTIAL_WAIT, Chunk

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from .state import RunState

__all__ = ["ChunkReader"]

_log = logging.getLogger("batchkit.dask")

_END = object()  # the end of an async input


class ChunkReader:
    """Reads the run's input into chunks through the engine's intake."""

    def __init__(self, state: RunState[Any, Any], skip_unsent: Callable[[Chunk], None]) -> None:
        self._s = state
        self._skip_unsent = skip_unsent  # a chunk read but never sent: its items skipped
        self._pull: asyncio.Future[Any] | None = None  # an async input's next item
        self._back: list[Any] = []  # read, not sent yet (held behind a probe): next in line
        self.mark: Callable[[Chunk], None] | None = None  # journal=: what is not sent

    def open(self) -> None:
        s = self._s
        if hasattr(s.items, "__aiter__"):
            s.intake.ait = aiter(s.items)
        else:
            s.intake.it = iter(s.items)

    async def chunks(self) -> AsyncIterator[Chunk]:
        s = self._s
        intake = s.intake
        breaker = s.breaker
        assert s.sizer is not None
        try:
            while not s.stopping and (
                self._back or (not intake.exhausted and intake.error is None)
            ):
                if self._back and breaker is not None and breaker.held(self._back[0]):
                    await breaker.wait_verdict()  # a half-open circuit's probe is out
                    continue
                size = s.sizer.next_size(intake.next_index)
                batch = self._back[:size]
                del self._back[:size]
                try:
                    if len(batch) == size or intake.exhausted or intake.error is not None:
                        pass
                    elif intake.it is not None:
                        # extend keeps what was read before the input raised: it still runs
                        batch.extend(itertools.islice(intake.it, size - len(batch)))
                        if len(batch) < size:
                            intake.exhausted = True
                    else:
                        await self._fill(batch, size)
                except Exception as e:
                    intake.error = e  # what was read before it still runs
                except BaseException:
                    # Closed while reading (a stop's grace ran out): what was read is skipped.
                    self._back[:0] = batch
                    raise
                if not batch:
                    return
                chunk = Chunk(intake.next_index, batch)
                if breaker is not None and (cut := breaker.sort(chunk)) is not None:
                    self._back[:0] = batch[cut:]  # held until the probe's verdict
                    del batch[cut:]
                    if not batch:
                        continue
                intake.next_index += len(batch)
                if self.mark is not None:  # journal= (never with breaker=: spec.py)
                    self.mark(chunk)
                yield chunk
        finally:
            if self._back:  # read but never sent: skipped
                back, self._back = self._back, []
                self._skip_unsent(Chunk(intake.next_index, back))

    async def _fill(self, batch: list[Any], size: int) -> None:
        """Read up to ``size`` items of the async input into ``batch``; once it holds one,
        wait at most ``PARTIAL_WAIT`` for the rest. The pending read is kept for the next
        chunk (cancelling it would break the input's generator)."""
        s = self._s
        ait = s.intake.ait
        loop = s.loop
        assert ait is not None
        assert loop is not None
        send_by: float | None = None
        while len(batch) < size and not s.stopping:
            if self._pull is None:
                self._pull = asyncio.ensure_future(_next_of(ait))
            if not self._pull.done():
                timeout = None if send_by is None else max(0.0, send_by - loop.time())
                await asyncio.wait({self._pull}, timeout=timeout)
                if not self._pull.done():
                    return
            pull, self._pull = self._pull, None
            item = pull.result()  # the input's own error propagates
            if item is _END:
                s.intake.exhausted = True
                return
            batch.append(item)
            if send_by is None:
                send_by = loop.time() + PARTIAL_WAIT

    async def close(self) -> None:
        """Cancel a pending read and close an async input."""
        pull, self._pull = self._pull, None
        if pull is not None:
            pull.cancel()
            await asyncio.gather(pull, return_exceptions=True)
        ait = self._s.intake.ait
        if ait is not None and hasattr(ait, "aclose"):
            try:
                await ait.aclose()
            except Exception:  # pragma: no cover
                _log.exception("batchkit: closing the async input failed")


async def _next_of(ait: AsyncIterator[Any]) -> Any:
    try:
        return await anext(ait)
    except StopAsyncIteration:
        return _END
