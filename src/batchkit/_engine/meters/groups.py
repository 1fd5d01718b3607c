"""``groups=``: limits per upstream, taken all together or not at all.

Each :class:`~batchkit.LimitGroup` names, per item, the group it belongs to (``by(item)``,
once per item); each group named has its own state — attempts holding a place, and its token
bucket when it has a ``rate_limit`` — created lazily the first time an item names it.

An item takes a place in every one of its groups at once, or in none (:meth:`Groups.try_take`):
no partial holds, so two items cannot each hold half of what the other needs. The window's
workers pick, among the read-ahead, the first item whose groups all have room
(``Intake.pull(pick=...)``), so an item whose group is full never holds a worker: no
head-of-line blocking within the read-ahead. A retry that holds its slot (``hold_slot=True``)
waits in :meth:`Groups.wait_task_can_start` instead, as the user asked it to hold the slot.

Scans stay cheap when the read-ahead is full of waiting items: a refusal stands until the
:meth:`Groups.epoch` changes (a place given back, or a bucket found empty refilled; taking
places only uses room up), so a scan resumes after the items already refused and a group found
full is skipped at a set lookup's cost (20,000 items over 4 saturated groups, 64 workers: 1.7 s
of CPU instead of 160 s for a full scan per waking worker).

The places are given back when the attempt ends (``notify_task_finished``, whatever its
result, also when a later meter refused it). A group's state is forgotten once no attempt
holds a place and its bucket has refilled: a fresh state is then the same as the old one, so
forgetting never loosens a limit, and memory is bounded by the groups active (in the last
refill time), not by every group ever seen.

``concurrency=Adaptive(...)`` gives each group its own AIMD limit (``adaptive_math``), moved
only by the attempts of that group's items: the limit starts at ``initial`` when the group's
state is created, a place is taken only under the group's limit now, and an attempt that ends
in an overload signal (a timeout, an ``overload_on`` error, a slow success, an attempt stuck
past ``latency_factor`` times the baseline) cuts the limit of each group it holds a place in.
A group whose limit was never cut is forgotten on the rule above, once idle for a round trip
too (its latency baseline: a group idle only between two of its items keeps its limit); it
comes back at ``initial`` in slow start, as it began: never looser. A group whose limit was
cut keeps its adaptive state (its limit, latency baseline and ceiling, ~200 bytes) for the
rest of the run even when idle: starting it again at ``initial`` could loosen a limit its
upstream imposed.
Memory is then bounded by the groups active plus the groups cut in this run.

``rate_limit=RateLimit(weight=...)``: an attempt takes the item's weight from the group's
bucket (weighed once per item, when its keys are). A weighted bucket that cannot grant an
item now is reserved for it (the first such item of the group in pick order) while the
bucket is all it waits for: lighter items of that group do not take its tokens meanwhile
(they would starve it), and the reservation is dropped as soon as the item waits for a full
group instead (no partial holds). Under a deadline, an item whose weight its bucket grants
only after the deadline is skipped (``out_of_time``), as with the call's weighted rate.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, final

from ..._model.policies import Adaptive
from ..watchdog import SLACK
from .group_state import (
    GroupState,
    Need,
    forget_at,
    forget_idle,
    forgettable,
    fresh_limit,
    observe,
    reserve,
    resize,
    unreserve,
    weigh,
)
from .rate_math import reserve_weighted

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import StopReason
    from ..._model.policies import LimitGroup
    from .deadline import DeadlineMeter

__all__ = ["SHARED", "Groups"]

SHARED: ContextVar[Groups | None] = ContextVar("batchkit_shared_groups", default=None)
"""A private seam: set while a Dask worker opens a chunk's engine, that engine uses these
groups (the worker's share, shared by the run's chunks there) instead of its own."""


@final
class Groups:
    """The limit groups of one run, as a meter (the first the runner asks)."""

    __slots__ = (
        "_adaptive",
        "_changed",
        "_deadline",
        "_engines",
        "_epoch",
        "_full",
        "_idle",
        "_late",
        "_loop",
        "_policies",
        "_refill_at",
        "_states",
        "_weighted",
        "paced",
    )

    def __init__(
        self,
        policies: tuple[LimitGroup, ...],
        loop: asyncio.AbstractEventLoop,
        deadline: DeadlineMeter | None = None,
    ) -> None:
        self._policies = policies
        self._loop = loop
        self._deadline = deadline
        self._states: list[dict[Hashable, GroupState]] = [{} for _ in policies]
        self._idle: deque[tuple[float, int, Hashable]] = deque()
        """Groups left idle with a bucket still refilling: (refilled at, group, key)."""
        self._changed: asyncio.Future[None] | None = None
        self._full: set[tuple[int, Hashable]] = set()
        """Groups found without room in this epoch: a scan of the read-ahead skips their
        items at a set lookup's cost."""
        self._epoch = 0
        self._refill_at = math.inf
        """The soonest a bucket found empty has a token again (a new epoch then)."""
        self._late: set[Job] = set()
        """Items whose weight a bucket grants only after the deadline."""
        self.paced = any(g.rate_limit is not None for g in policies)
        """Whether a group has a rate limit (a bucket's refill is then a time to wake at)."""
        self._weighted = any(g.rate_limit is not None and g.rate_limit.weight for g in policies)
        self._adaptive = any(isinstance(g.concurrency, Adaptive) for g in policies)
        self._engines: dict[object, tuple[Callable[[], None], DeadlineMeter | None]] = {}

    def attach(self, run: object, wake: Callable[[], None], deadline: DeadlineMeter | None) -> None:
        """An engine (its ``RunInfo``) uses these groups: ``wake`` wakes its workers when room
        appears; its deadline meter hears of its items skipped by weight. Locally one engine;
        on a Dask worker, the run's chunk engines there (``_dask/groups.py``)."""
        self._engines[run] = (wake, deadline)
        if self._deadline is None:
            self._deadline = deadline

    def detach(self, run: object) -> None:
        """The engine ended: it is woken no more."""
        self._engines.pop(run, None)

    def resize(self, policies: tuple[LimitGroup, ...]) -> None:
        """New limits for the same groups (a Dask worker's share grew), for the states in
        memory too."""
        self._policies = policies
        resize(self._states, policies)
        self._room_changed()

    # -- what an item needs ----------------------------------------------------------
    def keys(self, job: Job) -> Need | BaseException:
        """The item's keys (and weights) in each group, computed once; the error if ``by``
        or a ``weight`` raised (or returned something that cannot be a key or a weight)."""
        need: Need | BaseException | None = getattr(job, "groups", None)
        if need is None:
            try:
                keys = tuple(_hashable(g.by(job.item)) if g.by else None for g in self._policies)
                weights = None
                if self._weighted:
                    weights = tuple(
                        weigh(g.rate_limit, job.item) if key is not None else 1.0
                        for g, key in zip(self._policies, keys, strict=True)
                    )
                need = Need(keys, weights)
            except Exception as e:
                need = e
            job.groups = need
        return need

    def try_take(self, job: Job) -> bool:
        """Take a place in every group of ``job`` if all have room now (True), else take
        nothing. An item whose ``by`` raised is let through: its attempt fails with that
        error (in :meth:`wait_task_can_start`); so is one whose weight is granted only after
        the deadline: it is skipped there."""
        if getattr(job, "holds", False):
            return True
        need = self.keys(job)
        if isinstance(need, BaseException):
            return True
        full = self._full
        for i, key in enumerate(need.keys):
            if (i, key) in full:
                self._unreserve(job, need)
                return False
        now = self._loop.time()
        wait = self.wait_for(need, now, job)
        if wait > 0.0:
            if math.isinf(wait):
                self._unreserve(job, need)
            elif need.weights is not None:
                deadline = self._deadline
                if deadline is not None and now + wait > deadline.deadline_at + SLACK:
                    self._unreserve(job, need)
                    self._late.add(job)
                    return True
                self._reserve(job, need, now)
            return False
        self._take(need, job, now)
        job.holds = True
        return True

    def epoch(self) -> object:
        """Changes when room may have appeared: a place given back, or a bucket found empty
        has refilled. Refusals stand until it changes (takes only use room up); call it
        before a round of :meth:`try_take`."""
        if self._loop.time() + SLACK >= self._refill_at:
            self._new_epoch()
        return self._epoch

    def _new_epoch(self) -> None:
        self._epoch += 1
        self._full.clear()
        self._refill_at = math.inf

    def wait_for(self, need: Need, now: float | None = None, job: Job | None = None) -> float:
        """0.0 if every group has room now; else the seconds until the buckets allow it
        (``inf`` if a group is full, or its weighted bucket is kept for another item: only a
        release or that item's start makes room). A group found without room is remembered
        for the scan (``_full``; not a weighted bucket: a lighter item may still fit)."""
        if now is None:
            now = self._loop.time()
        wait = 0.0
        full = self._full
        weights = need.weights
        for i, (states, key) in enumerate(zip(self._states, need.keys, strict=True)):
            state = states.get(key)
            if state is None:
                # Not in this group (None), or a fresh group: room (a limit >= 1, a full
                # bucket that holds any weight allowed).
                continue
            if state.held >= state.limit:
                full.add((i, key))
                return math.inf
            bucket = state.bucket
            if bucket is None:
                continue
            if weights is not None and state.reserved is not None and state.reserved is not job:
                return math.inf
            w = 1.0 if weights is None else weights[i]
            turn = reserve_weighted(bucket.tat, now, bucket.interval, bucket.tolerance, w)[1]
            if turn > 0.0:
                if weights is None:
                    full.add((i, key))
                # The refusal stands until then (a new epoch: scans ask again).
                self._refill_at = min(self._refill_at, now + turn)
            wait = max(wait, turn)
        return wait

    def _reserve(self, job: Job, need: Need, now: float) -> None:
        reserve(self._states, need, job, now)

    def _unreserve(self, job: Job, need: Need) -> None:
        """``job`` waits for something else than buckets: its reservations go (others of
        those groups may take the tokens, and they are woken to)."""
        if need.weights is not None and unreserve(self._states, need, job):
            self._room_changed()

    def _take(self, need: Need, job: Job, now: float) -> None:
        forget_idle(self._idle, self._states, now)
        weights = need.weights
        dropped = False
        for i, (policy, states, key) in enumerate(
            zip(self._policies, self._states, need.keys, strict=True)
        ):
            if key is None:
                continue  # the item is not in this group
            state = states.get(key)
            if state is None:
                state = states[key] = GroupState(policy, now)
            state.held += 1
            state.forget_at = math.inf  # not idle: an entry of ``_idle`` for it is stale
            bucket = state.bucket
            if bucket is not None:
                bucket.take_weighted(now, 1.0 if weights is None else weights[i])
            if state.reserved is job:
                state.reserved = None
                dropped = True
        if dropped:
            self._room_changed()  # lighter items of the group may take what is left

    def release(self, job: Job) -> None:
        """Give back ``job``'s places (its attempt ended, or never started)."""
        if not getattr(job, "holds", False):
            return
        job.holds = False
        need = job.groups
        assert isinstance(need, Need)
        now = self._loop.time()
        for i, (states, key) in enumerate(zip(self._states, need.keys, strict=True)):
            if key is None:
                continue
            state = states[key]
            state.held -= 1
            if state.held == 0 and forgettable(state):
                state.forget_at = at = forget_at(state, now)
                if at <= now:
                    del states[key]
                else:
                    self._idle.append((at, i, key))
        forget_idle(self._idle, self._states, now)
        self._room_changed()

    def _room_changed(self) -> None:
        """Places given back or a reservation dropped: refusals no longer stand, and those
        waiting look again."""
        self._new_epoch()
        fut = self._changed
        if fut is not None and not fut.done():
            fut.set_result(None)
        for wake, _ in self._engines.values():
            wake()

    def active(self) -> int:
        """How many group states are held in memory (all groups together)."""
        return sum(len(states) for states in self._states)

    def held(self, group: int, key: Hashable) -> int:
        """The places held now in group ``group`` (its index in ``groups=``) under ``key``."""
        state = self._states[group].get(key)
        return state.held if state is not None else 0

    def limit(self, group: int, key: Hashable) -> float:
        """The concurrency limit of group ``group`` under ``key`` now (``inf``: none; an
        adaptive group not in memory is at its ``initial``)."""
        state = self._states[group].get(key)
        return state.limit if state is not None else fresh_limit(self._policies[group])

    # -- as a meter: a retry that held its slot waits here ---------------------------
    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        need = self.keys(job)
        if isinstance(need, BaseException):
            raise need
        while True:
            self.epoch()
            if self.try_take(job):
                break
            await self._until_room(self.wait_for(need, job=job))
        late = self._late
        if late and job in late:
            late.discard(job)
            deadline = self._engines.get(slot.run, (None, self._deadline))[1]
            assert deadline is not None
            deadline.by_weight = True  # this item's own weight does not fit: a lighter one may
            return "out_of_time"
        return None

    async def _until_room(self, wait: float) -> None:
        fut = self._changed
        if fut is None or fut.done():
            fut = self._changed = self._loop.create_future()
        if math.isinf(wait):
            await asyncio.shield(fut)  # a cancelled waiter does not cancel the others'
            return
        handle = self._loop.call_later(wait, _resolve, fut)
        try:
            await asyncio.shield(fut)
        finally:
            handle.cancel()

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        if self._adaptive:
            for state in self._held_states(job):
                if state.starts is not None:
                    state.starts.append((now, slot, slot.gen))

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        if self._adaptive and result is not None:
            for state in self._held_states(job):
                if state.adaptive is not None:
                    observe(state, result)
        self.release(job)  # after the limits moved: the release wakes pickers to the new ones

    def _held_states(self, job: Job) -> list[GroupState]:
        """The states ``job`` holds a place in now."""
        if not getattr(job, "holds", False):
            return []
        need = job.groups
        assert isinstance(need, Need)
        keys = need.keys
        return [by_key[k] for by_key, k in zip(self._states, keys, strict=True) if k is not None]


def _hashable(key: Any) -> Hashable:
    hash(key)  # a TypeError here is the item's error, said where it happens
    return key  # type: ignore[no-any-return]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
