"""Events only a cluster run has: a worker lost, a chunk re-run (see ``batchkit.dask``).

They reach the run's observers like every :data:`~batchkit.Event` (an observer that does not
know them ignores them: ``LoggingObserver``, ``progress=True`` and the Prometheus observer do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from .._model.public import publish

__all__ = ["ChunkRerun", "WorkerLost"]


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerLost:
    """A Dask worker left the cluster while the run was going (killed, restarted by its
    nanny, retired). Its chunks are re-run elsewhere by Dask (see :class:`ChunkRerun`)."""

    name: str | None
    worker: str
    """The worker's address."""
    time: float
    """The driver's loop time when the driver noticed (it polls every 0.2 s)."""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRerun:
    """The items ``indices`` started again on ``worker`` because the worker running them,
    ``lost``, was lost: they may have run (in part or wholly) ``reruns`` times more than once.
    Their envelopes carry ``reruns`` too (``Success.reruns``, ``Failure.reruns``)."""

    name: str | None
    lost: str
    """The address of the worker that was lost (``"?"`` if it was never heard of)."""
    worker: str
    """Where the items run now."""
    indices: range
    reruns: int
    """How many times these items have now been re-run."""
    time: float


publish(globals(), __all__, "batchkit.dask")  # users import them from batchkit.dask
