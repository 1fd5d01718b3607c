"""One limit group's state, and the math on it that needs no event loop (see ``groups.py``)."""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, final

from ..._model.policies import Adaptive
from .adaptive import is_overload
from .adaptive_math import AimdState, is_stuck, on_overload, on_success
from .rate import checked_weight
from .rate_math import TokenBucket, reserve_weighted

if TYPE_CHECKING:
    from collections.abc import Hashable

    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.policies import LimitGroup, RateLimit

__all__ = [
    "GroupState",
    "Need",
    "forget_at",
    "forget_idle",
    "forgettable",
    "fresh_limit",
    "observe",
    "reserve",
    "resize",
    "unreserve",
    "weigh",
]


@final
class GroupState:
    """One group's state: the places held now, its limit now (``inf``: none), its bucket (a
    ``rate_limit``), and with ``Adaptive`` its AIMD state and its attempts' starts."""

    __slots__ = ("adaptive", "aimd", "bucket", "forget_at", "held", "limit", "reserved", "starts")

    def __init__(self, policy: LimitGroup, now: float) -> None:
        self.held = 0
        self.forget_at = math.inf
        """When it may be forgotten, idle since its last release (see :func:`forget_at`);
        ``inf`` while in use, or when it must be kept (:func:`forgettable`)."""
        rate = policy.rate_limit
        self.bucket = TokenBucket.of(rate, now) if rate is not None else None
        self.reserved: Job | None = None
        """The item the weighted bucket's tokens are kept for (the job itself, not its index:
        on a Dask worker, the jobs of several chunk engines share these states)."""
        self.limit = fresh_limit(policy)
        concurrency = policy.concurrency
        self.adaptive = concurrency if isinstance(concurrency, Adaptive) else None
        self.aimd: AimdState | None = None
        self.starts: deque[tuple[float, Slot, int]] | None = None
        if self.adaptive is not None:
            self.aimd = AimdState(limit=self.limit)
            self.starts = deque()


@final
class Need:
    """What an item needs: its key in each group (``None``: not in it), and its weight in
    each group (``None`` when no group's rate limit is weighted)."""

    __slots__ = ("keys", "weights")

    def __init__(self, keys: tuple[Hashable, ...], weights: tuple[float, ...] | None) -> None:
        self.keys = keys
        self.weights = weights


def fresh_limit(policy: LimitGroup) -> float:
    """A new group's concurrency limit (``inf``: none; an adaptive one starts at
    ``initial``)."""
    concurrency = policy.concurrency
    if isinstance(concurrency, Adaptive):
        return float(concurrency.initial)
    return math.inf if concurrency is None else float(concurrency)


def reserve(states: list[dict[Hashable, GroupState]], need: Need, job: Job, now: float) -> None:
    """Keep the weighted buckets that ``job`` waits for (and only those) for it."""
    assert need.weights is not None
    for by_key, key, weight in zip(states, need.keys, need.weights, strict=True):
        state = by_key.get(key)
        bucket = state.bucket if state is not None else None
        if state is None or bucket is None or state.reserved is not None:
            continue
        if reserve_weighted(bucket.tat, now, bucket.interval, bucket.tolerance, weight)[1] > 0:
            state.reserved = job


def unreserve(states: list[dict[Hashable, GroupState]], need: Need, job: Job) -> bool:
    """Drop what ``job`` reserved; whether it had anything."""
    dropped = False
    for by_key, key in zip(states, need.keys, strict=True):
        state = by_key.get(key)
        if state is not None and state.reserved is job:
            state.reserved = None
            dropped = True
    return dropped


def resize(states: list[dict[Hashable, GroupState]], policies: tuple[LimitGroup, ...]) -> None:
    """The states in memory take their groups' new limits (a Dask worker's share grew): a
    fixed concurrency at once, an adaptive one within its new ``max`` (its limit now stays),
    the bucket's rate and burst (its debt kept: see :meth:`TokenBucket.set_rate`)."""
    for policy, by_key in zip(policies, states, strict=True):
        concurrency, rate = policy.concurrency, policy.rate_limit
        for state in by_key.values():
            if isinstance(concurrency, Adaptive):
                state.adaptive = concurrency
            elif concurrency is not None:
                state.limit = float(concurrency)
            if rate is not None and state.bucket is not None:
                state.bucket.set_rate(rate.per_second, rate.burst)


def forget_idle(
    idle: deque[tuple[float, int, Hashable]], states: list[dict[Hashable, GroupState]], now: float
) -> None:
    """Forget groups idle since their bucket refilled (checked in the order they went idle;
    one taken again meanwhile is skipped, and checked again when it goes idle)."""
    while idle and idle[0][0] <= now:
        _, i, key = idle.popleft()
        state = states[i].get(key)
        if state is not None and state.held == 0 and state.forget_at <= now:
            del states[i][key]


def observe(state: GroupState, result: AttemptResult) -> None:
    """An attempt of this group ended: move its limit as ``AdaptiveMeter`` moves the run's."""
    aimd, policy = state.aimd, state.adaptive
    assert aimd is not None
    assert policy is not None
    now = result.ended
    if result.kind == "success":
        aimd, overload = on_success(aimd, policy, now - result.started, result.started, now)
        if overload is not None:
            aimd = on_overload(aimd, policy, result.started, now)
        aimd = _check_stuck(state, aimd, policy, now)
    elif result.kind == "timeout" or (
        result.kind == "error"
        and isinstance(result.error, Exception)
        and is_overload(policy, result.error)
    ):
        aimd = on_overload(aimd, policy, result.started, now)
    state.aimd = aimd
    state.limit = int(aimd.limit)


def _check_stuck(state: GroupState, aimd: AimdState, policy: Adaptive, now: float) -> AimdState:
    """The group's oldest attempt still running is the first sign of its overload (as
    ``AdaptiveMeter._check_stuck``)."""
    starts = state.starts
    assert starts is not None
    while starts:
        started, slot, gen = starts[0]
        if slot.gen != gen:
            starts.popleft()
            continue
        if is_stuck(aimd, policy, started, now):
            starts.popleft()
            aimd = on_overload(aimd, policy, started, now)
        break
    if len(starts) > 2 * policy.max + 64:
        state.starts = deque(s for s in starts if s[1].gen == s[2])
    return aimd


def forgettable(state: GroupState) -> bool:
    """Whether forgetting this idle state keeps its limits: not if it is an adaptive limit
    that was cut (a fresh one would start at ``initial`` in slow start, maybe looser)."""
    aimd = state.aimd
    return aimd is None or aimd.ceiling is None


def weigh(rate: RateLimit | None, item: object) -> float:
    """The item's weight in a group's bucket (1 without ``weight=``); ``InvalidArgument``
    (that item's error, before any attempt) if it is no number > 0 or above the burst."""
    if rate is None or rate.weight is None:
        return 1.0
    return checked_weight(rate.weight(item), rate.burst, "LimitGroup's RateLimit")


def forget_at(state: GroupState, now: float) -> float:
    """When a state idle from ``now`` may be forgotten: once its bucket is full again (a
    fresh one is the same from then on) and, for an adaptive limit, a round trip (its latency
    baseline) later, so that a group idle only between two of its items keeps its limit."""
    at = -math.inf if state.bucket is None else state.bucket.tat
    aimd = state.aimd
    if aimd is not None and aimd.baseline is not None:
        at = max(at, now + aimd.baseline)
    return at
