"""``Adaptive`` concurrency as a meter: a gate that lets at most ``limit`` attempts run, and
moves the limit by the AIMD math of ``_adaptive`` as attempts end (or get stuck); and the
limit remembered between runs (``Adaptive(remember=...)``): :func:`recall` before a run,
:func:`remember` after it."""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, final

from ..._model.errors import add_note, describe
from .adaptive_math import AimdState, blend, is_stuck, on_overload, on_success, recalled

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import StopReason
    from ..._model.policies import Adaptive, Remembered
    from ..._model.state import JsonValue

__all__ = ["AdaptiveMeter", "is_overload", "recall", "remember"]

_log = logging.getLogger("batchkit")

# Writers of one key that race (overlapping ticks) each re-read and blend again; after this
# many lost races the run gives up writing (and logs it) rather than delay its return.
_WRITE_TRIES = 5


@final
class AdaptiveMeter:
    __slots__ = ("_gate", "_loop", "_on_limit", "_policy", "_starts", "admitted", "limit", "state")

    def __init__(
        self,
        policy: Adaptive,
        loop: asyncio.AbstractEventLoop,
        on_limit: Callable[[int, int, str, float], None],
    ) -> None:
        self._policy = policy
        self._loop = loop
        self._on_limit = on_limit
        self.state = AimdState(limit=float(policy.initial))
        self.limit = policy.initial
        self.admitted = 0
        self._gate: deque[asyncio.Future[None]] = deque()
        # Attempt starts in order, to spot stuck attempts before they end.
        self._starts: deque[tuple[float, Slot, int]] = deque()

    async def wait_task_can_start(self, slot: Slot, job: Job) -> StopReason | None:
        while self.admitted >= self.limit:
            fut = self._loop.create_future()
            self._gate.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
        self.admitted += 1
        return None

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        self._starts.append((now, slot, slot.gen))

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        self.admitted -= 1
        if result is not None:
            self._observe(result)
        self._open_gate()

    def _observe(self, result: AttemptResult) -> None:
        policy, now = self._policy, result.ended
        if result.kind == "success":
            state, overload = on_success(
                self.state, policy, result.ended - result.started, result.started, now
            )
            if overload is not None:
                state = on_overload(state, policy, result.started, now)
            self._set(state, now, overload or "increase")
            self._check_stuck(now)
        elif result.kind == "timeout" or (
            result.kind == "error"
            and isinstance(result.error, Exception)
            and is_overload(policy, result.error)
        ):
            self._set(on_overload(self.state, policy, result.started, now), now, result.kind)

    def _check_stuck(self, now: float) -> None:
        """The oldest attempt still running is the first sign of an overload: act on it
        without waiting for it to time out (every attempt launched meanwhile would suffer)."""
        starts = self._starts
        while starts:
            started, slot, gen = starts[0]
            if slot.gen != gen:
                starts.popleft()
                continue
            if is_stuck(self.state, self._policy, started, now):
                starts.popleft()
                self._set(on_overload(self.state, self._policy, started, now), now, "stuck")
            break
        if len(starts) > 2 * self._policy.max + 64:
            self._starts = deque(s for s in starts if s[1].gen == s[2])

    def resume(self, state: AimdState) -> None:
        """Start from a remembered limit instead of ``initial`` (before any attempt)."""
        self.state = state
        self.limit = int(state.limit)

    def _set(self, state: AimdState, now: float, reason: str) -> None:
        self.state = state
        new, old = int(state.limit), self.limit
        if new != old:
            self.limit = new
            self._on_limit(old, new, reason, now)

    def _open_gate(self) -> None:
        gate = self._gate
        free = self.limit - self.admitted
        while gate and free > 0:
            fut = gate.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1


def is_overload(policy: Adaptive, error: Exception) -> bool:
    """``overload_on`` runs user code: if it raises, the error is not counted as an overload,
    and it says so in a note (the item keeps its own error)."""
    try:
        return policy.is_overload(error)
    except Exception as e:
        add_note(error, f"batchkit: Adaptive.overload_on raised {describe(e)}; not counted "
                        "as an overload")  # fmt: skip
        return False


async def recall(memory: Remembered) -> float | None:
    """The remembered limit, or ``None`` when there is none or the store fails (logged)."""
    try:
        entry = await memory.store.get(memory.key)
    except Exception as e:
        _log.warning(
            "batchkit: could not read the remembered limit %r (%s); starting from initial",
            memory.key, describe(e),
        )  # fmt: skip
        return None
    if entry is None:
        return None
    limit = recalled(entry.value)
    if limit is None:
        _log.warning(
            "batchkit: the remembered limit %r holds %r, not {'limit': <number>}; "
            "starting from initial",
            memory.key, entry.value,
        )  # fmt: skip
    return limit


async def remember(memory: Remembered, final: float) -> None:
    """Blend a run's final limit into the remembered one by compare-and-set (another process
    may write the same key); a store that fails is logged, never raised."""
    store, key = memory.store, memory.key
    try:
        for _ in range(_WRITE_TRIES):
            entry = await store.get(key)
            before = recalled(entry.value) if entry is not None else None
            value: JsonValue = {"limit": blend(before, final, memory.weight)}
            if await store.compare_and_set(key, value, expected=entry.version if entry else 0):
                return
        _log.warning(
            "batchkit: the remembered limit %r was not written: %d other writers won the race",
            key, _WRITE_TRIES,
        )  # fmt: skip
    except Exception as e:
        _log.warning("batchkit: could not write the remembered limit %r (%s)", key, describe(e))
