"""A chunk's compact records -> the envelopes a local run makes (exactly one per item), with
input indices, re-runs and the events observers would have heard; and the unread rest of a
sized input after a stop, one envelope at a time.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._model.errors import ItemCancelled, ItemSkipped
from .._model.events import AttemptFailed, Event, ItemFinished, ItemStarted
from .._model.outcomes import Failure, Outcome, make_success, set_reruns, set_resumed
from .wire import ChunkResult, Record

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._model.errors import StopReason
    from .alerts import Alerts
    from .chunks import Chunk
    from .state import RunState

__all__ = ["Envelopes", "peak"]

T = TypeVar("T")
R = TypeVar("R")

_FAILED = ("error", "timeout")  # what thresholds count
_MAX_INTERVALS = 100_000  # item spans kept for peak_concurrency before folding


class Envelopes(Generic[T, R]):
    """Envelopes ready for the caller (``ready``), the tally by kind and the re-runs."""

    def __init__(self, state: RunState[T, R], alerts: Alerts) -> None:
        self._s = state
        self._alerts = alerts
        self.ready: deque[Outcome[T, R]] = deque()
        self.counts: dict[str, int] = {}
        self.reruns = 0
        self.rerun_of: dict[int, int] = {}  # input index -> re-runs, the non-zero ones
        self._intervals: list[tuple[float, float]] = []
        self._peak = 0  # from spans folded away (long streams)
        self._skip_announced = False
        self.journal: Callable[[Outcome[T, R]], None] | None = None  # journal=: every envelope

    # ------------------------------------------------------- records of chunks that did not run
    def closed_chunk(self, chunk: Chunk, how: str) -> ChunkResult:
        s = self._s
        if s.gone is not None:
            return self.lost(chunk, s.gone)
        reason: StopReason = s.stop_reason or "fail_fast"
        records: list[Record] = []
        now = time.time()
        for i in range(len(chunk.items)):
            err: BaseException
            if chunk.unsent(i):
                continue  # its own pickling error or circuit_open (added by emit_chunk)
            if how == "skipped":
                err = ItemSkipped(reason)
                records.append((i, "skipped", err, 0, 0.0, (err,), now))
            else:
                err = ItemCancelled(reason)
                records.append((i, "cancelled", err, 1, 0.0, (err,), now))
        return ChunkResult(offset=chunk.offset, records=records)

    def lost(self, chunk: Chunk, error: BaseException) -> ChunkResult:
        now = time.time()
        records: list[Record] = [
            (i, "lost", error, 1, 0.0, (error,), now)
            for i in range(len(chunk.items))
            if not chunk.unsent(i)
        ]
        return ChunkResult(offset=chunk.offset, records=records)

    def skip_unsent(self, chunk: Chunk) -> None:
        intake = self._s.intake
        intake.next_index = max(intake.next_index, chunk.offset + len(chunk.items))
        self.emit_chunk(chunk, self.closed_chunk(chunk, "skipped"))

    # ---------------------------------------------------------------------- records -> envelopes
    def emit_chunk(self, chunk: Chunk, result: ChunkResult) -> None:
        """A chunk's records -> envelopes in ``ready`` (exactly one per item) and events."""
        s = self._s
        for record in result.logs:
            record.worker = result.worker
            logging.getLogger(record.name).handle(record)
        records = result.records
        if chunk.bad:  # items that could not be pickled to send them: each its own failure
            now = time.time()
            records = records + [(i, "error", e, 0, 0.0, (e,), now) for i, e in chunk.bad.items()]
        if chunk.open:  # items whose circuit was open: never sent
            now = time.time()
            records = records + [_circuit_open(i, now) for i in sorted(chunk.open)]
        if chunk.done:  # journal=: items the driver ended without sending them
            records = records + list(chunk.done.values())
        if s.plan.ordered:
            records = sorted(records, key=lambda r: r[0])
        reruns = max(len(chunk.starts) - 1, 0)
        if reruns:
            self.reruns += reruns * len(chunk.items)
            for i in range(chunk.offset, chunk.offset + len(chunk.items)):
                self.rerun_of[i] = reruns
        seen: set[int] = set()
        finished: list[tuple[float, int, Event]] = []
        for rec in records:
            if rec[0] in seen:  # pragma: no cover - a worker sends one record per item
                continue
            seen.add(rec[0])
            out = self._envelope(chunk, rec, reruns)
            if s.observers:
                finished.append(self.finished_event(out, chunk.items[rec[0]], rec[6]))
        self._intervals.extend(result.spans)
        if len(self._intervals) > _MAX_INTERVALS:
            self._fold_intervals()
        self._alerts.settle(chunk.offset, len(chunk.items), sum(r[1] in _FAILED for r in records))
        for i in range(len(chunk.items)):  # exactly one envelope per item, whatever arrived
            if i not in seen:
                err = ItemCancelled(s.stop_reason or "fail_fast")
                rec = (i, "cancelled", err, 1, 0.0, (err,), 0.0)
                out = self._envelope(chunk, rec, reruns)
                if s.observers:
                    finished.append(self.finished_event(out, chunk.items[i], 0.0))
        if s.observers:
            events = finished + [self._worker_event(r, chunk) for r in result.events]
            events.sort(key=lambda e: (e[0], e[1]))
            for _, _, event in events:
                s.event(event)

    def _envelope(self, chunk: Chunk, rec: Record, reruns: int = 0) -> Outcome[T, R]:
        i, kind, payload, attempts, elapsed, errors, _ = rec
        index, item = chunk.offset + i, chunk.items[i]
        out: Outcome[T, R]
        if kind == "success":
            out = make_success(item, payload, index, attempts, elapsed)
            if reruns:
                set_reruns(out, reruns)
        elif kind == "resumed":  # read from the run journal by the driver (_dask/journal.py)
            out = make_success(item, payload, index, attempts, elapsed)
            set_resumed(out)
            kind = "success"
        else:
            out = Failure(item, payload, kind, index, attempts, elapsed, errors, reruns)  # type: ignore[arg-type]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.ready.append(out)
        if self.journal is not None:
            self.journal(out)
        return out

    def finished_event(self, out: Outcome[T, R], item: Any, at: float) -> tuple[float, int, Event]:
        s = self._s
        assert s.loop is not None
        when = at - s.wall_offset if at else s.loop.time()
        event = ItemFinished(
            name=s.plan.name,
            key=s.key(out.index, item),
            outcome=out,
            in_flight=s.in_flight_items,
            time=when,
        )
        return when, 2, event

    def _worker_event(self, rec: tuple[Any, ...], chunk: Chunk) -> tuple[float, int, Event]:
        s = self._s
        when = rec[1] - s.wall_offset
        index = chunk.offset + rec[2]
        item = chunk.items[rec[2]]
        key = s.key(index, item)
        if rec[0] == "started":
            ev: Event = ItemStarted(
                name=s.plan.name,
                index=index,
                key=key,
                item=item,
                attempt=rec[3],
                in_flight=s.in_flight_items,
                time=when,
            )
            return when, 0, ev
        ev = AttemptFailed(
            name=s.plan.name,
            index=index,
            key=key,
            item=item,
            attempt=rec[3],
            error=rec[4],
            kind=rec[5],
            retry_in=rec[6],
            time=when,
        )
        return when, 1, ev

    # -------------------------------------------------------------------------- the unread rest
    def drain_one(self) -> Outcome[T, R] | None:
        """After a stop: the next unread item of a sized input, as skipped."""
        s = self._s
        intake = s.intake
        if intake.exhausted or not intake.sized or intake.it is None:
            return None
        if s.stop_reason is None and s.gone is None:
            return None
        if not self._skip_announced:
            # Observers hear of the whole rest in one ItemsSkipped, as on the local engine.
            self._skip_announced = True
            rest = range(intake.next_index, intake.total or 0)
            if s.observers and rest and s.stop_reason is not None:
                s.ledger.items_skipped(s.stop_reason, rest)
        if s.stop_reason is not None:
            skipped = intake.drain_one(s.stop_reason)
            if skipped is not None:
                s.ledger.count_skipped(1)
                self.counts["skipped"] = self.counts.get("skipped", 0) + 1
            return skipped
        assert s.gone is not None  # the cluster is gone: nothing can run the rest
        for item in intake.it:
            index = intake.next_index
            intake.next_index += 1
            s.ledger.finished += 1
            self.counts["lost"] = self.counts.get("lost", 0) + 1
            lost: Failure[Any] = Failure(item, s.gone, "lost", index, 0, 0.0, (s.gone,))
            if s.observers:
                s.event(self.finished_event(lost, item, 0.0)[2])
            return lost
        intake.exhausted = True
        return None

    # ------------------------------------------------------------------------ peak concurrency
    def peak_concurrency(self) -> int:
        """The most attempts whose (start, end) spans overlapped, from worker timestamps."""
        return max(self._peak, peak(self._intervals))

    def _fold_intervals(self) -> None:
        """Keep memory bounded on long streams: fold the spans seen so far into ``_peak`` and
        keep the latest-ending tenth, which later spans may still overlap."""
        self._peak = max(self._peak, peak(self._intervals))
        self._intervals.sort(key=lambda span: span[1])
        del self._intervals[: len(self._intervals) - _MAX_INTERVALS // 10]


def _circuit_open(i: int, now: float) -> Record:
    err = ItemSkipped("circuit_open")
    return (i, "skipped", err, 0, 0.0, (err,), now)


def peak(spans: list[tuple[float, float]]) -> int:
    marks = sorted(
        itertools.chain.from_iterable(((s, 1), (e, -1)) for s, e in spans),
        key=lambda m: (m[0], m[1]),
    )
    highest = cur = 0
    for _, d in marks:
        cur += d
        highest = max(highest, cur)
    return highest
