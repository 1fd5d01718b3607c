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
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import TYPE_CHECKING, Any, final

from ..watchdog import SLACK
from .rate_math import TokenBucket, reserve

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import StopReason
    from ..._model.policies import LimitGroup

__all__ = ["Groups"]


@final
class _State:
    """One group's state: the places held now, and its bucket (a ``rate_limit``)."""

    __slots__ = ("bucket", "held")

    def __init__(self, bucket: TokenBucket | None) -> None:
        self.held = 0
        self.bucket = bucket


@final
class Groups:
    """The limit groups of one run, as a meter (the first the runner asks)."""

    __slots__ = (
        "_changed",
        "_epoch",
        "_full",
        "_idle",
        "_loop",
        "_policies",
        "_refill_at",
        "_states",
        "on_release",
        "paced",
    )

    def __init__(self, policies: tuple[LimitGroup, ...], loop: asyncio.AbstractEventLoop) -> None:
        self._policies = policies
        self._loop = loop
        self._states: list[dict[Hashable, _State]] = [{} for _ in policies]
        self._idle: deque[tuple[float, int, Hashable]] = deque()
        """Groups left idle with a bucket still refilling: (refilled at, group, key)."""
        self._changed: asyncio.Future[None] | None = None
        self._full: set[tuple[int, Hashable]] = set()
        """Groups found without room in this epoch: a scan of the read-ahead skips their
        items at a set lookup's cost."""
        self._epoch = 0
        self._refill_at = math.inf
        """The soonest a bucket found empty has a token again (a new epoch then)."""
        self.paced = any(g.rate_limit is not None for g in policies)
        """Whether a group has a rate limit (a bucket's refill is then a time to wake at)."""
        self.on_release: Callable[[], None] = _nothing
        """Called when places are given back (the window wakes its waiting workers)."""

    # -- what an item needs ----------------------------------------------------------
    def keys(self, job: Job) -> tuple[Hashable, ...] | BaseException:
        """The item's key in each group, computed once; the error if ``by`` raised (or
        returned something that cannot be a key)."""
        keys: tuple[Hashable, ...] | BaseException | None = getattr(job, "groups", None)
        if keys is None:
            try:
                keys = tuple(_hashable(g.by(job.item)) for g in self._policies)
            except Exception as e:
                keys = e
            job.groups = keys
        return keys

    def try_take(self, job: Job) -> bool:
        """Take a place in every group of ``job`` if all have room now (True), else take
        nothing. An item whose ``by`` raised is let through: its attempt fails with that
        error (in :meth:`wait_task_can_start`)."""
        if getattr(job, "holds", False):
            return True
        keys = self.keys(job)
        if isinstance(keys, BaseException):
            return True
        full = self._full
        for i, key in enumerate(keys):
            if (i, key) in full:
                return False
        if self.wait_for(keys) > 0.0:
            return False
        self._take(keys)
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

    def wait_for(self, keys: tuple[Hashable, ...], now: float | None = None) -> float:
        """0.0 if every group has room now; else the seconds until the buckets allow it
        (``inf`` if a group is full: only a release makes room). A group found without room
        is remembered for the scan (``_full``)."""
        if now is None:
            now = self._loop.time()
        wait = 0.0
        full = self._full
        for i, (policy, states, key) in enumerate(
            zip(self._policies, self._states, keys, strict=True)
        ):
            state = states.get(key)
            if state is None:
                # Not in this group (None), or a fresh group: room (concurrency >= 1, a full
                # bucket).
                continue
            if policy.concurrency is not None and state.held >= policy.concurrency:
                full.add((i, key))
                return math.inf
            bucket = state.bucket
            if bucket is not None:
                turn = reserve(bucket.tat, now, bucket.interval, bucket.tolerance)[1]
                if turn > 0.0:
                    full.add((i, key))
                    self._refill_at = min(self._refill_at, now + turn)
                wait = max(wait, turn)
        return wait

    def _take(self, keys: tuple[Hashable, ...]) -> None:
        now = self._loop.time()
        self._forget(now)
        for policy, states, key in zip(self._policies, self._states, keys, strict=True):
            if key is None:
                continue  # the item is not in this group
            state = states.get(key)
            if state is None:
                rate = policy.rate_limit
                state = states[key] = _State(TokenBucket.of(rate, now) if rate else None)
            state.held += 1
            if state.bucket is not None:
                state.bucket.take(now)

    def release(self, job: Job) -> None:
        """Give back ``job``'s places (its attempt ended, or never started)."""
        if not getattr(job, "holds", False):
            return
        job.holds = False
        keys = job.groups
        assert isinstance(keys, tuple)
        now = self._loop.time()
        for i, (states, key) in enumerate(zip(self._states, keys, strict=True)):
            if key is None:
                continue
            state = states[key]
            state.held -= 1
            if state.held == 0:
                refilled = _refilled_at(state.bucket)
                if refilled <= now:
                    del states[key]
                else:
                    self._idle.append((refilled, i, key))
        self._forget(now)
        self._new_epoch()  # places were given back
        fut = self._changed
        if fut is not None and not fut.done():
            fut.set_result(None)
        self.on_release()

    def _forget(self, now: float) -> None:
        """Forget groups idle since their bucket refilled (checked in the order they went
        idle; one taken again meanwhile is skipped, and checked again when it goes idle)."""
        idle = self._idle
        while idle and idle[0][0] <= now:
            _, i, key = idle.popleft()
            state = self._states[i].get(key)
            if state is not None and state.held == 0 and _refilled_at(state.bucket) <= now:
                del self._states[i][key]

    def active(self) -> int:
        """How many group states are held in memory (all groups together)."""
        return sum(len(states) for states in self._states)

    def held(self, group: int, key: Hashable) -> int:
        """The places held now in group ``group`` (its index in ``groups=``) under ``key``."""
        state = self._states[group].get(key)
        return state.held if state is not None else 0

    # -- as a meter: a retry that held its slot waits here ---------------------------
    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        keys = self.keys(job)
        if isinstance(keys, BaseException):
            raise keys
        while True:
            self.epoch()
            if self.try_take(job):
                return None
            await self._until_room(self.wait_for(keys))

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
        return None

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        self.release(job)


def _refilled_at(bucket: TokenBucket | None) -> float:
    """When a bucket is full again (a fresh one is the same from then on)."""
    return -math.inf if bucket is None else bucket.tat


def _hashable(key: Any) -> Hashable:
    hash(key)  # a TypeError here is the item's error, said where it happens
    return key  # type: ignore[no-any-return]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _nothing() -> None:
    pass
