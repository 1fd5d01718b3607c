"""The breaker's half-open rule over random inputs, in virtual time: against an upstream
that is always down, once the circuit has opened every attempt is a probe — none before the
cool-down, one at a time, each a cool-down after the last one failed — and every item ends
``error`` (an attempt) or ``skipped``, whatever the arrivals, latencies, concurrency and
thresholds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypothesis import given, settings
from hypothesis import strategies as st

from batchkit import Breaker, Failure, ItemSkipped, MemoryStateStore, batch_process
from batchkit.testing import run_virtual

from ..helpers import now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@dataclass(frozen=True)
class Case:
    gaps: list[int]  # virtual seconds before each item arrives
    latencies: list[int]
    concurrency: int
    open_after: int
    cool_down: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 30))
    return Case(
        gaps=draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)),
        latencies=draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)),
        concurrency=draw(st.integers(1, 6)),
        open_after=draw(st.integers(1, 4)),
        cool_down=draw(st.integers(1, 10)),  # >= 1: no probe at the instant it opens
    )


async def run(case: Case) -> tuple[list[tuple[float, float]], list[str]]:
    attempts: list[tuple[float, float]] = []

    async def down(i: int) -> int:
        start = now()
        await asyncio.sleep(case.latencies[i])
        attempts.append((start, now()))
        raise ConnectionError(i)

    async def items() -> AsyncIterator[int]:
        for i, gap in enumerate(case.gaps):
            await asyncio.sleep(gap)
            yield i

    breaker = Breaker(
        MemoryStateStore(clock=now),
        name="up",
        open_after=case.open_after,
        cool_down=case.cool_down,
        clock=now,
    )
    report = await batch_process(items(), down, concurrency=case.concurrency, breaker=breaker)
    kinds: list[str] = []
    for o in report:
        assert isinstance(o, Failure)
        if o.kind == "skipped":
            assert isinstance(o.error, ItemSkipped)
            assert o.error.reason == "circuit_open"
        kinds.append(o.kind)
    return attempts, kinds


@settings(max_examples=150, deadline=None)
@given(cases())
def test_once_open_every_attempt_is_a_lone_probe_a_cool_down_apart(case: Case) -> None:
    attempts, kinds = run_virtual(run(case))
    assert set(kinds) <= {"error", "skipped"}
    assert kinds.count("error") == len(attempts)
    ends = sorted(end for _, end in attempts)
    if len(ends) < case.open_after:
        assert "skipped" not in kinds
        return
    opened = ends[case.open_after - 1]  # the open_after-th failure to end
    # An attempt starting at the very instant it opened may have been admitted just before.
    probes = sorted((s, e) for s, e in attempts if s > opened)
    reopened = opened
    for start, end in probes:
        assert start >= reopened + case.cool_down, (probes, opened)
        reopened = end  # the probe failed: open again from its end; the next one waits
