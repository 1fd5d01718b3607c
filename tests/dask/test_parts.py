"""The Dask driver's parts without a cluster: the workers' messages (``Alerts``) feed the
ledger's counts, a re-run forgets its earlier run's alerts, a chunk's result replaces what
its alerts said, and a threshold the alerts reach stops the run (``Stopper``)."""

from __future__ import annotations

import asyncio
from typing import Any

from batchkit._dask.alerts import Alerts
from batchkit._dask.chunks import Chunk
from batchkit._dask.events import ChunkRerun
from batchkit._dask.state import RunState
from batchkit._dask.stopping import Stopper
from batchkit._model.options import Options


def _parts(**options: Any) -> tuple[RunState[int, str], Alerts, Chunk, list[object]]:
    heard: list[object] = []
    state: RunState[int, str] = RunState(
        None, list(range(8)), str, Options(observers=[heard.append], **options)
    )
    state.loop = asyncio.get_running_loop()
    state.outage = (0.0, "scheduler")  # no messages to a cluster: there is none
    chunk = Chunk(0, list(range(4)))
    state.pending[0] = chunk
    return state, Alerts(state, Stopper(state)), chunk, heard


def _failed(token: str, finished: int = 1, failed: int = 1) -> tuple[float, dict[str, Any]]:
    return (0.0, {"o": 0, "s": token, "f": finished, "x": failed})


def _started(token: str, worker: str) -> tuple[float, dict[str, Any]]:
    return (0.0, {"o": 0, "s": token, "w": worker})


async def test_failure_alerts_count_until_the_threshold_stops_the_run() -> None:
    state, alerts, _, _ = _parts(max_failures=2)
    alerts.on_alert(_started("t1", "w1"))
    alerts.on_alert(_failed("t1"))
    assert (state.ledger.finished, state.ledger.failed, state.stopping) == (1, 1, False)
    alerts.on_alert(_failed("t1"))
    assert (state.ledger.failed, state.stopping, state.stop_reason) == (2, True, "max_failures")


async def test_a_rerun_forgets_the_alerts_of_its_earlier_run() -> None:
    state, alerts, chunk, heard = _parts(max_failures=5)
    alerts.on_alert(_started("t1", "w1"))
    alerts.on_alert(_failed("t1"))
    alerts.on_alert(_started("t2", "w2"))  # w1 was lost: Dask runs the chunk again on w2
    assert (state.ledger.finished, state.ledger.failed) == (0, 0)
    assert chunk.starts == {"t1": "w1", "t2": "w2"}
    [rerun] = [e for e in heard if isinstance(e, ChunkRerun)]
    assert (rerun.lost, rerun.worker, rerun.indices, rerun.reruns) == ("w1", "w2", range(4), 1)
    alerts.on_alert(_failed("t1"))  # late, from the lost run: not counted
    alerts.on_alert(_failed("t2"))
    assert (state.ledger.finished, state.ledger.failed) == (1, 1)


async def test_a_chunks_result_replaces_its_alerts_and_later_ones_are_ignored() -> None:
    state, alerts, _, _ = _parts(max_failures=5)
    alerts.on_alert(_started("t1", "w1"))
    alerts.on_alert(_failed("t1", finished=2))
    alerts.settle(0, finished=4, failed=1)
    assert (state.ledger.finished, state.ledger.failed) == (4, 1)
    alerts.on_alert(_failed("t1"))
    assert (state.ledger.finished, state.ledger.failed) == (4, 1)
