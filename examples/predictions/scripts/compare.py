"""Measure the figures quoted in docs/from-batches-to-batchkit.md, on the simulator.

    python examples/predictions/scripts/compare.py [--time-factor 0.2] [--seeds 3]

For each configuration and seed: a fresh SQLite database with 20 markets, the simulated
upstream (10-15 s calls, 2% 503, 3% 429 with Retry-After 2 s, 1% hangs) on loopback, one run.
The old pattern (batches of 5, a semaphore of 3, ``asyncio.wait_for(..., 30)`` per market, no
deadline) runs against the same simulator for comparison. Times are real-world seconds
(measured / time factor), so they include this machine's HTTP overhead scaled up.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from predictions.db import make_engine, make_session_factory
from predictions.forecast import forecast
from predictions.models import create_schema, seed_markets
from predictions.pipeline import RunConfig, run_job, select_markets
from predictions.simulator import SimulatorConfig, serve_simulator
from predictions.upstream import UpstreamClient, UpstreamURLs

CONFIGS = [
    RunConfig(concurrency=3, timeout=30, deadline=55),
    RunConfig(concurrency=5, timeout=20, deadline=55),
    RunConfig(concurrency=8, timeout=20, deadline=55),
    RunConfig(concurrency=10, timeout=20, deadline=55),
]


async def old_pattern(client: UpstreamClient, symbols: list[str], f: float) -> tuple[int, float]:
    """The seed's job: chunks of 5, gather with a semaphore of 3, 30 s wait_for, no retries."""
    semaphore = asyncio.Semaphore(3)
    done = 0

    async def one(symbol: str) -> None:
        nonlocal done
        async with semaphore:
            try:
                forecast(await asyncio.wait_for(client.signals(symbol), 30 * f))
                done += 1
            except Exception:  # the old job logged and moved on
                pass

    start = time.monotonic()
    for i in range(0, len(symbols), 5):
        await asyncio.gather(*(one(s) for s in symbols[i : i + 5]))
    return done, (time.monotonic() - start) / f


async def measure(f: float, seeds: int) -> None:
    print(f"time factor {f:g}; real-world seconds; 20 markets")
    print(f"{'configuration':<34}{'seed':>5}{'wall':>8}{'done':>6}  outcomes")
    for seed in range(seeds):
        sim = SimulatorConfig(
            error_rate=0.02, rate_limit_rate=0.03, hang_rate=0.01, time_factor=f, seed=seed
        )
        with tempfile.TemporaryDirectory() as tmp:
            engine = make_engine(f"sqlite+aiosqlite:///{Path(tmp) / 'c.db'}")
            sf = make_session_factory(engine)
            await create_schema(engine)
            await seed_markets(sf, 20)
            symbols = [m.symbol for m in await select_markets(sf, 20)]
            async with (
                serve_simulator(sim) as (url, _),
                UpstreamClient(UpstreamURLs.single(url)) as client,
            ):
                done, wall = await old_pattern(client, symbols, f)
            print(f"{'old: batches of 5, semaphore 3':<34}{seed:>5}{wall:>7.1f}s{done:>6}")
            await engine.dispose()
        for config in CONFIGS:
            with tempfile.TemporaryDirectory() as tmp:
                engine = make_engine(f"sqlite+aiosqlite:///{Path(tmp) / 'c.db'}")
                sf = make_session_factory(engine)
                await create_schema(engine)
                await seed_markets(sf, 20)
                async with (
                    serve_simulator(sim) as (url, _),
                    UpstreamClient(UpstreamURLs.single(url)) as client,
                ):
                    scaled = RunConfig(
                        concurrency=config.concurrency,
                        timeout=config.timeout,
                        deadline=config.deadline,
                        time_factor=f,
                    )
                    result = await run_job(sf, client, scaled)
                await engine.dispose()
            r = result.report
            name = f"batchkit c={config.concurrency} t={config.timeout:g} d={config.deadline:g}"
            outcomes = ", ".join(f"{v} {k}" for k, v in r.counts.items() if v)
            print(
                f"{name:<34}{seed:>5}{r.wall_time / f:>7.1f}s{r.counts['success']:>6}  {outcomes}"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--time-factor", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.time_factor, args.seeds))


if __name__ == "__main__":
    main()
