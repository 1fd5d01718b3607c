"""The front door: ``batch_process()`` and ``stream()``. Validates, wires, nothing else."""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, overload

from ._dask_seam import BackendOptions
from ._engine import Engine, Plan
from ._errors import InvalidArgument
from ._policies import Adaptive, AsyncLimiter, Deadline, FailureRatio, RateLimit, Retry
from ._stream import Stream

if TYPE_CHECKING:
    from ._dask_seam import Backend
    from ._events import Observer
    from ._outcomes import BatchReport

__all__ = ["ContextFactory", "batch_process", "stream"]

T = TypeVar("T")
R = TypeVar("R")
C = TypeVar("C")

ContextFactory: TypeAlias = Callable[[], AbstractAsyncContextManager[C]]
"""A zero-argument callable returning an async context manager, e.g. ``async_sessionmaker``."""

Items: TypeAlias = Iterable[T] | AsyncIterable[T]

DEFAULT_CONCURRENCY = 10
DEFAULT_COST_READ_AHEAD = 1024


def _is_async_callable(fn: object) -> bool:
    while True:
        if inspect.iscoroutinefunction(fn):
            return True
        inner = getattr(fn, "func", None)  # functools.partial
        if inner is not None and inner is not fn:
            fn = inner
            continue
        break
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - callable objects
    return call is not None and inspect.iscoroutinefunction(call)


