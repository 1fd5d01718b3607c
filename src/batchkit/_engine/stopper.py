"""Ending a run: no more starts, cancel what is in flight, escalate after ``grace``, abandon
what still runs; and the deadline's timer.

Decide, then act: :meth:`Stopper.takes` decides whether a stop acts (and which reason the run
reports); the engine then tells the observers and calls :meth:`Stopper.halt`. A stop cancels
each slot once (what runs may be cleaning up: a rollback, a connection's close), cancels once
more ``grace`` later, and abandons what still runs a loop turn after that, so the call always
returns.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, final

from .._model.attempt import CancelKind
from .watchdog import cancel_attempt, cancel_once

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._model.attempt import Slot
    from .._model.errors import StopReason

__all__ = ["Stopper"]


def _nothing(*args: object) -> None:
    pass


@final
class Stopper:
    """The stop of one run over ``slots`` (the engine's list: workers are added as they
    start). Connected to the workers: ``wake`` wakes every waiting worker (and a stream's
    consumer); ``abandon`` gives up on a slot whose work did not stop after two
    cancellations."""

    __slots__ = (
        "_abandon",
        "_deadline",
        "_escalation",
        "_slots",
        "_wake",
        "grace",
        "loop",
        "reason",
        "stopping",
    )

    def __init__(self, slots: list[Slot], grace: float) -> None:
        self._slots = slots
        self.grace = grace
        self._wake: Callable[[], None] = _nothing
        self._abandon: Callable[[Slot], None] = _nothing
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reason: StopReason | None = None
        """Why the run stopped starting items (the report's ``stop_reason``)."""
        self.stopping = False
        """No new starts: a stop, an input error, the caller's cancel."""
        self._escalation: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connect(self, *, wake: Callable[[], None], abandon: Callable[[Slot], None]) -> None:
        """What a stop wakes, and what abandons a slot: the workers' (made after this)."""
        self._wake = wake
        self._abandon = abandon

    def arm_deadline(self, at: float, reached: Callable[[], None]) -> None:
        """Call ``reached`` at the deadline's loop time ``at``: two loop turns after its
        timer, so an attempt whose own timer fires at the same instant (it ends exactly at
        the deadline) completes instead of being cancelled."""
        loop = self.loop
        assert loop is not None
        self._deadline = loop.call_at(at, loop.call_soon, loop.call_soon, reached)

    def takes(self, reason: StopReason) -> bool:
        """Whether a stop for ``reason`` acts; records the reason the run reports. A second
        stop does not act, except the deadline's (it also names a run already stopping for
        ``out_of_time``)."""
        if reason != "deadline" and self.stopping and self.reason is not None:
            return False
        if self.reason is None or (reason == "deadline" and self.reason == "out_of_time"):
            self.reason = reason
        return True

    def no_more_starts(self, reason: StopReason | None = None) -> None:
        """Start nothing new; what is in flight may finish."""
        if self.reason is None:
            self.reason = reason
        self.stopping = True
        self._wake()

    def halt(self) -> None:
        """Cancel every worker waiting or in an attempt; escalate after ``grace``."""
        self.stopping = True
        self._wake()
        current = asyncio.current_task()
        for slot in self._slots:
            if slot.cancellable and not slot.abandoned and slot.task is not current:
                cancel_once(slot, CancelKind.STOP)
        if self._escalation is None:
            loop = self.loop
            assert loop is not None
            self._escalation = loop.call_at(loop.time() + self.grace, self._escalate)

    def _escalate(self) -> None:
        """``grace`` after the stop: cancel what still runs once more; abandon it a turn later."""
        live = [
            s for s in self._slots if not s.abandoned and s.task is not None and not s.task.done()
        ]
        for slot in live:
            cancel_attempt(slot, CancelKind.STOP)
        if live:
            assert self.loop is not None
            self.loop.call_soon(self._abandon_all)

    def _abandon_all(self) -> None:
        for slot in self._slots:
            if not slot.abandoned and slot.task is not None and not slot.task.done():
                self._abandon(slot)

    def close(self) -> None:
        """The run ended: no deadline, no escalation any more."""
        for handle in (self._deadline, self._escalation):
            if handle is not None:
                handle.cancel()

    def quiet_slots(self) -> None:
        """No worker is left that could still do work: those waiting only for a thread that
        outlived its timeout leave too."""
        for slot in self._slots:
            if slot.thread is not None and not slot.abandoned and slot.cancellable:
                cancel_attempt(slot, CancelKind.STOP)
