"""The worker side of the Dask backend: run one chunk with the local engine.

Each chunk runs through ``batchkit.stream`` on the worker's event loop, so every item goes
through the same per-item code as a local run (timeouts, contexts, retries with their backoff,
the deadline). What is shared between the chunks of one run on one worker lives in a
:class:`_WorkerRun` found by run id in this process's registry:

- a gate every attempt passes (``rate_limit=`` of the local run): at most ``per_worker``
  attempts at once on this worker, and this worker's share of the cluster-wide ``RateLimit``;
- with ``groups=`` (or a weighted ``RateLimit``), this worker's share of each group, one
  ``Groups`` every chunk engine of the run here is handed (``groups.py``);
- the asyncio tasks of the chunks running now, so that a stop message from the driver
  (``stop_run``: deadline, thresholds, the caller cancelled) cancels the coroutines themselves
  (``Client.cancel`` does not stop a coroutine that is already running);
- per-worker resources (``batchkit.dask.per_worker``), disposed by ``end_run``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._engine.meters.groups import SHARED, Groups
from .._engine.meters.rate_math import TokenBucket
from .._model.errors import ItemCancelled, ItemSkipped, StopReason
from .._model.events import AttemptFailed, Event, ItemStarted
from .._model.outcomes import Success
from .wire import (
    ChunkResult,
    Record,
    RunSpec,
    dumps,
    find_broken,
    load_records,
    loads,
    safe_error,
    salvage_loads,
    to_wire_records,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from .groups import ShareTable

__all__ = [
    "current_run",
    "decode",
    "end_run",
    "run_chunk",
    "running_chunks",
    "set_group_shares",
    "set_share",
    "stop_run",
]

_log = logging.getLogger("batchkit.dask")

_CURRENT: contextvars.ContextVar[_WorkerRun | None] = contextvars.ContextVar(
    "batchkit_dask_run", default=None
)


@dataclass(eq=False)
class _WorkerRun:
    run_id: str
    spec: RunSpec | None = None
    stop_reason: StopReason | None = None
    chunks: set[asyncio.Task[None]] = field(default_factory=set)
    sem: asyncio.Semaphore | None = None
    # This worker's share of the cluster-wide rate, once the driver has sent it.
    bucket: TokenBucket | None = None
    share_set: asyncio.Event = field(default_factory=asyncio.Event)
    # groups=: this worker's share of the groups, shared by the run's chunk engines here,
    # and the latest share table the driver sent (it re-splits as workers leave).
    groups: Groups | None = None
    table: ShareTable | None = None
    resources: dict[object, tuple[Any, Callable[[Any], object] | None]] = field(
        default_factory=dict
    )


_RUNS: dict[str, _WorkerRun] = {}
# Runs that ended here: a chunk of theirs that arrives late must not start anything.
_ENDED: OrderedDict[str, None] = OrderedDict()
_ENDED_KEEP = 1024


def _run_state(run_id: str) -> _WorkerRun:
    run = _RUNS.get(run_id)
    if run is None:
        run = _RUNS[run_id] = _WorkerRun(run_id)
    return run


def current_run() -> _WorkerRun | None:
    """The run whose chunk is executing in this context (for per-worker resources)."""
    return _CURRENT.get()


# ------------------------------------------------------------------------ the gate
class _Gate:
    """Passed to the local run as its ``rate_limit=``: entered around every attempt."""

    __slots__ = ("_run",)

    def __init__(self, run: _WorkerRun) -> None:
        self._run = run

    async def __aenter__(self) -> None:
        run = self._run
        assert run.sem is not None
        await run.sem.acquire()
        try:
            spec = run.spec
            assert spec is not None
            if spec.rate is not None:
                await run.share_set.wait()
                assert run.bucket is not None
                await run.bucket.wait_turn(asyncio.get_running_loop())
        except BaseException:
            run.sem.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._run.sem is not None
        self._run.sem.release()


def set_share(run_id: str, per_second: float, burst: int) -> None:
    """The driver's message: this worker may start ``per_second`` attempts per second."""
    if run_id in _ENDED:
        return
    run = _run_state(run_id)
    if run.bucket is None:
        now = asyncio.get_running_loop().time() if _has_loop() else time.monotonic()
        run.bucket = TokenBucket(per_second, burst, now)
    else:
        run.bucket.set_rate(per_second, burst)
    run.share_set.set()


