"""The per-item runner: one attempt of one item — admission, context, ``fn``, timeout — and a
typed :class:`AttemptResult`. Scheduling (which item, when, what next) is not its business:
the local engine's workers call it, and so can any backend's.

Each attempt sees the caller's context variables, as a task would: it runs in its worker's
context (a fresh copy of the caller's), and an attempt that changes it — sets a ``ContextVar``
(structlog's ``bind_contextvars``, a tracing span) — marks its slot ``polluted``, so the
scheduler replaces that worker by a fresh one. Nothing leaks into the next item, and the common
case (nothing set) costs one context comparison, not a task or a context switch per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, final

from .._model.attempt import _SLOT, AttemptResult, CancelKind
from .._model.errors import ItemTimeout, add_note, describe, safe_repr

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future, ThreadPoolExecutor

    from .._model.attempt import Job, Slot
    from .._model.errors import SkipReason
    from .._model.events import Observer
    from .._model.seams import RunHook
    from .meters.base import Meter
    from .plan import Plan
    from .watchdog import Watchdog

__all__ = ["Runner", "loop_clock", "open_hooks"]

_FIRST: Any = object()

_new_tuple = tuple.__new__


def loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """``loop.time``, cheaper: asyncio's own loop reads ``time.monotonic()`` through a Python
    method, so that is called directly. Any other loop (virtual time, uvloop) is asked itself:
    in virtual time the clock stands still while the CPU works."""
    stock = getattr(type(loop), "time", None) is asyncio.BaseEventLoop.time
    return time.monotonic if stock else loop.time


def open_hooks(plan: Plan) -> tuple[tuple[RunHook, ...], tuple[Observer, ...]]:
    """Ask each attempt hook for this run's hook; the run's observers, with each hook that
    takes part replaced by its run's hook (one that sits the run out is dropped)."""
    if not plan.attempt_hooks:
        return (), plan.observers
    retry = plan.retry
    settings: dict[str, object] = {
        "concurrency": plan.slots,
        "timeout": plan.timeout,
        "retry.attempts": retry.attempts if retry is not None else 1,
        "deadline": plan.deadline_seconds,
        "fail_fast": plan.fail_fast,
        "max_failures": plan.max_failures,
    }
    settings = {k: v for k, v in settings.items() if v is not None}
    hooks: list[RunHook] = []
    observers: list[Observer] = []
    for observer in plan.observers:
        if observer in plan.attempt_hooks:
            hook = observer.start_run(plan.name, settings)
            if hook is not None:
                hooks.append(hook)
                observers.append(hook)
        else:
            observers.append(observer)
    return tuple(hooks), tuple(observers)


