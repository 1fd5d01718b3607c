"""The cluster while a run is on it: which workers are there, each one's share of the rate
limit (and of the limit groups: ``groups.py``), the workers that left, and — when no worker
(or no scheduler) was there for ``DaskBackend(lost_after=...)`` seconds — the end of what is
out as ``lost``. A run with limit groups counts only the workers it started with.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .._model.errors import ItemError
from . import worker as worker_side
from .events import WorkerLost
from .groups import share_table

if TYPE_CHECKING:
    from .._model.policies import RateLimit
    from .state import RunState
    from .stopping import Stopper

__all__ = ["ClusterWatch"]

_log = logging.getLogger("batchkit.dask")

_SHARE_POLL_SECONDS = 0.2
_PROBE_SECONDS = 1.0  # a scheduler that does not answer within this is unreachable


class ClusterWatch:
    """Polls the scheduler while the run is on; re-splits the rate; notices an outage."""

    def __init__(self, state: RunState[Any, Any], stopper: Stopper) -> None:
        self._s = state
        self._stopper = stopper
        self._workers_seen: set[str] = set()
        self._grouped: set[str] = set()  # the workers the groups were last split among
        self._shares: dict[str, float] = {}
        self._watch: asyncio.Future[None] | None = None

    async def workers(self) -> tuple[int, int, list[str]]:
        """``(workers, threads, addresses)`` as the scheduler sees them now."""
        info = await self._s.client.scheduler.identity()
        workers = info.get("workers", {})
        threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
        return len(workers), threads, list(workers)

    async def start(self, addresses: list[str]) -> None:
        rate = self._s.plan.rate_limit
        if rate is not None and rate.weight is not None:
            rate = None  # split with the groups (groups.py), not through the gate
        self._workers_seen = self._grouped = set(addresses)
        if rate is not None:
            await self._share_rate(rate, addresses)
        self._watch = asyncio.ensure_future(self._watch_cluster(rate))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    def done(self) -> bool:
        return self._watch is None or self._watch.done()

    async def _share_rate(self, rate: RateLimit, addresses: list[str]) -> None:
        """Give every live worker ``per_second / n`` (burst split too, at least 1 each).
        A worker not told yet starts nothing: its gate waits for its share."""
        n = max(len(addresses), 1)
        per_second = rate.per_second / n
        burst = max(1, rate.burst // n)
        await self._s.client.run(
            worker_side.set_share, self._s.run_id, per_second, burst, workers=addresses
        )
        self._shares = dict.fromkeys(addresses, per_second)

    async def _watch_cluster(self, rate: RateLimit | None) -> None:
        """Every ``_SHARE_POLL_SECONDS``: which workers are there. Re-split the rate when
        they change, tell of each worker that left, and when no worker (or no scheduler) was
        there for ``lost_after`` seconds, end what is out as ``lost``."""
        s = self._s
        assert s.loop is not None
        lost_after: float | None = getattr(s.backend, "lost_after", None)
        while True:
            await asyncio.sleep(_SHARE_POLL_SECONDS)
            try:
                async with asyncio.timeout(_PROBE_SECONDS):
                    _, _, addresses = await self.workers()
                if s.kept is not None:  # groups=: only the workers holding a share count
                    addresses = [a for a in addresses if a in s.kept]
                missing = None if addresses else "worker"
            except asyncio.CancelledError:
                raise
            except Exception:
                addresses, missing = [], "scheduler"
            now = s.loop.time()
            if missing is None:
                s.outage = None
                if s.kept is not None and set(addresses) != self._grouped:
                    await self._share_groups(addresses)
                self._tell_left(addresses, now)
                if rate is not None and set(addresses) != set(self._shares):
                    try:
                        await self._share_rate(rate, addresses)
                    except Exception:
                        _log.debug("batchkit: re-splitting the rate limit failed", exc_info=True)
                continue
            if s.outage is None or s.outage[1] != missing:
                s.outage = (now, missing)
                self._tell_left(addresses, now)
            if lost_after is not None and now - s.outage[0] >= lost_after:
                self._cluster_gone(missing, lost_after)
                return

    async def _share_groups(self, addresses: list[str]) -> None:
        """Workers holding a share left: split the groups again among those left (each
        share only grows)."""
        table = share_table(self._s.plan, addresses)
        try:
            await self._s.client.run(
                worker_side.set_group_shares, self._s.run_id, table, workers=addresses
            )
            self._grouped = set(addresses)
        except Exception:
            _log.debug("batchkit: re-splitting the limit groups failed", exc_info=True)

    def _tell_left(self, addresses: list[str], now: float) -> None:
        left = self._workers_seen - set(addresses)
        self._workers_seen = set(addresses)
        for worker in sorted(left):
            _log.warning("batchkit: Dask worker %s left the cluster during the run", worker)
            self._s.event(WorkerLost(name=self._s.plan.name, worker=worker, time=now))

    def _cluster_gone(self, missing: str, waited: float) -> None:
        """No worker (or no scheduler) for ``waited`` seconds: what is out is lost."""
        s = self._s
        what = (
            "no Dask worker was left"
            if missing == "worker"
            else "the Dask scheduler could not be reached"
        )
        s.gone = ItemError(
            f"lost: {what} for {waited:g} s (DaskBackend(lost_after=...)); the item may have "
            "run, in part or wholly, on a worker that is gone"
        )
        n = sum(len(c.items) for c in s.pending.values())
        _log.warning("batchkit: %s for %g s; %d item(s) out end as lost", what, waited, n)
        self._stopper.give_up_now()
