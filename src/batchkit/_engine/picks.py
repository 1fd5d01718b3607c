"""Limit groups in the window: how its workers pick, and when one that found nothing wakes.

The window's part for ``groups=`` (the groups' own state and math are
:class:`~batchkit._engine.meters.groups.Groups`'). A run without groups has none, and its
workers' loop only checks that it is ``None``: the hot path does no work for groups.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any, final

from .watchdog import SLACK

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._model.attempt import Job
    from .intake import Intake
    from .meters.groups import Groups
    from .retries import Retries

__all__ = ["GroupPicks"]


@final
class GroupPicks:
    """The picking a run's limit groups add to the window: a round before each pick, and
    the time a worker that found nothing it could pick waits for."""

    __slots__ = ("_intake", "_loop", "_retries", "groups", "take")

    def __init__(
        self,
        groups: Groups,
        intake: Intake[Any],
        retries: Retries,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.groups = groups
        self.take: Callable[[Job], bool] = groups.try_take
        """The pick: takes a job's places in all its groups at once, or none."""
        self._intake = intake
        self._retries = retries
        self._loop = loop

    async def round(self) -> None:
        """Before a worker picks: every attempt that ends in this loop turn gives its places
        back first, whatever order the loop resumes the workers in, so the picks are the
        greedy schedule's (tests/engine/test_limit_groups.py)."""
        await asyncio.sleep(0)
        self.groups.epoch()  # a bucket may have refilled since the last round

    def blocked(self) -> bool:
        """Items wait whose groups are full (read ahead, or retries due)."""
        heap = self._retries.heap
        return bool(self._intake.buffer) or bool(heap and heap[0].ready <= self._now_slack())

    def _now_slack(self) -> float:
        """Now, within the clock's resolution (as the retry heap says a retry is due)."""
        return self._loop.time() + SLACK

    def ready_at(self) -> float | None:
        """When a waiting item's groups' buckets allow it (a release wakes the workers too),
        or a retry is due: the soonest, loop time."""
        groups = self.groups
        heap = self._retries.heap
        now, due_by = self._loop.time(), self._now_slack()
        # A retry not due yet wakes the workers when it is; one due waits for its groups.
        later = [job.ready for job in heap if job.ready > due_by]
        soonest = min(later) if later else None
        if not groups.paced:
            return soonest  # without buckets, only a release (it wakes the workers) makes room
        due = [job for _, _, job in self._intake.buffer]
        due += [job for job in heap if job.ready <= due_by]
        for job in due:
            need = groups.keys(job)
            wait = 0.0 if isinstance(need, BaseException) else groups.wait_for(need, now, job)
            if wait != math.inf and (soonest is None or now + wait < soonest):
                soonest = now + wait
        return soonest