@final
class Runner:
    """Runs attempts for one run. ``on_start``/``on_end`` let the scheduler keep its counts
    and tell observers; a runner driven on its own needs neither."""

    __slots__ = (
        "_call",
        "_clock",
        "_executor",
        "_hooks",
        "_loop",
        "_meters",
        "_on_start",
        "_one",
        "_plan",
        "_slots",
        "_watchdog",
        "in_flight",
        "journal_tx",
        "peak",
        "run",
        "threads",
    )

    def __init__(
        self,
        plan: Plan,
        loop: asyncio.AbstractEventLoop,
        *,
        meters: tuple[Meter, ...] = (),
        watchdog: Watchdog | None = None,
        executor: ThreadPoolExecutor | None = None,
        on_start: Callable[[Slot, Job, float], None] | None = None,
        hooks: tuple[RunHook, ...] = (),
    ) -> None:
        self._plan = plan
        self._loop = loop
        self._meters = meters
        self._watchdog = watchdog
        self._executor = executor
        self._on_start = on_start
        self._slots = plan.slots
        self._clock = loop_clock(loop)  # twice per attempt
        self.in_flight = 0
        """Attempts running now."""
        self.peak = 0
        """The most attempts that ever ran at once."""
        self._hooks = hooks
        self._one: Callable[[Slot, Job], Awaitable[AttemptResult]] = (
            self._hooked if hooks else self.attempt
        )
        self.run: Callable[[Slot, Job], Awaitable[AttemptResult]] = (
            self._run_metered if meters else self._one
        )
        """Admission, then one attempt of a job in a slot (on ``slot.task``)."""
        self.threads: set[Future[Any]] = set()
        """Threads of a sync ``fn`` still running (one that timed out runs to its end)."""
        self.journal_tx: Callable[[Any, Any], Awaitable[None]] | None = None
        """A transactional journal's write, in the item's context before it exits."""
        if plan.context is not None:
            self._call: Callable[[Any], Awaitable[Any]] = self._attempt_in_context
        elif plan.fn_is_async:
            self._call = plan.fn
        else:
            self._call = self._sync_call

    # -- admission ---------------------------------------------------------------------
    async def _admit(self, slot: Slot, job: Job) -> tuple[int, SkipReason | None]:
        """Ask every meter in turn; returns how many admitted and why one refused."""
        admitted = 0
        try:
            for meter in self._meters:
                slot.cancellable = True
                refused = await meter.wait_task_can_start(slot, job)
                slot.cancellable = False
                if refused is not None:
                    return admitted, refused
                admitted += 1
        except BaseException:
            slot.cancellable = False
            await self._release(slot, job, admitted, None)
            raise
        return admitted, None

    async def _release(
        self, slot: Slot, job: Job, admitted: int, result: AttemptResult | None
    ) -> Exception | None:
        """Tell every admitting meter the attempt ended; the first error one raised (an
        external limiter's ``__aexit__`` is user code), after all were told."""
        error = None
        for meter in self._meters[:admitted]:
            try:
                await meter.notify_task_finished(slot, job, result)
            except Exception as e:
                error = error or e
        return error

    async def _run_metered(self, slot: Slot, job: Job) -> AttemptResult:
        try:
            admitted, refused = await self._admit(slot, job)
        except Exception as e:
            # A limiter's __aenter__ (user code) raised: the item's error, fn never ran. Or
            # the item's budget ran out before this attempt could start (a timeout).
            now = self._loop.time()
            if job.first_start is None:
                job.first_start = now
            if isinstance(e, ItemTimeout):
                return AttemptResult("timeout", None, e, now, now)
            return AttemptResult("error", None, e, now, now)
        if refused is not None:
            await self._release(slot, job, admitted, None)
            now = self._loop.time()
            return AttemptResult("refused", None, None, now, now, refused)
        for meter in self._meters:
            meter.notify_task_started(slot, job, self._loop.time())
        result: AttemptResult | None = None
        try:
            result = await self._one(slot, job)
        finally:
            released = await self._release(slot, job, admitted, result)
        if released is not None:
            # As for a context's exit: the item's error if fn succeeded, else noted on it.
            if result.kind == "success":
                return AttemptResult("error", None, released, result.started, result.ended)
            if result.error is not None:
                add_note(result.error, f"batchkit: releasing the limiter also failed: "
                                       f"{describe(released)}")  # fmt: skip
        return result

    # -- the attempt: context, fn, timeout (the hot path) --------------------------------
    async def attempt(self, slot: Slot, job: Job) -> AttemptResult:
        """One attempt, no admission. The hot path: the steps are written out in one
        function because each call level costs about 5% of the per-item overhead."""
        clock = self._clock
        now = slot.started = clock()
        if job.first_start is None:
            job.first_start = now
        slot.job = job
        in_flight = self.in_flight = self.in_flight + 1
        if in_flight > self.peak:
            self.peak = in_flight
        if self._on_start is not None:
            self._on_start(slot, job, now)
        gen = slot.gen = slot.gen + 1
        task = slot.task
        assert task is not None
        # Cancellation requests already pending on this task (a TaskGroup inside fn can
        # leave one behind on 3.11): ours are the ones above this base.
        base = task.cancelling()
        timeout = self._plan.timeout
        watchdog = self._watchdog
        if watchdog is not None and timeout is not None:
            watchdog.timers.append((now + timeout, slot, gen))  # Watchdog.arm, inline
            if len(watchdog.timers) > 2 * self._slots + 64:
                watchdog.compact(self._slots)
        slot.cancellable = True
        try:
            value = await self._call(job.item)
        except asyncio.CancelledError as e:
            return self._cancelled(slot, gen, base, e, now)
        except Exception as e:
            if slot.cancel_gen == gen:
                # Our timeout was absorbed on the way (a rollback it cut): the error stands.
                self._uncancel(slot, task)
            return AttemptResult("error", None, e, now, clock())
        finally:
            slot.cancellable = False
            slot.gen = gen + 1
            self.in_flight -= 1
            if watchdog is not None:
                timers = watchdog.timers  # Watchdog.compact's common case, inline
                while timers and timers[0][1].gen != timers[0][2]:
                    timers.popleft()
            if slot.baseline is not None and contextvars.copy_context() != slot.baseline:
                slot.polluted = True  # it set a context variable: see the module docstring
        if slot.cancel_gen == gen:
            # fn swallowed our cancellation and returned: keep its result, undo ours.
            self._uncancel(slot, task)
        # tuple.__new__ directly: a NamedTuple's own __new__ is a Python function (inline for
        # speed: this is once per item).
        return _new_tuple(AttemptResult, ("success", value, None, now, clock(), None))

    async def _hooked(self, slot: Slot, job: Job) -> AttemptResult:
        """One attempt inside the run's hooks (only runs that have some come here). What a
        hook sets in the context (a current span) is the attempt's starting context: the
        pollution check compares against it, and it is undone before the slot goes on."""
        baseline = slot.baseline
        tokens = [hook.enter_attempt(job) for hook in self._hooks]
        if baseline is not None:
            slot.baseline = contextvars.copy_context()
        result = None
        try:
            result = await self.attempt(slot, job)
        finally:
            slot.baseline = baseline
            for hook, token in zip(reversed(self._hooks), reversed(tokens), strict=True):
                hook.exit_attempt(token, result)
        return result

    def _uncancel(self, slot: Slot, task: asyncio.Task[Any]) -> None:
        for _ in range(slot.cancels):
            task.uncancel()
        slot.cancels = 0
        slot.cancel_gen = -1

    def _cancelled(
        self, slot: Slot, gen: int, base: int, error: asyncio.CancelledError, started: float
    ) -> AttemptResult:
        task = slot.task
        assert task is not None
        if slot.cancel_gen != gen:
            raise error  # not ours: the caller is cancelling the run
        self._uncancel(slot, task)
        if task.cancelling() > base:
            raise error  # ours, but the caller is cancelling too
        ended = self._loop.time()
        if slot.cancel_kind is CancelKind.TIMEOUT or slot.cancel_kind is CancelKind.BUDGET:
            budget = slot.cancel_kind is CancelKind.BUDGET
            seconds = self._plan.item_budget if budget else self._plan.timeout
            assert seconds is not None
            timeout_error = ItemTimeout(seconds, budget=budget)
            timeout_error.__cause__ = error
            return AttemptResult("timeout", None, timeout_error, started, ended)
        return AttemptResult("cancelled", None, None, started, ended)

    # -- the three ways to call fn -------------------------------------------------------
    async def _attempt_in_context(self, item: Any) -> Any:
        """Enter a fresh context, call ``fn(item, ctx)``, exit the context on every path.
        An error while exiting is the item's error if ``fn`` succeeded, else added to it."""
        p = self._plan
        assert p.context is not None
        cm = p.context()
        ctx = await cm.__aenter__()
        try:
            value = await p.fn(item, ctx) if p.fn_is_async else await self._in_thread(item, ctx)
            if self.journal_tx is not None:
                # In the item's own transaction: the row commits (or rolls back) with it.
                await self.journal_tx(ctx, value)
        except BaseException as e:
            try:
                await cm.__aexit__(type(e), e, e.__traceback__)
            except asyncio.CancelledError:
                # fn raised, then the item's timeout cut the context's exit (a rollback):
                # the item still failed with fn's error, not a timeout.
                if not (isinstance(e, Exception) and _timed_out()):
                    raise
                add_note(e, "batchkit: the item's timeout interrupted exiting its context")
            except Exception as exit_error:
                if exit_error is not e:
                    add_note(e, "batchkit: exiting the context also failed: "
                                f"{safe_repr(exit_error)}")  # fmt: skip
            # A context that "suppresses" the error does not make the item a success.
            raise
        await cm.__aexit__(None, None, None)
        return value

    def _sync_call(self, item: Any) -> Awaitable[Any]:
        return self._in_thread(item)

    async def _in_thread(self, item: Any, *args: Any) -> Any:
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, self._plan.fn, item, *args)
        future = self._executor.submit(call) if self._executor is not None else None
        if future is None:
            raise RuntimeError("a sync fn needs the runner's executor")
        self.threads.add(future)
        future.add_done_callback(self.threads.discard)
        slot = _SLOT.get()
        if slot is not None:
            slot.thread = future
        try:
            result = await asyncio.wrap_future(future, loop=self._loop)
        except asyncio.CancelledError:
            if args and not future.done():
                await self._outlast(future)
            raise
        if isinstance(result, Awaitable):
            # A plain function that returned an awaitable (``lambda x: fetch(x)``).
            result = await result
        return result

    async def _outlast(self, future: Future[Any]) -> None:
        """A sync ``fn``'s thread still uses its context after a cancellation: its context is
        not exited before the thread returns. Cancellations are held back meanwhile; after
        ``grace`` the watchdog (or the stop) cancels once more and abandons this attempt, so
        the item gets its envelope and the call returns, and the context is exited only when
        the thread is done."""
        done = asyncio.wrap_future(future, loop=self._loop)
        while not done.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((done,))  # a cancellation does not cancel ``done``
        if not done.cancelled():
            done.exception()  # retrieved: the attempt ends with its cancellation


def _timed_out() -> bool:
    """Whether the attempt running in this task has been cancelled by its timeout."""
    slot = _SLOT.get()
    return (
        slot is not None
        and slot.cancel_gen == slot.gen
        and slot.cancel_kind in (CancelKind.TIMEOUT, CancelKind.BUDGET)
    )