async def set_group_shares(run_id: str, table: ShareTable, dask_worker: Any = None) -> None:
    """The driver's message: workers left, this worker's share of the groups grew."""
    if run_id in _ENDED:
        return
    run = _run_state(run_id)
    run.table = table
    policies = table.get(dask_worker.address) if dask_worker is not None else None
    if run.groups is not None and policies is not None:
        run.groups.resize(policies)


def _groups_of(run: _WorkerRun, worker: str) -> tuple[Any, ...]:
    """This worker's share of the run's groups; the shared ``Groups`` made on first use."""
    spec = run.spec
    assert spec is not None
    table = run.table or spec.groups
    assert table is not None
    policies = table.get(worker)
    if policies is None:  # pragma: no cover - chunks are submitted to the start workers only
        raise RuntimeError(f"batchkit: worker {worker} holds no share of the run's groups")
    if run.groups is None:
        run.groups = Groups(policies, asyncio.get_running_loop())
    return policies


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------- stop and end
def stop_run(run_id: str, reason: StopReason) -> int:
    """The driver's message: stop the run here. Returns how many chunks were cancelled."""
    if run_id in _ENDED:
        return 0
    run = _run_state(run_id)
    if run.stop_reason is None:
        run.stop_reason = reason
    n = 0
    for task in list(run.chunks):
        if not task.done():
            task.cancel()
            n += 1
    return n


async def end_run(run_id: str, grace: float = 1.0) -> dict[str, int]:
    """The driver's last message: cancel what still runs, dispose resources, forget the run."""
    _ENDED[run_id] = None
    while len(_ENDED) > _ENDED_KEEP:
        _ENDED.popitem(last=False)
    run = _RUNS.pop(run_id, None)
    if run is None:
        return {"cancelled": 0, "abandoned": 0, "disposed": 0}
    run.stop_reason = run.stop_reason or "fail_fast"
    tasks = [t for t in run.chunks if not t.done()]
    for t in tasks:
        t.cancel()
    abandoned = 0
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=grace)
        abandoned = len(pending)
        if pending:
            _log.warning(
                "batchkit: %d chunk(s) of run %s did not stop within %.3g s of being cancelled",
                len(pending),
                run_id,
                grace,
            )
    disposed = 0
    for value, dispose in run.resources.values():
        if dispose is None:
            continue
        try:
            result = dispose(value)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                await result
            disposed += 1
        except Exception:
            _log.exception("batchkit: disposing a per-worker resource failed")
    run.resources.clear()
    return {"cancelled": len(tasks), "abandoned": abandoned, "disposed": disposed}


def running_chunks() -> int:
    """How many chunks of any run execute on this worker now (for tests and diagnostics)."""
    return sum(1 for run in _RUNS.values() for t in run.chunks if not t.done())


# ------------------------------------------------------------------- log capture
class _Capture(logging.Handler):
    """Collects records emitted while a chunk runs (found by the context variable)."""

    def emit(self, record: logging.LogRecord) -> None:
        sink = _LOGS.get()
        if sink is None or record.name.startswith(("distributed", "tornado", "asyncio")):
            return
        try:
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.msg = record.getMessage()
            record.args = None
            record.exc_info = None
            sink.append(record)
        except Exception:  # pragma: no cover - a broken record must not break the chunk
            self.handleError(record)


_LOGS: contextvars.ContextVar[list[logging.LogRecord] | None] = contextvars.ContextVar(
    "batchkit_dask_logs", default=None
)
_capture: _Capture | None = None


def _install_capture() -> None:
    global _capture
    if _capture is None:
        _capture = _Capture()
        logging.getLogger().addHandler(_capture)


