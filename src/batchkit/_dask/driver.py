"""The driver side of the Dask backend: chunks out, envelopes back, one report.

The driver cuts the input into chunks and schedules them with batchkit's own engine
(``stream`` over chunks, its concurrency = chunks in flight); each chunk is one Dask task that
runs its items with the local engine on a worker (``_dask/worker.py``). Chunk results come back as
compact records and are turned into the same envelopes a local run makes, with input indices,
in one :class:`BatchReport` (or one stream of outcomes).

Stopping (deadline, ``fail_fast``, thresholds, the caller leaving or cancelling) sends every
worker a stop message that cancels the run's coroutines there; the call's exit sends an end
message that cancels whatever is left, disposes per-worker resources and waits for it.

Bookkeeping that cannot leak: a chunk is registered as out (``_pending``) only once Dask accepted
it and leaves it only with its result; a chunk's result is kept (``_returned``) until its
envelopes are out, so that giving up after a stop's grace drains what came back before it
closes the rest. Every chunk start on a worker is announced on the run's event topic, so the
driver counts re-runs after a worker died (``Success.reruns``) and counts a re-run chunk's
failures once. A watch on the cluster ends what is out as ``lost`` when no worker (or no
scheduler) was left for ``DaskBackend(lost_after=...)`` seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .._dask import worker as worker_side
from .._engine.intake import Intake
from .._engine.ledger import Ledger
from .._engine.plan import make_plan
from .._model.errors import (
    BatchkitError,
    InvalidArgument,
    ItemCancelled,
    ItemError,
    ItemSkipped,
)
from .._model.events import (
    AttemptFailed,
    Event,
    ItemFinished,
    ItemStarted,
    RunFinished,
    RunStarted,
)
from .._model.outcomes import Failure, Outcome, make_success, set_reruns
from .._model.report import BatchReport, InputFailed
from .._model.store import OutcomeStore
from .events import ChunkRerun, WorkerLost
from .wire import ChunkResult, Record, RunSpec, check_picklable, dumps, pack_items

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from types import TracebackType

    from .._engine.plan import Plan
    from .._model.errors import StopReason
    from .._model.options import Options
    from .._model.policies import Adaptive, RateLimit

__all__ = ["DaskRun", "plan_chunks"]

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger("batchkit.dask")

# A chunk should keep a worker busy about this long: long enough that the round trip per
# chunk is noise, short enough that the last chunks even out across workers.
_TARGET_CHUNK_SECONDS = 0.5
_MIN_CHUNK_SECONDS = 0.2
_MAX_CHUNK = 5000
_SHARE_POLL_SECONDS = 0.2
SLACK = 1.0  # DaskBackend.SLACK
"""Seconds the call may take beyond ``deadline + grace`` (or a stop + grace) for the cluster
round trip: half for the last messages to the workers (cut off there), half for closing a
client the backend opened itself."""
_MESSAGES_SLACK = SLACK / 2
PARTIAL_WAIT = 0.1
"""Seconds a chunk of an async input waits for more items after its first one was read
before it is sent as it is (a stalled input's items run instead of waiting for a full chunk)."""
_PROBE_SECONDS = 1.0  # a scheduler that does not answer within this is unreachable
_FAILED = ("error", "timeout")  # what thresholds count
_MAX_INTERVALS = 100_000  # item spans kept for peak_concurrency before folding


def plan_chunks(concurrency: int, per_worker: int, n_workers: int, threads: int) -> tuple[int, int]:
    """``(per_chunk, chunks_in_flight)``: the concurrency of one chunk on its worker and how
    many chunks may be submitted at once, so that ``per_chunk * chunks_in_flight`` never
    exceeds ``concurrency`` while every worker thread has a chunk and one queued behind it."""
    threads = max(threads, 1)
    per_chunk = max(1, min(per_worker, concurrency // threads or 1))
    most = max(1, concurrency // per_chunk)
    return per_chunk, max(1, min(most, threads + n_workers))


class _Sizer:
    """Chunk sizes from the observed worker time per item, unless ``chunk_size`` is fixed.

    A chunk aims at ``_TARGET_CHUNK_SECONDS`` of work on its worker, and never less than
    ``_MIN_CHUNK_SECONDS`` (below that the round trip per chunk shows). For sized inputs,
    guided self-scheduling (``remaining / (2 * worker threads)``) shrinks the last chunks so
    the workers finish together. The first chunks, before any observation, are small.
    """

    def __init__(self, fixed: int | None, per_chunk: int, threads: int, total: int | None) -> None:
        self.fixed = fixed
        self.per_chunk = per_chunk
        self.threads = max(threads, 1)
        self.total = total
        self.seconds_per_item: float | None = None

    def observe(self, n: int, seconds: float) -> None:
        """A chunk of ``n`` items kept its worker busy ``seconds``."""
        if n <= 0 or seconds <= 0:
            return
        spi = seconds / n
        old = self.seconds_per_item
        self.seconds_per_item = spi if old is None else 0.5 * old + 0.5 * spi

    def next_size(self, taken: int) -> int:
        if self.fixed is not None:
            return self.fixed
        spi = self.seconds_per_item
        if spi is None:
            size, floor = 4 * self.per_chunk, self.per_chunk
        else:
            size = int(_TARGET_CHUNK_SECONDS / spi)
            floor = max(self.per_chunk, int(_MIN_CHUNK_SECONDS / spi))
        if self.total is not None:
            remaining = self.total - taken
            size = min(size, math.ceil(remaining / (2 * self.threads)))
        return max(1, min(max(size, floor), _MAX_CHUNK))


@dataclasses.dataclass(slots=True, eq=False)
class _Chunk:
    offset: int
    items: list[Any]
    submitted: float = 0.0
    bad: dict[int, Exception] = dataclasses.field(default_factory=dict)
    """Items that could not be pickled to send them (position -> error)."""
    starts: dict[str, str] = dataclasses.field(default_factory=dict)
    """Each run of this chunk on a worker: token -> worker address, in order."""


class DaskRun(Generic[T, R]):
    """One run on a Dask cluster: an async context manager and iterator of outcomes."""

    def __init__(
        self,
        backend: Any,
        items: Any,
        fn: Callable[..., Any],
        options: Options,
        *,
        keep: bool,
    ) -> None:
        # CORE's validators, the same as a local run: bad arguments raise here, at the call.
        self._o: Plan = make_plan(items, fn, options)
        self._backend = backend
        self._items = items
        self._fn = fn
        self._keep = keep
        self._outcomes: list[Outcome[T, R]] = []
        self._run_id = uuid.uuid4().hex
        o = self._o
        self._ledger: Ledger[T, R] = Ledger(
            put=_no_sink, name=o.name, fail_fast=o.fail_fast, max_failures=o.max_failures,
            max_failure_ratio=o.max_failure_ratio, observers=o.observers,  # progress=True too
            clock=self._now, in_flight=self._in_flight,
        )  # fmt: skip
        self._observers = self._ledger.observers  # the same list: a raising one is dropped
        self._skip_announced = False
        # The local engine's bookkeeping: the intake (numbering, keys, the unread rest) and
        # the ledger (counts, the threshold decision, the observers).
        self._intake: Intake[T] = Intake(items, key=self._o.key)
        if self._intake.error is not None:
            raise self._intake.error  # the input's own __len__ raised: at the call, as before
        self._ready: deque[Outcome[T, R]] = deque()
        self._stop_reason: StopReason | None = None
        self._stopping = False
        # Threshold counts: settled chunks' true counts plus in-flight chunks' alerts.
        self._alerted: dict[int, tuple[int, int]] = {}
        self._settled: set[int] = set()
        self._topic = f"batchkit-{self._run_id}"
        self._subscribed = False
        self._announced = False  # RunStarted was sent: RunFinished will be
        self._consumed = 0
        self._counts: dict[str, int] = {}
        self._pending: dict[int, _Chunk] = {}
        self._returned: dict[int, tuple[_Chunk, ChunkResult]] = {}
        self._in_flight_items = 0
        self._reruns = 0
        self._rerun_of: dict[int, int] = {}  # input index -> re-runs, the non-zero ones
        self._final: BatchReport[T, R] | None = None
        self._pull: asyncio.Future[Any] | None = None  # an async input's next item
        self._gone: BaseException | None = None  # the cluster was lost: what is out is lost
        self._outage: tuple[float, str] | None = None  # since when, and what is missing
        self._workers_seen: set[str] = set()
        self._peak = 0  # from spans folded away (long streams)
        self._background: set[asyncio.Task[Any]] = set()
        self._force = asyncio.Event()
        self._outer: Any = None
        self._outer_done = False
        self._entered = False
        self._closed = False
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start = 0.0
        self._deadline_at: float | None = None
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._force_handle: asyncio.TimerHandle | None = None
        self._grace = 1.0
        self._effective = 1
        self._sizer: _Sizer | None = None
        self._wall_offset = 0.0
        self._spec_blob = b""
        self._shares: dict[str, float] = {}
        self._intervals: list[tuple[float, float]] = []
        self._watch: asyncio.Future[None] | None = None
        self._return_by: float | None = None  # a stop's grace + _MESSAGES_SLACK
        # Input indices given up on after a stop (BatchReport.abandoned).
        self._abandoned: list[int] = []

    # ------------------------------------------------------------------ entering
    def _check_options(self) -> None:
        o = self._o
        if o.limiter is not None:
            raise InvalidArgument(
                "rate_limit on a Dask cluster must be batchkit.RateLimit(...): a limiter "
                f"object ({o.limiter!r}) would be copied to every worker and limit each "
                "alone\nHINT: pass RateLimit(per_second=...); batchkit splits it among workers"
            )
        if o.cost is not None:
            raise InvalidArgument(
                "cost= is not supported with the Dask backend yet\nHINT: sort the input by "
                "cost yourself, most expensive first"
            )
        check_picklable("fn", self._fn)
        if o.context is not None:
            check_picklable("the context factory", o.context)
        if o.retry is not None:
            check_picklable("retry", o.retry)
        if o.key is not None:
            check_picklable("key", o.key)

    async def _workers(self) -> tuple[int, int, list[str]]:
        info = await self._client.scheduler.identity()
        workers = info.get("workers", {})
        threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
        return len(workers), threads, list(workers)

    async def __aenter__(self) -> DaskRun[T, R]:
        if self._entered:
            raise RuntimeError("a stream can be entered only once")
        self._entered = True
        self._check_options()
        self._loop = asyncio.get_running_loop()
        try:
            await self._enter()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _enter(self) -> None:
        o = self._o
        loop = self._loop
        assert loop is not None
        # The run (and a relative deadline) starts at the call, connecting included.
        self._start = loop.time()
        self._client = await self._backend._connect()
        n_workers, threads, addresses = await self._workers()
        if n_workers == 0:
            raise BatchkitError(
                "the Dask cluster has no workers\nHINT: start some (`dask worker ADDRESS`) or "
                "await client.wait_for_workers(n) before the call"
            )
        self._wall_offset = time.time() - loop.time()
        fit_timeout = self._read_deadline()
        in_flight, spec = self._plan(n_workers, threads, fit_timeout)
        self._spec_blob = dumps(spec)
        self._client.subscribe_topic(self._topic, self._on_alert)
        self._subscribed = True
        rate = o.rate_limit
        self._workers_seen = set(addresses)
        if rate is not None:
            await self._share_rate(rate, addresses)
        self._watch = asyncio.ensure_future(self._watch_cluster(rate))
        if self._is_async_input():
            self._intake.ait = aiter(self._items)
        else:
            self._intake.it = iter(self._items)
        if self._deadline_at is not None:
            self._deadline_handle = loop.call_at(self._deadline_at, self._on_deadline)
        self._event(
            RunStarted(
                name=o.name, concurrency=self._effective, total=self._intake.total, time=self._start
            )
        )
        self._announced = True
        from .._api import stream

        outer = stream(self._chunks(), self._run_chunk, concurrency=in_flight, ordered=o.ordered)
        await outer.__aenter__()
        self._outer = outer

    def _read_deadline(self) -> bool:
        """The deadline as this loop's time (``_deadline_at``) and the grace; returns
        ``fit_timeout``."""
        p = self._o
        self._grace = p.grace
        if p.deadline_seconds is not None:
            self._deadline_at = self._start + p.deadline_seconds
        else:
            self._deadline_at = p.deadline_at
        return p.fit_timeout

    def _plan(self, n_workers: int, threads: int, fit_timeout: bool) -> tuple[int, RunSpec]:
        """Chunks in flight, and what every worker gets to run its chunks."""
        o = self._o
        per_worker = self._backend.per_worker
        cap = o.slots
        per_chunk, in_flight = plan_chunks(cap, per_worker, n_workers, threads)
        self._effective = min(cap, per_chunk * threads)
        self._sizer = _Sizer(self._backend.chunk_size, per_chunk, threads, self._intake.total)
        chunk_concurrency: int | Adaptive = per_chunk
        if o.adaptive is not None:
            a = o.adaptive
            chunk_concurrency = dataclasses.replace(
                a, max=per_chunk, initial=min(a.initial, per_chunk), min=min(a.min, per_chunk)
            )
        rate = o.rate_limit
        dl = self._deadline_at
        spec = RunSpec(
            run_id=self._run_id,
            name=o.name,
            fn=self._fn,
            context=o.context,
            concurrency=chunk_concurrency,
            per_worker=per_worker,
            timeout=o.timeout,
            retry=o.retry,
            rate=rate.per_second if rate else None,
            burst=rate.burst if rate else 1,
            deadline_wall=dl + self._wall_offset if dl is not None else None,
            key=o.key,
            fit_timeout=fit_timeout,
            grace=self._grace,
            fail_fast=o.fail_fast,
            max_failures=o.max_failures,
            events=bool(self._observers),
            logs=self._backend.forward_logs,
            alerts=o.max_failures is not None or o.max_failure_ratio is not None,
            topic=self._topic,
        )
        return in_flight, spec

    def _is_async_input(self) -> bool:
        return hasattr(self._items, "__aiter__")

    # ------------------------------------------------------------------- chunks
    async def _chunks(self) -> AsyncIterator[_Chunk]:
        assert self._sizer is not None
        while not self._stopping and not self._intake.exhausted and self._intake.error is None:
            size = self._sizer.next_size(self._intake.next_index)
            batch: list[Any] = []
            try:
                if self._intake.it is not None:
                    batch.extend(itertools.islice(self._intake.it, size))
                    if len(batch) < size:
                        self._intake.exhausted = True
                else:
                    await self._fill(batch, size)
            except Exception as e:
                self._intake.error = e  # what was read before it still runs
            except BaseException:
                # Closed while reading (a stop's grace ran out): what was read is skipped.
                if batch:
                    self._skip_unsent(_Chunk(self._intake.next_index, batch))
                raise
            if not batch:
                return
            chunk = _Chunk(self._intake.next_index, batch)
            self._intake.next_index += len(batch)
            yield chunk

    async def _fill(self, batch: list[Any], size: int) -> None:
        """Read up to ``size`` items of the async input into ``batch``; once it holds one,
        wait at most ``PARTIAL_WAIT`` for the rest. The pending read is kept for the next
        chunk (cancelling it would break the input's generator)."""
        assert self._intake.ait is not None
        assert self._loop is not None
        send_by: float | None = None
        while len(batch) < size and not self._stopping:
            if self._pull is None:
                self._pull = asyncio.ensure_future(_next_of(self._intake.ait))
            if not self._pull.done():
                timeout = None if send_by is None else max(0.0, send_by - self._loop.time())
                await asyncio.wait({self._pull}, timeout=timeout)
                if not self._pull.done():
                    return
            pull, self._pull = self._pull, None
            item = pull.result()  # the input's own error propagates
            if item is _END:
                self._intake.exhausted = True
                return
            batch.append(item)
            if send_by is None:
                send_by = self._loop.time() + PARTIAL_WAIT

    def _skip_unsent(self, chunk: _Chunk) -> None:
        self._intake.next_index = max(self._intake.next_index, chunk.offset + len(chunk.items))
        self._emit_chunk(chunk, self._closed_chunk(chunk, "skipped"))

    async def _run_chunk(self, chunk: _Chunk) -> ChunkResult | None:
        """Send one chunk and wait for its result. The chunk is out (``_pending``) from the
        moment Dask accepted it until its result came back; a result is kept in
        ``_returned`` until its envelopes are out. Returns ``None``: results travel through
        ``_returned``, never through the outer stream (which may drop what it holds)."""
        loop = asyncio.get_running_loop()
        if self._stopping:
            self._returned[chunk.offset] = (chunk, self._closed_chunk(chunk, "skipped"))
            return None
        blob, positions, chunk.bad = pack_items(chunk.items)
        if len(chunk.bad) == len(chunk.items):
            self._returned[chunk.offset] = (chunk, ChunkResult(offset=chunk.offset, records=[]))
            return None
        future = self._client.submit(
            worker_side.run_chunk,
            self._spec_blob,
            self._run_id,
            chunk.offset,
            blob,
            positions,
            self._topic,
            pure=False,
            key=f"batchkit-{self._run_id}-{chunk.offset}",
        )
        self._pending[chunk.offset] = chunk
        self._in_flight_items += len(chunk.items)
        chunk.submitted = loop.time()
        try:
            result = worker_side.decode(await future)
        except asyncio.CancelledError:
            # Closed after a stop's grace: the chunk stays out, for _give_up to end it.
            self._spawn(self._client.cancel(future))
            raise
        except Exception as e:  # lost with its worker(s), or the task itself failed
            result = self._lost(chunk, e)
        self._pending.pop(chunk.offset, None)
        self._in_flight_items -= len(chunk.items)
        if result.token:
            chunk.starts.setdefault(result.token, result.worker)
        if self._sizer is not None and result.records and result.seconds:
            self._sizer.observe(len(result.records), result.seconds)
        self._returned[chunk.offset] = (chunk, result)
        return None

    def _closed_chunk(self, chunk: _Chunk, how: str) -> ChunkResult:
        if self._gone is not None:
            return self._lost(chunk, self._gone)
        reason: StopReason = self._stop_reason or "fail_fast"
        records: list[Record] = []
        now = time.time()
        for i in range(len(chunk.items)):
            err: BaseException
            if i in chunk.bad:
                continue  # its own pickling error (added by _emit_chunk)
            if how == "skipped":
                err = ItemSkipped(reason)
                records.append((i, "skipped", err, 0, 0.0, (err,), now))
            else:
                err = ItemCancelled(reason)
                records.append((i, "cancelled", err, 1, 0.0, (err,), now))
        return ChunkResult(offset=chunk.offset, records=records)

    # ------------------------------------------------------------------- outcomes
    def _expand(self, outcome: Outcome[_Chunk, ChunkResult | None]) -> None:
        """One chunk's outcome from the outer stream -> its items' envelopes (and events),
        in ``_ready``."""
        chunk = outcome.item
        returned = self._returned.pop(chunk.offset, None)
        if returned is None:
            # The outer stream ended the chunk itself (it cannot, short of a bug here).
            err = outcome.error if type(outcome) is Failure else ItemCancelled("fail_fast")
            self._emit_chunk(chunk, self._lost(chunk, err))  # pragma: no cover
            return
        result = returned[1]
        self._emit_chunk(chunk, result)
        if result.stop_reason is not None and self._stop_reason is None:
            # The chunk stopped itself (its own fail_fast / max_failures / the deadline).
            if result.stop_reason == "deadline":
                self._on_deadline()
            else:
                self._stop(result.stop_reason)
        self._check_thresholds()

    def _lost(self, chunk: _Chunk, error: BaseException) -> ChunkResult:
        now = time.time()
        records: list[Record] = [
            (i, "lost", error, 1, 0.0, (error,), now)
            for i in range(len(chunk.items))
            if i not in chunk.bad
        ]
        return ChunkResult(offset=chunk.offset, records=records)

    def _emit_chunk(self, chunk: _Chunk, result: ChunkResult) -> None:
        """A chunk's records -> envelopes in ``_ready`` (exactly one per item) and events."""
        for record in result.logs:
            record.worker = result.worker
            logging.getLogger(record.name).handle(record)
        records = result.records
        if chunk.bad:  # items that could not be pickled to send them: each its own failure
            now = time.time()
            records = records + [(i, "error", e, 0, 0.0, (e,), now) for i, e in chunk.bad.items()]
        if self._o.ordered:
            records = sorted(records, key=lambda r: r[0])
        reruns = max(len(chunk.starts) - 1, 0)
        if reruns:
            self._reruns += reruns * len(chunk.items)
            for i in range(chunk.offset, chunk.offset + len(chunk.items)):
                self._rerun_of[i] = reruns
        seen: set[int] = set()
        finished: list[tuple[float, int, Event]] = []
        for rec in records:
            if rec[0] in seen:  # pragma: no cover - a worker sends one record per item
                continue
            seen.add(rec[0])
            out = self._envelope(chunk, rec, reruns)
            if self._observers:
                finished.append(self._finished_event(out, chunk.items[rec[0]], rec[6]))
        self._intervals.extend(result.spans)
        if len(self._intervals) > _MAX_INTERVALS:
            self._fold_intervals()
        self._settle(chunk.offset, len(chunk.items), sum(r[1] in _FAILED for r in records))
        for i in range(len(chunk.items)):  # exactly one envelope per item, whatever arrived
            if i not in seen:
                err = ItemCancelled(self._stop_reason or "fail_fast")
                rec = (i, "cancelled", err, 1, 0.0, (err,), 0.0)
                out = self._envelope(chunk, rec, reruns)
                if self._observers:
                    finished.append(self._finished_event(out, chunk.items[i], 0.0))
        if self._observers:
            events = finished + [self._worker_event(r, chunk) for r in result.events]
            events.sort(key=lambda e: (e[0], e[1]))
            for _, _, event in events:
                self._event(event)

    def _envelope(self, chunk: _Chunk, rec: Record, reruns: int = 0) -> Outcome[T, R]:
        i, kind, payload, attempts, elapsed, errors, _ = rec
        index, item = chunk.offset + i, chunk.items[i]
        out: Outcome[T, R]
        if kind == "success":
            out = make_success(item, payload, index, attempts, elapsed)
            if reruns:
                set_reruns(out, reruns)
        else:
            out = Failure(item, payload, kind, index, attempts, elapsed, errors, reruns)  # type: ignore[arg-type]
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self._ready.append(out)
        return out

    def _finished_event(self, out: Outcome[T, R], item: Any, at: float) -> tuple[float, int, Event]:
        assert self._loop is not None
        when = at - self._wall_offset if at else self._loop.time()
        event = ItemFinished(
            name=self._o.name,
            key=self._key(out.index, item),
            outcome=out,
            in_flight=self._in_flight_items,
            time=when,
        )
        return when, 2, event

    def _worker_event(self, rec: tuple[Any, ...], chunk: _Chunk) -> tuple[float, int, Event]:
        when = rec[1] - self._wall_offset
        index = chunk.offset + rec[2]
        item = chunk.items[rec[2]]
        key = self._key(index, item)
        if rec[0] == "started":
            ev: Event = ItemStarted(
                name=self._o.name,
                index=index,
                key=key,
                item=item,
                attempt=rec[3],
                in_flight=self._in_flight_items,
                time=when,
            )
            return when, 0, ev
        ev = AttemptFailed(
            name=self._o.name,
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

    def _key(self, index: int, item: Any) -> str:
        return f"#{index}" if self._o.key is None else self._intake.key_of(index, item)

    # ------------------------------------------------------------------- iterating
    def __aiter__(self) -> DaskRun[T, R]:
        return self

    async def __anext__(self) -> Outcome[T, R]:
        if not self._entered:
            raise RuntimeError("iterate a stream inside `async with stream(...) as outcomes:`")
        while True:
            if self._ready:
                out = self._ready.popleft()
                self._consumed += 1
                if self._keep:
                    self._outcomes.append(out)
                return out
            if not self._outer_done:
                await self._next_chunk()
                continue
            drained = self._drain_one()
            if drained is not None:
                self._ready.append(drained)
                continue
            if self._intake.error is not None:
                raise InputFailed(self.report) from self._intake.error
            raise StopAsyncIteration

    async def _next_chunk(self) -> None:
        outer = self._outer
        nxt = asyncio.ensure_future(outer.__anext__())
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait({nxt, force}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            force.cancel()
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
        if nxt.cancelled():
            await self._give_up()
            return
        try:
            outcome = nxt.result()
        except StopAsyncIteration:
            await self._close_outer()
            return
        self._expand(outcome)

    async def _give_up(self, *, abandon: bool = True) -> None:
        """A stop's grace ran out (or the cluster is gone): drain what already came back,
        then end every chunk still out — ``lost`` if the cluster is gone, else
        ``cancelled`` and (unless the caller cancelled) listed in ``report.abandoned``."""
        try:
            await self._close_outer()  # cancels the chunk tasks; a pending chunk stays pending
        finally:
            self._end_chunks_out(abandon=abandon)

    def _end_chunks_out(self, *, abandon: bool) -> None:
        """Every chunk still out or returned but unread -> its items' envelopes."""
        left: dict[int, tuple[_Chunk, ChunkResult | None]] = {
            offset: (chunk, None) for offset, chunk in self._pending.items()
        }
        left.update(self._returned)
        self._returned.clear()
        self._pending.clear()
        given_up = 0
        for offset in sorted(left):
            chunk, result = left[offset]
            if result is None:
                given_up += len(chunk.items)
                if self._gone is None and abandon:
                    self._abandoned.extend(
                        offset + i for i in range(len(chunk.items)) if i not in chunk.bad
                    )
                result = self._closed_chunk(chunk, "cancelled")
            self._emit_chunk(chunk, result)
        if given_up and abandon:
            _log.warning(
                "batchkit: %d item(s) did not report back within %.3g s of the run stopping; "
                "recorded as %s",
                given_up,
                self._grace,
                "lost" if self._gone is not None else "cancelled and abandoned",
            )

    async def _close_outer(self) -> None:
        if not self._outer_done:
            self._outer_done = True
            await self._outer.__aexit__(None, None, None)

    def _drain_one(self) -> Outcome[T, R] | None:
        """After a stop: the next unread item of a sized input, as skipped."""
        if self._intake.exhausted or not self._intake.sized or self._intake.it is None:
            return None
        if self._stop_reason is None and self._gone is None:
            return None
        if not self._skip_announced:
            # Observers hear of the whole rest in one ItemsSkipped, as on the local engine.
            self._skip_announced = True
            rest = range(self._intake.next_index, self._intake.total or 0)
            if self._observers and rest and self._stop_reason is not None:
                self._ledger.items_skipped(self._stop_reason, rest)
        if self._stop_reason is not None:
            skipped = self._intake.drain_one(self._stop_reason)
            if skipped is not None:
                self._ledger.count_skipped(1)
                self._counts["skipped"] = self._counts.get("skipped", 0) + 1
            return skipped
        assert self._gone is not None  # the cluster is gone: nothing can run the rest
        for item in self._intake.it:
            index = self._intake.next_index
            self._intake.next_index += 1
            self._ledger.finished += 1
            self._counts["lost"] = self._counts.get("lost", 0) + 1
            lost: Failure[Any] = Failure(item, self._gone, "lost", index, 0, 0.0, (self._gone,))
            if self._observers:
                self._event(self._finished_event(lost, item, 0.0)[2])
            return lost
        self._intake.exhausted = True
        return None

    # -------------------------------------------------------------------- stopping
    def _settle(self, offset: int, finished: int, failed: int) -> None:
        """A chunk's true counts replace what its alerts had said so far."""
        alerted = self._alerted.pop(offset, (0, 0))
        self._settled.add(offset)
        self._ledger.finished += finished - alerted[0]
        self._ledger.failed += failed - alerted[1]

    def _on_alert(self, event: tuple[float, dict[str, Any]]) -> None:
        """A message from a worker on the run's topic: a chunk started there (``"w"``), or a
        failure alert (``max_failures`` and ``max_failure_ratio`` need them: a chunk with a
        hanging item would otherwise never report its failures). Alerts of an earlier run
        of a chunk that was re-run are not counted again."""
        msg = event[1]
        offset = msg["o"]
        if self._closed or offset in self._settled:
            return
        chunk = self._pending.get(offset)
        if "w" in msg:
            if chunk is not None:
                self._on_start(chunk, msg["s"], msg["w"])
            return
        if chunk is not None and chunk.starts and msg["s"] != next(reversed(chunk.starts)):
            return  # from a run of this chunk on a worker that was lost since
        fin, fail = self._alerted.get(offset, (0, 0))
        self._alerted[offset] = (fin + msg["f"], fail + msg["x"])
        self._ledger.finished += msg["f"]
        self._ledger.failed += msg["x"]
        self._check_thresholds()

    def _on_start(self, chunk: _Chunk, token: str, worker: str) -> None:
        """A chunk started on ``worker``. A second start means the worker running it was lost
        and Dask re-runs it: its items run again (from the start), its earlier run's failure
        alerts no longer count, and observers and the log hear of it."""
        if token in chunk.starts:
            return
        previous = next(reversed(chunk.starts), None)
        lost_on = chunk.starts[previous] if previous is not None else "?"
        chunk.starts[token] = worker
        if previous is None:
            return
        fin, fail = self._alerted.pop(chunk.offset, (0, 0))
        self._ledger.finished -= fin
        self._ledger.failed -= fail
        indices = range(chunk.offset, chunk.offset + len(chunk.items))
        _log.warning(
            "batchkit: worker %s was lost; %d item(s) (input %d..%d) re-run on %s "
            "(re-run %d of this chunk)",
            lost_on,
            len(indices),
            indices.start,
            indices.stop - 1,
            worker,
            len(chunk.starts) - 1,
        )
        assert self._loop is not None
        self._event(
            ChunkRerun(
                name=self._o.name,
                lost=lost_on,
                worker=worker,
                indices=indices,
                reruns=len(chunk.starts) - 1,
                time=self._loop.time(),
            )
        )

    def _check_thresholds(self) -> None:
        """The ledger decides (the same decision as the local engine's); the driver acts."""
        if self._stopping:
            return
        reason = self._ledger.threshold_reached()
        if reason is not None:
            self._stop(reason)

    def _stop(self, reason: StopReason) -> None:
        """Start no more chunks; tell every worker to stop this run's coroutines."""
        if self._stopping and self._stop_reason is not None:
            return
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stopping = True
        loop = self._loop
        assert loop is not None
        if reason != "deadline" and self._observers:
            self._ledger.run_stopping(reason)
        if self._outage is None:
            self._spawn(self._broadcast(worker_side.stop_run, self._run_id, reason))
        if self._force_handle is None:
            # Chunks whose results have not come back within the grace are given up as
            # cancelled (a worker that does not answer cannot hold the call past it).
            self._force_handle = loop.call_later(self._grace, self._force.set)
            self._return_by = loop.time() + self._grace + _MESSAGES_SLACK

    def _on_deadline(self) -> None:
        if self._stop_reason is not None:
            return
        assert self._loop is not None
        if self._observers:
            self._ledger.deadline_hit()
        self._stop("deadline")

    def _time_left(self) -> float:
        """How long the call may still wait on the cluster: until a stop's grace + half the
        SLACK, else that from now."""
        assert self._loop is not None
        if self._return_by is None:
            return self._grace + _MESSAGES_SLACK
        return max(0.0, self._return_by - self._loop.time())

    async def _broadcast(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._outage is not None and self._outage[1] == "scheduler":
            return None  # it cannot be reached; waiting for it would only delay the call
        try:
            # A worker whose loop is blocked would never answer: bound the wait.
            async with asyncio.timeout(self._time_left()):
                return await self._client.run(fn, *args)
        except Exception:  # a worker that is going away cannot be told; its chunks are lost
            _log.debug("batchkit: broadcast %s failed", fn.__name__, exc_info=True)
            return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ rate shares
    async def _share_rate(self, rate: RateLimit, addresses: list[str]) -> None:
        """Give every live worker ``per_second / n`` (burst split too, at least 1 each).
        A worker not told yet starts nothing: its gate waits for its share."""
        n = max(len(addresses), 1)
        per_second = rate.per_second / n
        burst = max(1, rate.burst // n)
        await self._client.run(
            worker_side.set_share, self._run_id, per_second, burst, workers=addresses
        )
        self._shares = dict.fromkeys(addresses, per_second)

    async def _watch_cluster(self, rate: RateLimit | None) -> None:
        """Every ``_SHARE_POLL_SECONDS``: which workers are there. Re-split the rate when
        they change, tell of each worker that left, and when no worker (or no scheduler) was
        there for ``lost_after`` seconds, end what is out as ``lost``."""
        assert self._loop is not None
        lost_after: float | None = getattr(self._backend, "lost_after", None)
        while True:
            await asyncio.sleep(_SHARE_POLL_SECONDS)
            try:
                async with asyncio.timeout(_PROBE_SECONDS):
                    _, _, addresses = await self._workers()
                missing = None if addresses else "worker"
            except asyncio.CancelledError:
                raise
            except Exception:
                addresses, missing = [], "scheduler"
            now = self._loop.time()
            if missing is None:
                self._outage = None
                self._tell_left(addresses, now)
                if rate is not None and set(addresses) != set(self._shares):
                    try:
                        await self._share_rate(rate, addresses)
                    except Exception:
                        _log.debug("batchkit: re-splitting the rate limit failed", exc_info=True)
                continue
            if self._outage is None or self._outage[1] != missing:
                self._outage = (now, missing)
                self._tell_left(addresses, now)
            if lost_after is not None and now - self._outage[0] >= lost_after:
                self._cluster_gone(missing, lost_after)
                return

    def _tell_left(self, addresses: list[str], now: float) -> None:
        left = self._workers_seen - set(addresses)
        self._workers_seen = set(addresses)
        for worker in sorted(left):
            _log.warning("batchkit: Dask worker %s left the cluster during the run", worker)
            self._event(WorkerLost(name=self._o.name, worker=worker, time=now))

    def _cluster_gone(self, missing: str, waited: float) -> None:
        """No worker (or no scheduler) for ``waited`` seconds: what is out is lost."""
        what = (
            "no Dask worker was left"
            if missing == "worker"
            else "the Dask scheduler could not be reached"
        )
        self._gone = ItemError(
            f"lost: {what} for {waited:g} s (DaskBackend(lost_after=...)); the item may have "
            "run, in part or wholly, on a worker that is gone"
        )
        n = sum(len(c.items) for c in self._pending.values())
        _log.warning("batchkit: %s for %g s; %d item(s) out end as lost", what, waited, n)
        self._stopping = True
        assert self._loop is not None
        self._return_by = self._loop.time() + _MESSAGES_SLACK
        self._force.set()

    # --------------------------------------------------------------------- leaving
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._outer is not None and not self._outer_done:
                await self._left_early()
        finally:
            await asyncio.shield(self._shutdown())

    async def _left_early(self) -> None:
        """The caller cancelled the call, or left a stream block, before the run ended: as on
        the local engine, items out end ``cancelled``, items not started ``skipped``, the
        report counts every item, and the stop reason is ``"cancelled"`` unless every item
        had already ended."""
        if self._stop_reason is None:
            self._stop_reason = "cancelled"
            self._stopping = True
        before = self._counts.get("cancelled", 0) + self._counts.get("skipped", 0)
        try:
            # Closing the chunk stream re-raises the caller's cancel once it has cleaned up.
            await self._give_up(abandon=False)
        finally:
            while (drained := self._drain_one()) is not None:
                self._ready.append(drained)
            after = self._counts.get("cancelled", 0) + self._counts.get("skipped", 0)
            if self._stop_reason == "cancelled" and after == before:
                self._stop_reason = None  # nothing was left to cancel
            if self._keep:
                # Nobody will iterate any more: what is ready belongs in the report.
                self._outcomes.extend(self._ready)
                self._ready.clear()

    async def _shutdown(self) -> None:
        for handle in (self._deadline_handle, self._force_handle):
            if handle is not None:
                handle.cancel()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._background:
            # Bounded: a scheduler that is gone never answers a cancel or a stop message.
            _, late = await asyncio.wait(self._background, timeout=self._time_left())
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._client is not None:
            if self._subscribed:
                try:
                    self._client.unsubscribe_topic(self._topic)
                except Exception:  # pragma: no cover - a client already closing
                    _log.debug("batchkit: unsubscribing failed", exc_info=True)
            grace = min(self._grace, self._time_left())
            await self._broadcast(worker_side.end_run, self._run_id, grace)
        await self._close_input()
        if self._announced:
            assert self._loop is not None
            report = self.report
            self._event(RunFinished(name=self._o.name, report=report, time=self._loop.time()))

    async def _close_input(self) -> None:
        pull, self._pull = self._pull, None
        if pull is not None:
            pull.cancel()
            await asyncio.gather(pull, return_exceptions=True)
        if self._intake.ait is not None and hasattr(self._intake.ait, "aclose"):
            try:
                await self._intake.ait.aclose()
            except Exception:  # pragma: no cover
                _log.exception("batchkit: closing the async input failed")

    # ---------------------------------------------------------------------- report
    @property
    def consumed(self) -> int:
        return self._consumed

    @property
    def report(self) -> BatchReport[T, R]:
        if self._loop is None:
            raise RuntimeError(
                "Stream.report is available once the stream is entered: read it inside or "
                "after the `async with` block"
            )
        if self._final is not None:
            return self._final
        outcomes = sorted(self._outcomes, key=lambda o: o.index) if self._keep else []
        # The store is built here with each index's re-runs: reading them back from the
        # envelopes would cost a raised AttributeError per item (see _outcomes.set_reruns).
        store = OutcomeStore[T, R].from_outcomes(outcomes, self._rerun_of)
        report = BatchReport(
            outcomes=store.view(),
            wall_time=self._loop.time() - self._start,
            concurrency=self._effective,
            peak_concurrency=self._peak_from_intervals(),
            stop_reason=self._stop_reason,
            input_exhausted=self._intake.exhausted,
            name=self._o.name,
            key=self._o.key,
            abandoned=tuple(sorted(self._abandoned)),
            tally=None if self._keep else dict(self._counts),
            reruns=self._reruns,
        )
        if self._closed and not self._background and self._watch_done():
            self._final = report  # nothing can change it any more
        return report

    def _watch_done(self) -> bool:
        return self._watch is None or self._watch.done()

    def _peak_from_intervals(self) -> int:
        """The most attempts whose (start, end) spans overlapped, from worker timestamps."""
        return max(self._peak, _peak(self._intervals))

    def _fold_intervals(self) -> None:
        """Keep memory bounded on long streams: fold the spans seen so far into ``_peak`` and
        keep the latest-ending tenth, which later spans may still overlap."""
        self._peak = max(self._peak, _peak(self._intervals))
        self._intervals.sort(key=lambda span: span[1])
        del self._intervals[: len(self._intervals) - _MAX_INTERVALS // 10]

    def _event(self, event: Event | ChunkRerun | WorkerLost) -> None:
        # The cluster's own events go to the same observers, through the ledger; they are not
        # in the core's Event union (observers that do not know them ignore them).
        self._ledger.event(cast("Event", event))

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _in_flight(self) -> int:
        return self._in_flight_items


_END = object()  # the end of an async input


def _no_sink(outcome: Any) -> None:  # the driver puts outcomes in its own queue
    raise AssertionError("the Dask driver records envelopes itself")


async def _next_of(ait: AsyncIterator[Any]) -> Any:
    try:
        return await anext(ait)
    except StopAsyncIteration:
        return _END


def _peak(spans: list[tuple[float, float]]) -> int:
    marks = sorted(
        itertools.chain.from_iterable(((s, 1), (e, -1)) for s, e in spans),
        key=lambda m: (m[0], m[1]),
    )
    peak = cur = 0
    for _, d in marks:
        cur += d
        peak = max(peak, cur)
    return peak


async def run_batch(
    backend: Any, items: Any, fn: Callable[..., Any], options: Options
) -> BatchReport[Any, Any]:
    run: DaskRun[Any, Any] = DaskRun(backend, items, fn, options, keep=True)
    async with run:
        async for _ in run:
            pass
    return run.report