def _check_arity(fn: Callable[..., Any], n: int, with_context: bool) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust the caller
        return
    try:
        sig.bind(*([None] * n))
    except TypeError:
        if with_context:
            hint = "with context=, fn is called as fn(item, ctx): add a second parameter"
        else:
            hint = "fn is called as fn(item); pass context= if it takes a context too"
        raise InvalidArgument(
            f"fn {getattr(fn, '__qualname__', fn)!r} cannot be called with {n} argument(s) "
            f"{tuple(sig.parameters)}\nHINT: {hint}"
        ) from None


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds or None, got {value!r}")
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise InvalidArgument(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _positive_int_or_none(name: str, value: object, hint: str = "") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{name} must be an int >= 1 or None, got {value!r}{hint}")
    return value


def _plan(
    items: object,
    fn: object,
    *,
    concurrency: object,
    timeout: object,
    context: object,
    key: object,
    batch_size: object,
    fail_fast: object,
    retry: object,
    rate_limit: object,
    deadline: object,
    max_failures: object,
    max_failure_ratio: object,
    cost: object,
    observers: object,
    progress: object,
    name: object,
) -> Plan:
    """Check every argument before anything runs; messages name the argument and the fix."""
    if isinstance(items, str | bytes):
        raise InvalidArgument(
            "items is a string; batchkit would run fn once per character\n"
            "HINT: pass a list of items, e.g. [text]"
        )
    if not (hasattr(items, "__iter__") or hasattr(items, "__aiter__")):
        raise InvalidArgument(
            f"items must be an iterable or an async iterable, got {type(items).__name__}"
        )
    if not callable(fn):
        raise InvalidArgument(f"fn must be callable (an async function), got {fn!r}")
    if context is not None and not callable(context):
        raise InvalidArgument(
            f"context must be a zero-argument callable returning an async context manager, "
            f"got {context!r}\nHINT: pass the factory itself (async_sessionmaker(engine)), "
            "not a session"
        )
    _check_arity(fn, 2 if context is not None else 1, context is not None)

    adaptive: Adaptive | None = None
    if isinstance(concurrency, Adaptive):
        adaptive = concurrency
        slots = concurrency.max
    elif isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise InvalidArgument(
            f"concurrency must be an int >= 1 or batchkit.Adaptive(...), got {concurrency!r}"
        )
    elif concurrency < 1:
        raise InvalidArgument(f"concurrency must be >= 1, got {concurrency}")
    else:
        slots = concurrency

    timeout_s = None if timeout is None else _seconds("timeout", timeout)

    for arg_name, arg in (("key", key), ("cost", cost)):
        if arg is not None and not callable(arg):
            raise InvalidArgument(f"{arg_name} must be a callable taking an item, got {arg!r}")

    batch = _positive_int_or_none("batch_size", batch_size)
    read_ahead = batch if batch is not None else DEFAULT_COST_READ_AHEAD

    if not isinstance(fail_fast, bool):
        raise InvalidArgument(f"fail_fast must be a bool, got {fail_fast!r}")
    if retry is not None and not isinstance(retry, Retry):
        raise InvalidArgument(f"retry must be batchkit.Retry(...) or None, got {retry!r}")

    bucket_policy: RateLimit | None = None
    limiter: AsyncLimiter | None = None
    if isinstance(rate_limit, RateLimit):
        bucket_policy = rate_limit
    elif isinstance(rate_limit, AsyncLimiter):
        limiter = rate_limit
    elif rate_limit is not None:
        raise InvalidArgument(
            f"rate_limit must be batchkit.RateLimit(...) or an object used as "
            f"`async with limiter:` (e.g. aiolimiter.AsyncLimiter), got {rate_limit!r}"
        )

    deadline_seconds: float | None = None
    deadline_at: float | None = None
    fit_timeout = True
    if isinstance(deadline, Deadline):
        deadline_seconds, deadline_at, fit_timeout = (
            deadline.seconds,
            deadline.at,
            deadline.fit_timeout,
        )
    elif deadline is not None:
        deadline_seconds = _seconds("deadline", deadline)
    if (
        fit_timeout
        and timeout_s is not None
        and deadline_seconds is not None
        and timeout_s > deadline_seconds
    ):
        raise InvalidArgument(
            f"timeout ({timeout_s:g} s) is longer than the deadline ({deadline_seconds:g} s): "
            "no item could ever start\nHINT: lower timeout, raise the deadline, or pass "
            "Deadline(seconds=..., fit_timeout=False) to start items anyway"
        )

    failures_cap = _positive_int_or_none(
        "max_failures", max_failures, "\nHINT: max_failures=1 is fail_fast=True"
    )
    ratio: FailureRatio | None
    if max_failure_ratio is None or isinstance(max_failure_ratio, FailureRatio):
        ratio = max_failure_ratio
    elif isinstance(max_failure_ratio, int | float) and not isinstance(max_failure_ratio, bool):
        if not 0 <= max_failure_ratio < 1:
            raise InvalidArgument(f"max_failure_ratio must be in [0, 1), got {max_failure_ratio!r}")
        ratio = FailureRatio(ratio=float(max_failure_ratio))
    else:
        raise InvalidArgument(
            f"max_failure_ratio must be a float in [0, 1) or FailureRatio(...), "
            f"got {max_failure_ratio!r}"
        )

    if isinstance(observers, str | bytes) or not isinstance(observers, Sequence):
        raise InvalidArgument(f"observers must be a sequence of callables, got {observers!r}")
    obs: list[Observer] = []
    for o in observers:
        if not callable(o):
            raise InvalidArgument(f"every observer must be callable with an event, got {o!r}")
        obs.append(o)
    if not isinstance(progress, bool):
        raise InvalidArgument(f"progress must be a bool, got {progress!r}")
    if progress:
        from ._progress import ProgressObserver

        obs.append(ProgressObserver())
    if name is not None and not isinstance(name, str):
        raise InvalidArgument(f"name must be a str or None, got {name!r}")

    return Plan(
        fn=fn,
        fn_is_async=_is_async_callable(fn),
        slots=slots,
        adaptive=adaptive,
        timeout=timeout_s,
        context=context,
        key=key,  # type: ignore[arg-type]
        read_ahead=read_ahead,
        cost=cost,  # type: ignore[arg-type]
        retry=retry,
        rate_limit=bucket_policy,
        limiter=limiter,
        deadline_seconds=deadline_seconds,
        deadline_at=deadline_at,
        fit_timeout=fit_timeout,
        fail_fast=fail_fast,
        max_failures=failures_cap,
        max_failure_ratio=ratio,
        observers=tuple(obs),
        name=name,
    )


def _backend_options(*, backend: object, **options: Any) -> BackendOptions:
    """The validated keywords for a backend (CORE's ``Options`` replaces this at the merge)."""
    if not (hasattr(backend, "run_batch") and hasattr(backend, "open_stream")):
        raise InvalidArgument(
            f"backend must be a batchkit backend such as batchkit.dask.DaskBackend(...), "
            f"got {backend!r}"
        )
    return BackendOptions(**options)


# Overloads: without ``context`` fn takes the item; with it, the item and the context value.
# Async functions are listed first so ``R`` is what they return, not the awaitable.
@overload
async def batch_process(
    items: Items[T],
    fn: Callable[[T], Awaitable[R]],
    *,
    concurrency: int | Adaptive = ...,
    timeout: float | None = ...,
    context: None = ...,
    key: Callable[[T], object] | None = ...,
    batch_size: int | None = ...,
    fail_fast: bool = ...,
    retry: Retry | None = ...,
    rate_limit: RateLimit | AsyncLimiter | None = ...,
    deadline: float | Deadline | None = ...,
    max_failures: int | None = ...,
    max_failure_ratio: float | FailureRatio | None = ...,
    cost: Callable[[T], float] | None = ...,
    observers: Sequence[Observer] = ...,
    progress: bool = ...,
    name: str | None = ...,
    backend: Backend | None = ...,
) -> BatchReport[T, R]: ...
@overload
async def batch_process(
    items: Items[T],
    fn: Callable[[T, C], Awaitable[R]],
    *,
    concurrency: int | Adaptive = ...,
    timeout: float | None = ...,
    context: ContextFactory[C],
    key: Callable[[T], object] | None = ...,
    batch_size: int | None = ...,
    fail_fast: bool = ...,
    retry: Retry | None = ...,
    rate_limit: RateLimit | AsyncLimiter | None = ...,
    deadline: float | Deadline | None = ...,
    max_failures: int | None = ...,
    max_failure_ratio: float | FailureRatio | None = ...,
    cost: Callable[[T], float] | None = ...,
    observers: Sequence[Observer] = ...,
    progress: bool = ...,
    name: str | None = ...,
    backend: Backend | None = ...,
) -> BatchReport[T, R]: ...
@overload
async def batch_process(
    items: Items[T],
    fn: Callable[[T], R],
    *,
    concurrency: int | Adaptive = ...,
    timeout: float | None = ...,
    context: None = ...,
    key: Callable[[T], object] | None = ...,
    batch_size: int | None = ...,
    fail_fast: bool = ...,
    retry: Retry | None = ...,
    rate_limit: RateLimit | AsyncLimiter | None = ...,
    deadline: float | Deadline | None = ...,
    max_failures: int | None = ...,
    max_failure_ratio: float | FailureRatio | None = ...,
    cost: Callable[[T], float] | None = ...,
    observers: Sequence[Observer] = ...,
    progress: bool = ...,
    name: str | None = ...,
    backend: Backend | None = ...,
) -> BatchReport[T, R]: ...
@overload
async def batch_process(
    items: Items[T],
    fn: Callable[[T, C], R],
    *,
    concurrency: int | Adaptive = ...,
    timeout: float | None = ...,
    context: ContextFactory[C],
    key: Callable[[T], object] | None = ...,
    batch_size: int | None = ...,
    fail_fast: bool = ...,
    retry: Retry | None = ...,
    rate_limit: RateLimit | AsyncLimiter | None = ...,
    deadline: float | Deadline | None = ...,
    max_failures: int | None = ...,
    max_failure_ratio: float | FailureRatio | None = ...,
    cost: Callable[[T], float] | None = ...,
    observers: Sequence[Observer] = ...,
    progress: bool = ...,
    name: str | None = ...,
    backend: Backend | None = ...,
) -> BatchReport[T, R]: ...
async def batch_process(
    items: Items[Any],
    fn: Callable[..., Any],
    *,
    concurrency: int | Adaptive = DEFAULT_CONCURRENCY,
    timeout: float | None = None,
    context: ContextFactory[Any] | None = None,
    key: Callable[[Any], object] | None = None,
    batch_size: int | None = None,
    fail_fast: bool = False,
    retry: Retry | None = None,
    rate_limit: RateLimit | AsyncLimiter | None = None,
    deadline: float | Deadline | None = None,
    max_failures: int | None = None,
    max_failure_ratio: float | FailureRatio | None = None,
    cost: Callable[[Any], float] | None = None,
    observers: Sequence[Observer] = (),
    progress: bool = False,
    name: str | None = None,
    backend: Backend | None = None,
) -> BatchReport[Any, Any]:
    """Apply ``fn`` to every item, at most ``concurrency`` at once, and report every outcome.

    A sliding window: the next item starts the moment any slot frees. Each item ends in
    exactly one :class:`Success` or :class:`Failure`; the report lists them in input order.
    See the docs for every keyword; bad arguments raise :class:`InvalidArgument` at once.
    """
    plan = _plan(
        items, fn, concurrency=concurrency, timeout=timeout, context=context, key=key,
        batch_size=batch_size, fail_fast=fail_fast, retry=retry, rate_limit=rate_limit,
        deadline=deadline, max_failures=max_failures, max_failure_ratio=max_failure_ratio,
        cost=cost, observers=observers, progress=progress, name=name,
    )  # fmt: skip
    if backend is not None:
        options = _backend_options(
            concurrency=concurrency, timeout=timeout, context=context, key=key,
            batch_size=batch_size, fail_fast=fail_fast, retry=retry, rate_limit=rate_limit,
            deadline=deadline, max_failures=max_failures, max_failure_ratio=max_failure_ratio,
            cost=cost, observers=observers, progress=progress, name=name, backend=backend,
        )  # fmt: skip
        return await backend.run_batch(items, fn, options)
    engine: Engine[Any, Any] = Engine(plan, items)
    return await engine.run()


@overload
def stream(
    items: Items[T],
    fn: Callable[[T], Awaitable[R]],
    *,
    concurrency: int | Adaptive = ...,
    timeout: float | None = ...,
    context: None = ...,
    key: Callable[[T], object] | None = ...,
    batch_size: int | None = ...,
    fail_fast: bool = ...,
    retry: Retry | None = ...,
    rate_limit: RateLimit | AsyncLimiter | None = ...,
    deadline: float | Deadline | None = ...,
    max_failures: int | None = ...,
    max_failure_ratio: float | FailureRatio | None = ...,
    cost: Callable[[T], float] | None = ...,
    observers: Sequence[Observer] = ...,
    progress: bool = ...,
    name: str | None = ...,
    backend: Backend | None = ...,
    ordered: bool = ...,
    buffer: int | None = ...,
) -> Stream[T, R]: ...
@overload
def stream(
    items: Items[T],
    fn: Callable[[T, C], Awaitable[R]],
    *,
    concurrency: int | Adaptive = ...,
    timeout: float | None = ...,
    context: ContextFactory[C],
    key: Callable[[T], object] | None = ...,
    batch_size: int | None = ...,
    fail_fast: bool = ...,
    retry: Retry | None = ...,
    rate_limit: RateLimit | AsyncLimiter | None = ...,
    deadline: float | Deadline | None = ...,
    max_failures: int | None = ...,
    max_failure_ratio: float | FailureRatio | None = ...,
    cost: Callable[[T], float] | None = ...,
    observers: Sequence[Observer] = ...,
    progress: bool = ...,
    name: str | None = ...,
    backend: Backend | None = ...,
    ordered: bool = ...,
    buffer: int | None = ...,
) -> Stream[T, R]: ...
@overload
def stream(
    items: Items[T],
    fn: Callable[[T], R],
    *,
    concurrency: int | Adaptive = ...,
    timeout: float | None = ...,
    context: None = ...,
    key: Callable[[T], object] | None = ...,
    batch_size: int | None = ...,
    fail_fast: bool = ...,
    retry: Retry | None = ...,
    rate_limit: RateLimit | AsyncLimiter | None = ...,
    deadline: float | Deadline | None = ...,
    max_failures: int | None = ...,
    max_failure_ratio: float | FailureRatio | None = ...,
    cost: Callable[[T], float] | None = ...,
    observers: Sequence[Observer] = ...,
    progress: bool = ...,
    name: str | None = ...,
    backend: Backend | None = ...,
    ordered: bool = ...,
    buffer: int | None = ...,
) -> Stream[T, R]: ...
@overload
def stream(
    items: Items[T],
    fn: Callable[[T, C], R],
    *,
    concurrency: int | Adaptive = ...,
    timeout: float | None = ...,
    context: ContextFactory[C],
    key: Callable[[T], object] | None = ...,
    batch_size: int | None = ...,
    fail_fast: bool = ...,
    retry: Retry | None = ...,
    rate_limit: RateLimit | AsyncLimiter | None = ...,
    deadline: float | Deadline | None = ...,
    max_failures: int | None = ...,
    max_failure_ratio: float | FailureRatio | None = ...,
    cost: Callable[[T], float] | None = ...,
    observers: Sequence[Observer] = ...,
    progress: bool = ...,
    name: str | None = ...,
    backend: Backend | None = ...,
    ordered: bool = ...,
    buffer: int | None = ...,
) -> Stream[T, R]: ...
def stream(
    items: Items[Any],
    fn: Callable[..., Any],
    *,
    concurrency: int | Adaptive = DEFAULT_CONCURRENCY,
    timeout: float | None = None,
    context: ContextFactory[Any] | None = None,
    key: Callable[[Any], object] | None = None,
    batch_size: int | None = None,
    fail_fast: bool = False,
    retry: Retry | None = None,
    rate_limit: RateLimit | AsyncLimiter | None = None,
    deadline: float | Deadline | None = None,
    max_failures: int | None = None,
    max_failure_ratio: float | FailureRatio | None = None,
    cost: Callable[[Any], float] | None = None,
    observers: Sequence[Observer] = (),
    progress: bool = False,
    name: str | None = None,
    backend: Backend | None = None,
    ordered: bool = False,
    buffer: int | None = None,
) -> Stream[Any, Any]:
    """Like :func:`batch_process`, but yield outcomes as they complete::

        async with stream(items, fn, concurrency=10) as outcomes:
            async for outcome in outcomes:
                ...

    ``ordered=True`` yields in input order through a reorder buffer. At most
    ``concurrency + buffer`` items (default ``buffer``: ``concurrency``) are ever pulled from
    the input and not yet consumed, whatever the input's length: a slow head item or a slow
    consumer pauses new starts rather than growing memory.
    """
    plan = _plan(
        items, fn, concurrency=concurrency, timeout=timeout, context=context, key=key,
        batch_size=batch_size, fail_fast=fail_fast, retry=retry, rate_limit=rate_limit,
        deadline=deadline, max_failures=max_failures, max_failure_ratio=max_failure_ratio,
        cost=cost, observers=observers, progress=progress, name=name,
    )  # fmt: skip
    if not isinstance(ordered, bool):
        raise InvalidArgument(f"ordered must be a bool, got {ordered!r}")
    extra = _positive_int_or_none("buffer", buffer)
    if backend is not None:
        options = _backend_options(
            concurrency=concurrency, timeout=timeout, context=context, key=key,
            batch_size=batch_size, fail_fast=fail_fast, retry=retry, rate_limit=rate_limit,
            deadline=deadline, max_failures=max_failures, max_failure_ratio=max_failure_ratio,
            cost=cost, observers=observers, progress=progress, name=name, backend=backend,
            ordered=ordered, buffer=buffer,
        )  # fmt: skip
        return backend.open_stream(items, fn, options)
    window = plan.slots + (extra if extra is not None else plan.slots)
    if plan.cost is not None:
        # Cost ordering needs its read-ahead inside the window.
        window += plan.read_ahead
    return Stream(plan, items, ordered=ordered, window=window)
