"""``python -m benchmarks.simulated``: limit groups, item budgets and hedging on a simulated
upstream.

Issue 25, item 5. Every run happens in virtual time (a looptime event loop): ``fn`` sleeps
on the loop's clock, which jumps to the next timer, so a 55-second run takes milliseconds
of wall time and every figure is exact and the same on every machine (fixed seeds). The
figures measure scheduling decisions, not the engine's overhead (the other scenarios do).

The hedging comparison is in :mod:`benchmarks.sim_hedging`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import sys
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import batchkit
from batchkit import Backoff, LimitGroup, Retry

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = [
    "BudgetRow",
    "GroupsRow",
    "budget_rows",
    "groups_rows",
    "main",
    "markdown",
    "run_virtual",
]

SLOW_LIMIT = 4
FAST_LIMIT = 32


def run_virtual(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine on a fresh event loop in virtual time, starting at 0."""
    import looptime

    loop = asyncio.new_event_loop()
    assert isinstance(loop, asyncio.BaseEventLoop)
    patched = looptime.patch_event_loop(loop, start=0)
    try:
        return patched.run_until_complete(make())
    finally:
        loop.close()


# -- (a) two upstreams, limits 4 and 32 ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Call:
    upstream: str  # "slow" (limit 4) or "fast" (limit 32)
    latency: float


def two_upstreams(n: int, *, seed: int = 25) -> list[Call]:
    """A quarter of the items go to the slow upstream (1 s), the rest to the fast (0.1 s),
    interleaved at random, with +-20 % jitter."""
    rng = random.Random(seed)
    calls = []
    for _ in range(n):
        slow = rng.random() < 0.25
        base = 1.0 if slow else 0.1
        calls.append(Call("slow" if slow else "fast", base * rng.uniform(0.8, 1.2)))
    return calls


@dataclass(frozen=True, slots=True)
class GroupsRow:
    setup: str
    makespan: float
    lower_bound: float
    peak_slow: int
    peak_fast: int
    succeeded: int
    n: int


async def _run_groups(setup: str, calls: list[Call]) -> GroupsRow:
    loop = asyncio.get_running_loop()
    now = Counter[str]()
    peak = Counter[str]()

    async def fn(call: Call) -> None:
        now[call.upstream] += 1
        peak[call.upstream] = max(peak[call.upstream], now[call.upstream])
        try:
            await asyncio.sleep(call.latency)
        finally:
            now[call.upstream] -= 1

    def only(name: str) -> Callable[[Call], object]:
        return lambda c: c.upstream if c.upstream == name else None

    options: dict[str, Any]
    if setup == "groups":
        options = {
            "concurrency": SLOW_LIMIT + FAST_LIMIT,
            "groups": [
                LimitGroup(by=only("slow"), concurrency=SLOW_LIMIT),
                LimitGroup(by=only("fast"), concurrency=FAST_LIMIT),
            ],
        }
    elif setup == "global_4":
        options = {"concurrency": SLOW_LIMIT}
    else:
        options = {"concurrency": SLOW_LIMIT + FAST_LIMIT}
    start = loop.time()
    report = await batchkit.batch_process(calls, fn, **options)
    makespan = loop.time() - start
    slow = sum(c.latency for c in calls if c.upstream == "slow")
    fast = sum(c.latency for c in calls if c.upstream == "fast")
    return GroupsRow(
        setup=setup,
        makespan=makespan,
        lower_bound=max(slow / SLOW_LIMIT, fast / FAST_LIMIT, max(c.latency for c in calls)),
        peak_slow=peak["slow"],
        peak_fast=peak["fast"],
        succeeded=len(report.successes),
        n=len(calls),
    )


GROUP_SETUPS = {
    "groups": f"limit groups ({SLOW_LIMIT} + {FAST_LIMIT}), concurrency={SLOW_LIMIT + FAST_LIMIT}",
    "global_4": f"one global limit, concurrency={SLOW_LIMIT} (safe for the slow upstream)",
    "global_36": f"one global limit, concurrency={SLOW_LIMIT + FAST_LIMIT} (the sum)",
}


def groups_rows(n: int) -> list[GroupsRow]:
    calls = two_upstreams(n)
    return [run_virtual(functools.partial(_run_groups, s, calls)) for s in GROUP_SETUPS]


# -- (b) item budget vs Retry alone, an upstream failing 50 %, deadline=55 ---------------
OK_S = 0.5
"""A successful attempt's latency."""
TIMEOUT_S = 5.0
"""A failing attempt hangs until the per-attempt timeout ends it."""
DEADLINE_S = 55.0
BUDGET_S = 11.0
CONCURRENCY = 10


