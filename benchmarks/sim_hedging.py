"""Hedged attempts on a heavy-tailed upstream under a deadline (issue 25, item 5).

Part of ``python -m benchmarks.simulated``; in virtual time like the rest of it (a looptime
event loop, fixed seeds), so the figures are exact and the same on every machine. The
upstream: an attempt takes a log-normal time with a median of 0.5 s and a p99 of 10 s, and
1 % of attempts hang (no timeout is set: a hung attempt runs until the deadline cuts it).
Each attempt draws its own time (seeded by item and attempt), so a hedge of a straggler
usually finishes quickly — which is what hedging bets on.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import batchkit
from batchkit import Hedge

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = ["HEDGE_SETUPS", "SIZES", "HedgeRow", "hedge_markdown", "hedge_rows"]

MEDIAN_S = 0.5
P99_S = 10.0
HANG_SHARE = 0.01
DEADLINE_S = 55.0
CONCURRENCY = 32
SIZES = (1200, 2000)
"""Both make the deadline bind. 1200 items are about 43 s of work per slot on average: the
stragglers and hung attempts at the end decide what is finished by 55 s. 2000 items are
about 72 s per slot: the run cannot finish them all, and every hung attempt holds a slot
until something cancels it."""
SIGMA = math.log(P99_S / MEDIAN_S) / 2.3263  # the normal distribution's 99th percentile

HEDGE_SETUPS: dict[str, Hedge | None] = {
    "none": None,
    "p95": Hedge(after="p95", budget=0.10),
}


def latency(seed: int, item: int, attempt: int) -> float:
    """One attempt's time: ``math.inf`` for a hang."""
    rng = random.Random(f"{seed}:{item}:{attempt}")
    if rng.random() < HANG_SHARE:
        return math.inf
    return MEDIAN_S * math.exp(SIGMA * rng.gauss(0.0, 1.0))


@dataclass(frozen=True, slots=True)
class HedgeRow:
    setup: str
    finished: int
    p99: float
    """The items' p99 latency, an unfinished item counting as infinitely late."""
    hedges: int
    attempts: int
    n: int


async def _run(setup: str, *, n: int, seed: int) -> HedgeRow:
    calls = Counter[int]()

    async def fn(item: int) -> int:
        calls[item] += 1
        seconds = latency(seed, item, calls[item])
        await asyncio.sleep(seconds if math.isfinite(seconds) else 3600.0)
        return item

    options: dict[str, Any] = {"concurrency": CONCURRENCY, "deadline": DEADLINE_S, "key": str}
    hedge = HEDGE_SETUPS[setup]
    if hedge is not None:
        options["hedge"] = hedge
    report = await batchkit.batch_process(range(n), fn, **options)
    times = sorted([s.elapsed for s in report.successes] + [math.inf] * len(report.failures))
    return HedgeRow(
        setup=setup,
        finished=len(report.successes),
        p99=times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)],
        hedges=report.hedges,
        attempts=sum(calls.values()),
        n=n,
    )


def _virtual(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    from .simulated import run_virtual

    return run_virtual(make)


def hedge_rows(n: int, seed: int = 25) -> list[HedgeRow]:
    return [_virtual(functools.partial(_run, s, n=n, seed=seed)) for s in HEDGE_SETUPS]


def hedge_markdown(rows: list[HedgeRow]) -> str:
    out = [
        f"**Hedging stragglers** (concurrency={CONCURRENCY}, deadline={DEADLINE_S:g}; an "
        f"attempt takes a log-normal time, median {MEDIAN_S:g} s, p99 {P99_S:g} s, and "
        f"{HANG_SHARE:.0%} of attempts hang; no timeout):",
        "",
        "| items | setup | finished before the deadline | p99 item latency (s) "
        "| extra attempts spent (hedges) | attempts made |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        what = "no hedging" if r.setup == "none" else "`Hedge(after='p95', budget=0.10)`"
        p99 = f"{r.p99:.2f}" if math.isfinite(r.p99) else "not finished"
        share = f"{r.hedges} ({r.hedges / r.n:.1%} of items)"
        out.append(f"| {r.n} | {what} | {r.finished} | {p99} | {share} | {r.attempts} |")
    return "\n".join(out) + "\n"