# ---------------------------------------------------------------------- a chunk
class _Collector:
    """What a chunk knows about its items beyond their outcomes: when each first started and
    how many attempts it had (for the envelopes of a stopped chunk), when each last ended (for
    the report's peak concurrency) — recorded by a thin wrapper around ``fn`` — and, only when
    the driver has observers, the local run's events to forward (events cost the local engine
    about 20 us per item, so they are not asked for otherwise)."""

    __slots__ = (
        "events",
        "finished",
        "keep_events",
        "loop_to_wall",
        "spans",
        "started",
        "stop_reason",
    )

    def __init__(self, keep_events: bool, loop_to_wall: float) -> None:
        self.stop_reason: StopReason | None = None
        self.started: dict[int, tuple[float, int]] = {}
        self.finished: dict[int, float] = {}
        self.events: list[tuple[Any, ...]] = []
        self.spans: list[tuple[float, float]] = []
        self.keep_events = keep_events
        self.loop_to_wall = loop_to_wall

    def __call__(self, event: Event) -> None:
        if type(event) is ItemStarted:
            wall = event.time + self.loop_to_wall
            self.events.append(("started", wall, event.index, event.attempt))
        elif type(event) is AttemptFailed:
            wall = event.time + self.loop_to_wall
            self.events.append(
                (
                    "failed",
                    wall,
                    event.index,
                    event.attempt,
                    safe_error(event.error),
                    event.kind,
                    event.retry_in,
                )
            )


def _tracked(fn: Callable[..., Any], collector: _Collector) -> Callable[..., Any]:
    """``fn`` over ``(index, item)`` pairs, noting each attempt's start and end: the span of
    every attempt (what ``report.peak_concurrency`` counts: items running ``fn``, not waiting
    out a backoff), each item's first start and attempt count, and its last end. Sync stays
    sync (the local engine runs it in its thread pool), async stays async.
    ``time.monotonic`` is the loop's clock."""
    from .._model.options import is_async_callable

    started, finished = collector.started, collector.finished
    spans = collector.spans
    to_wall = collector.loop_to_wall
    clock = time.monotonic

    def begin(i: int) -> float:
        now = clock()
        s = started.get(i)
        started[i] = (now, 1) if s is None else (s[0], s[1] + 1)
        return now + to_wall

    if is_async_callable(fn):

        async def call_async(pair: tuple[int, Any], *ctx: Any) -> Any:
            start = begin(pair[0])
            try:
                return await fn(pair[1], *ctx)
            finally:
                end = finished[pair[0]] = clock() + to_wall
                spans.append((start, end))

        return call_async

    def call(pair: tuple[int, Any], *ctx: Any) -> Any:
        start = begin(pair[0])
        try:
            return fn(pair[1], *ctx)
        finally:
            end = finished[pair[0]] = clock() + to_wall
            spans.append((start, end))

    return call


class _ChunkKey:
    """``key=`` of a chunk's local run over ``(local index, item)`` pairs: the item's own key
    when the run has one, else ``"<driver's run id>:<input index>"``, so that
    ``current_attempt().idempotency_key`` is the same on every worker (a lost chunk re-run
    elsewhere keeps its items' keys)."""

    __slots__ = ("key", "offset", "run_id")

    def __init__(self, run_id: str, offset: int, key: Callable[[Any], object] | None) -> None:
        self.run_id = run_id
        self.offset = offset
        self.key = key

    def __call__(self, pair: tuple[int, Any]) -> object:
        if self.key is not None:
            return self.key(pair[1])
        return f"{self.run_id}:{self.offset + pair[0]}"


def _record(outcome: Any, i: int, finished_wall: float) -> Record:
    # Places as declared in wire.RECORD_PLACES (tests/dask/test_wire_fields.py checks them).
    if type(outcome) is Success:
        return (
            i,
            "success",
            outcome.value,
            outcome.attempts,
            outcome.elapsed,
            (),
            finished_wall,
        )
    errors = tuple(safe_error(e) for e in outcome.errors)
    return (
        i,
        outcome.kind,
        safe_error(outcome.error),
        outcome.attempts,
        outcome.elapsed,
        errors,
        finished_wall,
    )


class _Alerts:
    """Tells the driver of each failure at once, with the outcomes finished since the last
    alert, through Dask's event log (the driver subscribes to ``topic``). ``token`` names
    this run of the chunk: a chunk re-run after its worker died counts afresh."""

    __slots__ = ("finished", "offset", "token", "topic", "worker")

    def __init__(self, topic: str, offset: int, token: str) -> None:
        from distributed import get_worker

        self.worker = get_worker()
        self.topic = topic
        self.offset = offset
        self.token = token
        self.finished = 0

    def add(self, failed: bool) -> None:
        self.finished += 1
        if failed:
            msg = {"o": self.offset, "s": self.token, "f": self.finished, "x": 1}
            self.worker.log_event(self.topic, msg)
            self.finished = 0


