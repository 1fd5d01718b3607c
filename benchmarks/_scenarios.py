"""What is measured: the scenarios, their sizes per mode, and their analytic lower bounds.

Everything here is deterministic (fixed seeds), so the runner and every worker subprocess
derive the same latencies and the same bounds independently.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "MODES",
    "SCENARIOS",
    "Mode",
    "Scenario",
    "greedy_makespan",
    "lognormal_latencies",
    "scenario",
]

Mode: TypeAlias = Literal["full", "quick", "smoke"]
MODES: tuple[Mode, ...] = ("full", "quick", "smoke")

Kind: TypeAlias = Literal["overhead", "makespan", "stream", "report", "deadline", "startup"]
FnKind: TypeAlias = Literal["immediate", "sleep0", "latency", "slow", "none"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """One scenario at one size. ``latencies`` is ``None`` for the overhead kinds; a latency of
    ``math.inf`` marks an item that never finishes (only its timeout ends it)."""

    name: str
    title: str
    kind: Kind
    fn: FnKind
    n: int
    concurrency: int
    timeout: float
    contenders: tuple[str, ...]
    latencies: tuple[float, ...] | None = None
    expected_failures: int | None = 0
    """``None``: not checked (a deadline decides how many items fail)."""
    note: str = ""
    # Contenders too slow to run at full size in the time budget run on fewer items; every
    # figure of theirs is per item, and the table says how many items they ran.
    reduced: tuple[tuple[str, int], ...] = ()

    def n_for(self, contender: str) -> int:
        return dict(self.reduced).get(contender, self.n)

    def durations(self) -> list[float]:
        """Each item's time in a slot: its latency, or the timeout if it would run longer."""
        assert self.latencies is not None
        return [min(x, self.timeout) for x in self.latencies]

    def lower_bound(self) -> float:
        """No schedule with ``concurrency`` slots can finish sooner than this."""
        d = self.durations()
        return max(sum(d) / self.concurrency, max(d))

    def greedy(self) -> float:
        """The overhead-free greedy in-input-order makespan (what a perfect sliding window
        reaches without reordering)."""
        return greedy_makespan(self.durations(), self.concurrency)


def greedy_makespan(durations: Sequence[float], slots: int) -> float:
    """Start each item, in order, in the slot that frees first; return the last end."""
    ends = [0.0] * min(slots, max(len(durations), 1))
    heapq.heapify(ends)
    last = 0.0
    for d in durations:
        end = heapq.heappop(ends) + d
        last = max(last, end)
        heapq.heappush(ends, end)
    return last


def lognormal_latencies(n: int, *, seed: int, median: float, sigma: float) -> tuple[float, ...]:
    """Fixed-seed lognormal latencies: most items fast, a heavy tail of slow ones."""
    rng = random.Random(seed)
    return tuple(rng.lognormvariate(math.log(median), sigma) for _ in range(n))


def _hung_latencies(n: int, *, seed: int, latency: float, hung_share: float) -> tuple[float, ...]:
    rng = random.Random(seed)
    hung = set(rng.sample(range(n), round(n * hung_share)))
    return tuple(math.inf if i in hung else latency for i in range(n))


# Contender groups (names resolved in _contenders).
_EVERYONE = (
    "pool",
    "batch_process",
    "stream",
    "gather",
    "barrier",
    "aiometer",
    "aiostream",
    "aiostream_unordered",
    "anyio",
)
# Streaming over a 1M-item generator: only the contenders that can consume a lazy input with
# bounded memory. gather and anyio create a task per item up front; aiometer.amap needs a
# sized Sequence (it calls len(args)); batch_process keeps every outcome for its report.
_STREAMING = (
    "pool",
    "stream",
    "stream_ordered",
    "barrier",
    "aiostream",
    "aiostream_unordered",
)
# The same code on a uvloop event loop (issue 15, item 6).
_UVLOOP = ("pool_uvloop", "batch_process_uvloop", "stream_uvloop")
# Over 10x slower than the pool per item: measured on a tenth of the overhead items.
_SLOW = ("aiometer", "aiostream", "aiostream_unordered", "anyio")
_OTEL = ("batch_process", "bp_observer", "bp_otel_imported", "bp_otel_nosdk", "bp_otel_sdk")
_POLICIES = (
    "pool",
    "batch_process",
    "bp_retry",
    "bp_rate_limit",
    "bp_observer",
    "bp_context",
)

SCENARIOS: tuple[str, ...] = (
    "overhead_immediate",
    "overhead_sleep0",
    "makespan",
    "seed_x100",
    "hung",
    "stream_memory",
    "policy_costs",
    "otel_overhead",
    "report_1m",
    "deadline_1m",
    "deadline_5m",
    "startup",
)

_OVERHEAD_N: dict[Mode, int] = {"full": 100_000, "quick": 10_000, "smoke": 300}
_STREAM_N: dict[Mode, int] = {"full": 1_000_000, "quick": 50_000, "smoke": 2_000}
_REPORT_N: dict[Mode, int] = {"full": 1_000_000, "quick": 200_000, "smoke": 2_000}
_DEADLINE_N: dict[str, dict[Mode, int]] = {
    "deadline_1m": {"full": 1_000_000, "quick": 1_000_000, "smoke": 10_000},
    "deadline_5m": {"full": 5_000_000, "quick": 2_000_000, "smoke": 20_000},
}
_IMPORT_RUNS: dict[Mode, int] = {"full": 15, "quick": 7, "smoke": 3}
SLOW_FN_S = 0.05
"""How long the deadline scenarios' ``fn`` sleeps per item."""


