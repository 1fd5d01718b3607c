"""The run journal of one call (``journal=Journal(...)``): read before the first item starts,
written as items end, cleared when every item succeeded.

Where the writes happen (the design note in ``docs/design.md`` says why):

- **Reading**: once, before the first item starts: the rows older than ``retain`` are
  pruned, then one :meth:`~batchkit.StateStore.scan` of the journal's prefix. Items whose
  row is a success are *resumed*: the window records their ``Success(resumed=True)`` instead
  of running them (:meth:`RunJournal.takes`), so nothing is started, limited or timed for them.
- **Batched rows**: the ledger hands every recorded outcome to :meth:`RunJournal.ended`; rows
  wait in memory and are written by one background task at a time, once ``flush_every`` wait
  or the oldest has waited ``flush_after`` seconds, and on every way out of the call
  (:meth:`RunJournal.close`).
- **Transactional rows**: a success's row is written by :meth:`RunJournal.write_in_session`,
  which the runner calls inside the item's context after ``fn`` returned and before the
  context commits. Failures follow as batched rows, never over a committed success.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from typing import TYPE_CHECKING, Any

from .._model.attempt import _SLOT
from .._model.errors import InvalidArgument, describe
from .._model.outcomes import Failure, make_success, set_resumed
from .._model.state import MAX_KEY_LENGTH, encode

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._model.attempt import Job
    from .._model.journal import Journal
    from .._model.outcomes import Outcome
    from .._model.state import JsonValue

__all__ = ["RunJournal"]

_log = logging.getLogger("batchkit")
_BIG = 2**63  # an int within this is short JSON for sure
_ERROR_CHARS = 300  # a failure's row keeps the start of its error's description


class RunJournal:
    """One call's journal: what it resumes, and the rows waiting to be written."""

    def __init__(self, policy: Journal, *, check_duplicates: bool = True) -> None:
        self.policy = policy
        self.prefix = policy.prefix
        self.transactional = policy.mode == "transactional"
        self.done: dict[str, tuple[int, JsonValue]] = {}  # store key -> (attempts, value)
        self.resumed = 0
        self.all_ok = True  # every item recorded so far is a success
        self.seen: set[str] | None = set() if check_duplicates else None
        self.duplicates: set[int] = set()  # indices refused for a duplicate key
        self.pending: dict[str, JsonValue] = {}
        self.record: Callable[[Outcome[Any, Any], Job], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flush: asyncio.Task[None] | None = None
        self._warned = False

    # -------------------------------------------------------------------------- reading
    async def load(self) -> None:
        """Prune what ``retain`` drops, then read the successes to resume (one scan). A store
        that fails here fails the call before any item starts: resuming is what was asked."""
        p = self.policy
        self._loop = asyncio.get_running_loop()
        if p.retain is not None:
            await p.store.prune(p.clock() - p.retain, prefix=self.prefix)
        for entry in await p.store.scan(self.prefix):
            row = entry.value
            if isinstance(row, dict) and row.get("kind") == "success":
                attempts = row.get("attempts")
                self.done[entry.key] = (
                    attempts if isinstance(attempts, int) else 1,
                    row.get("value"),
                )
        if self.done:
            _log.info(
                "batchkit: journal %r holds %d committed successes; those items are resumed, "
                "not run",
                p.name,
                len(self.done),
            )

    def store_key(self, key: str) -> str:
        """The row's key: the item key under the prefix, or its SHA-256 if too long."""
        k = self.prefix + key
        if len(k) > MAX_KEY_LENGTH:
            k = self.prefix + "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        return k

    def takes(self, job: Job, picks: Any = None) -> bool:
        """A new item: True when the journal ends it here (a resumed success, or a duplicate
        key refused), so it does not run (and gives back the places ``picks`` gave it)."""
        if self._ends(job):
            if picks is not None:
                picks.groups.release(job)
            return True
        return False

    def _ends(self, job: Job) -> bool:
        key = job.key
        assert key is not None  # journal= requires key=
        seen = self.seen
        if seen is not None:
            if key in seen:
                self._duplicate(job, key)
                return True
            seen.add(key)
        hit = self.done.get(self.store_key(key))
        if hit is None:
            return False
        attempts, stored = hit
        load = self.policy.load
        value = load(stored) if load is not None and stored is not None else stored
        s = make_success(job.item, value, job.index, attempts, 0.0)
        set_resumed(s)
        self.resumed += 1
        assert self.record is not None
        self.record(s, job)
        return True

    def _duplicate(self, job: Job, key: str) -> None:
        err = InvalidArgument(
            f"duplicate key {key!r} (item #{job.index}): a journal records one outcome per key"
            "\nHINT: make key= unique per item, e.g. key=lambda m: m.id"
        )
        self.duplicates.add(job.index)
        assert self.record is not None
        self.record(Failure(job.item, err, "error", job.index, 0, 0.0, (err,)), job)

    # -------------------------------------------------------------------------- writing
    def ended(self, outcome: Outcome[Any, Any], key: str) -> None:
        """The ledger recorded ``outcome`` (every kind, every path): queue its row."""
        if type(outcome) is Failure:
            self.all_ok = False
            if outcome.kind not in ("error", "timeout") or outcome.index in self.duplicates:
                return  # not run to its end: no row, it runs again on resume
            row: JsonValue = {
                "kind": outcome.kind,
                "attempts": outcome.attempts,
                "time": self.policy.clock(),
                "error": describe(outcome.error)[:_ERROR_CHARS],
            }
        elif outcome.resumed or self.transactional:
            return  # its row is already there (written in its session, or read)
        else:
            row = self._success_row(outcome.attempts, outcome.value)
        self.pending[self.store_key(key)] = row
        if len(self.pending) >= self.policy.flush_every:
            self._kick()
        elif self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self.policy.flush_after, self._kick)

    def _success_row(self, attempts: int, value: Any) -> JsonValue:
        row: dict[str, JsonValue] = {
            "kind": "success",
            "attempts": attempts,
            "time": self.policy.clock(),
        }
        p = self.policy
        if not p.values or value is None:
            return row
        kind = type(value)
        if p.dump is None and (
            (kind is int and -_BIG < value < _BIG)
            or kind is bool
            # JSON text of a str is ASCII (escaped): at most 12 bytes a character, quoted.
            or (kind is str and 12 * len(value) + 2 <= p.max_value_bytes)
        ):
            row["value"] = value  # JSON for sure: not encoded twice (set_many encodes it)
        else:
            try:
                stored = p.dump(value) if p.dump is not None else value
                text = encode(stored)
            except Exception as e:
                self._warn(f"not JSON ({describe(e)[:120]})")
            else:
                if len(text.encode()) <= p.max_value_bytes:
                    row["value"] = stored
                else:
                    self._warn(f"{len(text)} characters of JSON > max_value_bytes")
        return row

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            _log.warning(
                "batchkit: journal %r does not store a value: %s; a resumed success of it "
                "has value None (this is logged once per call)",
                self.policy.name,
                why,
            )

    async def write_in_session(self, session: Any, value: Any) -> None:
        """Transactional mode, inside the item's context after ``fn`` returned: its success
        row, in its own session (committed with the item's writes, or rolled back)."""
        slot = _SLOT.get()
        assert slot is not None
        job = slot.job
        assert job is not None
        assert job.key is not None
        row = self._success_row(job.attempt, value)
        await self.policy.store.set_in_session(  # type: ignore[attr-defined]
            session, {self.store_key(job.key): row}
        )

    def _kick(self) -> None:
        """Start writing what waits, unless a write is under way (it takes the rest)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush is None or self._flush.done():
            assert self._loop is not None
            self._flush = self._loop.create_task(self._write_pending())

    async def _write_pending(self) -> None:
        while self.pending:
            rows, self.pending = self.pending, {}
            try:
                await self._write(rows)
            except Exception as e:
                # Never fails the run: those items have no row, so they run again on resume.
                _log.warning(
                    "batchkit: journal %r could not write %d rows (%s); those items will run "
                    "again on resume",
                    self.policy.name,
                    len(rows),
                    describe(e),
                )

    async def _write(self, rows: dict[str, JsonValue]) -> None:
        store = self.policy.store
        if not self.transactional:
            await store.set_many(rows)
            return
        # Only failures come here: never write one over a success its session committed
        # (a commit that went through just before a timeout cancelled the attempt).
        for key, row in rows.items():
            entry = await store.get(key)
            value = entry.value if entry is not None else None
            if isinstance(value, dict) and value.get("kind") == "success":
                continue
            await store.compare_and_set(key, row, expected=entry.version if entry else 0)

    async def close(self, completed: bool) -> None:
        """On every way out of the call: write what waits; a call whose every item succeeded
        (``completed``: it was not stopped and read its whole input) clears the journal."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        flush = self._flush
        if flush is not None and not flush.done():
            await asyncio.shield(flush)
        await self._write_pending()
        if completed and self.all_ok:
            try:
                # Every row of the journal: they were all written before this moment.
                await self.policy.store.prune(sys.float_info.max, prefix=self.prefix)
            except Exception as e:
                _log.warning(
                    "batchkit: journal %r could not be cleared (%s); the next call resumes it",
                    self.policy.name,
                    describe(e),
                )