async def _consume(
    run: _WorkerRun,
    offset: int,
    pairs: list[tuple[int, Any]],
    collector: _Collector,
    records: list[Record],
    gate: bool,
    token: str,
    groups: tuple[Any, ...] = (),
) -> None:
    from .._api import stream
    from .._model.policies import Deadline

    spec = run.spec
    assert spec is not None
    loop = asyncio.get_running_loop()
    deadline: Deadline | None = None
    if spec.deadline_wall is not None:
        deadline = Deadline(
            at=loop.time() + (spec.deadline_wall - time.time()),
            fit_timeout=spec.fit_timeout,
            grace=spec.grace,
        )
    kwargs: dict[str, Any] = {}
    if groups:
        # The chunk's engine takes the worker's shared groups (SHARED), not its own.
        kwargs["groups"] = groups
        SHARED.set(run.groups)
    if spec.context is not None:
        kwargs["context"] = spec.context
    if spec.item_budget is not None:
        kwargs["item_budget"] = spec.item_budget
    async with stream(
        pairs,
        _tracked(spec.fn, collector),
        concurrency=spec.concurrency,
        timeout=spec.timeout,
        retry=spec.retry,
        rate_limit=_Gate(run) if gate else None,
        deadline=deadline,
        fail_fast=spec.fail_fast,
        max_failures=spec.max_failures,
        observers=[collector] if collector.keep_events else [],
        name=spec.name,
        buffer=max(len(pairs), 1),  # the chunk is in memory already: never wait for room
        key=_ChunkKey(spec.run_id, offset, spec.key),
        **kwargs,
    ) as outcomes:
        finished = collector.finished
        alert = _Alerts(spec.topic, offset, token) if spec.alerts else None
        async for outcome in outcomes:
            i = outcome.item[0]
            at = finished.pop(i, None)
            records.append(_record(outcome, i, time.time() if at is None else at))
            if alert is not None:
                alert.add(type(outcome) is not Success and outcome.kind in ("error", "timeout"))
        collector.stop_reason = outcomes.report.stop_reason


def _close_records(
    records: list[Record],
    indices: list[int],
    collector: _Collector,
    reason: StopReason,
    loop_now: float,
) -> None:
    """After a stop: ``cancelled`` for items that started here, ``skipped`` for the rest."""
    done = {r[0] for r in records}
    now_wall = time.time()
    for i in indices:
        if i in done:
            continue
        started = collector.started.get(i)
        if started is None:
            err: BaseException = ItemSkipped(reason)
            records.append((i, "skipped", err, 0, 0.0, (err,), now_wall))
        else:
            err = ItemCancelled(reason)
            first, attempt = started
            records.append((i, "cancelled", err, attempt, loop_now - first, (err,), now_wall))


def _unpack(blob: bytes, positions: list[int] | None, records: list[Record]) -> list[Any]:
    """The chunk's ``(local index, item)`` pairs. An item that cannot be unpickled here does
    not run: its record is an ``error`` with the unpickling error."""
    try:
        items = loads(blob)
        broken = False
    except Exception:
        items, marks = salvage_loads(blob)
        broken = bool(marks)
    indices = positions if positions is not None else range(len(items))
    pairs = list(zip(indices, items, strict=True))
    if not broken:
        return pairs
    good: list[Any] = []
    now = time.time()
    for i, item in pairs:
        bad = find_broken(item)
        if bad is None:
            good.append((i, item))
            continue
        err = safe_error(bad.error)
        err.add_note("batchkit: this item cannot be unpickled on the worker")
        records.append((i, "error", err, 0, 0.0, (err,), now))
    return good


def _announce(topic: str, offset: int, token: str, worker: Any) -> None:
    """Tell the driver this chunk starts here (a second start means a worker was lost)."""
    if worker is not None:
        worker.log_event(topic, {"o": offset, "s": token, "w": worker.address})