class Flaky:
    """An upstream whose attempts fail half the time, by hanging until the timeout.

    ``sticky``: half the items are sick (an attempt fails 90 % of the time) and half healthy
    (10 %), 50 % over all first attempts; otherwise every attempt fails with 50 %,
    independently. Draws are per (item, attempt), so every setup sees the same upstream.
    """

    def __init__(self, *, sticky: bool, seed: int = 55) -> None:
        self.sticky = sticky
        self.seed = seed
        self.attempts = Counter[int]()

    def fails(self, item: int) -> bool:
        attempt = self.attempts[item]
        self.attempts[item] += 1
        rng = random.Random(f"{self.seed}:{item}:{attempt}")
        if self.sticky:
            sick = random.Random(f"{self.seed}:{item}").random() < 0.5
            return rng.random() < (0.9 if sick else 0.1)
        return rng.random() < 0.5


@dataclass(frozen=True, slots=True)
class BudgetRow:
    upstream: str
    setup: str
    succeeded: int
    failed: int
    not_run: int
    attempts: int
    n: int


BUDGET_SETUPS = {
    "retry": "Retry(attempts=10) alone",
    "budget": f"Retry(attempts=10) + item_budget={BUDGET_S:g}",
}


async def _run_budget(setup: str, *, sticky: bool, n: int) -> BudgetRow:
    upstream = Flaky(sticky=sticky)

    async def fn(item: int) -> int:
        if upstream.fails(item):
            await asyncio.sleep(3600)  # hangs: the timeout ends it
        await asyncio.sleep(OK_S)
        return item

    options: dict[str, Any] = {
        "concurrency": CONCURRENCY,
        "timeout": TIMEOUT_S,
        "deadline": DEADLINE_S,
        "retry": Retry(
            attempts=10, backoff=Backoff(initial=0.5, maximum=4.0), rng=random.Random(1)
        ),
    }
    if setup == "budget":
        options["item_budget"] = BUDGET_S
    report = await batchkit.batch_process(range(n), fn, **options)
    not_run = sum(1 for f in report.failures if f.kind == "skipped")
    return BudgetRow(
        upstream="sticky" if sticky else "independent",
        setup=setup,
        succeeded=len(report.successes),
        failed=len(report.failures) - not_run,
        not_run=not_run,
        attempts=sum(upstream.attempts.values()),
        n=n,
    )


def budget_rows(n: int) -> list[BudgetRow]:
    return [
        run_virtual(functools.partial(_run_budget, s, sticky=k, n=n))
        for k in (True, False)
        for s in BUDGET_SETUPS
    ]


# -- the report ----------------------------------------------------------------------------
def markdown(groups: list[GroupsRow], budget: list[BudgetRow]) -> str:
    g0 = groups[0]
    out = [
        f"**Two upstreams** ({g0.n} items, a quarter to a slow upstream that allows "
        f"{SLOW_LIMIT} calls at once, 1 s each, the rest to a fast one allowing {FAST_LIMIT}, "
        f"0.1 s each, +-20 % jitter; lower bound {g0.lower_bound:.2f} s):",
        "",
        "| setup | makespan (s) | vs lower bound | slow upstream's peak in flight "
        "| fast upstream's peak in flight |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in groups:
        kept = r.peak_slow <= SLOW_LIMIT
        over = "" if kept else f" (limit {SLOW_LIMIT} exceeded)"
        # The bound assumes the limits hold: a run that breaks one is not comparable.
        ratio = f"{r.makespan / r.lower_bound:.2f}x" if kept else "n/a (limit broken)"
        out.append(
            f"| {GROUP_SETUPS[r.setup]} | {r.makespan:.2f} | {ratio} "
            f"| {r.peak_slow}{over} | {r.peak_fast} |"
        )
    b0 = budget[0]
    out += [
        "",
        f"**Item budget vs `Retry` alone** ({b0.n} items, concurrency={CONCURRENCY}, "
        f"deadline={DEADLINE_S:g}, timeout={TIMEOUT_S:g}; an attempt succeeds in {OK_S:g} s or "
        f"hangs until the timeout, half the time; backoff 0.5 s doubling to 4 s):",
        "",
        "| upstream | setup | finished before the deadline | failed | skipped (out of time) "
        "| attempts made |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for b in budget:
        what = (
            "sticky (half the items fail 90 %, half 10 %)"
            if b.upstream == "sticky"
            else "independent (every attempt 50 %)"
        )
        out.append(
            f"| {what} | {BUDGET_SETUPS[b.setup]} | {b.succeeded} | {b.failed} "
            f"| {b.not_run} | {b.attempts} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulated", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the harness's test")
    args = parser.parse_args(argv)
    groups = groups_rows(40 if args.smoke else 1000)
    budget = budget_rows(30 if args.smoke else 400)
    print(markdown(groups, budget), end="")
    from .sim_hedging import SIZES, hedge_markdown, hedge_rows

    hedging = [row for n in ((60,) if args.smoke else SIZES) for row in hedge_rows(n)]
    print("\n" + hedge_markdown(hedging), end="")
    from . import sim_outage  # issue 26: the breaker across cron ticks

    return sim_outage.main([])


if __name__ == "__main__":
    sys.exit(main())
