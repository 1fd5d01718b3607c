"""One measurement in a fresh process: ``python -m benchmarks.worker SCENARIO CONTENDER MODE``.

Prints one JSON object on stdout: wall time, outcome counts, the longest event-loop stall seen
by a 5 ms heartbeat task, and for the streaming scenario the peak RSS growth and the largest
read-ahead (items pulled from the input but not yet handed to the consumer). The report and
deadline scenarios add the peak RSS growth and what stays in memory with the result kept;
the start-up scenario times imports in subprocesses. A contender whose name ends in
``_uvloop`` runs on a uvloop event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from ._contenders import UVLOOP, Collector, Job, get
from ._scenarios import MODES, SLOW_FN_S, Mode, Scenario, scenario

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["measure", "main"]

HEARTBEAT = 0.005


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # not Linux
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is the run's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class _Heartbeat:
    """Ticks every 5 ms. The longest gap between ticks minus 5 ms is the worst stall a
    concurrent request handler would have seen (``max_gap``). On a shared machine that wall
    gap also counts time the OS gave to other processes, so the loop thread's own CPU time
    between ticks (``max_cpu_gap``) is kept too: it is what the loop itself spent without
    letting the heartbeat run. Optionally samples RSS on each tick."""

    def __init__(self, *, sample_rss: bool) -> None:
        self.max_gap = 0.0
        self.max_cpu_gap = 0.0
        self.last = time.perf_counter()
        self.last_cpu = time.thread_time()
        self.sample_rss = sample_rss
        self.max_rss_kb = 0

    def tick(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        self.max_gap = max(self.max_gap, now - self.last)
        self.max_cpu_gap = max(self.max_cpu_gap, cpu - self.last_cpu)
        self.last, self.last_cpu = now, cpu

    async def run(self) -> None:
        self.last, self.last_cpu = time.perf_counter(), time.thread_time()
        while True:
            await asyncio.sleep(HEARTBEAT)
            self.tick()
            if self.sample_rss:
                self.max_rss_kb = max(self.max_rss_kb, _status_kb("VmRSS") or 0)


def _fn(sc: Scenario) -> Any:
    if sc.fn == "immediate":

        async def immediate(item: int) -> int:
            return item

        return immediate
    if sc.fn == "sleep0":
        sleep = asyncio.sleep

        async def sleep0(item: int) -> int:
            await sleep(0)
            return item

        return sleep0
    if sc.fn == "slow":

        async def slow(item: int) -> int:
            await asyncio.sleep(SLOW_FN_S)
            return item

        return slow
    assert sc.latencies is not None
    latencies = sc.latencies

    async def latency(item: int) -> int:
        d = latencies[item]
        if math.isinf(d):
            await asyncio.get_running_loop().create_future()  # never resolved: hangs
        await asyncio.sleep(d)
        return item

    return latency


class _ReadAhead:
    """A generator over ``range(n)`` that records, at each pull, how many items were pulled
    but not yet handed to the consumer."""

    def __init__(self, n: int, out: Collector) -> None:
        self.n = n
        self.out = out
        self.max = 0

    def __iter__(self) -> Iterator[int]:
        consumed = self.out.consumed
        for i in range(self.n):
            ahead = i - consumed()
            if ahead > self.max:
                self.max = ahead
            yield i


def _mode(mode: str) -> Mode:
    for m in MODES:
        if m == mode:
            return m
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


async def measure(scenario_name: str, contender: str, mode: str) -> dict[str, Any]:
    """Run one contender on one scenario in this process and return the measurements."""
    sc = scenario(scenario_name, _mode(mode))
    run = get(contender)
    streaming = sc.kind == "stream"
    peak_rss = sc.kind in ("stream", "report", "deadline")
    n = sc.n_for(contender)
    # A stream's consumer only counts: a benchmark that kept every envelope would measure
    # its own list (issue 15, item 1). Everyone else keeps what it returns.
    out = Collector(keep=not streaming and not contender.startswith("stream"))
    reader = _ReadAhead(n, out) if streaming else None
    cost = None
    if contender == "bp_cost":
        assert sc.latencies is not None
        cost = sc.durations().__getitem__
    job = Job(
        items=reader if reader is not None else range(n),
        fn=_fn(sc),
        concurrency=sc.concurrency,
        timeout=sc.timeout,
        cost=cost,
    )
    gc.collect()
    rss_before = _status_kb("VmRSS")
    peak_reset = peak_rss and _reset_peak_rss()
    heartbeat = _Heartbeat(sample_rss=peak_rss)
    beat = asyncio.create_task(heartbeat.run())
    await asyncio.sleep(0)  # let the heartbeat start its first tick
    start = time.perf_counter()
    await run(job, out)
    wall = time.perf_counter() - start
    beat.cancel()
    heartbeat.tick()  # a stall still under way when the run ended counts too

    result: dict[str, Any] = {
        "scenario": scenario_name,
        "contender": contender,
        "mode": mode,
        "n": n,
        "wall_s": wall,
        "stall_ms": max(0.0, heartbeat.max_gap - HEARTBEAT) * 1e3,
        "stall_cpu_ms": max(0.0, heartbeat.max_cpu_gap - HEARTBEAT) * 1e3,
    }
    if peak_rss:
        peak_kb = _status_kb("VmHWM") if peak_reset else None
        if peak_kb is None:
            peak_kb = heartbeat.max_rss_kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["rss_delta_mb"] = max(0, peak_kb - (rss_before or 0)) / 1024
        result["rss_method"] = "VmHWM reset" if peak_reset else "VmRSS sampled"
        # What the kept result costs once the run's own garbage is gone.
        gc.collect()
        result["rss_kept_mb"] = max(0, (_status_kb("VmRSS") or 0) - (rss_before or 0)) / 1024
    if streaming:
        assert reader is not None
        result["read_ahead"] = reader.max
    done, failed = out.outcomes()
    result["outcomes"] = done
    result["failed"] = failed
    problems = []
    if done != n:
        problems.append(f"{done} outcomes for {n} items")
    if sc.expected_failures is not None and failed != sc.expected_failures:
        problems.append(f"{failed} failures, expected {sc.expected_failures}")
    if out.report is not None:
        # The report is complete: every item has exactly one envelope, readable at both ends.
        report = out.report
        if len(report) != n or (n and report[n - 1].index != n - 1):
            problems.append(f"report of {len(report)} outcomes for {n} items")
    result["valid"] = not problems
    result["problems"] = problems
    return result


def _import_us(module: str, lines: list[str]) -> int:
    for line in lines:
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == module and not parts[2].startswith("  "):
            return int(parts[1])
    raise ValueError(f"{module} not in the -X importtime output")


def _child_cpu(cmd: list[str]) -> float:
    """CPU seconds (user + system) that running ``cmd`` to its end cost."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure_startup(scenario_name: str, mode: str) -> dict[str, Any]:
    """``import batchkit`` after ``import asyncio``, each in a fresh interpreter (``-X
    importtime``): the median of batchkit's cumulative import time over the scenario's runs.
    The package's bytecode is compiled first, as an installed wheel's is."""
    import compileall
    import importlib.util

    sc = scenario(scenario_name, _mode(mode))
    spec = importlib.util.find_spec("batchkit")
    assert spec is not None
    assert spec.submodule_search_locations
    compileall.compile_dir(spec.submodule_search_locations[0], quiet=1)
    batchkit_us: list[int] = []
    asyncio_us: list[int] = []
    # The same in CPU time (the child's user + system), which a busy machine disturbs less:
    # an interpreter importing asyncio and batchkit minus one importing asyncio alone.
    cpu: dict[bool, list[float]] = {True: [], False: []}
    start = time.perf_counter()
    for _ in range(sc.n):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import asyncio; import batchkit"],
            capture_output=True,
            text=True,
            check=True,
        )
        lines = proc.stderr.splitlines()
        batchkit_us.append(_import_us("batchkit", lines))
        asyncio_us.append(_import_us("asyncio", lines))
        for with_batchkit in (True, False):
            code = "import asyncio" + ("; import batchkit" if with_batchkit else "")
            cpu[with_batchkit].append(_child_cpu([sys.executable, "-c", code]))
    return {
        "scenario": scenario_name,
        "contender": "import",
        "mode": mode,
        "n": sc.n,
        "wall_s": time.perf_counter() - start,
        "stall_ms": 0.0,
        "stall_cpu_ms": 0.0,
        "import_ms": statistics.median(batchkit_us) / 1e3,
        "asyncio_import_ms": statistics.median(asyncio_us) / 1e3,
        "import_cpu_ms": (statistics.median(cpu[True]) - statistics.median(cpu[False])) * 1e3,
        "outcomes": sc.n,
        "failed": 0,
        "valid": True,
        "problems": [],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("scenario")
    parser.add_argument("contender")
    parser.add_argument("mode", choices=MODES)
    args = parser.parse_args(argv)
    if scenario(args.scenario, _mode(args.mode)).kind == "startup":
        result = measure_startup(args.scenario, args.mode)
    elif args.contender.endswith(UVLOOP):
        import uvloop

        result = uvloop.run(measure(args.scenario, args.contender, args.mode))
    else:
        result = asyncio.run(measure(args.scenario, args.contender, args.mode))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
