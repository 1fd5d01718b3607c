"""The local sliding-window scheduler.

One long-lived worker task per concurrency slot pulls the next item the moment its previous
one ends: no barrier, no task per item. Per-item timeouts are enforced by one watchdog task
over a FIFO of attempt deadlines (every attempt gets the same timeout, so deadlines arrive in
start order) instead of a timer per item; a timed-out attempt is cancelled with
``Task.cancel()`` on its worker, which records the failure and goes on with the next item.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import heapq
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence, Sized
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar, cast

from . import _backoff
from ._adaptive import AimdState, is_stuck, on_overload, on_success
from ._errors import (
    InputFailed,
    ItemCancelled,
    ItemSkipped,
    ItemTimeout,
    StopReason,
)
from ._events import (
    AttemptFailed,
    DeadlineHit,
    Event,
    ItemFinished,
    ItemsSkipped,
    ItemStarted,
    LimitChanged,
    Observer,
    RunFinished,
    RunStarted,
    RunStopping,
)
from ._outcomes import BatchReport, Failure, LimitChange, Outcome, make_success
from ._ratelimit import TokenBucket
from ._store import OutcomeStore

if TYPE_CHECKING:
    import random
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import AbstractAsyncContextManager

    from ._policies import Adaptive, AsyncLimiter, FailureRatio, Retry

__all__ = ["Engine", "Plan"]

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger("batchkit")

_TIMEOUT: Final = 1
_STOP: Final = 2

# Yield to the event loop after this much real time (or, in virtual time, this many items
# per worker) without a suspension, so a ``fn`` that never awaits cannot starve the loop or
# the watchdog. The budget is shared and refilled once per loop iteration; once it is spent,
# every worker that comes round yields, so the count scales with the number of workers to
# keep those extra resumptions rare.
_YIELD_EVERY_ITEMS_PER_WORKER: Final = 32
_YIELD_EVERY_SECONDS: Final = 0.002

# asyncio runs a timer once ``loop.time() + clock resolution`` reaches it, so a callback set
# for ``when`` may see ``loop.time()`` a hair before ``when``. Every "is it time yet?" check
# allows the same slack; otherwise it would re-arm the timer forever (in virtual time, the
# clock would never move again).
_SLACK: Final = time.get_clock_info("monotonic").resolution


class Plan:
    """Validated, normalised arguments of one run (built by ``_api``)."""

    __slots__ = (
        "adaptive",
        "context",
        "cost",
        "deadline_at",
        "deadline_seconds",
        "fail_fast",
        "fit_timeout",
        "fn",
        "fn_is_async",
        "key",
        "limiter",
        "max_failure_ratio",
        "max_failures",
        "name",
        "observers",
        "rate_limit",
        "read_ahead",
        "retry",
        "slots",
        "timeout",
    )

    def __init__(
        self,
        *,
        fn: Callable[..., Any],
        fn_is_async: bool,
        slots: int,
        adaptive: Adaptive | None,
        timeout: float | None,
        context: Callable[[], AbstractAsyncContextManager[Any]] | None,
        key: Callable[[Any], object] | None,
        read_ahead: int,
        cost: Callable[[Any], float] | None,
        retry: Retry | None,
        rate_limit: Any,
        limiter: AsyncLimiter | None,
        deadline_seconds: float | None,
        deadline_at: float | None,
        fit_timeout: bool,
        fail_fast: bool,
        max_failures: int | None,
        max_failure_ratio: FailureRatio | None,
        observers: tuple[Observer, ...],
        name: str | None,
    ) -> None:
        self.fn = fn
        self.fn_is_async = fn_is_async
        self.slots = slots
        self.adaptive = adaptive
        self.timeout = timeout
        self.context = context
        self.key = key
        self.read_ahead = read_ahead
        self.cost = cost
        self.retry = retry
        self.rate_limit = rate_limit
        self.limiter = limiter
        self.deadline_seconds = deadline_seconds
        self.deadline_at = deadline_at
        self.fit_timeout = fit_timeout
        self.fail_fast = fail_fast
        self.max_failures = max_failures
        self.max_failure_ratio = max_failure_ratio
        self.observers = observers
        self.name = name


class _Slot:
    """One worker's state; ``gen`` is bumped at each attempt's start and end, so a watchdog
    entry ``(deadline, slot, gen)`` is live only while ``slot.gen == gen``."""

    __slots__ = ("busy", "cancel_gen", "cancel_kind", "gen", "task")

    def __init__(self) -> None:
        self.gen = 0
        self.cancel_gen = -1
        self.cancel_kind = 0
        self.busy = False
        self.task: asyncio.Task[None] | None = None


class _Retrying:
    """An item waiting out its backoff with its slot freed."""

    __slots__ = ("errors", "first_start", "index", "item", "ready")

    def __init__(
        self, index: int, item: Any, ready: float, first_start: float, errors: list[BaseException]
    ) -> None:
        self.index = index
        self.item = item
        self.ready = ready
        self.first_start = first_start
        self.errors = errors

    def __lt__(self, other: _Retrying) -> bool:
        return (self.ready, self.index) < (other.ready, other.index)


class _Sink(Generic[T, R]):
    """Where outcomes go. The batch sink stores them in input order; the stream sink hands them
    to the consumer. ``room()`` is the backpressure check made before pulling an item."""

    __slots__ = ()

    def put(self, outcome: Outcome[T, R]) -> None:
        raise NotImplementedError

    def room(self, next_index: int) -> bool:
        return True

    async def wait_room(self, next_index: int) -> None:  # pragma: no cover - batch never waits
        return None

    def wake(self) -> None:
        """The run is stopping: release producers waiting for room."""


class Engine(Generic[T, R]):
    """Runs one batch. Create, then ``await run()`` exactly once."""

    def __init__(
        self,
        plan: Plan,
        items: Any,
        sink: _Sink[T, R] | None = None,
    ) -> None:
        self._p = plan
        self._items = items
        self._sized = isinstance(items, Sized)
        self._total = len(items) if self._sized else None
        self._is_async_source = hasattr(items, "__aiter__")
        self._it: Iterator[T] | None = None
        self._ait: AsyncIterator[T] | None = None
        self._pull_lock: asyncio.Lock | None = None
        self._exhausted = False
        self._input_error: BaseException | None = None
        # Outcomes of a batch are stored column-wise (see _store); a stream passes its own sink.
        self._store: OutcomeStore[T, R] = OutcomeStore(keep_keys=plan.key is not None)
        self._sink = sink
        self._next_index = 0
        self._buffer: list[tuple[float, int, T]] = []  # cost-ordered read-ahead
        self._retry_heap: list[_Retrying] = []
        self._in_flight = 0
        self._active = 0  # workers holding an item (in an attempt, a backoff or a limiter)
        self._peak = 0
        self._finished = 0
        self._failed = 0
        self._stop_reason: StopReason | None = None
        self._stopping = False  # no new starts (deadline fit, threshold, input error)
        self._timers: deque[tuple[float, _Slot, int]] = deque()
        self._slots: list[_Slot] = []
        self._idle: asyncio.Future[None] | None = None
        self._budget_size = max(256, _YIELD_EVERY_ITEMS_PER_WORKER * plan.slots)
        self._budget = self._budget_size
        self._slice_start = time.perf_counter()
        self._reset_pending = False
        self._observers: list[Observer] = list(plan.observers)
        self._emit_events = bool(self._observers)
        self._rng: random.Random | None = None  # made on first use (start-up time)
        self._executor: ThreadPoolExecutor | None = None
        self._bucket: TokenBucket | None = None
        self._aimd: AimdState | None = None
        self._limit = plan.slots
        self._limit_changes: list[LimitChange] = []
        # Adaptive only: attempt starts in order, to spot stuck attempts before they end.
        self._starts: deque[tuple[float, _Slot, int]] = deque()
        self._gate: deque[asyncio.Future[None]] = deque()
        self._deadline_at: float | None = None
        self._start = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------------------- run
    async def run(self) -> BatchReport[T, R]:
        p = self._p
        loop = self._loop = asyncio.get_running_loop()
        self._start = start = loop.time()
        if p.deadline_seconds is not None:
            self._deadline_at = start + p.deadline_seconds
        elif p.deadline_at is not None:
            self._deadline_at = p.deadline_at
        if p.rate_limit is not None:
            self._bucket = TokenBucket(p.rate_limit, start)
        if p.adaptive is not None:
            self._aimd = AimdState(limit=float(p.adaptive.initial))
            self._limit = p.adaptive.initial
        if not p.fn_is_async:
            from concurrent.futures import ThreadPoolExecutor  # lazy: start-up time

            self._executor = ThreadPoolExecutor(
                max_workers=p.slots, thread_name_prefix=f"batchkit-{p.name or 'run'}"
            )
        if self._is_async_source:
            self._ait = aiter(self._items)
            self._pull_lock = asyncio.Lock()
        else:
            self._it = iter(self._items)
        if self._emit_events:
            self._event(
                RunStarted(name=p.name, concurrency=self._limit, total=self._total, time=start)
            )

        deadline_handle: asyncio.TimerHandle | None = None
        completed = False
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(p.slots):
                    slot = _Slot()
                    self._slots.append(slot)
                    slot.task = tg.create_task(self._worker(slot))
                watchdog = tg.create_task(self._watchdog()) if p.timeout is not None else None
                if self._deadline_at is not None:
                    deadline_handle = loop.call_at(self._deadline_at, self._on_deadline)
                # Workers end on their own when the input is done (or the run stopped).
                await asyncio.gather(*(s.task for s in self._slots if s.task is not None))
                if watchdog is not None:
                    watchdog.cancel()
            completed = True
        finally:
            if deadline_handle is not None:
                deadline_handle.cancel()
            if self._executor is not None:
                # A thread cannot be interrupted; do not wait for one that timed out.
                self._executor.shutdown(wait=False, cancel_futures=True)
            await self._close_input()
            if not completed and self._emit_events:
                # Cancelled (or a stream left early): observers still hear the end, with
                # what had finished by then.
                self._event(
                    RunFinished(name=p.name, report=self._report(partial=True), time=loop.time())
                )

        self._finish_unstarted()
        report = self._report()
        if self._emit_events:
            self._event(RunFinished(name=p.name, report=report, time=loop.time()))
        if self._input_error is not None:
            raise InputFailed(report) from self._input_error
        return report

    def _report(self, *, partial: bool = False) -> BatchReport[T, R]:
        assert self._loop is not None
        # A partial store's view leaves out the items still in flight.
        return BatchReport(
            outcomes=self._store.view(),
            wall_time=self._loop.time() - self._start,
            concurrency=self._p.adaptive.initial if self._p.adaptive else self._p.slots,
            peak_concurrency=self._peak,
            stop_reason=self._stop_reason,
            input_exhausted=self._exhausted,
            limit_changes=tuple(self._limit_changes),
            name=self._p.name,
            key=self._p.key,
        )

    def partial_report(self) -> BatchReport[T, R]:
        """What a stream produced so far (outcomes are not kept by a stream)."""
        return self._report()

    # ------------------------------------------------------------------------- input
    def _take_index(self) -> int:
        index = self._next_index
        self._next_index = index + 1
        return index

    def _pull_now(self) -> tuple[int, T] | None:
        """``_pull`` for a plain iterable without cost hints: no coroutine on the hot path."""
        if self._exhausted:
            return None
        try:
            assert self._it is not None
            item = next(self._it)
        except StopIteration:
            self._exhausted = True
            return None
        except Exception as e:
            self._input_failed(e)
            return None
        return self._take_index(), item

    async def _pull(self) -> tuple[int, T] | None:
        """The next item to start, with its input index; ``None`` when there is none."""
        p = self._p
        if p.cost is None:
            if self._it is not None:
                return self._pull_now()
            if self._exhausted:
                return None
            try:
                assert self._ait is not None
                assert self._pull_lock is not None
                async with self._pull_lock:
                    if self._exhausted:
                        return None
                    item = await anext(self._ait)
            except StopAsyncIteration:
                self._exhausted = True
                return None
            except Exception as e:
                self._input_failed(e)
                return None
            return self._take_index(), item
        # Cost hints: keep up to read_ahead items, start the most expensive first.
        while not self._exhausted and len(self._buffer) < p.read_ahead:
            try:
                if self._it is not None:
                    item = next(self._it)
                else:
                    assert self._ait is not None
                    assert self._pull_lock is not None
                    async with self._pull_lock:
                        if self._exhausted:
                            break
                        item = await anext(self._ait)
            except (StopIteration, StopAsyncIteration):
                self._exhausted = True
                break
            except Exception as e:
                self._input_failed(e)
                return None
            index = self._take_index()
            try:
                c = float(p.cost(item))
            except Exception as e:
                # A broken cost hint is this item's failure, not the run's.
                self._record(Failure(item, e, "error", index, 0, 0.0, (e,)))
                continue
            heapq.heappush(self._buffer, (-c, index, item))
        if not self._buffer:
            return None
        _, index, item = heapq.heappop(self._buffer)
        return index, item

    def _input_failed(self, error: Exception) -> None:
        self._input_error = error
        self._stopping = True
        self._wake_idle()

    async def _close_input(self) -> None:
        ait = self._ait
        if ait is not None and hasattr(ait, "aclose"):
            try:
                await ait.aclose()
            except Exception:  # pragma: no cover - a broken aclose must not hide the report
                _log.exception("batchkit: closing the async input failed")

    # ---------------------------------------------------------------------- workers
    async def _worker(self, slot: _Slot) -> None:
        loop = self._loop
        assert loop is not None
        sink = self._sink
        heap = self._retry_heap
        # Retries that free their slot come back through the heap; while any item is still
        # active it may yet produce one, so an idle worker waits instead of leaving.
        waits_for_retries = self._p.retry is not None and not self._p.retry.hold_slot
        pull_now = self._it is not None and self._p.cost is None
        while not self._stopping:
            if self._aimd is not None and self._active >= self._limit:
                await self._wait_gate()
                continue
            if heap and heap[0].ready <= loop.time() + _SLACK:
                job = heapq.heappop(heap)
                self._active += 1
                try:
                    await self._run_item(slot, job.index, job.item, job.first_start, job.errors)
                finally:
                    self._active -= 1
                    if self._gate:
                        self._open_gate()
            else:
                if sink is not None and not sink.room(self._next_index):
                    await sink.wait_room(self._next_index)
                    continue
                self._active += 1
                try:
                    pulled = self._pull_now() if pull_now else await self._pull()
                    if pulled is not None:
                        index, item = pulled
                        if self._stopping:
                            # Pulled while another worker stopped the run: never started.
                            self._skip(index, item)
                            return
                        await self._run_item(slot, index, item, None, None)
                finally:
                    self._active -= 1
                    if self._gate:
                        self._open_gate()
                if pulled is None:
                    if self._stopping:
                        break
                    if heap:
                        await self._wait_idle(heap[0].ready)
                        continue
                    if waits_for_retries and self._active:
                        await self._wait_idle(loop.time() + 3600.0)
                        continue
                    break
            if waits_for_retries and self._exhausted:
                self._wake_idle()
            # Starvation guard: see _YIELD_EVERY_*.
            self._budget -= 1
            if self._budget <= 0 or time.perf_counter() - self._slice_start > _YIELD_EVERY_SECONDS:
                await self._yield()
        self._wake_idle()
        # Workers parked at the adaptive gate must see that the input is done.
        self._open_gate(everyone=True)

    async def _yield(self) -> None:
        if not self._reset_pending:
            self._reset_pending = True
            self._budget = 0
            assert self._loop is not None
            self._loop.call_soon(self._reset_budget)
        await asyncio.sleep(0)

    def _reset_budget(self) -> None:
        self._reset_pending = False
        self._budget = self._budget_size
        self._slice_start = time.perf_counter()

    async def _run_item(
        self,
        slot: _Slot,
        index: int,
        item: T,
        first_start: float | None,
        errors: list[BaseException] | None,
    ) -> None:
        """Run the attempts of one item until it succeeds, fails for good, or is released to
        the retry heap (its slot freed during the backoff)."""
        p = self._p
        loop = self._loop
        assert loop is not None
        retry = p.retry
        attempt = 1 + (len(errors) if errors else 0)
        slot.busy = True
        try:
            while True:
                now = loop.time()
                # Rate limit: wait for this attempt's turn.
                if self._bucket is not None:
                    wait = self._bucket.reserve(now)
                    if wait > 0:
                        if not await self._wait_in_slot(slot, asyncio.sleep(wait)):
                            self._stopped_item(index, item, first_start, errors, attempt)
                            return
                        now = loop.time()
                # The deadline: do not start an attempt whose timeout cannot fit.
                dl = self._deadline_at
                if dl is not None and (
                    now + _SLACK >= dl
                    or (p.fit_timeout and p.timeout is not None and now + p.timeout > dl + _SLACK)
                ):
                    self._no_more_starts("deadline")
                    self._stopped_item(index, item, first_start, errors, attempt)
                    return
                if self._stopping:
                    self._stopped_item(index, item, first_start, errors, attempt)
                    return
                if first_start is None:
                    first_start = now
                limiter = p.limiter
                if limiter is not None:
                    if not await self._wait_in_slot(slot, limiter.__aenter__()):
                        started = first_start if errors else None
                        self._stopped_item(index, item, started, errors, attempt)
                        return
                    now = loop.time()
                # -- one attempt: context, fn, timeout (inline: this is the hot path) --
                in_flight = self._in_flight = self._in_flight + 1
                if in_flight > self._peak:
                    self._peak = in_flight
                if self._emit_events:
                    self._event(
                        ItemStarted(
                            name=p.name,
                            index=index,
                            key=self._key(index, item),
                            item=item,
                            attempt=attempt,
                            in_flight=in_flight,
                            time=now,
                        )
                    )
                gen = slot.gen = slot.gen + 1
                task = slot.task
                assert task is not None
                # Cancellation requests already pending on this task (a TaskGroup inside fn
                # can leave one behind on 3.11): ours is the one above this base.
                base = task.cancelling()
                if self._aimd is not None:
                    self._starts.append((now, slot, gen))
                timeout = p.timeout
                if timeout is not None:
                    self._timers.append((now + timeout, slot, gen))
                outcome_error: BaseException | None = None
                kind: Literal["error", "timeout", "cancelled"] | None = None
                try:
                    if p.context is None:
                        if p.fn_is_async:
                            value = await p.fn(item)
                        else:
                            value = await self._call_sync(item)
                    else:
                        value, outcome_error = await self._attempt_in_context(item)
                        if outcome_error is not None:
                            kind = "error"
                except asyncio.CancelledError as e:
                    if slot.cancel_gen != gen:
                        raise  # not ours: the caller is cancelling the run
                    slot.cancel_gen = -1
                    if task.uncancel() > base:
                        raise  # ours, but the caller is cancelling too
                    if slot.cancel_kind == _TIMEOUT:
                        assert timeout is not None
                        outcome_error, kind = ItemTimeout(timeout), "timeout"
                        outcome_error.__cause__ = e
                    else:
                        kind = "cancelled"
                except Exception as e:
                    outcome_error, kind = e, "error"
                finally:
                    slot.gen = gen + 1
                    self._in_flight -= 1
                    if timeout is not None:
                        timers = self._timers
                        while timers and timers[0][1].gen != timers[0][2]:
                            timers.popleft()
                        if len(timers) > 2 * len(self._slots) + 64:
                            self._timers = deque(t for t in timers if t[1].gen == t[2])
                    if limiter is not None:
                        await limiter.__aexit__(None, None, None)
                if slot.cancel_gen == gen:
                    # fn swallowed our cancellation and returned: keep its result, undo it.
                    slot.cancel_gen = -1
                    assert slot.task is not None
                    slot.task.uncancel()
                end = loop.time()
                if kind is None:
                    elapsed = end - first_start
                    if self._aimd is not None:
                        self._adapt_success(end - now, now, end)
                    self._record(make_success(item, value, index, attempt, elapsed))
                    return
                if kind == "cancelled":
                    self._stopped_item(index, item, first_start, errors, attempt, running=True)
                    return
                assert outcome_error is not None
                if errors is None:
                    errors = []
                errors.append(outcome_error)
                if self._aimd is not None and (
                    kind == "timeout"
                    or (
                        isinstance(outcome_error, Exception)
                        and p.adaptive is not None
                        and p.adaptive.is_overload(outcome_error)
                    )
                ):
                    self._adapt_overload(now, end, kind)
                delay = self._retry_delay(retry, attempt, outcome_error, kind, end)
                if self._emit_events:
                    self._event(
                        AttemptFailed(
                            name=p.name,
                            index=index,
                            key=self._key(index, item),
                            item=item,
                            attempt=attempt,
                            error=outcome_error,
                            kind=kind,
                            retry_in=delay,
                            time=end,
                        )
                    )
                if delay is None:
                    self._record(
                        Failure(
                            item,
                            outcome_error,
                            kind,
                            index,
                            attempt,
                            end - first_start,
                            tuple(errors),
                        )
                    )
                    return
                attempt += 1
                assert retry is not None
                if not retry.hold_slot:
                    heapq.heappush(
                        self._retry_heap, _Retrying(index, item, end + delay, first_start, errors)
                    )
                    # An idle worker may be sleeping until a later retry: wake it to re-plan.
                    self._wake_idle()
                    return
                if delay > 0 and not await self._wait_in_slot(slot, asyncio.sleep(delay)):
                    self._stopped_item(index, item, first_start, errors, attempt - 1, running=True)
                    return
        finally:
            slot.busy = False

    async def _attempt_in_context(self, item: T) -> tuple[Any, BaseException | None]:
        """Enter a fresh context, call ``fn(item, ctx)``, exit the context on every path.
        An error while exiting is the item's error if ``fn`` succeeded, else added to it."""
        p = self._p
        assert p.context is not None
        cm = p.context()
        ctx = await cm.__aenter__()
        try:
            if p.fn_is_async:
                value = await p.fn(item, ctx)
            else:
                value = await self._call_sync(item, ctx)
        except BaseException as e:
            try:
                await cm.__aexit__(type(e), e, e.__traceback__)
            except Exception as exit_error:
                if exit_error is not e:
                    e.add_note(f"batchkit: exiting the context also failed: {exit_error!r}")
            # A context that "suppresses" the error does not make the item a success.
            raise
        try:
            await cm.__aexit__(None, None, None)
        except Exception as exit_error:
            return None, exit_error
        return value, None

    async def _call_sync(self, item: T, *args: Any) -> Any:
        assert self._loop is not None
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, self._p.fn, item, *args)
        result = await self._loop.run_in_executor(self._executor, call)
        if isinstance(result, Awaitable):
            # A plain function that returned an awaitable (``lambda x: fetch(x)``).
            result = await result
        return result

    # ------------------------------------------------------------------ outcomes
    def _record(self, outcome: Outcome[T, R]) -> None:
        self._finished += 1
        key = None  # computed once, for the report's store and the event
        if self._p.key is not None and (self._sink is None or self._emit_events):
            key = self._key(outcome.index, outcome.item)
        if self._sink is None:
            self._store.append(outcome, key)
        else:
            self._sink.put(outcome)
        if self._emit_events:
            assert self._loop is not None
            self._event(
                ItemFinished(
                    name=self._p.name,
                    key=f"#{outcome.index}" if key is None else key,
                    outcome=outcome,
                    in_flight=self._in_flight,
                    time=self._loop.time(),
                )
            )
        # After ItemFinished, so observers hear of the failure before the stop it causes.
        if type(outcome) is Failure and outcome.kind in ("error", "timeout"):
            self._failed += 1
            self._check_thresholds()

    def _skip(self, index: int, item: T) -> None:
        assert self._stop_reason is not None or self._input_error is not None
        reason: StopReason = self._stop_reason or "fail_fast"
        err = ItemSkipped(reason)
        self._record(Failure(item, err, "skipped", index, 0, 0.0, (err,)))

    def _stopped_item(
        self,
        index: int,
        item: T,
        first_start: float | None,
        errors: list[BaseException] | None,
        attempt: int,
        *,
        running: bool = False,
    ) -> None:
        """The run stopped around this item: ``cancelled`` if it had started, else ``skipped``."""
        assert self._loop is not None
        reason: StopReason = self._stop_reason or "fail_fast"
        if first_start is None and not running:
            self._skip(index, item)
            return
        err = ItemCancelled(reason)
        history = (*errors, err) if errors else (err,)
        elapsed = self._loop.time() - first_start if first_start is not None else 0.0
        self._record(
            Failure(
                item, err, "cancelled", index, attempt if running else attempt - 1, elapsed, history
            )
        )

    def _finish_unstarted(self) -> None:
        """After the workers ended: give every item that never started its envelope."""
        while self._retry_heap:
            r = heapq.heappop(self._retry_heap)
            self._stopped_item(r.index, r.item, r.first_start, r.errors, len(r.errors) + 1)
        while self._buffer:
            _, index, item = heapq.heappop(self._buffer)
            self._skip(index, item)
        if self._exhausted or self._input_error is not None:
            return
        if self._stop_reason is None:  # pragma: no cover - workers only end early when stopping
            return
        # Sized inputs (lists, ranges, ...) are drained so every item has an envelope.
        # Unsized ones may be endless or slow; they are left unread (input_exhausted=False).
        # A stream drains lazily, as its consumer asks (see drain_one), to keep memory bounded.
        if self._sized and self._it is not None and self._sink is None:
            self._skip_rest()

    def _skip_rest(self) -> None:
        """The unread rest of a sized input, as one skipped range: O(1) for a range or a
        tuple (items are read from it when an envelope is built), a C-speed copy otherwise."""
        assert self._stop_reason is not None
        assert self._loop is not None
        start = self._next_index
        items = self._items
        rest: Sequence[T]
        if isinstance(items, range | tuple):
            rest, first = cast("Sequence[T]", items), start
        else:
            rest, first = (items[start:] if isinstance(items, list) else list(self._it or ())), 0
        stop = start + len(rest) - first
        self._store.skip_range(start, stop, self._stop_reason, rest, first)
        self._next_index = stop
        self._exhausted = True
        if self._emit_events and stop > start:
            self._event(
                ItemsSkipped(
                    name=self._p.name,
                    reason=self._stop_reason,
                    indices=range(start, stop),
                    time=self._loop.time(),
                )
            )

    def drain_one(self) -> Outcome[T, R] | None:
        """After a stopped stream's run: the next unread item of a sized input, as skipped."""
        if self._exhausted or self._stop_reason is None or not self._sized or self._it is None:
            return None
        for item in self._it:
            index = self._take_index()
            err = ItemSkipped(self._stop_reason)
            return Failure(item, err, "skipped", index, 0, 0.0, (err,))
        self._exhausted = True
        return None

    # ------------------------------------------------------------------- stopping
    def _check_thresholds(self) -> None:
        p = self._p
        if p.max_failures is not None and self._failed >= p.max_failures:
            self._stop("max_failures")
        elif p.fail_fast and self._failed:
            self._stop("fail_fast")
        elif (
            p.max_failure_ratio is not None
            and self._finished >= p.max_failure_ratio.min_sample
            and self._failed / self._finished > p.max_failure_ratio.ratio
        ):
            self._stop("max_failure_ratio")

    def _no_more_starts(self, reason: StopReason) -> None:
        """Start nothing new; what is in flight may finish."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stopping = True
        self._wake_idle()
        if self._sink is not None:
            self._sink.wake()
        while self._gate:
            fut = self._gate.popleft()
            if not fut.done():
                fut.set_result(None)

    def _stop(self, reason: StopReason) -> None:
        """Start nothing new and cancel what is in flight."""
        if self._stopping and self._stop_reason is not None and reason != "deadline":
            return
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._emit_events and reason != "deadline":
            assert self._loop is not None
            self._event(
                RunStopping(
                    name=self._p.name,
                    reason=reason,
                    in_flight=self._in_flight,
                    time=self._loop.time(),
                )
            )
        self._no_more_starts(reason)
        current = asyncio.current_task()
        for slot in self._slots:
            task = slot.task
            if (
                slot.busy
                and task is not None
                and task is not current
                and not task.done()
                and slot.cancel_gen != slot.gen
            ):
                slot.cancel_gen = slot.gen
                slot.cancel_kind = _STOP
                task.cancel()

    def _on_deadline(self) -> None:
        if self._emit_events:
            assert self._loop is not None
            self._event(
                DeadlineHit(name=self._p.name, in_flight=self._in_flight, time=self._loop.time())
            )
        self._stop("deadline")

    async def _wait_in_slot(self, slot: _Slot, waiting: Awaitable[object]) -> bool:
        """Wait (a backoff, a limiter) while holding the slot; False if the run stopped."""
        gen = slot.gen = slot.gen + 1
        task = slot.task
        assert task is not None
        base = task.cancelling()
        try:
            await waiting
        except asyncio.CancelledError:
            if slot.cancel_gen != gen:
                raise
            slot.cancel_gen = -1
            if task.uncancel() > base:
                raise
            return False
        finally:
            slot.gen = gen + 1
        return not self._stopping

    # --------------------------------------------------------------- retry, idle
    def _retry_delay(
        self, retry: Retry | None, attempt: int, error: BaseException, kind: str, now: float
    ) -> float | None:
        """Seconds until the next attempt, or None when the item is done failing."""
        if retry is None or attempt >= retry.attempts or self._stopping:
            return None
        if kind == "timeout":
            if not retry.timeouts:
                return None
        elif not (isinstance(error, Exception) and retry.should_retry(error)):
            return None
        if self._rng is None:
            import random  # lazy: start-up time

            self._rng = random.Random()
        delay = _backoff.retry_delay(retry.backoff, attempt, self._rng.random(), error)
        dl = self._deadline_at
        if dl is not None:
            need = delay + (self._p.timeout if self._p.fit_timeout and self._p.timeout else 0.0)
            if now + need > dl + _SLACK:
                return None  # the retry could not finish in time: report the last error
        return delay

    async def _wait_idle(self, until: float) -> None:
        """Nothing to pull; wait for a retry to become ready (or the run to change)."""
        assert self._loop is not None
        fut = self._idle
        if fut is None or fut.done():
            fut = self._idle = self._loop.create_future()
        handle = self._loop.call_at(until, _resolve, fut)
        try:
            await fut
        finally:
            handle.cancel()

    def _wake_idle(self) -> None:
        fut = self._idle
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ------------------------------------------------------------------ adaptive
    async def _wait_gate(self) -> None:
        assert self._loop is not None
        fut = self._loop.create_future()
        self._gate.append(fut)
        await fut

    def _open_gate(self, *, everyone: bool = False) -> None:
        while self._gate and (everyone or self._active < self._limit):
            fut = self._gate.popleft()
            if not fut.done():
                fut.set_result(None)

    def _set_limit(self, state: AimdState, now: float, reason: str) -> None:
        self._aimd = state
        new = int(state.limit)
        old = self._limit
        if new != old:
            self._limit = new
            self._limit_changes.append(LimitChange(time=now, old=old, new=new, reason=reason))
            if self._emit_events:
                self._event(
                    LimitChanged(name=self._p.name, old=old, new=new, reason=reason, time=now)
                )
            self._open_gate()

    def _adapt_success(self, latency: float, started: float, now: float) -> None:
        assert self._aimd is not None
        assert self._p.adaptive is not None
        state, overload = on_success(self._aimd, self._p.adaptive, latency, started, now)
        if overload is not None:
            state = on_overload(state, self._p.adaptive, started, now)
            self._set_limit(state, now, overload)
        else:
            self._set_limit(state, now, "increase")
        self._adapt_check_stuck(now)

    def _adapt_check_stuck(self, now: float) -> None:
        """The oldest attempt still running is the first sign of an overload: act on it
        without waiting for it to time out (every attempt launched meanwhile would suffer)."""
        assert self._aimd is not None
        assert self._p.adaptive is not None
        starts = self._starts
        while starts:
            started, slot, gen = starts[0]
            if slot.gen != gen:
                starts.popleft()
                continue
            if is_stuck(self._aimd, self._p.adaptive, started, now):
                starts.popleft()
                self._set_limit(
                    on_overload(self._aimd, self._p.adaptive, started, now), now, "stuck"
                )
            break
        if len(starts) > 2 * len(self._slots) + 64:
            self._starts = deque(s for s in starts if s[1].gen == s[2])

    def _adapt_overload(self, started: float, now: float, kind: str) -> None:
        assert self._aimd is not None
        assert self._p.adaptive is not None
        self._set_limit(on_overload(self._aimd, self._p.adaptive, started, now), now, kind)

    # ----------------------------------------------------------------- watchdog
    async def _watchdog(self) -> None:
        """Cancel attempts that outlive the timeout. Deadlines arrive in start order, so the
        head of the FIFO is always the next to expire; entries of finished attempts are stale
        and dropped. With nothing in flight it sleeps one timeout: any attempt started later
        expires after that anyway, so no one has to wake it."""
        loop = self._loop
        assert loop is not None
        assert self._p.timeout is not None
        timeout = self._p.timeout
        while True:
            timers = self._timers
            now = loop.time()
            while timers:
                when, slot, gen = timers[0]
                if slot.gen != gen:
                    timers.popleft()
                    continue
                if when <= now + _SLACK:
                    timers.popleft()
                    task = slot.task
                    if task is not None and slot.cancel_gen != gen:
                        slot.cancel_gen = gen
                        slot.cancel_kind = _TIMEOUT
                        task.cancel()
                    continue
                break
            target = timers[0][0] if timers else now + timeout
            fut = loop.create_future()
            handle = loop.call_at(target, _resolve, fut)
            try:
                await fut
            finally:
                handle.cancel()

    # ------------------------------------------------------------------- events
    def _key(self, index: int, item: T) -> str:
        key = self._p.key
        if key is None:
            return f"#{index}"
        try:
            return str(key(item))
        except Exception:
            return f"#{index}"

    def _event(self, event: Event) -> None:
        for observer in tuple(self._observers):
            try:
                observer(event)
            except Exception:
                # Reported once, then dropped: an observer never breaks the run.
                _log.exception(
                    "batchkit: observer %r raised; it is disabled for this run", observer
                )
                self._observers.remove(observer)
        self._emit_events = bool(self._observers)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
