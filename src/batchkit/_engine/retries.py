"""What follows a failed attempt: the retry policy's answer, and the items waiting for it.

:meth:`Retries.delay` asks the pure :func:`~batchkit._engine.decide.next_retry` (it runs user
code: ``retry_on``, the error's ``retry_after``; if that raises, the item is not retried and
its error says why). Items released from their slot while they wait (``hold_slot=False``)
wait in a heap by the loop time of their next attempt.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, final

from .._model.errors import add_note, describe
from .decide import next_retry
from .watchdog import SLACK

if TYPE_CHECKING:
    import random

    from .._model.attempt import Job
    from .._model.policies import Retry

__all__ = ["Retries"]


@final
class Retries:
    """The retries of one run under ``policy`` (``None``: no retry)."""

    __slots__ = ("_rng", "heap", "policy")

    def __init__(self, policy: Retry | None) -> None:
        self.policy = policy
        self.heap: list[Job] = []
        """Jobs released from their slot until ``job.ready`` (loop time)."""
        self._rng: random.Random | None = policy.rng if policy is not None else None

    def delay(self, job: Job, kind: str, error: BaseException) -> float | None:
        """Seconds until ``job``'s next attempt, or None: it ends with this error."""
        try:
            return next_retry(
                self.policy, attempt=job.attempt, kind=kind, error=error, draw=self._draw()
            )
        except Exception as hook_error:
            add_note(
                error,
                "batchkit: not retried: deciding on a retry (Retry.retry_on, or the error's "
                f"retry_after) raised {describe(hook_error)}",
            )
            return None

    def _draw(self) -> float:
        """The backoff's random draw; the source is made on first use (start-up time)."""
        if self._rng is None:
            import random

            self._rng = random.Random()
        return self._rng.random()

    def park(self, job: Job, ready: float) -> None:
        """``job`` waits out of any slot until loop time ``ready``."""
        job.ready = ready
        heapq.heappush(self.heap, job)

    def ready(self, now: float) -> Job | None:
        """The first parked job whose time has come (within the clock's resolution)."""
        heap = self.heap
        if heap and heap[0].ready <= now + SLACK:
            return heapq.heappop(heap)
        return None

    def next_at(self) -> float | None:
        """When the first parked job is due, if any."""
        return self.heap[0].ready if self.heap else None

    def drain(self) -> list[Job]:
        """Every parked job, soonest first: the run ended before their retries."""
        heap, self.heap = self.heap, []
        return [heapq.heappop(heap) for _ in range(len(heap))]
