"""Call-level limit groups: ``LimitGroup(name=...)`` without ``by``, taken inside ``fn`` with
``async with batchkit.limit(name):`` (``_engine/calls.py``) around one upstream call.

Not a meter: nothing here is asked at admission. Each such group is one
:class:`~batchkit._engine.meters.group_state.GroupState` for the whole run (places held, its
limit, its GCRA bucket, its AIMD state with ``Adaptive``), so the math is the item-level
groups' own, and memory is one state per named group.

A block that finds no room waits in the group's FIFO queue. Room is granted *for* the head of
the queue, by whoever makes it (a block giving its place back, or a timer at the bucket's next
turn: :meth:`CallGroup._grant`): decide, then wake — so a place is never free while someone
waits for it, and a heavier weight at the head is not starved by lighter ones behind it. A
waiter cancelled after its grant (its item's timeout, the deadline, a hedge's twin winning)
gives the place straight back; one cancelled before leaves the queue. Either way the place is
given back on every path, and the next in line is granted.

With ``Adaptive``, a block's own outcome moves the group's limit, as an attempt moves an
item-level group's: a block cut by its item's timeout or raising an ``overload_on`` error is an
overload, a success counts its latency; a block cancelled otherwise (the run stopping, a hedge
lost) says nothing about the upstream. A block still running past ``latency_factor`` times the
baseline is not counted until it ends (item-level groups watch their attempts; a block has no
watchdog entry).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import TYPE_CHECKING, NoReturn, final

from ..._model.attempt import _SLOT, AttemptResult, CancelKind
from ..._model.errors import InvalidArgument, safe_repr
from .group_state import GroupState, observe
from .rate_math import reserve_weighted

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

    from ..._model.policies import LimitGroup

__all__ = ["CallGroup", "CallGroups"]


@final
class CallGroups:
    """The call-level groups of one run, by name (``RunInfo.limits``)."""

    __slots__ = ("_by_name", "_item_level")

    def __init__(self, policies: tuple[LimitGroup, ...], loop: asyncio.AbstractEventLoop) -> None:
        self._by_name: dict[str | None, CallGroup] = {}
        item_level: set[str] = set()
        for p in policies:
            if p.by is None:
                self._by_name[p.name] = CallGroup(p, loop)
            elif p.name is not None:
                item_level.add(p.name)
        self._item_level = frozenset(item_level)

    def group(self, name: object) -> CallGroup:
        if not isinstance(name, str):
            unknown(name, sorted(map(str, self._by_name)))
        group = self._by_name.get(name)
        if group is not None:
            return group
        if name in self._item_level:
            raise InvalidArgument(
                f"batchkit.limit({name!r}): that LimitGroup has by=, so it is item-level: "
                "the item took it before fn ran, for the whole attempt\nHINT: drop this "
                f"batchkit.limit({name!r}) (the item holds the group already), or drop by= "
                f"to make the group call-level: LimitGroup(name={name!r}, ...)"
            )
        return unknown(name, sorted(map(str, self._by_name)))

    def held(self, name: str) -> int:
        """The places held in group ``name`` now."""
        return self.group(name).state.held

    def waiting(self, name: str) -> int:
        """The blocks waiting for a place in group ``name`` now."""
        return len(self.group(name).waiters)

    def limit(self, name: str) -> float:
        """Group ``name``'s concurrency limit now (``inf``: none)."""
        return self.group(name).state.limit


def unknown(name: object, known: list[str]) -> NoReturn:
    """The error for a name that is no call-level group of this run (``known``: those that
    are)."""
    names = ", ".join(map(repr, known)) if known else "none"
    raise InvalidArgument(
        f"batchkit.limit(): no call-level group named {safe_repr(name)} in this run (its "
        f"call-level groups: {names})\nHINT: pass groups=[LimitGroup(name={safe_repr(name)}, "
        "concurrency=..., rate_limit=...)] to the call whose fn uses it"
    )


