"""The local engine's properties, checked the same way on both backends (issue 12 item 8).

Hypothesis draws a run — items that succeed, fail or hang until their timeout, with short
random delays; a concurrency, a per-worker limit and a chunk size; the entry point
(``batch_process``, ``stream``, ordered ``stream``) — and runs it on the in-process engine and on
the two-process ``LocalCluster``, in real time (virtual time cannot span processes), with a
bounded number of examples. Judged on what was recorded (each attempt's span in the process
that ran it, each context's enter and exit, the envelopes), never on sleeping margins:

- every item ends in exactly one envelope, and the envelope says what happened (a success
  returned its index; an error is the item's ``PlannedError``; a hang is a timeout);
- every context entered was exited;
- at most ``concurrency`` attempts ran at once overall, and at most ``per_worker`` in one
  worker process;
- an ordered stream yields in input order;
- nothing is left running when the call returns.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchkit
from batchkit import Failure, Success
from batchkit._dask.worker import running_chunks
from batchkit.dask import DaskBackend

from . import _work
from ._spans import peak

if TYPE_CHECKING:
    from batchkit import Outcome

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(120)

Entry = Literal["batch", "stream", "stream_ordered"]
Backend = Literal["local", "dask"]
TIMEOUT = 0.5  # a hanging item's end; ok items take at most 30 ms


@dataclass(frozen=True)
class Run:
    items: list[tuple[int, str, float]]
    concurrency: int
    per_worker: int
    chunk_size: int | None
    entry: Entry


@st.composite
def runs(draw: st.DrawFn) -> Run:
    n = draw(st.integers(0, 40))
    behaviours = draw(
        st.lists(st.sampled_from(["ok", "ok", "ok", "error", "hang"]), min_size=n, max_size=n)
    )
    # At most two hanging items: each holds its slot for the whole timeout (real time).
    hanging = [i for i, b in enumerate(behaviours) if b == "hang"]
    for i in hanging[2:]:
        behaviours[i] = "ok"
    delays = draw(st.lists(st.sampled_from([0.0, 0.005, 0.03]), min_size=n, max_size=n))
    return Run(
        items=[(i, b, d) for i, (b, d) in enumerate(zip(behaviours, delays, strict=True))],
        concurrency=draw(st.integers(1, 8)),
        per_worker=draw(st.integers(1, 4)),
        chunk_size=draw(st.none() | st.integers(1, 10)),
        entry=draw(st.sampled_from(["batch", "stream", "stream_ordered"])),
    )


async def _execute(run: Run, backend: Any) -> list[Outcome[tuple[int, str, float], int]]:
    options: dict[str, Any] = {
        "concurrency": run.concurrency,
        "timeout": TIMEOUT,
        "context": _work.counting,
        "backend": backend,
    }
    if run.entry == "batch":
        report = await batchkit.batch_process(run.items, _work.planned, **options)
        return list(report)
    ordered = run.entry == "stream_ordered"
    async with batchkit.stream(run.items, _work.planned, ordered=ordered, **options) as out:
        return [o async for o in out]


async def _on(
    backend: Backend, run: Run, address: str
) -> tuple[list[Any], list[Any], Counter[str]]:
    """Run once; return the outcomes, every attempt's span and the context counters."""
    if backend == "local":
        _work.reset_state()
        outcomes = await _execute(run, None)
        assert asyncio.all_tasks() == {asyncio.current_task()}  # no task outlives the call
        return outcomes, _work.get_spans(), Counter(_work.get_state())
    async with distributed.Client(address, asynchronous=True) as client:
        await client.wait_for_workers(2)
        await client.run(_work.reset_state)
        dask = DaskBackend(client, per_worker=run.per_worker, chunk_size=run.chunk_size)
        outcomes = await _execute(run, dask)
        spans: dict[str, list[Any]] = await client.run(_work.get_spans)
        states: dict[str, dict[str, int]] = await client.run(_work.get_state)
        running: dict[str, int] = await client.run(running_chunks)
        assert sum(running.values()) == 0  # nothing of the run left on a worker
    counters: Counter[str] = Counter()
    for state in states.values():
        counters.update(state)
    return outcomes, [s for per in spans.values() for s in per], counters


def _check(
    backend: Backend, run: Run, outcomes: list[Any], spans: list[Any], c: Counter[str]
) -> None:
    n = len(run.items)
    # Exactly one envelope per item.
    assert sorted(o.index for o in outcomes) == list(range(n))
    if run.entry == "stream_ordered":
        assert [o.index for o in outcomes] == list(range(n))
    # Each envelope says what happened.
    for o in outcomes:
        behaviour = run.items[o.index][1]
        if behaviour == "ok" and isinstance(o, Success):
            assert o.value == o.index
        elif behaviour == "error":
            assert isinstance(o, Failure)
            assert o.kind == "error", o
            assert isinstance(o.error, _work.PlannedError)
        else:
            # A hang always times out; an ok item only if the machine stalled it past 0.5 s.
            assert isinstance(o, Failure)
            assert o.kind == "timeout", o
    # Contexts: every one entered was exited; one per attempt (no retries here).
    assert c["entered"] == c["exited"] == len(spans) == n
    # Limits, from the spans recorded where the attempts ran.
    assert peak([(s, e) for _, _, s, e in spans]) <= run.concurrency
    if backend == "dask":
        by_pid: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for pid, _, s, e in spans:
            by_pid[pid].append((s, e))
        assert all(peak(p) <= run.per_worker for p in by_pid.values())


def _run_fresh(main: Any) -> Any:
    """One example on a new event loop (a sync Hypothesis test; real time)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.mark.parametrize("backend", ["local", "dask"])
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(run=runs())
def test_the_same_properties_hold_on_both_backends(
    backend: Backend, run: Run, cluster: Any
) -> None:
    outcomes, spans, counters = _run_fresh(_on(backend, run, cluster.scheduler_address))
    _check(backend, run, outcomes, spans, counters)
