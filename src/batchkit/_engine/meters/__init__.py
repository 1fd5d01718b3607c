"""The meters: one file per policy, its math beside it; :func:`open_meters` picks a run's."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from ..plan import Plan
    from .adaptive import AdaptiveMeter
    from .base import Meter
    from .deadline import DeadlineMeter

__all__ = ["Meters", "open_meters"]


Meters: TypeAlias = "tuple[tuple[Meter, ...], AdaptiveMeter | None, DeadlineMeter | None]"
"""A run's meters in the order the runner asks them, and the two the engine reads (a plain
tuple: a NamedTuple class would cost start-up time)."""


def open_meters(
    plan: Plan,
    loop: asyncio.AbstractEventLoop,
    deadline_at: float | None,
    on_limit: Callable[[int, int, str, float], None],
) -> Meters:
    """In this order: a place under the adaptive limit, then a rate-limit turn (waited for
    with the place held, so turns are not spent by attempts still queued), then the deadline
    check (after the waits), then the external limiter (it holds a resource). Each meter's
    module is imported when its policy is given (start-up time)."""
    meters: list[Meter] = []
    adaptive = deadline = None
    if plan.adaptive is not None:
        from .adaptive import AdaptiveMeter

        adaptive = AdaptiveMeter(plan.adaptive, loop, on_limit)
        meters.append(adaptive)
    if deadline_at is not None:
        from .deadline import DeadlineMeter

        deadline = DeadlineMeter(
            deadline_at, loop, timeout=plan.timeout, fit_timeout=plan.fit_timeout, cost=plan.cost
        )
    if plan.rate_limit is not None:
        if plan.rate_limit.weight is None:
            from .rate import RateMeter

            meters.append(RateMeter(plan.rate_limit, loop))
        else:
            from .rate import WeightedRateMeter

            meters.append(WeightedRateMeter(plan.rate_limit, loop, deadline))
    if deadline is not None:
        meters.append(deadline)
    if plan.limiter is not None:
        from .limiter import LimiterMeter

        meters.append(LimiterMeter(plan.limiter))
    return tuple(meters), adaptive, deadline