def scenario(name: str, mode: Mode) -> Scenario:
    """The scenario ``name`` at the size used in ``mode``."""
    if name in ("overhead_immediate", "overhead_sleep0", "policy_costs", "otel_overhead"):
        n = _OVERHEAD_N[mode]
        immediate = name in ("overhead_immediate", "otel_overhead")
        return Scenario(
            name=name,
            title=(
                f"OpenTelemetry's cost, overhead_immediate's run ({n:,} items, C=100)"
                if name == "otel_overhead"
                else f"overhead, fn returns at once ({n:,} items, C=100)"
                if immediate
                else f"overhead, fn awaits sleep(0) ({n:,} items, C=100)"
                if name == "overhead_sleep0"
                else f"policy costs, fn awaits sleep(0) ({n:,} items, C=100)"
            ),
            kind="overhead",
            fn="immediate" if immediate else "sleep0",
            n=n,
            concurrency=100,
            timeout=60.0,
            contenders=(
                _POLICIES
                if name == "policy_costs"
                else _OTEL
                if name == "otel_overhead"
                else (*_EVERYONE, "floor", *_UVLOOP)
            ),
            note="" if mode == "full" else f"{mode} mode: {n:,} items instead of 100,000",
            reduced=tuple((c, n // 10) for c in _SLOW),
        )
    if name == "makespan":
        median = {"full": 0.02, "quick": 0.01, "smoke": 0.001}[mode]
        lat = lognormal_latencies(200, seed=20240601, median=median, sigma=1.2)
        return Scenario(
            name=name,
            title=(
                f"makespan (200 items, C=10, lognormal latencies, "
                f"median {median * 1e3:g} ms, sigma 1.2)"
            ),
            note="" if mode == "full" else f"{mode} mode: median latency {median * 1e3:g} ms",
            kind="makespan",
            fn="latency",
            n=len(lat),
            concurrency=10,
            timeout=30.0,
            latencies=lat,
            contenders=(*_EVERYONE, "stream_ordered", "bp_cost"),
        )
    if name == "seed_x100":
        return Scenario(
            name=name,
            title="the seed's case x100 (20 items x 150 ms, C=3)",
            kind="makespan",
            fn="latency",
            n=20,
            concurrency=3,
            timeout=1.0,
            latencies=(0.15,) * 20,
            contenders=_EVERYONE,
            note="sequential 3.0 s, batches of 5 with a barrier 1.2 s, ideal 1.05 s",
        )
    if name == "hung":
        lat = _hung_latencies(100, seed=7, latency=0.02, hung_share=0.1)
        return Scenario(
            name=name,
            title="hung items (100 items x 20 ms, 10% never finish, timeout 0.2 s, C=10)",
            kind="makespan",
            fn="latency",
            n=len(lat),
            concurrency=10,
            timeout=0.2,
            latencies=lat,
            expected_failures=sum(1 for x in lat if math.isinf(x)),
            contenders=(*_EVERYONE, "stream_ordered", *_UVLOOP),
        )
    if name == "stream_memory":
        n = _STREAM_N[mode]
        return Scenario(
            name=name,
            title=f"streaming memory ({n:,}-item generator, fn awaits sleep(0), C=50)",
            kind="stream",
            fn="sleep0",
            n=n,
            concurrency=50,
            timeout=60.0,
            contenders=_STREAMING,
            note="" if mode == "full" else f"{mode} mode: {n:,} items instead of 1,000,000",
            reduced=(
                ("barrier", n // 10),
                ("aiostream", n // 40),
                ("aiostream_unordered", n // 40),
            ),
        )
    if name == "report_1m":
        n = _REPORT_N[mode]
        return Scenario(
            name=name,
            title=f"a big report ({n:,} items, fn returns at once, C=100)",
            kind="report",
            fn="immediate",
            n=n,
            concurrency=100,
            timeout=60.0,
            contenders=("pool", "batch_process", "bp_key", "stream"),
            note=(
                "batch_process keeps its report, the pool its list of results, stream's "
                "consumer only counts"
                + ("" if mode == "full" else f"; {mode} mode: {n:,} items instead of 1,000,000")
            ),
        )
    if name in _DEADLINE_N:
        n = _DEADLINE_N[name][mode]
        return Scenario(
            name=name,
            title=(
                f"a deadline over a big sized input (range({n:,}), fn sleeps "
                f"{SLOW_FN_S * 1e3:g} ms, C=4, deadline=0.2)"
            ),
            kind="deadline",
            fn="slow",
            n=n,
            concurrency=4,
            timeout=60.0,
            contenders=("bp_deadline",),
            expected_failures=None,
        )
    if name == "startup":
        runs = _IMPORT_RUNS[mode]
        return Scenario(
            name=name,
            title=f"start-up: import batchkit after import asyncio (median of {runs} runs)",
            kind="startup",
            fn="none",
            n=runs,
            concurrency=1,
            timeout=60.0,
            contenders=("import",),
            note="python -X importtime -c 'import asyncio; import batchkit', bytecode compiled",
        )
    raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
