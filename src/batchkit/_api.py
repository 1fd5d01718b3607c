"""The front door: ``batch_process()`` and ``stream()``. Validates, wires, nothing else.

Every keyword is declared once (:mod:`batchkit._model.options`); the overloads only vary what
changes the types: ``fn`` with or without a context, async or sync.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, Unpack, overload

from ._model.options import Options, RunOptions, StreamOptions, check_backend

if TYPE_CHECKING:
    from ._model.report import BatchReport
    from ._model.seams import Stream

__all__ = ["ContextFactory", "batch_process", "stream"]

T = TypeVar("T")
R = TypeVar("R")
C = TypeVar("C")

ContextFactory: TypeAlias = Callable[[], AbstractAsyncContextManager[C]]
"""A zero-argument callable returning an async context manager, e.g. ``async_sessionmaker``."""

Items: TypeAlias = Iterable[T] | AsyncIterable[T]


# Async functions are listed first so ``R`` is what they return, not the awaitable.
@overload
async def batch_process(
    items: Items[T],
    fn: Callable[[T], Awaitable[R]],
    *,
    context: None = ...,
    **options: Unpack[RunOptions[T]],
) -> BatchReport[T, R]: ...
@overload
async def batch_process(
    items: Items[T],
    fn: Callable[[T, C], Awaitable[R]],
    *,
    context: ContextFactory[C],
    **options: Unpack[RunOptions[T]],
) -> BatchReport[T, R]: ...
@overload
async def batch_process(
    items: Items[T],
    fn: Callable[[T], R],
    *,
    context: None = ...,
    **options: Unpack[RunOptions[T]],
) -> BatchReport[T, R]: ...
@overload
async def batch_process(
    items: Items[T],
    fn: Callable[[T, C], R],
    *,
    context: ContextFactory[C],
    **options: Unpack[RunOptions[T]],
) -> BatchReport[T, R]: ...
async def batch_process(
    items: Items[Any],
    fn: Callable[..., Any],
    *,
    context: ContextFactory[Any] | None = None,
    **options: Unpack[RunOptions[Any]],
) -> BatchReport[Any, Any]:
    """Apply ``fn`` to every item, at most ``concurrency`` at once, and report every outcome.

    A sliding window: the next item starts the moment any slot frees. Each item ends in
    exactly one :class:`Success` or :class:`Failure`; the report lists them in input order.
    See the docs for every keyword; bad arguments raise :class:`InvalidArgument` at once.
    """
    stream_only = sorted(set(options) & _STREAM_ONLY)
    if stream_only:
        from ._model.errors import InvalidArgument

        raise InvalidArgument(
            f"batch_process() does not take {', '.join(stream_only)}: they are options of "
            "stream()\nHINT: batch_process() keeps every outcome in input order; use "
            "stream(..., ordered=True) to consume outcomes as they complete"
        )
    opts = _options(context, options)
    if opts.backend is not None:
        return await opts.backend.run_batch(items, fn, opts)
    # The engine is imported at the first call, not by `import batchkit` (start-up time).
    from ._engine.engine import Engine
    from ._engine.plan import make_plan

    engine: Engine[Any, Any] = Engine(make_plan(items, fn, opts), items)
    return await engine.run()


_STREAM_ONLY: frozenset[str] = frozenset(StreamOptions.__annotations__) - frozenset(
    RunOptions.__annotations__
)


def _options(context: object, options: Any) -> Options:
    from ._model.errors import InvalidArgument

    try:
        opts = Options(context=context, **options)  # type: ignore[arg-type]
    except TypeError as e:
        raise InvalidArgument(f"{e}\nHINT: see the keyword arguments in the reference") from None
    check_backend(opts.backend)  # before dispatching to it; the backend validates the rest
    return opts


@overload
def stream(
    items: Items[T],
    fn: Callable[[T], Awaitable[R]],
    *,
    context: None = ...,
    **options: Unpack[StreamOptions[T]],
) -> Stream[T, R]: ...
@overload
def stream(
    items: Items[T],
    fn: Callable[[T, C], Awaitable[R]],
    *,
    context: ContextFactory[C],
    **options: Unpack[StreamOptions[T]],
) -> Stream[T, R]: ...
@overload
def stream(
    items: Items[T],
    fn: Callable[[T], R],
    *,
    context: None = ...,
    **options: Unpack[StreamOptions[T]],
) -> Stream[T, R]: ...
@overload
def stream(
    items: Items[T],
    fn: Callable[[T, C], R],
    *,
    context: ContextFactory[C],
    **options: Unpack[StreamOptions[T]],
) -> Stream[T, R]: ...
def stream(
    items: Items[Any],
    fn: Callable[..., Any],
    *,
    context: ContextFactory[Any] | None = None,
    **options: Unpack[StreamOptions[Any]],
) -> Stream[Any, Any]:
    """Like :func:`batch_process`, but yield outcomes as they complete::

        async with stream(items, fn, concurrency=10) as outcomes:
            async for outcome in outcomes:
                ...

    ``ordered=True`` yields in input order through a reorder buffer. At most
    ``concurrency + buffer`` items are ever pulled from the input and not yet consumed,
    whatever the input's length: a slow head item or a slow consumer pauses new starts rather
    than growing memory. The default ``buffer`` is ``concurrency``, and ``8 * concurrency``
    when ordered: room for the other slots to keep working while one slow item holds the head
    (with less, an ordered stream falls to ~0.6-0.7 of the unordered throughput on
    heavy-tailed latencies).
    """
    opts = _options(context, options)
    if opts.backend is not None:
        return opts.backend.open_stream(items, fn, opts)
    from ._engine.plan import make_plan
    from ._engine.stream import LocalStream

    return LocalStream(make_plan(items, fn, opts), items)
