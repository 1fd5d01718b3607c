"""What workers tell the driver while a chunk runs: that it started (a second start means a
worker was lost and Dask re-runs the chunk), and each failure at once (``max_failures`` and
``max_failure_ratio`` need them: a chunk with a hanging item would otherwise never report its
failures). The ledger's counts are the settled chunks' true counts plus the in-flight
chunks' alerts; a chunk's result replaces what its alerts said (:meth:`Alerts.settle`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .events import ChunkRerun

if TYPE_CHECKING:
    from .chunks import Chunk
    from .state import RunState
    from .stopping import Stopper

__all__ = ["Alerts"]

_log = logging.getLogger("batchkit.dask")


class Alerts:
    """The run's event topic on the driver, and the counts it feeds the ledger."""

    def __init__(self, state: RunState[Any, Any], stopper: Stopper) -> None:
        self._s = state
        self._stopper = stopper
        self._alerted: dict[int, tuple[int, int]] = {}  # offset -> (finished, failed)
        self._settled: set[int] = set()

    def settle(self, offset: int, finished: int, failed: int) -> None:
        """A chunk's true counts replace what its alerts had said so far."""
        ledger = self._s.ledger
        alerted = self._alerted.pop(offset, (0, 0))
        self._settled.add(offset)
        ledger.finished += finished - alerted[0]
        ledger.failed += failed - alerted[1]

    def on_alert(self, event: tuple[float, dict[str, Any]]) -> None:
        """A message from a worker on the run's topic: a chunk started there (``"w"``), or a
        failure alert. Alerts of an earlier run of a chunk that was re-run are not counted
        again."""
        s = self._s
        msg = event[1]
        offset = msg["o"]
        if s.closed or offset in self._settled:
            return
        chunk = s.pending.get(offset)
        if "w" in msg:
            if chunk is not None:
                self._on_start(chunk, msg["s"], msg["w"])
            return
        if chunk is not None and chunk.starts and msg["s"] != next(reversed(chunk.starts)):
            return  # from a run of this chunk on a worker that was lost since
        fin, fail = self._alerted.get(offset, (0, 0))
        self._alerted[offset] = (fin + msg["f"], fail + msg["x"])
        s.ledger.finished += msg["f"]
        s.ledger.failed += msg["x"]
        self._stopper.check_thresholds()

    def _on_start(self, chunk: Chunk, token: str, worker: str) -> None:
        """A chunk started on ``worker``. A second start means the worker running it was lost
        and Dask re-runs it: its items run again (from the start), its earlier run's failure
        alerts no longer count, and observers and the log hear of it."""
        if token in chunk.starts:
            return
        previous = next(reversed(chunk.starts), None)
        lost_on = chunk.starts[previous] if previous is not None else "?"
        chunk.starts[token] = worker
        if previous is None:
            return
        s = self._s
        fin, fail = self._alerted.pop(chunk.offset, (0, 0))
        s.ledger.finished -= fin
        s.ledger.failed -= fail
        indices = range(chunk.offset, chunk.offset + len(chunk.items))
        _log.warning(
            "batchkit: worker %s was lost; %d item(s) (input %d..%d) re-run on %s "
            "(re-run %d of this chunk)",
            lost_on,
            len(indices),
            indices.start,
            indices.stop - 1,
            worker,
            len(chunk.starts) - 1,
        )
        assert s.loop is not None
        s.event(
            ChunkRerun(
                name=s.plan.name,
                lost=lost_on,
                worker=worker,
                indices=indices,
                reruns=len(chunk.starts) - 1,
                time=s.loop.time(),
            )
        )
