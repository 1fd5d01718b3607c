"""A chaos property suite (issue 21) on the two-process ``LocalCluster``.

Hypothesis draws a fault schedule — items that fail, hang, clean up past ``grace``, cannot be
pickled on the driver or unpickled back, or kill their worker (its nanny restarts it); an async
input that stalls; a stop at a random point (the deadline, ``fail_fast``, ``max_failures``) —
and a call (both entry points, ordered or not, retries, thresholds, deadline). Whatever
happens:

- every index taken from the input has exactly one envelope (all of them for a sized input;
  an unsized one's read prefix), and an ordered stream yields them in order;
- the kinds are truthful: an ``ok`` item succeeded with its own value unless the run stopped
  or its worker died; an ``error`` item never succeeded; a bad payload is its own item's
  ``error``; a run without a stop or a death has no ``cancelled``, ``skipped`` or ``lost``;
- every context entered on a surviving worker was exited (once the abandoned cleanups ended);
- the call returned within ``deadline + grace + DaskBackend.SLACK``;
- counts add up: kinds sum to the envelopes, ``report.reruns`` is the sum of the items';
  ``report.peak_concurrency`` stays within ``concurrency``.

The default profile runs a few examples (the whole of tests/dask stays within 120 s on two
cores); ``--hypothesis-profile=chaos`` runs 200.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import batchkit
from batchkit import Failure, Success
from batchkit.dask import DaskBackend

from . import _work
from .conftest import wait_for_two

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(600)

# No shrinking: every example costs real seconds on the cluster; a failure is reported with
# the call that failed as drawn. (The "chaos" profile is registered in conftest.py.)
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate]

Behaviour = Literal["ok", "error", "hang", "stubborn", "unsendable", "unloadable", "die"]
# Read at import: the pytest plugin loads --hypothesis-profile before collection.
_EXAMPLES = 200 if settings.get_current_profile_name() == "chaos" else 6
_COUNTER = itertools.count()


@dataclass(frozen=True)
class Call:
    behaviours: list[Behaviour]
    entry: Literal["batch", "stream", "stream_ordered"]
    async_input: bool
    stall: bool
    concurrency: int
    per_worker: int
    chunk_size: int | None
    retry: bool
    fail_fast: bool
    max_failures: int | None
    deadline: float | None
    grace: float


@st.composite
def calls(draw: st.DrawFn) -> Call:
    n = draw(st.integers(0, 24))
    kinds: list[Behaviour] = ["ok", "ok", "ok", "ok", "error", "hang", "stubborn"]
    kinds += ["unsendable", "unloadable", "die"]
    behaviours: list[Behaviour] = draw(st.lists(st.sampled_from(kinds), min_size=n, max_size=n))
    # A worker death costs a nanny restart (seconds): at most one per call.
    dies = [i for i, b in enumerate(behaviours) if b == "die"]
    for i in dies[1:]:
        behaviours[i] = "ok"
    deadline = draw(st.none() | st.sampled_from([0.5, 1.0, 2.0]))
    async_input = draw(st.booleans())
    stall = async_input and draw(st.booleans())
    if deadline is None:
        # Without a deadline nothing may wait forever: hangs, stubborn cleanups and a stalled
        # input need a stop, which only the deadline guarantees.
        behaviours = ["ok" if b in ("hang", "stubborn") else b for b in behaviours]
        stall = False
    return Call(
        behaviours=behaviours,
        entry=draw(st.sampled_from(["batch", "stream", "stream_ordered"])),
        async_input=async_input,
        stall=stall,
        concurrency=draw(st.integers(1, 8)),
        per_worker=draw(st.integers(1, 4)),
        chunk_size=draw(st.none() | st.integers(1, 8)),
        retry=draw(st.booleans()),
        fail_fast=draw(st.booleans()),
        max_failures=draw(st.none() | st.integers(1, 4)),
        deadline=deadline,
        grace=draw(st.sampled_from([0.2, 0.5])),
    )


def _items(call: Call) -> list[Any]:
    out: list[Any] = []
    for i, b in enumerate(call.behaviours):
        out.append((i, _work.Unsendable(i)) if b == "unsendable" else (i, b))
    return out


async def _input(items: list[Any], stall: bool) -> AsyncIterator[Any]:
    for item in items:
        yield item
    if stall:
        await asyncio.Event().wait()


async def _execute(call: Call, client: Any, marker: str) -> tuple[list[Any], Any, float]:
    import functools

    fn = functools.partial(_work.chaotic, marker=marker)
    items = _items(call)
    source: Any = _input(items, call.stall) if call.async_input else items
    options: dict[str, Any] = {
        "concurrency": call.concurrency,
        "context": _work.counting,
        "fail_fast": call.fail_fast,
        "max_failures": call.max_failures,
        "backend": DaskBackend(client, per_worker=call.per_worker, chunk_size=call.chunk_size),
    }
    if call.retry:
        options["retry"] = batchkit.Retry(
            attempts=2, backoff=batchkit.Backoff(initial=0.0, maximum=0.0)
        )
    if call.deadline is not None:
        options["deadline"] = batchkit.Deadline(seconds=call.deadline, grace=call.grace)
    loop = asyncio.get_running_loop()
    start = loop.time()
    if call.entry == "batch":
        report = await batchkit.batch_process(source, fn, **options)
        outcomes = list(report)
    else:
        ordered = call.entry == "stream_ordered"
        async with batchkit.stream(source, fn, ordered=ordered, **options) as out:
            outcomes = [o async for o in out]
        report = out.report
    return outcomes, report, loop.time() - start


async def _settled(client: Any) -> Counter[str]:
    """Once the abandoned cleanups on the workers ended: the workers' counters, summed."""
    while True:
        states: dict[str, dict[str, int]] = await client.run(_work.get_state)
        total: Counter[str] = Counter()
        for state in states.values():
            total.update(state)
        if total["stubborn"] == 0 and total["running"] == 0:
            return total
        await asyncio.sleep(0.05)


