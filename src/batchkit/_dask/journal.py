"""``journal=`` on the Dask backend: read and written by the driver, in batched mode.

The local engine's :class:`~batchkit._engine.journal.RunJournal` does the work; this part
only puts it where the driver sees items:

- **Reading**: once, before the first chunk is sent (the same prune and one scan). As the
  input is read into chunks, each item goes through ``RunJournal.takes``: a resumed success
  (or a duplicate key, refused) is never sent. Its ``"resumed"`` (or ``"error"``) record is
  kept in the chunk (``Chunk.done``) and joins the records that come back, so its envelope
  comes out with the chunk's, in input order; the rest of the chunk is sent as one task.
- **Writing**: every envelope the driver makes is handed to ``RunJournal.ended`` (the same
  rows and flush rules as locally: ``flush_every``, ``flush_after``, and on every way out of
  the call). An item lost with its worker, cancelled or skipped has no row: it runs again on
  resume.

Rows are written only when envelopes reach the driver, so the loss window is the local one
plus the chunks out: a driver killed at once loses the rows not yet written and every result
still on a worker; those items run again on resume.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._engine.journal import RunJournal
from .._model.attempt import Job
from .._model.outcomes import Failure

if TYPE_CHECKING:
    from .._model.journal import Journal
    from .._model.outcomes import Outcome
    from .chunks import Chunk
    from .state import RunState

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
        self._keys: dict[int, str] = {}  # input index -> key, for items out
        self._taken_now: dict[int, Outcome[Any, Any]] = {}  # index -> ended by the journal

    async def load(self) -> None:
        await self.journal.load()

    # ----------------------------------------------------------------------------- reading
    def mark(self, chunk: Chunk) -> None:
        """A chunk just read: the items the journal ends (resumed, duplicate keys) get their
        records in ``chunk.done``, so they are not sent (the rest of the chunk is) and their
        envelopes come out with the chunk's, in input order."""
        s = self._s
        taken = self._taken_now
        for i, item in enumerate(chunk.items):
            index = chunk.offset + i
            key = s.key(index, item)
            if not self.journal.takes(Job(index, item, key)):
                self._keys[index] = key
        if not taken:
            return
        now = time.time()
        for index, out in taken.items():
            i = index - chunk.offset
            if type(out) is Failure:  # a duplicate key, refused
                chunk.done[i] = (i, "error", out.error, 0, 0.0, out.errors, now)
            else:
                chunk.done[i] = (i, RESUMED, out.value, out.attempts, 0.0, (), now)
        taken.clear()

    def _taken(self, outcome: Outcome[Any, Any], job: Any) -> None:
        self._taken_now[job.index] = outcome

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