@final
class CallGroup:
    """One call-level group: its state, and the blocks waiting for it in arrival order."""

    __slots__ = ("_loop", "_timer", "name", "rate", "state", "waiters")

    def __init__(self, policy: LimitGroup, loop: asyncio.AbstractEventLoop) -> None:
        self.name = policy.name
        self.rate = policy.rate_limit
        self.state = GroupState(policy, loop.time())
        self.waiters: deque[tuple[asyncio.Future[None], float]] = deque()
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None

    def hold(self, weight: object) -> AbstractAsyncContextManager[None]:
        """A place for one block (``batchkit.limit``), taking ``weight`` tokens."""
        return _Hold(self, self._checked(weight))

    def _checked(self, weight: object) -> float:
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise InvalidArgument(
                f"batchkit.limit({self.name!r}, weight=...) must be a finite number > 0, got "
                f"{safe_repr(weight)}\nHINT: weigh the call by what the quota counts, e.g. "
                "its tokens"
            )
        if self.rate is not None and weight > self.rate.burst:
            raise InvalidArgument(
                f"batchkit.limit({self.name!r}, weight={weight!r}) is larger than its "
                f"burst={self.rate.burst}: the bucket never holds that much, so the call "
                "could never start\nHINT: raise burst= to the largest weight, or split the call"
            )
        return float(weight)

    async def acquire(self, weight: float) -> None:
        """Wait for a place (and the bucket's turn); taken on return."""
        if not self.waiters and self._wait(weight, self._loop.time()) == 0.0:
            self._take(weight, self._loop.time())
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        entry = (fut, weight)
        self.waiters.append(entry)
        self._grant()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted as it was cancelled: the place goes back
            else:
                if entry in self.waiters:
                    self.waiters.remove(entry)
                self._grant()  # it may have been the head the others waited behind
            raise

    def now(self) -> float:
        return self._loop.time()

    def release(self) -> None:
        self.state.held -= 1
        self._grant()

    def _wait(self, weight: float, now: float) -> float:
        """0.0 if a block of ``weight`` may start now, else how long the bucket makes it wait
        (``inf``: no place; only a release makes one)."""
        state = self.state
        if state.held >= state.limit:
            return math.inf
        bucket = state.bucket
        if bucket is None:
            return 0.0
        return reserve_weighted(bucket.tat, now, bucket.interval, bucket.tolerance, weight)[1]

    def _take(self, weight: float, now: float) -> None:
        state = self.state
        state.held += 1
        if state.bucket is not None:
            state.bucket.take_weighted(now, weight)

    def _grant(self) -> None:
        """Grant places to the waiters at the head of the queue while there is room; else
        wake again at the bucket's next turn (a release wakes it for a place)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters = self.waiters
        now = self._loop.time()
        while waiters:
            fut, weight = waiters[0]
            if fut.done():  # cancelled: its task leaves the queue (or has already)
                waiters.popleft()
                continue
            wait = self._wait(weight, now)
            if wait > 0.0:
                if not math.isinf(wait):
                    self._timer = self._loop.call_later(wait, self._grant)
                return
            waiters.popleft()
            self._take(weight, now)
            fut.set_result(None)

    def observe(self, error: BaseException | None, started: float) -> None:
        """A block ended (``error``: how): move an ``Adaptive`` limit by it."""
        state = self.state
        if state.adaptive is None:
            return
        now = self._loop.time()
        if error is None:
            result = AttemptResult("success", None, None, started, now)
        elif isinstance(error, asyncio.CancelledError):
            if not _timed_out():
                return  # the run stopping, a hedge lost: no signal about the upstream
            result = AttemptResult("timeout", None, error, started, now)
        else:
            result = AttemptResult("error", None, error, started, now)
        observe(state, result)


def _timed_out() -> bool:
    """Whether the attempt running in this task was cancelled by its timeout or budget."""
    slot = _SLOT.get()
    return (
        slot is not None
        and slot.cancel_gen == slot.gen
        and slot.cancel_kind in (CancelKind.TIMEOUT, CancelKind.BUDGET)
    )


@final
class _Hold:
    """``async with batchkit.limit(name):`` — one place in a call-level group for the block."""

    __slots__ = ("_group", "_started", "_weight")

    def __init__(self, group: CallGroup, weight: float) -> None:
        self._group = group
        self._weight = weight
        self._started = 0.0

    async def __aenter__(self) -> None:
        group = self._group
        await group.acquire(self._weight)
        self._started = group.now()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group = self._group
        try:
            group.observe(exc, self._started)
        finally:
            group.release()  # after the limit moved: the release grants under the new one
