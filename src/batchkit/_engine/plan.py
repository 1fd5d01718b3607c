"""The :class:`Plan` a run follows: valid options, normalised, with what the engine derives
from them (slots, window, read-ahead). :func:`make_plan` is the one place that builds one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._model.errors import InvalidArgument
from .._model.options import (
    DEFAULT_COST_READ_AHEAD,
    DEFAULT_GRACE,
    ORDERED_BUFFER_PER_SLOT,
    Options,
    check_fn,
    check_items,
    is_async_callable,
    validate,
)
from .._model.policies import (
    Adaptive,
    AsyncLimiter,
    Deadline,
    FailureRatio,
    LimitGroup,
    RateLimit,
    Retry,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractAsyncContextManager

    from .._model.events import Observer
    from .._model.journal import Journal
    from .._model.policies import Breaker, Hedge
    from .._model.seams import AttemptHook

__all__ = ["Plan", "make_plan"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Validated, normalised arguments of one run: what the engine reads."""

    fn: Callable[..., Any]
    fn_is_async: bool
    slots: int
    adaptive: Adaptive | None
    timeout: float | None
    context: Callable[[], AbstractAsyncContextManager[Any]] | None
    key: Callable[[Any], object] | None
    read_ahead: int
    cost: Callable[[Any], float] | None
    retry: Retry | None
    rate_limit: RateLimit | None
    limiter: AsyncLimiter | None
    deadline_seconds: float | None
    deadline_at: float | None
    fit_timeout: bool
    grace: float
    fail_fast: bool
    max_failures: int | None
    max_failure_ratio: FailureRatio | None
    observers: tuple[Observer, ...]
    name: str | None
    ordered: bool = False
    item_budget: float | None = None
    groups: tuple[LimitGroup, ...] = ()
    """The item-level groups (with ``by``), taken at admission."""
    call_groups: tuple[LimitGroup, ...] = ()
    """All the groups, when some are call-level (``batchkit.limit(name)`` in ``fn``)."""
    window: int = 0
    """For a stream: how many items may be pulled and not yet consumed."""
    attempt_hooks: tuple[AttemptHook, ...] = ()
    breaker: Breaker | None = None
    """Observers that also hook into every attempt (``batchkit.otel.OpenTelemetry``)."""
    journal: Journal | None = None
    keys_checked: bool = False
    """With ``journal=``: the input's keys were checked unique before the run (a sequence)."""
    hedge: Hedge | None = None


def _check_timeout_fits(timeout: float | None, deadline: Deadline | None) -> None:
    if (
        deadline is not None
        and deadline.fit_timeout
        and timeout is not None
        and deadline.seconds is not None
        and timeout > deadline.seconds
    ):
        raise InvalidArgument(
            f"timeout ({timeout:g} s) is longer than the deadline ({deadline.seconds:g} s) "
            "with fit_timeout=True: no item could ever start\nHINT: lower timeout, raise the "
            "deadline, or drop fit_timeout=True"
        )


def _check_journal(journal: Journal | None, key: object, context: object) -> None:
    if journal is None:
        return
    if key is None:
        raise InvalidArgument(
            "journal= needs key=: the journal records each item's outcome by its key\n"
            "HINT: key=lambda item: item.id (a value unique per item, stable between calls)"
        )
    if journal.mode == "transactional" and context is None:
        raise InvalidArgument(
            "Journal(mode='transactional') needs context=: a success's row is written in the "
            "item's own session\nHINT: context=batchkit.sqlalchemy.sessions(async_sessionmaker("
            "engine)), or Journal(mode='batched')"
        )


def _check_hedge_is_safe(hedge: Hedge | None, key: object) -> None:
    """A hedge runs an item twice at once: only work marked safe to repeat, by its key."""
    if hedge is not None and key is None:
        raise InvalidArgument(
            "hedge= runs a slow item's attempt twice at once, so it needs key=: the item's "
            "idempotency key, which fn sends upstream (current_attempt().idempotency_key) "
            "so a repeated write happens once\nHINT: pass key=lambda item: item.id, and "
            "make fn idempotent by that key"
        )


def make_plan(items: object, fn: object, options: Options) -> Plan:
    """Check every argument before anything runs; messages name the argument and the fix."""
    check_items(items)
    v = validate(options)
    check_fn(fn, v["context"] is not None)
    concurrency, deadline = v["concurrency"], v["deadline"]
    _check_timeout_fits(v["timeout"], deadline)
    _check_journal(v["journal"], v["key"], v["context"])
    keys_checked = False
    if v["journal"] is not None:
        from .._model.journal import check_unique_keys

        keys_checked = check_unique_keys(items, v["key"])  # before any work
    _check_hedge_is_safe(v["hedge"], v["key"])
    adaptive = concurrency if isinstance(concurrency, Adaptive) else None
    slots = concurrency.max if isinstance(concurrency, Adaptive) else concurrency
    observers = list(v["observers"])
    if v["progress"]:
        from .._observe.progress import ProgressObserver

        observers.append(ProgressObserver())
    rate_limit = v["rate_limit"]
    read_ahead = v["batch_size"] or DEFAULT_COST_READ_AHEAD
    extra = v["buffer"]
    default = ORDERED_BUFFER_PER_SLOT * slots if v["ordered"] else slots
    window = slots + (extra if extra is not None else default)
    groups = tuple(g for g in v["groups"] if not g.call_level)
    if v["cost"] is not None or groups:
        window += read_ahead  # cost ordering and groups pick among the read-ahead
    return Plan(
        fn=fn,  # type: ignore[arg-type]
        fn_is_async=is_async_callable(fn),
        slots=slots,
        adaptive=adaptive,
        timeout=v["timeout"],
        context=v["context"],
        key=v["key"],
        read_ahead=read_ahead,
        cost=v["cost"],
        retry=v["retry"],
        rate_limit=rate_limit if isinstance(rate_limit, RateLimit) else None,
        limiter=rate_limit if isinstance(rate_limit, AsyncLimiter) else None,
        deadline_seconds=deadline.seconds if deadline else None,
        deadline_at=deadline.at if deadline else None,
        fit_timeout=deadline.fit_timeout if deadline else False,
        grace=deadline.grace if deadline else DEFAULT_GRACE,
        fail_fast=v["fail_fast"],
        max_failures=v["max_failures"],
        max_failure_ratio=v["max_failure_ratio"],
        observers=tuple(observers),
        name=v["name"],
        ordered=v["ordered"],
        groups=groups,
        call_groups=v["groups"] if len(groups) < len(v["groups"]) else (),
        item_budget=v["item_budget"],
        window=window,
        attempt_hooks=tuple(o for o in observers if hasattr(o, "start_run")),
        breaker=v["breaker"],
        journal=v["journal"],
        keys_checked=keys_checked,
        hedge=v["hedge"],
    )
