"""``python -m benchmarks.dask_compare [--quick] [--reps N]``: the local engine vs the Dask backend.

Three scenarios, each run against the in-process engine and against a ``LocalCluster`` of two
single-threaded worker processes (``DaskBackend(client, per_worker=...)``), at equal effective
concurrency:

- ``io``: 10,000 items of 20 ms ``asyncio.sleep`` at effective concurrency 32 (local: 32; Dask:
  2 workers x 16). Target: Dask makespan <= 1.1x the local engine's.
- ``cpu``: 400 items of a sync ``fn`` burning about 5 ms of CPU (the GIL holds one process to
  one core). Local: concurrency 2 (two threads); Dask: 2 workers x 1. Target: Dask throughput
  >= 1.8x the local engine's on 2 free cores.
- ``overhead``: 10,000 items that return at once: the per-item cost of each backend.

Prints one Markdown table with the medians of ``--reps`` runs (the cluster starts once; its
start-up time is reported apart and not counted in any makespan).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import batchkit

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["burn", "main", "nothing", "sleep_20ms"]


async def sleep_20ms(x: int) -> int:
    await asyncio.sleep(0.02)
    return x


def burn(x: int, seconds: float = 0.005) -> int:
    """About ``seconds`` of pure-Python CPU work (calibrated against the thread's CPU clock)."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += 1
    return x


async def nothing(x: int) -> int:
    return x


SCENARIOS: dict[str, tuple[Callable[..., Any], int, int, int, int]] = {
    # name: (fn, items, local concurrency, per_worker, dask concurrency). The Dask runs'
    # effective concurrency is min(concurrency, 2 workers x per_worker), equal to the local
    # one; their concurrency is twice that so one chunk can wait queued behind each running
    # one (see docs/how-to/dask.md).
    "io": (sleep_20ms, 10_000, 32, 16, 64),
    "cpu": (burn, 400, 2, 1, 4),
    "overhead": (nothing, 10_000, 32, 16, 64),
}


async def _time(run: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    report = await run()
    wall = time.perf_counter() - start
    assert len(report) == n, report.summary()
    assert report.ok, report.summary()
    return wall


async def _measure(reps: int, quick: bool) -> list[dict[str, Any]]:
    from batchkit.dask import DaskBackend

    dist: Any = importlib.import_module("distributed")  # partly typed: keep it Any here

    t0 = time.perf_counter()
    async with (
        dist.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
            asynchronous=True,
            silence_logs=40,
        ) as cluster,
        dist.Client(cluster, asynchronous=True) as client,
    ):
        startup = time.perf_counter() - t0
        print(f"cluster start-up: {startup:.2f} s", file=sys.stderr)
        rows: list[dict[str, Any]] = []
        for name, (fn, n, local_c, per_worker, dask_c) in SCENARIOS.items():
            if quick:
                n = max(n // 10, 40)
            items = range(n)
            backend = DaskBackend(client, per_worker=per_worker)

            def local(fn: Any = fn, c: int = local_c, items: range = items) -> Any:
                return batchkit.batch_process(items, fn, concurrency=c)

            def dask(
                fn: Any = fn, c: int = dask_c, items: range = items, backend: Any = backend
            ) -> Any:
                return batchkit.batch_process(items, fn, concurrency=c, backend=backend)

            await _time(dask, n)  # warm the workers (imports, first chunk sizes)
            local_t = [await _time(local, n) for _ in range(reps)]
            dask_t = [await _time(dask, n) for _ in range(reps)]
            lm, dm = statistics.median(local_t), statistics.median(dask_t)
            rows.append(
                {
                    "scenario": name,
                    "items": n,
                    "local_s": lm,
                    "dask_s": dm,
                    "ratio": dm / lm,
                    "local_us_per_item": 1e6 * lm / n,
                    "dask_us_per_item": 1e6 * dm / n,
                }
            )
            print(f"{name}: local {lm:.3f} s, dask {dm:.3f} s", file=sys.stderr)
        return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | items | local engine (s) | Dask, 2 workers (s) | Dask / local | "
        "local us/item | Dask us/item |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['items']} | {r['local_s']:.3f} | {r['dask_s']:.3f} | "
            f"{r['ratio']:.2f}x | {r['local_us_per_item']:.1f} | {r['dask_us_per_item']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dask_compare")
    parser.add_argument("--quick", action="store_true", help="a tenth of the items")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (medians are shown)")
    args = parser.parse_args(argv)
    rows = asyncio.run(_measure(args.reps, args.quick))
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}\n")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