def _check(call: Call, outcomes: list[Any], report: Any, returned: float) -> None:
    n = len(call.behaviours)
    indices = [o.index for o in outcomes]
    # One envelope per index taken; all of a sized input, a prefix of an unsized one.
    assert sorted(indices) == list(range(len(indices))), indices
    assert len(set(indices)) == len(indices)
    if not call.async_input:
        assert len(indices) == n
    if call.entry == "stream_ordered":
        assert indices == sorted(indices)
    stopped = report.stop_reason is not None
    died = any(o.reruns for o in outcomes) or "die" in call.behaviours
    for o in outcomes:
        b = call.behaviours[o.index]
        if isinstance(o, Success):
            assert b in ("ok", "die"), (b, o)
            assert o.value == o.index
            continue
        assert isinstance(o, Failure)
        if b == "error":
            assert o.kind in ("error", "cancelled", "skipped", "lost"), o
        elif b == "unsendable":
            assert o.kind in ("error", "skipped", "lost"), o
            if o.kind == "error":
                assert isinstance(o.error, TypeError)
        elif b == "unloadable":
            assert o.kind in ("error", "cancelled", "skipped", "lost"), o
            if o.kind == "error":
                assert "No worker found" in str(o.error)
        elif b in ("hang", "stubborn"):
            assert o.kind in ("cancelled", "skipped", "lost"), o
        else:  # ok, die: only a stop or a lost worker keeps them from succeeding
            assert o.kind in ("cancelled", "skipped", "lost"), o
        if o.kind in ("cancelled", "skipped"):
            assert stopped, o
        if o.kind == "lost":
            assert died or stopped, o
    # Counts add up.
    if call.entry == "batch":
        assert sum(report.counts.values()) == len(report) == len(outcomes)
    assert report.reruns == sum(o.reruns for o in outcomes)
    assert set(report.abandoned) <= {o.index for o in outcomes if o.kind == "cancelled"}
    assert report.peak_concurrency <= call.concurrency, report.peak_concurrency
    if call.deadline is not None:
        assert returned <= call.deadline + call.grace + DaskBackend.SLACK, returned


@settings(
    max_examples=_EXAMPLES,
    deadline=None,
    phases=_PHASES,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(call=calls())
def test_every_item_ends_in_one_truthful_envelope_whatever_the_cluster_does(
    call: Call, cluster: Any, tmp_path: Path
) -> None:
    marker = str(tmp_path / f"died-{next(_COUNTER)}")

    async def main() -> None:
        async with distributed.Client(cluster.scheduler_address, asynchronous=True) as client:
            await wait_for_two(client, cluster)
            await client.run(_work.reset_state)
            outcomes, report, returned = await _execute(call, client, marker)
            _check(call, outcomes, report, returned)
            counters = await _settled(client)
            # Every context entered on a surviving worker was exited.
            assert counters["entered"] == counters["exited"], counters
            await wait_for_two(client, cluster)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 150))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
