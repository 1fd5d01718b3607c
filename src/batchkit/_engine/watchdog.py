"""One task that cancels attempts past their timeout, instead of a timer per attempt.

Every attempt of a run has the same timeout, so deadlines arrive in start order: a FIFO of
``(deadline, slot, gen)`` whose head is always the next to expire; entries of attempts that
ended are stale (``slot.gen != gen``) and dropped. A timed-out attempt is cancelled on its
worker; if it is still running ``grace`` seconds later (its cleanup hangs), it is cancelled once
more and, one loop turn after that, handed to ``abandon``. With nothing to watch the task sleeps
one timeout: any attempt started later expires later, so no one has to wake it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Final

from .._model.attempt import CancelKind

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from .._model.attempt import Slot

__all__ = ["SLACK", "Watchdog", "cancel_attempt", "cancel_once"]

# asyncio runs a timer once ``loop.time() + clock resolution`` reaches it, so a callback set
# for ``when`` may see ``loop.time()`` a hair before ``when``. Every "is it time yet?" check
# allows the same slack; otherwise it would re-arm the timer forever (in virtual time, the
# clock would never move again).
SLACK: Final = time.get_clock_info("monotonic").resolution


def cancel_attempt(slot: Slot, kind: CancelKind) -> None:
    """Cancel the attempt running in ``slot`` (a timeout or a stop), marked as ours."""
    task = slot.task
    if task is None or task.done():
        return
    if slot.cancel_gen != slot.gen:
        slot.cancel_gen = slot.gen
        slot.cancel_kind = kind
    slot.cancels += 1
    task.cancel()


def cancel_once(slot: Slot, kind: CancelKind) -> bool:
    """The first cancellation of what runs in ``slot`` (a timeout or a stop); False if it
    was cancelled already. Cancelled once, it is cleaning up (a rollback, a connection's
    close): cutting that helps no one and can leave a driver's close hanging, so only the
    escalation after ``grace`` cancels it again."""
    if slot.cancel_gen == slot.gen:
        return False
    cancel_attempt(slot, kind)
    return True


class Watchdog:
    """See the module docstring. ``arm`` at each attempt's start; ``run`` as one task."""

    __slots__ = ("_abandon", "_grace", "_loop", "_reap", "_slots", "_timeout", "timers")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        grace: float,
        abandon: Callable[[Slot], None],
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._grace = grace
        self._abandon = abandon
        self.timers: deque[tuple[float, Slot, int]] = deque()
        self._reap: deque[tuple[float, Slot, int]] = deque()
        self._slots = 0

    def arm(self, slot: Slot, gen: int, when: float) -> None:
        self.timers.append((when, slot, gen))

    def compact(self, slots: int) -> None:
        """Drop stale entries at the head; rebuild when they pile up behind a slow attempt."""
        timers = self.timers
        while timers and timers[0][1].gen != timers[0][2]:
            timers.popleft()
        if len(timers) > 2 * slots + 64:
            self.timers = deque(t for t in timers if t[1].gen == t[2])

    def _expire(self, now: float) -> None:
        timers = self.timers
        while timers:
            when, slot, gen = timers[0]
            if slot.gen != gen:
                timers.popleft()
            elif when <= now + SLACK:
                timers.popleft()
                if cancel_once(slot, CancelKind.TIMEOUT):
                    self._reap.append((now + self._grace, slot, gen))
            else:
                break

    def _reap_stuck(self, now: float) -> None:
        reap = self._reap
        while reap:
            when, slot, gen = reap[0]
            if slot.gen != gen:
                reap.popleft()
            elif when <= now + SLACK:
                reap.popleft()
                cancel_attempt(slot, CancelKind.TIMEOUT)  # the second and last time
                self._loop.call_soon(self._abandon_if_stuck, slot, gen)
            else:
                break

    def _abandon_if_stuck(self, slot: Slot, gen: int) -> None:
        if slot.gen == gen and not slot.abandoned:
            self._abandon(slot)

    async def run(self) -> None:
        loop = self._loop
        while True:
            now = loop.time()
            self._expire(now)
            self._reap_stuck(now)
            target = now + self._timeout
            if self.timers:
                target = self.timers[0][0]
            if self._reap and self._reap[0][0] < target:
                target = self._reap[0][0]
            fut = loop.create_future()
            handle = loop.call_at(target, _resolve, fut)
            try:
                await fut
            finally:
                handle.cancel()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
