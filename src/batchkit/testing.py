"""Helpers for testing **your own** pipelines' limits: probes, strategies, virtual time.

- :class:`Probe` wraps (or fakes) an item function and records every attempt: when it
  started and ended (loop time), how many ran at once, how many attempts each item got.
- :class:`ContextProbe` wraps (or fakes) a context factory and records every enter and exit.
- :class:`ItemPlan` / :class:`Step` script what each attempt of an item does (succeed, fail,
  hang, be slow); a :class:`Probe` follows the plan when the items are plans.
- :class:`strategies` draws plans, latencies and policies with Hypothesis.
- :func:`run_virtual` runs a coroutine on a fresh virtual-time event loop (looptime), so a
  batch of hour-long items finishes in milliseconds and times are exact.
- :func:`instant` removes backoff waits, restoring the previous state afterwards.

Hypothesis and looptime are imported only when used (``pip install 'aio-batchkit[testing]'``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    Literal,
    ParamSpec,
    TypeAlias,
    TypeVar,
    cast,
    final,
    overload,
)

from ._engine import backoff as _backoff
from ._model.errors import InvalidArgument, MissingExtra
from ._model.policies import Adaptive, Backoff, RateLimit, Retry

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
    from contextvars import Token
    from types import ModuleType, TracebackType

    from hypothesis.strategies import SearchStrategy

__all__ = [
    "Call",
    "ContextProbe",
    "ContextRecord",
    "ItemPlan",
    "Probe",
    "ProbeError",
    "Step",
    "StepKind",
    "TICK",
    "instant",
    "run_virtual",
    "strategies",
]

T = TypeVar("T")
R = TypeVar("R")
C = TypeVar("C")
P = ParamSpec("P")

StepKind: TypeAlias = Literal["ok", "error", "hang"]


# -- plans -------------------------------------------------------------------------------
@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """What one attempt does: wait ``latency`` seconds, then return (``"ok"``) or raise
    :class:`ProbeError` (``"error"``); ``"hang"`` never returns, so only a ``timeout`` (or
    the run's end) stops it. A *slow* attempt is an ``"ok"`` one longer than the timeout."""

    kind: StepKind = "ok"
    latency: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("ok", "error", "hang"):
            raise InvalidArgument(f"Step.kind must be 'ok', 'error' or 'hang', got {self.kind!r}")
        latency: object = self.latency
        if (
            isinstance(latency, bool)
            or not isinstance(latency, int | float)
            or not math.isfinite(latency)
            or latency < 0
        ):
            raise InvalidArgument(f"Step.latency must be a number of seconds >= 0, got {latency!r}")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ItemPlan:
    """A scripted item: attempt ``n`` does ``steps[n - 1]``; the last step repeats.

    ``index`` tells equal plans apart (use the item's input position). Pass a list of plans
    as the items and a :class:`Probe` as ``fn``: the probe follows each plan.
    """

    index: int
    steps: tuple[Step, ...] = (Step(),)

    def __post_init__(self) -> None:
        if not self.steps:
            raise InvalidArgument("ItemPlan.steps must hold at least one Step")

    def step(self, attempt: int) -> Step:
        """The step of attempt ``attempt`` (1 for the first)."""
        return self.steps[min(attempt, len(self.steps)) - 1]

    def expect(
        self, *, timeout: float | None = None, retry: Retry | None = None
    ) -> tuple[Literal["success", "error", "timeout"], int]:
        """What batchkit should report for this item: ``(kind, attempts)``.

        For a run without deadline or failure thresholds. A step whose latency equals the
        timeout exactly is a tie the event loop may break either way; the strategies never
        draw one.
        """
        most = retry.attempts if retry is not None else 1
        kind: Literal["success", "error", "timeout"] = "success"
        for attempt in range(1, most + 1):
            step = self.step(attempt)
            if step.kind == "hang" or (timeout is not None and step.latency >= timeout):
                if timeout is None:
                    raise InvalidArgument(f"item {self.index} hangs and there is no timeout")
                kind = "timeout"
                retried = retry is not None and retry.timeouts
            elif step.kind == "error":
                kind = "error"
                retried = retry is not None and retry.should_retry(ProbeError(self, attempt))
            else:
                return "success", attempt
            if not retried:
                return kind, attempt
        return kind, most


class ProbeError(Exception):
    """The error a :class:`Probe` raises for an ``"error"`` step. It carries
    ``status_code = 503``, so :func:`batchkit.transient` (``Retry``'s default) retries it like
    the flaky upstream it stands for."""

    status_code = 503

    def __init__(self, item: object, attempt: int) -> None:
        super().__init__(f"planned failure of attempt {attempt}")
        self.item = item
        self.attempt = attempt


# -- probes ------------------------------------------------------------------------------
@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """One finished attempt seen by a :class:`Probe` (times are ``loop.time()``)."""

    item: Any
    attempt: int
    start: float
    end: float
    result: Literal["ok", "error", "cancelled"]
    """``cancelled``: the attempt was cancelled (a timeout, a deadline, a stopped run)."""
    in_flight: int
    """Attempts running in this probe when this one started, itself included."""


def _default_key(item: object) -> Hashable:
    try:
        hash(item)
    except TypeError:
        return id(item)
    return item


@final
class Probe(Generic[T, R]):
    """An item function that records what batchkit does with it.

    ``Probe(fn)`` wraps your async ``fn`` (called as ``fn(item)``, or ``fn(item, ctx)`` with
    ``context=``); ``Probe()`` is a fake that returns the item. Before calling ``fn`` each
    attempt waits ``latency`` seconds (a number or ``latency(item)``) and raises
    ``fail(item, attempt)`` if that returns an exception. Items that are :class:`ItemPlan`
    follow their plan instead. Use it as the ``fn`` of ``batch_process`` or ``stream``, then
    assert on :attr:`calls`, :attr:`peak_in_flight`, :meth:`attempts`.

    Items are told apart by ``key(item)`` (default: the item itself, or its ``id()`` if it is
    not hashable).
    """

    @overload
    def __init__(
        self: Probe[T, R],
        fn: Callable[[T], Awaitable[R]],
        *,
        latency: float | Callable[[T], float] = ...,
        fail: Callable[[T, int], BaseException | None] | None = ...,
        key: Callable[[T], Hashable] | None = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Probe[T, R],
        fn: Callable[[T, Any], Awaitable[R]],
        *,
        latency: float | Callable[[T], float] = ...,
        fail: Callable[[T, int], BaseException | None] | None = ...,
        key: Callable[[T], Hashable] | None = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Probe[Any, Any],
        fn: None = None,
        *,
        latency: float | Callable[[Any], float] = ...,
        fail: Callable[[Any, int], BaseException | None] | None = ...,
        key: Callable[[Any], Hashable] | None = ...,
    ) -> None: ...
    def __init__(
        self,
        fn: Callable[..., Awaitable[Any]] | None = None,
        *,
        latency: float | Callable[[Any], float] = 0.0,
        fail: Callable[[Any, int], BaseException | None] | None = None,
        key: Callable[[Any], Hashable] | None = None,
    ) -> None:
        if fn is not None and not callable(fn):
            raise InvalidArgument(f"fn must be an async function or None, got {fn!r}")
        self._fn = fn
        self._latency = latency
        self._fail = fail
        self._key: Callable[[Any], Hashable] = key if key is not None else _default_key
        self._attempts: dict[Hashable, int] = {}
        self.calls: list[Call] = []
        """Every finished attempt, in the order they ended."""
        self.in_flight = 0
        """Attempts running now."""
        self.peak_in_flight = 0
        """The most attempts that ever ran at once."""
        self.started = 0
        """Attempts started, over all items."""

    def __repr__(self) -> str:
        return f"Probe(started={self.started}, peak_in_flight={self.peak_in_flight})"

    def attempts(self, item: T) -> int:
        """How many attempts of ``item`` started."""
        return self._attempts.get(self._key(item), 0)

    def calls_of(self, item: T) -> list[Call]:
        """The finished attempts of ``item``, in order."""
        k = self._key(item)
        return [c for c in self.calls if self._key(c.item) == k]

    @property
    def items(self) -> int:
        """How many distinct items were started."""
        return len(self._attempts)

    def _step(self, item: Any, attempt: int) -> Step:
        if isinstance(item, ItemPlan):
            return item.step(attempt)
        latency = self._latency(item) if callable(self._latency) else self._latency
        return Step(latency=latency)

    async def __call__(self, item: T, *context: Any) -> R:
        loop = asyncio.get_running_loop()
        start = loop.time()
        k = self._key(item)
        attempt = self._attempts[k] = self._attempts.get(k, 0) + 1
        self.started += 1
        in_flight = self.in_flight = self.in_flight + 1
        if in_flight > self.peak_in_flight:
            self.peak_in_flight = in_flight
        result: Literal["ok", "error", "cancelled"] = "cancelled"
        try:
            step = self._step(item, attempt)
            if step.kind == "hang":
                await loop.create_future()  # never resolved: only cancellation ends it
            if step.latency:
                await asyncio.sleep(step.latency)
            if step.kind == "error":
                raise ProbeError(item, attempt)
            if self._fail is not None:
                error = self._fail(item, attempt)
                if error is not None:
                    raise error
            value: Any = item
            if self._fn is not None:
                value = self._fn(item, *context)
                if inspect.isawaitable(value):
                    value = await value
            result = "ok"
            return cast("R", value)
        except Exception:
            result = "error"
            raise
        finally:
            self.in_flight -= 1
            self.calls.append(
                Call(
                    item=item,
                    attempt=attempt,
                    start=start,
                    end=loop.time(),
                    result=result,
                    in_flight=in_flight,
                )
            )


@final
@dataclass(slots=True, kw_only=True)
class ContextRecord:
    """One context made by a :class:`ContextProbe` (times are ``loop.time()``)."""

    number: int
    entered_at: float | None = None
    exited_at: float | None = None
    exits: int = 0
    """How many times ``__aexit__`` ran: 1 once entered and left, more is a bug."""
    exit_error: type[BaseException] | None = None
    """The error the block ended with (``CancelledError`` for a timeout), if any."""


@final
class ContextProbe(Generic[C]):
    """A context factory (for ``context=``) that records every enter and exit.

    ``ContextProbe(factory)`` wraps yours (e.g. an ``async_sessionmaker``); ``ContextProbe()``
    is a fake whose context value is the context's number (0, 1, ...). ``enter_latency`` and
    ``exit_latency`` make entering and leaving take time. :meth:`assert_balanced` checks that
    every entered context was exited exactly once.
    """

    @overload
    def __init__(
        self: ContextProbe[int],
        factory: None = None,
        *,
        enter_latency: float = ...,
        exit_latency: float = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: ContextProbe[C],
        factory: Callable[[], AbstractAsyncContextManager[C]],
        *,
        enter_latency: float = ...,
        exit_latency: float = ...,
    ) -> None: ...
    def __init__(
        self,
        factory: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
        *,
        enter_latency: float = 0.0,
        exit_latency: float = 0.0,
    ) -> None:
        self._factory = factory
        self._enter_latency = enter_latency
        self._exit_latency = exit_latency
        self.contexts: list[ContextRecord] = []
        """Every context made, in order."""
        self.open = 0
        """Contexts entered and not yet exited."""
        self.peak_open = 0
        """The most contexts that were ever open at once."""

    def __repr__(self) -> str:
        return f"ContextProbe(made={len(self.contexts)}, open={self.open})"

    @property
    def entered(self) -> int:
        """How many contexts were entered."""
        return sum(1 for c in self.contexts if c.entered_at is not None)

    @property
    def exited(self) -> int:
        """How many contexts were exited (at least once)."""
        return sum(1 for c in self.contexts if c.exits)

    def __call__(self) -> AbstractAsyncContextManager[C]:
        record = ContextRecord(number=len(self.contexts))
        self.contexts.append(record)
        return _ProbedContext(self, record)

    def assert_balanced(self) -> None:
        """Raise ``AssertionError`` unless every entered context was exited exactly once (and
        none was exited without being entered)."""
        bad = [
            c
            for c in self.contexts
            if (c.entered_at is not None and c.exits != 1) or (c.entered_at is None and c.exits)
        ]
        if bad:
            raise AssertionError(f"contexts not exited exactly once: {bad}")


class _ProbedContext(AbstractAsyncContextManager[C]):
    __slots__ = ("_inner", "_probe", "_record")

    def __init__(self, probe: ContextProbe[C], record: ContextRecord) -> None:
        self._probe = probe
        self._record = record
        self._inner: AbstractAsyncContextManager[C] | None = None

    async def __aenter__(self) -> C:
        probe = self._probe
        if probe._enter_latency:
            await asyncio.sleep(probe._enter_latency)
        value: Any = self._record.number
        if probe._factory is not None:
            inner = self._inner = probe._factory()
            value = await inner.__aenter__()
        # Recorded once entering succeeded: a failed enter must not be exited.
        self._record.entered_at = asyncio.get_running_loop().time()
        probe.open += 1
        probe.peak_open = max(probe.peak_open, probe.open)
        return cast("C", value)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        probe, record = self._probe, self._record
        record.exits += 1
        record.exit_error = exc_type
        record.exited_at = asyncio.get_running_loop().time()
        probe.open -= 1
        if probe._exit_latency:
            await asyncio.sleep(probe._exit_latency)
        if self._inner is not None:
            return await self._inner.__aexit__(exc_type, exc, tb)
        return None


# -- virtual time ------------------------------------------------------------------------
def run_virtual(
    main: Coroutine[Any, Any, R] | Callable[[], Coroutine[Any, Any, R]], *, start: float = 0.0
) -> R:
    """Run ``main`` (a coroutine, or an async function taking no arguments) to its end on a
    fresh looptime event loop whose clock starts at ``start`` and jumps over every sleep.

    The way to run a batch in virtual time from a plain (sync) test, e.g. a Hypothesis one::

        report = run_virtual(batch_process(items, probe, concurrency=3, timeout=5))

    ``loop.time()`` inside is virtual and exact; the loop is closed afterwards. In an async
    pytest test, mark it ``@pytest.mark.looptime`` instead (see the testing how-to).
    """
    error: Exception | None = None
    try:
        import looptime
    except ImportError:
        error = MissingExtra("batchkit.testing.run_virtual", "testing", "looptime")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        error = RuntimeError(
            "run_virtual() cannot be called from a running event loop\nHINT: in an async "
            "test, await the coroutine and mark the test @pytest.mark.looptime"
        )
    if error is not None:
        if inspect.iscoroutine(main):
            main.close()  # never awaited: close it so Python does not warn
        raise error
    coro = main if inspect.iscoroutine(main) else cast("Callable[[], Any]", main)()

    def new_loop() -> asyncio.AbstractEventLoop:
        return cast("asyncio.AbstractEventLoop", looptime.new_event_loop(start=start))

    with asyncio.Runner(loop_factory=new_loop) as runner:
        return cast("R", runner.run(coro))


# -- instant mode ------------------------------------------------------------------------
@final
class _Instant:
    """See :func:`instant`."""

    __slots__ = ("_saved",)

    def __init__(self) -> None:
        self._saved: list[Token[bool]] = []

    def __enter__(self) -> None:
        self._saved.append(_backoff.INSTANT.set(True))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _backoff.INSTANT.reset(self._saved.pop())

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Decorate a sync or an async function: it runs in instant mode."""
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with self:
                    return await func(*args, **kwargs)

            return cast("Callable[P, R]", run_async)

        @functools.wraps(func)
        def run(*args: P.args, **kwargs: P.kwargs) -> Any:
            with self:
                return func(*args, **kwargs)

        return cast("Callable[P, R]", run)


def instant() -> _Instant:
    """Retry at once: every backoff wait (and ``retry_after`` hint) becomes zero.

    A context manager (``with instant(): ...``) or a decorator for sync and async test
    functions. The previous state is restored on exit, also on errors; uses nest. The switch
    is a context variable: it affects batches started inside the block (also by code you
    call), and nothing running in other tasks — concurrent tests keep their backoff.
    """
    return _Instant()


# -- Hypothesis strategies ---------------------------------------------------------------
def _st() -> ModuleType:
    try:
        import hypothesis.strategies as st
    except ImportError:
        raise MissingExtra("batchkit.testing.strategies", "testing", "hypothesis") from None
    return st


TICK: Final = 1 / 64
"""Drawn durations are whole multiples of this (15.625 ms): a binary fraction and a whole
number of microseconds, so sums of them are exact both as floats and on looptime's clock.
Decimal steps (0.001 s) are not: ``0.131 + 2.0 == 2.1310000000000002``."""


def _ms(low: float, high: float) -> SearchStrategy[float]:
    """Seconds in ``[low, high]``, in whole ticks."""
    first, last = math.ceil(low / TICK), math.floor(high / TICK)
    if first > last:
        raise InvalidArgument(f"no multiple of {TICK} s lies in [{low}, {high}]")
    return cast("SearchStrategy[float]", _st().integers(first, last).map(lambda n: n * TICK))


_KINDS: Final = ("ok", "error", "hang", "slow")


@final
class strategies:
    """Hypothesis strategies for item plans, latencies and policies.

    Durations are whole multiples of :data:`TICK` (1/64 s) so virtual times add up exactly.
    Needs Hypothesis (``pip install 'aio-batchkit[testing]'``).
    """

    def __init__(self) -> None:  # pragma: no cover - not meant to be instantiated
        raise TypeError("batchkit.testing.strategies is a namespace; call its functions")

    @staticmethod
    def latencies(*, min_value: float = 0.0, max_value: float = 1.0) -> SearchStrategy[float]:
        """Item latencies in seconds, in ``[min_value, max_value]``."""
        if not 0 <= min_value <= max_value:
            raise InvalidArgument("latencies needs 0 <= min_value <= max_value")
        return _ms(min_value, max_value)

    @staticmethod
    def steps(
        *,
        timeout: float | None = None,
        max_latency: float = 1.0,
        kinds: Sequence[Literal["ok", "error", "hang", "slow"]] = _KINDS,
    ) -> SearchStrategy[Step]:
        """One attempt's behaviour.

        ``ok`` and ``error`` take at most ``max_latency`` (and less than half the timeout);
        ``hang`` never returns; ``slow`` succeeds after 1.5 to 3 timeouts. ``hang`` and
        ``slow`` are drawn only when a ``timeout`` is given (without one they would hang).
        """
        st = _st()
        fast_max = max_latency if timeout is None else min(max_latency, timeout / 2)
        options: list[SearchStrategy[Step]] = []
        if "ok" in kinds:
            options.append(_ms(0, fast_max).map(lambda s: Step(kind="ok", latency=s)))
        if "error" in kinds:
            options.append(_ms(0, fast_max).map(lambda s: Step(kind="error", latency=s)))
        if timeout is not None:
            if "hang" in kinds:
                options.append(st.just(Step(kind="hang")))
            if "slow" in kinds:
                options.append(
                    _ms(timeout * 1.5, timeout * 3).map(lambda s: Step(kind="ok", latency=s))
                )
        if not options:
            raise InvalidArgument(f"no step kind left to draw from kinds={kinds!r}")
        return cast("SearchStrategy[Step]", st.one_of(options))

    @staticmethod
    def item_plans(
        *,
        min_size: int = 0,
        max_size: int = 20,
        max_attempts: int = 3,
        timeout: float | None = None,
        max_latency: float = 1.0,
        kinds: Sequence[Literal["ok", "error", "hang", "slow"]] = _KINDS,
    ) -> SearchStrategy[list[ItemPlan]]:
        """Lists of :class:`ItemPlan` (indexed 0, 1, ...) with 1 to ``max_attempts`` steps
        each, drawn by :meth:`steps` with the same arguments."""
        st = _st()
        step_lists = st.lists(
            strategies.steps(timeout=timeout, max_latency=max_latency, kinds=kinds),
            min_size=1,
            max_size=max_attempts,
        )
        return cast(
            "SearchStrategy[list[ItemPlan]]",
            st.lists(step_lists, min_size=min_size, max_size=max_size).map(
                lambda plans: [ItemPlan(index=i, steps=tuple(s)) for i, s in enumerate(plans)]
            ),
        )

    @staticmethod
    def backoffs(*, max_initial: float = 1.0, max_maximum: float = 10.0) -> SearchStrategy[Backoff]:
        """:class:`~batchkit.Backoff` values with ``initial <= max_initial``."""
        st = _st()

        @st.composite  # type: ignore[untyped-decorator]
        def build(draw: Callable[[SearchStrategy[Any]], Any]) -> Backoff:
            initial = draw(_ms(0, max_initial))
            maximum = draw(_ms(initial, max(initial, max_maximum)))
            return Backoff(
                initial=initial,
                maximum=maximum,
                multiplier=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
                jitter=draw(st.booleans()),
            )

        return cast("SearchStrategy[Backoff]", build())

    @staticmethod
    def retries(*, max_attempts: int = 4, max_initial: float = 1.0) -> SearchStrategy[Retry]:
        """:class:`~batchkit.Retry` policies with 1 to ``max_attempts`` attempts."""
        st = _st()
        return cast(
            "SearchStrategy[Retry]",
            st.builds(
                Retry,
                attempts=st.integers(1, max_attempts),
                backoff=strategies.backoffs(max_initial=max_initial),
                timeouts=st.booleans(),
                hold_slot=st.booleans(),
            ),
        )

    @staticmethod
    def rate_limits(
        *, max_per_second: float = 100.0, max_burst: int = 10
    ) -> SearchStrategy[RateLimit]:
        """:class:`~batchkit.RateLimit` policies: 0.1 to ``max_per_second`` per second."""
        st = _st()
        return cast(
            "SearchStrategy[RateLimit]",
            st.builds(
                RateLimit,
                per_second=st.integers(1, max(1, round(max_per_second * 10))).map(lambda n: n / 10),
                burst=st.integers(1, max_burst),
            ),
        )

    @staticmethod
    def adaptives(*, max_limit: int = 16) -> SearchStrategy[Adaptive]:
        """Valid :class:`~batchkit.Adaptive` limits within ``[1, max_limit]``."""
        st = _st()

        @st.composite  # type: ignore[untyped-decorator]
        def build(draw: Callable[[SearchStrategy[Any]], Any]) -> Adaptive:
            low = draw(st.integers(1, max_limit))
            high = draw(st.integers(low, max_limit))
            return Adaptive(
                min=low,
                max=high,
                initial=draw(st.integers(low, high)),
                decrease=draw(st.sampled_from([0.5, 0.75, 0.9])),
                latency_factor=draw(st.sampled_from([1.5, 2.0, 4.0])),
            )

        return cast("SearchStrategy[Adaptive]", build())
