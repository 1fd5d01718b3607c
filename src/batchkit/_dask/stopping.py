"""Stopping a Dask run: the ledger decides, this part acts.

A threshold, ``fail_fast``, the deadline or a chunk that stopped itself ends in
:meth:`Stopper.stop`: no more chunks start, every worker is told to stop this run's
coroutines, and after ``grace`` the driver gives up on what has not come back (``force``).
Messages to the cluster are bounded in time, so a worker or scheduler that does not answer
cannot hold the call past ``deadline + grace + SLACK``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from . import worker as worker_side

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._model.errors import StopReason
    from .state import RunState

__all__ = ["MESSAGES_SLACK", "SLACK", "Stopper"]

_log = logging.getLogger("batchkit.dask")

SLACK = 1.0  # DaskBackend.SLACK
"""Seconds the call may take beyond ``deadline + grace`` (or a stop + grace) for the cluster
round trip: half for the last messages to the workers (cut off there), half for closing a
client the backend opened itself."""
MESSAGES_SLACK = SLACK / 2


class Stopper:
    """Stops the run on the cluster, and bounds how long the call waits for it."""

    def __init__(self, state: RunState[Any, Any]) -> None:
        self._s = state
        self.force = asyncio.Event()  # set when the driver stops waiting for what is out
        self._force_handle: asyncio.TimerHandle | None = None
        self._deadline_handle: asyncio.TimerHandle | None = None
        self.return_by: float | None = None  # a stop's grace + MESSAGES_SLACK
        self.background: set[asyncio.Task[Any]] = set()

    def arm_deadline(self) -> None:
        s = self._s
        if s.deadline_at is not None:
            assert s.loop is not None
            self._deadline_handle = s.loop.call_at(s.deadline_at, self.on_deadline)

    def check_thresholds(self) -> None:
        """The ledger decides (the same decision as the local engine's); the driver acts."""
        if self._s.stopping:
            return
        reason = self._s.ledger.threshold_reached()
        if reason is not None:
            self.stop(reason)

    def stop(self, reason: StopReason) -> None:
        """Start no more chunks; tell every worker to stop this run's coroutines."""
        s = self._s
        if s.stopping and s.stop_reason is not None:
            return
        if s.stop_reason is None:
            s.stop_reason = reason
        s.stopping = True
        loop = s.loop
        assert loop is not None
        if reason != "deadline" and s.observers:
            s.ledger.run_stopping(reason)
        if s.outage is None:
            self.spawn(self.broadcast(worker_side.stop_run, s.run_id, reason))
        if self._force_handle is None:
            # Chunks whose results have not come back within the grace are given up as
            # cancelled (a worker that does not answer cannot hold the call past it).
            self._force_handle = loop.call_later(s.grace, self.force.set)
            self.return_by = loop.time() + s.grace + MESSAGES_SLACK

    def on_deadline(self) -> None:
        s = self._s
        if s.stop_reason is not None:
            return
        assert s.loop is not None
        if s.observers:
            s.ledger.deadline_hit()
        self.stop("deadline")

    def give_up_now(self) -> None:
        """The cluster is gone: stop at once, waiting on it no longer than the messages' half
        of the SLACK."""
        s = self._s
        s.stopping = True
        assert s.loop is not None
        self.return_by = s.loop.time() + MESSAGES_SLACK
        self.force.set()

    def time_left(self) -> float:
        """How long the call may still wait on the cluster: until a stop's grace + half the
        SLACK, else that from now."""
        s = self._s
        assert s.loop is not None
        if self.return_by is None:
            return s.grace + MESSAGES_SLACK
        return max(0.0, self.return_by - s.loop.time())

    async def broadcast(self, fn: Callable[..., Any], *args: Any) -> Any:
        s = self._s
        if s.outage is not None and s.outage[1] == "scheduler":
            return None  # it cannot be reached; waiting for it would only delay the call
        try:
            # A worker whose loop is blocked would never answer: bound the wait.
            async with asyncio.timeout(self.time_left()):
                return await s.client.run(fn, *args)
        except Exception:  # a worker that is going away cannot be told; its chunks are lost
            _log.debug("batchkit: broadcast %s failed", fn.__name__, exc_info=True)
            return None

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def cancel_timers(self) -> None:
        for handle in (self._deadline_handle, self._force_handle):
            if handle is not None:
                handle.cancel()

    async def wait_background(self) -> None:
        if self.background:
            # Bounded: a scheduler that is gone never answers a cancel or a stop message.
            _, late = await asyncio.wait(self.background, timeout=self.time_left())
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
