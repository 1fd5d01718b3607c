"""Chunks out on the cluster: sending one and waiting for its result, and ending every chunk
still out when the driver gives up on them.

Bookkeeping that cannot leak: a chunk is registered as out (``RunState.pending``) only once
Dask accepted it and leaves it only with its result; a chunk's result is kept (``returned``)
until its envelopes are out, so that giving up after a stop's grace drains what came back
before it closes the rest.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from . import worker as worker_side
from .wire import ChunkResult, pack_items

if TYPE_CHECKING:
    from .chunks import Chunk
    from .envelopes import Envelopes
    from .state import RunState
    from .stopping import Stopper

__all__ = ["InFlight"]

_log = logging.getLogger("batchkit.dask")


class InFlight:
    """Sends chunks, keeps their results until read, and ends what never came back."""

    def __init__(
        self, state: RunState[Any, Any], envelopes: Envelopes[Any, Any], stopper: Stopper
    ) -> None:
        self._s = state
        self._envelopes = envelopes
        self._stopper = stopper
        self.returned: dict[int, tuple[Chunk, ChunkResult]] = {}
        # Input indices given up on after a stop (BatchReport.abandoned).
        self.abandoned: list[int] = []

    async def run_chunk(self, chunk: Chunk) -> ChunkResult | None:
        """Send one chunk and wait for its result. The chunk is out (``pending``) from the
        moment Dask accepted it until its result came back; a result is kept in
        ``returned`` until its envelopes are out. Returns ``None``: results travel through
        ``returned``, never through the outer stream (which may drop what it holds)."""
        s = self._s
        loop = asyncio.get_running_loop()
        if s.stopping:
            self._unsent(chunk, self._envelopes.closed_chunk(chunk, "skipped"))
            return None
        unsent = chunk.open.union(chunk.done) if chunk.done else chunk.open
        blob, positions, chunk.bad = pack_items(chunk.items, unsent)
        if len(chunk.bad) + len(unsent) == len(chunk.items):
            self._unsent(chunk, ChunkResult(offset=chunk.offset, records=[]))
            return None
        # groups=: only the workers holding a share (the run's start; groups.py).
        where: dict[str, Any] = {}
        if s.kept is not None:
            where = {"workers": s.kept, "allow_other_workers": False}
        future = s.client.submit(
            worker_side.run_chunk,
            s.spec_blob,
            s.run_id,
            chunk.offset,
            blob,
            positions,
            s.topic,
            pure=False,
            key=f"batchkit-{s.run_id}-{chunk.offset}",
            **where,
        )
        s.pending[chunk.offset] = chunk
        s.in_flight_items += len(chunk.items)
        chunk.submitted = loop.time()
        try:
            result = worker_side.decode(await future)
        except asyncio.CancelledError:
            # Closed after a stop's grace: the chunk stays out, for give_up to end it.
            self._stopper.spawn(s.client.cancel(future))
            raise
        except Exception as e:  # lost with its worker(s), or the task itself failed
            result = self._envelopes.lost(chunk, e)
        s.pending.pop(chunk.offset, None)
        s.in_flight_items -= len(chunk.items)
        if result.token:
            chunk.starts.setdefault(result.token, result.worker)
        if s.breaker is not None:
            s.breaker.observe(chunk, result)
        if s.sizer is not None and result.records and result.seconds:
            s.sizer.observe(len(result.records), result.seconds)
        self.returned[chunk.offset] = (chunk, result)
        return None

    def _unsent(self, chunk: Chunk, result: ChunkResult) -> None:
        if self._s.breaker is not None:
            self._s.breaker.observe(chunk, result)  # a probe in it is not out any more
        self.returned[chunk.offset] = (chunk, result)

    def end_chunks_out(self, *, abandon: bool) -> None:
        """Every chunk still out or returned but unread -> its items' envelopes."""
        s = self._s
        left: dict[int, tuple[Chunk, ChunkResult | None]] = {
            offset: (chunk, None) for offset, chunk in s.pending.items()
        }
        left.update(self.returned)
        self.returned.clear()
        s.pending.clear()
        given_up = 0
        for offset in sorted(left):
            chunk, result = left[offset]
            if result is None:
                given_up += len(chunk.items)
                if s.gone is None and abandon:
                    self.abandoned.extend(
                        offset + i for i in range(len(chunk.items)) if not chunk.unsent(i)
                    )
                result = self._envelopes.closed_chunk(chunk, "cancelled")
            self._envelopes.emit_chunk(chunk, result)
        if given_up and abandon:
            _log.warning(
                "batchkit: %d item(s) did not report back within %.3g s of the run stopping; "
                "recorded as %s",
                given_up,
                s.grace,
                "lost" if s.gone is not None else "cancelled and abandoned",
            )
