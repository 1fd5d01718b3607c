"""``journal=`` on the Dask backend: read and written by the driver, in batched mode.

The local engine's :class:`~batchkit._engine.journal.RunJournal` does the work; this part
only puts it where the driver sees items:

- **Reading**: once, before the first chunk is sent (the same prune and one scan). As the
  input is read into chunks, each item goes through ``RunJournal.takes``: a resumed success
  (or a duplicate key, refused) is never sent. A chunk is cut around such items, and each run
  of them becomes a chunk the driver ends itself, with ``"resumed"`` (or ``"error"``) records,
  so its envelopes come out in input order like any chunk's.
- **Writing**: every envelope the driver makes is handed to ``RunJournal.ended`` (the same
  rows and flush rules as locally: ``flush_every``, ``flush_after``, and on every way out of
  the call). An item lost with its worker, cancelled or skipped has no row: it runs again on
  resume.

Rows are written only when envelopes reach the driver, so the loss window is the local one
plus the chunks out: a driver killed at once loses the rows not yet written and every result
still on a worker; those items run again on resume.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

from .._engine.journal import RunJournal
from .._model.attempt import Job
from .._model.outcomes import Failure
from .chunks import Chunk
from .wire import ChunkResult

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from .._model.journal import Journal
    from .._model.outcomes import Outcome
    from .state import RunState
    from .wire import Record

__all__ = ["DriverJournal"]

RESUMED = "resumed"
"""A record's kind for a success read from the journal (never sent to a worker)."""


class DriverJournal:
    """The run journal of one Dask run, kept by the driver."""

    def __init__(self, state: RunState[Any, Any], policy: Journal) -> None:
        self._s = state
        self.journal = RunJournal(policy, check_duplicates=not state.plan.keys_checked)
        self.journal.record = self._taken
        self.resumed = 0  # resumed envelopes made (report.resumed)
        self._local: dict[int, ChunkResult] = {}  # offset -> a chunk the driver ends itself
        self._keys: dict[int, str] = {}  # input index -> key, for items out
        self._taken_now: dict[int, Outcome[Any, Any]] = {}  # index -> ended by the journal

    async def load(self) -> None:
        await self.journal.load()

    # ----------------------------------------------------------------------------- reading
    def split(self, chunk: Chunk) -> list[Chunk]:
        """``chunk`` cut around the items the journal ends (resumed, duplicate keys): runs of
        items to send, and runs the driver ends itself (their results kept for the driver's
        ``run_chunk``, :meth:`wrap`). Every item of ``chunk`` is in exactly one part."""
        s = self._s
        taken = self._taken_now
        for i, item in enumerate(chunk.items):
            index = chunk.offset + i
            key = s.key(index, item)
            if not self.journal.takes(Job(index, item, key)):
                self._keys[index] = key
        if not taken:
            return [chunk]
        now = time.time()
        parts: list[Chunk] = []
        positions = range(len(chunk.items))
        for ended, run in itertools.groupby(positions, key=lambda i: chunk.offset + i in taken):
            at = list(run)
            start = at[0]
            part = Chunk(chunk.offset + start, chunk.items[start : at[-1] + 1])
            if ended:
                records: list[Record] = []
                for i in at:
                    out = taken.pop(chunk.offset + i)
                    if type(out) is Failure:  # a duplicate key, refused
                        records.append((i - start, "error", out.error, 0, 0.0, out.errors, now))
                    else:
                        records.append((i - start, RESUMED, out.value, out.attempts, 0.0, (), now))
                self._local[part.offset] = ChunkResult(offset=part.offset, records=records)
            parts.append(part)
        return parts

    def _taken(self, outcome: Outcome[Any, Any], job: Any) -> None:
        self._taken_now[job.index] = outcome

    def wrap(
        self, send: Callable[[Chunk], Coroutine[Any, Any, ChunkResult | None]], returned: Any
    ) -> Callable[[Chunk], Coroutine[Any, Any, ChunkResult | None]]:
        """The driver's ``run_chunk``: a chunk the journal ended is not sent; its result is
        there at once (in ``returned``, where every chunk's result waits for its envelopes)."""

        async def run_chunk(chunk: Chunk) -> ChunkResult | None:
            result = self._local.pop(chunk.offset, None)
            if result is None:
                return await send(chunk)
            returned[chunk.offset] = (chunk, result)
            return None

        return run_chunk

    # ----------------------------------------------------------------------------- writing
    def ended(self, outcome: Outcome[Any, Any]) -> None:
        """Every envelope the driver made: its row (if it gets one) waits to be written."""
        if getattr(outcome, "resumed", False):
            self.resumed += 1
        key = self._keys.pop(outcome.index, None)
        if key is None:
            key = self._s.key(outcome.index, outcome.item)
        self.journal.ended(outcome, key)

    async def close(self) -> None:
        """On every way out: the rows still waiting; the journal is cleared when the whole
        input was read and every item succeeded."""
        s = self._s
        intake = s.intake
        completed = (
            s.stop_reason is None and s.gone is None and intake.exhausted and intake.error is None
        )
        await self.journal.close(completed)