async def run_chunk(
    blob: bytes,
    run_id: str,
    offset: int,
    items_blob: bytes,
    positions: list[int] | None = None,
    topic: str = "",
) -> bytes:
    """A Dask task: run the chunk's items (input indices from ``offset``; ``positions``:
    which of the chunk's items the blob holds, ``None`` for all) and return their records."""
    from distributed import get_worker

    loop = asyncio.get_running_loop()
    began = loop.time()
    collector = _Collector(False, time.time() - loop.time())
    records: list[Record] = []
    logs: list[logging.LogRecord] = []
    run_token = uuid.uuid4().hex[:12]
    try:
        dask_worker: Any = get_worker()
        worker, threads = dask_worker.address, dask_worker.state.nthreads
    except ValueError:  # pragma: no cover - called outside a worker
        dask_worker, worker, threads = None, "", 1
    if topic:
        _announce(topic, offset, run_token, dask_worker)
    pairs = _unpack(items_blob, positions, records)
    indices = [i for i, _ in pairs]
    if run_id in _ENDED:
        reason: StopReason = "fail_fast"
        _close_records(records, indices, collector, reason, loop.time())
        return _encode(offset, records, collector, logs, worker, reason, token=run_token)
    run = _run_state(run_id)
    if run.spec is None:
        run.spec = loads(blob)
        run.sem = asyncio.Semaphore(run.spec.per_worker)
    spec = run.spec
    collector.keep_events = spec.events
    if run.stop_reason is not None:
        _close_records(records, indices, collector, run.stop_reason, loop.time())
        return _encode(offset, records, collector, logs, worker, run.stop_reason, token=run_token)
    if spec.logs:
        _install_capture()
    token = _CURRENT.set(run)
    logs_token = _LOGS.set(logs if spec.logs else None)
    try:
        # The gate holds per_worker across chunks running at once here and this worker's
        # rate share; with one chunk at a time and no rate limit it has nothing to do.
        gate = spec.rate is not None or threads > 1
        groups = _groups_of(run, worker) if spec.groups is not None else ()
        task = loop.create_task(
            _consume(run, offset, pairs, collector, records, gate, run_token, groups)
        )
    finally:
        _CURRENT.reset(token)
        _LOGS.reset(logs_token)
    run.chunks.add(task)
    try:
        await _wait_chunk(task)
    finally:
        run.chunks.discard(task)
    # A stop message may have come while we awaited (mypy narrowed it to None above).
    stopped = _stop_reason_of(run) or collector.stop_reason
    if len(records) < len(indices):
        _close_records(records, indices, collector, stopped or "fail_fast", loop.time())
    seconds = loop.time() - began
    return _encode(offset, records, collector, logs, worker, stopped, seconds, run_token)


def _stop_reason_of(run: _WorkerRun) -> StopReason | None:
    return run.stop_reason


async def _wait_chunk(task: asyncio.Task[None]) -> None:
    """Wait for the chunk's task. A stop message cancels that task (its outcomes so far are
    kept); if this Dask task itself is cancelled (the worker closes), cancel and re-raise."""
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        await asyncio.gather(task, return_exceptions=True)


def _encode(
    offset: int,
    records: list[Record],
    collector: _Collector,
    logs: list[logging.LogRecord],
    worker: str,
    reason: StopReason | None,
    seconds: float = 0.0,
    token: str = "",
) -> bytes:
    body = to_wire_records(records)
    result = ChunkResult(
        offset=offset,
        records=[],
        events=collector.events,
        logs=logs,
        worker=worker,
        stop_reason=reason,
        seconds=seconds,
        spans=collector.spans,
        token=token,
    )
    return dumps((body, result))


def decode(blob: bytes) -> ChunkResult:
    """On the driver: the chunk's result with its records. What does not unpickle here is
    its own item's failure (records) or left out (an event or log record)."""
    try:
        body, result = loads(blob)
    except Exception:
        (body, result), _ = salvage_loads(blob)
        result.events = [e for e in result.events if find_broken(e) is None]
        result.logs = [r for r in result.logs if find_broken(r) is None]
    result.records = load_records(body)
    assert isinstance(result, ChunkResult)
    return result
