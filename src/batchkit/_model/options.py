"""Every keyword of ``batch_process`` and ``stream``, declared once, and checked once.

:class:`Options` holds them as given (what a :class:`Backend` receives); one small validator
per option checks its value and says how to fix it; ``batchkit._engine.plan.make_plan`` turns
valid options into the plan the local engine runs. The keyword arguments' static types live in
:class:`RunOptions` / :class:`StreamOptions` (for ``**options: Unpack[...]``); a test checks
that they name the same options as :class:`Options`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypedDict, TypeVar

from .errors import InvalidArgument
from .journal import Journal
from .policies import (
    Adaptive,
    AsyncLimiter,
    Breaker,
    Deadline,
    FailureRatio,
    Hedge,
    LimitGroup,
    RateLimit,
    Retry,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Iterable
    from contextlib import AbstractAsyncContextManager

    from .events import Observer
    from .report import BatchReport
    from .seams import Stream

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Backend",
    "Options",
    "RunOptions",
    "StreamOptions",
    "validate",
]

T = TypeVar("T")

DEFAULT_CONCURRENCY: Final = 10
DEFAULT_COST_READ_AHEAD: Final = 1024
DEFAULT_GRACE: Final = 1.0
# The default reorder buffer of an ordered stream, per slot (docs/performance.md, item 3).
ORDERED_BUFFER_PER_SLOT: Final = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """The keyword arguments of one call, as given. See the reference for each."""

    concurrency: int | Adaptive = DEFAULT_CONCURRENCY
    timeout: float | None = None
    item_budget: float | None = None
    context: Callable[[], AbstractAsyncContextManager[Any]] | None = None
    key: Callable[[Any], object] | None = None
    batch_size: int | None = None
    fail_fast: bool = False
    retry: Retry | None = None
    rate_limit: RateLimit | AsyncLimiter | None = None
    deadline: float | Deadline | None = None
    max_failures: int | None = None
    max_failure_ratio: float | FailureRatio | None = None
    cost: Callable[[Any], float] | None = None
    groups: Sequence[LimitGroup] = ()
    observers: Sequence[Observer] = ()
    progress: bool = False
    name: str | None = None
    ordered: bool = False
    buffer: int | None = None
    backend: Backend | None = None
    breaker: Breaker | None = None
    journal: Journal | None = None
    hedge: Hedge | None = None


class Backend(Protocol):
    """Runs a whole call somewhere else, with the same options and the same envelopes.

    ``backend=None`` (the default) is the in-process engine; any other backend (e.g.
    ``batchkit.dask.DaskBackend``) receives the call's items, ``fn`` and :class:`Options`
    unchanged, and returns the same report types.
    """

    async def run_batch(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        fn: Callable[..., Any],
        options: Options,
    ) -> BatchReport[Any, Any]: ...

    def open_stream(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        fn: Callable[..., Any],
        options: Options,
    ) -> Stream[Any, Any]: ...


class RunOptions(TypedDict, Generic[T], total=False):
    """The keywords of ``batch_process`` other than ``context``: their static types, and each
    one's meaning where an IDE shows it (``docs/reference/options.md`` is checked against
    these docstrings by ``tests/test_docs_reference.py``)."""

    concurrency: int | Adaptive
    """Most items in flight: a sliding window, the next item starts the moment a slot frees. Or
    ``Adaptive(...)`` to find the limit while running. Default: ``10``."""

    timeout: float | None
    """Seconds per attempt, covering the context's enter and exit. The attempt is cancelled; the
    outcome is ``"timeout"``. ``None``: no timeout. Default: ``None``."""

    item_budget: float | None
    """Seconds per item across all its attempts and the waits between them, from its first
    attempt's start: no attempt or backoff goes past it, a running attempt is cancelled at
    it, and the item fails ``"timeout"`` (its error's ``budget`` is true). ``None``: no budget.
    Default: ``None``."""

    key: Callable[[T], object] | None
    """Names items in logs, events and report tables; ``None``: ``#index``. Default: ``None``."""

    batch_size: int | None
    """Bounds read-ahead from the input (matters with ``cost=``); never a barrier. Default:
    ``None``."""

    fail_fast: bool
    """Stop at the first ``"error"`` or ``"timeout"``: cancel items in flight, skip the rest.
    Default: ``False``."""

    retry: Retry | None
    """A ``Retry`` policy; ``None``: one attempt per item. Default: ``None``."""

    rate_limit: RateLimit | AsyncLimiter | None
    """A ``RateLimit``, or any object used as ``async with limiter:`` (an ``AsyncLimiter``).
    Default: ``None``."""

    deadline: float | Deadline | None
    """Seconds from the call's start, or a ``Deadline``. At the deadline in-flight items are
    cancelled, the rest skipped, and the call returns its report. Default: ``None``."""

    max_failures: int | None
    """Stop once this many items failed. Default: ``None``."""

    max_failure_ratio: float | FailureRatio | None
    """Stop when more than this ratio failed, after a minimum sample (a float uses
    ``min_sample=10``; or a ``FailureRatio``). Default: ``None``."""

    cost: Callable[[T], float] | None
    """An estimated duration per item: among the read-ahead, the most expensive starts first. A
    ``cost`` that raises fails that item. Default: ``None``."""

    groups: Sequence[LimitGroup]
    """Limits per upstream: one ``LimitGroup(by=..., concurrency=..., rate_limit=...)`` per
    upstream an item touches. An item starts when all its groups have room and takes them
    together; among the next ``batch_size`` items read (default 1024, the read-ahead), the
    first whose groups have room starts, so a saturated group never holds a slot.
    ``concurrency=Adaptive(...)`` gives each group value its own adaptive limit; a weighted
    ``rate_limit=RateLimit(..., weight=...)`` takes each item's weight from its group's bucket.
    A group with ``name=`` and no ``by=`` is call-level: ``fn`` takes it around one call with
    ``async with batchkit.limit(name):`` (waiting there holds the item's slot). Default:
    ``()``."""

    observers: Sequence[Observer]
    """Plain callables receiving events (an ``async def`` one is refused: it would never run).
    Default: ``()``."""

    progress: bool
    """Show a progress bar on a terminal (silent when not a terminal). Default: ``False``."""

    name: str | None
    """The batch's name in events, logs and metrics. Default: ``None``."""

    backend: Backend | None
    """Where the items run: ``None`` is this process's event loop; a backend object (the internal
    ``Backend`` protocol) runs them elsewhere with the same options and report. Default:
    ``None``."""

    breaker: Breaker | None
    """A ``Breaker``: circuits that open after consecutive failures and skip their items
    (reason ``circuit_open``) until a probe succeeds, kept between runs in a state store.
    Default: ``None``."""

    journal: Journal | None
    """A ``Journal``: each item's final outcome recorded by its ``key=`` in a state store, so a
    later call with the same journal resumes (items with a recorded success are not run again;
    their ``Success.resumed`` is ``True``). Needs ``key=``, unique per item. Default: ``None``."""
    hedge: Hedge | None
    """A ``Hedge``: an attempt running longer than ``after`` (seconds, or a quantile of this
    run's successful attempt durations such as ``"p95"``) gets one more attempt beside it,
    within ``budget`` (a share of the items started); the first success wins, the other is
    cancelled. Needs ``key=`` (the idempotency key: work safe to repeat). Default:
    ``None``."""


class StreamOptions(RunOptions[T], total=False):
    """``stream`` takes two more: ``ordered`` and ``buffer``."""

    ordered: bool
    """``stream`` only (``batch_process`` refuses it): yield outcomes in input order instead of as
    they complete. Default: ``False``."""

    buffer: int | None
    """``stream`` only (``batch_process`` refuses it): how many finished outcomes may wait for the
    consumer (``None``: ``concurrency``, or ``8 * concurrency`` when ``ordered=True``). At most
    ``concurrency + buffer`` items are pulled and not yet consumed. Default: ``None``."""


# -- one validator per option: check, normalise, say how to fix ---------------------------
def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds or None, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if math.isnan(seconds) or math.isinf(seconds) or seconds <= 0:
        raise InvalidArgument(
            f"{name} must be a finite number of seconds > 0, got {value!r}\n"
            f"HINT: pass {name}=None for no limit"
        )
    return seconds


def _positive_int(name: str, value: object, hint: str = "") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{name} must be an int >= 1 or None, got {value!r}{hint}")
    return value


def _callable(name: str, value: object, hint: str) -> Any:
    if value is not None and not callable(value):
        raise InvalidArgument(f"{name} must be {hint}, got {value!r}")
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be a bool, got {value!r}\nHINT: {name}=True")
    return value


def check_concurrency(value: object) -> int | Adaptive:
    if isinstance(value, Adaptive):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(
            f"concurrency must be an int >= 1 or batchkit.Adaptive(...), got {value!r}"
        )
    if value < 1:
        raise InvalidArgument(f"concurrency must be >= 1, got {value}\nHINT: concurrency=1 runs "
                              "one item at a time")  # fmt: skip
    return value


def check_timeout(value: object) -> float | None:
    return None if value is None else _seconds("timeout", value)


def check_item_budget(value: object) -> float | None:
    return None if value is None else _seconds("item_budget", value)


def check_context(value: object) -> Any:
    return _callable(
        "context",
        value,
        "a zero-argument callable returning an async context manager\nHINT: pass the "
        "factory itself (async_sessionmaker(engine)), not a session",
    )


def check_key(value: object) -> Any:
    return _callable("key", value, "a callable taking an item")


def check_batch_size(value: object) -> int | None:
    return _positive_int("batch_size", value)


def check_fail_fast(value: object) -> bool:
    return _bool("fail_fast", value)


def check_retry(value: object) -> Retry | None:
    if value is not None and not isinstance(value, Retry):
        raise InvalidArgument(
            f"retry must be batchkit.Retry(...) or None, got {value!r}\n"
            "HINT: retry=Retry(attempts=3)"
        )
    return value


def check_rate_limit(value: object) -> RateLimit | AsyncLimiter | None:
    if value is None or isinstance(value, RateLimit | AsyncLimiter):
        return value
    raise InvalidArgument(
        f"rate_limit must be batchkit.RateLimit(...) or an object used as "
        f"`async with limiter:` (e.g. aiolimiter.AsyncLimiter), got {value!r}"
    )


def check_deadline(value: object) -> Deadline | None:
    if value is None or isinstance(value, Deadline):
        return value
    return Deadline(seconds=_seconds("deadline", value))


def check_max_failures(value: object) -> int | None:
    return _positive_int("max_failures", value, "\nHINT: max_failures=1 is fail_fast=True")


def check_max_failure_ratio(value: object) -> FailureRatio | None:
    if value is None or isinstance(value, FailureRatio):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not 0 <= value < 1:
            raise InvalidArgument(f"max_failure_ratio must be in [0, 1), got {value!r}")
        return FailureRatio(ratio=float(value))
    raise InvalidArgument(
        f"max_failure_ratio must be a float in [0, 1) or FailureRatio(...), got {value!r}"
    )


def check_cost(value: object) -> Any:
    return _callable("cost", value, "a callable taking an item")


def check_groups(value: object) -> tuple[LimitGroup, ...]:
    if isinstance(value, LimitGroup):
        raise InvalidArgument(
            "groups must be a sequence of LimitGroup, got one LimitGroup\n"
            "HINT: groups=[LimitGroup(...)]"
        )
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidArgument(f"groups must be a sequence of batchkit.LimitGroup, got {value!r}")
    for g in value:
        if not isinstance(g, LimitGroup):
            raise InvalidArgument(
                f"every entry of groups must be batchkit.LimitGroup(...), got {g!r}\n"
                "HINT: groups=[LimitGroup(by=lambda item: item.host, concurrency=4)]"
            )
    names = [g.name for g in value if g.name is not None]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidArgument(
            f"every LimitGroup name in groups must be unique, got {', '.join(map(repr, twice))} "
            "more than once\nHINT: one LimitGroup per upstream, each with its own name="
        )
    return tuple(value)


def check_observers(value: object) -> tuple[Observer, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidArgument(f"observers must be a sequence of callables, got {value!r}")
    for o in value:
        if not callable(o):
            raise InvalidArgument(f"every observer must be callable with an event, got {o!r}")
        if is_async_callable(o):
            raise InvalidArgument(
                f"observer {getattr(o, '__qualname__', o)!r} is an async function: observers "
                "are called inline on the event loop, so its coroutines would never run\n"
                "HINT: use a plain function; hand slow work to a queue or a task you own"
            )
    return tuple(value)


def check_progress(value: object) -> bool:
    return _bool("progress", value)


def check_name(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"name must be a str or None, got {value!r}")
    return value


def check_ordered(value: object) -> bool:
    return _bool("ordered", value)


def check_buffer(value: object) -> int | None:
    return _positive_int("buffer", value)


def check_backend(value: object) -> Any:
    if value is not None and not (
        callable(getattr(value, "run_batch", None))
        and callable(getattr(value, "open_stream", None))
    ):
        raise InvalidArgument(
            f"backend must be None (this process) or a backend object, got {value!r}\n"
            "HINT: backend=batchkit.dask.DaskBackend(client)"
        )
    return value


def check_journal(value: object) -> Journal | None:
    if value is not None and not isinstance(value, Journal):
        raise InvalidArgument(
            f"journal must be batchkit.Journal(...) or None, got {value!r}\n"
            "HINT: journal=Journal(MemoryStateStore(), 'nightly'), with key="
        )
    return value


def check_breaker(value: object) -> Breaker | None:
    if value is not None and not isinstance(value, Breaker):
        raise InvalidArgument(
            f"breaker must be batchkit.Breaker(...) or None, got {value!r}\n"
            "HINT: breaker=Breaker(MemoryStateStore(), name='prices-api')"
        )
    return value


def check_hedge(value: object) -> Hedge | None:
    if value is not None and not isinstance(value, Hedge):
        raise InvalidArgument(
            f"hedge must be batchkit.Hedge(...) or None, got {value!r}\n"
            "HINT: hedge=Hedge(after='p95', budget=0.10)"
        )
    return value


VALIDATORS: Final[dict[str, Callable[[object], object]]] = {
    "concurrency": check_concurrency,
    "timeout": check_timeout,
    "item_budget": check_item_budget,
    "context": check_context,
    "key": check_key,
    "batch_size": check_batch_size,
    "fail_fast": check_fail_fast,
    "retry": check_retry,
    "rate_limit": check_rate_limit,
    "deadline": check_deadline,
    "max_failures": check_max_failures,
    "max_failure_ratio": check_max_failure_ratio,
    "cost": check_cost,
    "groups": check_groups,
    "observers": check_observers,
    "progress": check_progress,
    "name": check_name,
    "ordered": check_ordered,
    "buffer": check_buffer,
    "backend": check_backend,
    "breaker": check_breaker,
    "journal": check_journal,
    "hedge": check_hedge,
}


def validate(options: Options) -> dict[str, Any]:
    """Every option checked and normalised, by name; raises :class:`InvalidArgument`."""
    return {f.name: VALIDATORS[f.name](getattr(options, f.name)) for f in fields(options)}


# -- items and fn ----------------------------------------------------------------------------
def check_items(items: object) -> None:
    if isinstance(items, str | bytes):
        raise InvalidArgument(
            "items is a string; batchkit would run fn once per character\n"
            "HINT: pass a list of items, e.g. [text]"
        )
    if not (hasattr(items, "__iter__") or hasattr(items, "__aiter__")):
        raise InvalidArgument(
            f"items must be an iterable or an async iterable, got {type(items).__name__}"
        )


def _unwrap(fn: object) -> object:
    while True:
        inner = getattr(fn, "func", None)  # functools.partial
        if inner is None or inner is fn:
            return fn
        fn = inner


def is_async_callable(fn: object) -> bool:
    fn = _unwrap(fn)
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - callable objects
    return call is not None and inspect.iscoroutinefunction(call)


def check_fn(fn: object, with_context: bool) -> None:
    if not callable(fn):
        raise InvalidArgument(f"fn must be callable (an async function), got {fn!r}")
    inner = _unwrap(fn)
    if inspect.isasyncgenfunction(inner) or inspect.isasyncgenfunction(
        getattr(type(inner), "__call__", None)  # noqa: B004
    ):
        raise InvalidArgument(
            f"fn {getattr(fn, '__qualname__', fn)!r} is an async generator function: "
            "calling it returns a generator, not a result\n"
            "HINT: use `return` instead of `yield`, or collect the values into a list"
        )
    n = 2 if with_context else 1
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


# -- the plan ------------------------------------------------------------------------------
