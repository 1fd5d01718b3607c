"""Scheduling and aggregation: fresh subprocess per measurement, repetitions interleaved
across contenders (round-robin, rotated each repetition so no one always goes first),
medians and ratios to the worker pool measured in the same run."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._contenders import LABELS, UVLOOP
from ._scenarios import Mode, Scenario, scenario

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["Settings", "machine", "run_all", "summarise"]

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "pool"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    mode: Mode
    reps: int
    scenarios: tuple[str, ...]
    only: frozenset[str] | None = None  # contender filter
    # Latency-bound scenarios barely use the CPU: in quick mode a few run at once to fit the
    # minute. CPU-bound ones (overhead, streaming) always run alone.
    parallel_latency: int = 1
    stream_reps: int | None = None  # the 1M-item scenario is the slowest; fewer reps in full


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or "unknown"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        # The machine may be shared: a load above the CPU count makes every figure noisier.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _run_one(sc: str, contender: str, mode: Mode) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.worker", sc, contender, mode]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired:
        return {"scenario": sc, "contender": contender, "error": "timed out after 900 s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"scenario": sc, "contender": contender, "error": " | ".join(tail)}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_all(
    settings: Settings,
    log: Callable[[str], None],
    runner: Callable[[str, str, Mode], dict[str, Any]] = _run_one,
) -> list[dict[str, Any]]:
    """Every (scenario, contender, repetition), interleaved; returns the raw runs."""
    runs: list[dict[str, Any]] = []
    scenarios = [scenario(name, settings.mode) for name in settings.scenarios]
    for rep in range(settings.reps):
        for sc in scenarios:
            if (
                sc.kind == "stream"
                and settings.stream_reps is not None
                and rep >= settings.stream_reps
            ):
                continue
            names = [c for c in sc.contenders if settings.only is None or c in settings.only]
            if not names:
                continue
            shift = rep % len(names)
            order = names[shift:] + names[:shift]
            started = time.perf_counter()
            if settings.parallel_latency > 1 and sc.kind == "makespan":
                with ThreadPoolExecutor(max_workers=settings.parallel_latency) as ex:
                    k = len(order)
                    batch = list(ex.map(runner, [sc.name] * k, order, [settings.mode] * k))
            else:
                batch = [runner(sc.name, c, settings.mode) for c in order]
            for r in batch:
                r["rep"] = rep
                if "error" in r:
                    log(f"  ! {sc.name} / {r['contender']}: {r['error']}")
                elif not r.get("valid", False):
                    log(f"  ! {sc.name} / {r['contender']}: invalid: {r.get('problems')}")
            runs.extend(batch)
            log(
                f"rep {rep + 1}/{settings.reps} {sc.name}: {len(order)} contenders "
                f"in {time.perf_counter() - started:.1f} s"
            )
    return runs


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 and not (math.isnan(a) or math.isnan(b)) else None


def summarise(settings: Settings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (scenario, contender), ratios to the pool, lower bounds."""
    out: dict[str, Any] = {}
    for name in settings.scenarios:
        sc = scenario(name, settings.mode)
        rows: list[dict[str, Any]] = []
        for c in sc.contenders:
            mine = [r for r in runs if r["scenario"] == name and r["contender"] == c]
            if not mine:
                continue
            good = [r for r in mine if "error" not in r]
            walls = [r["wall_s"] for r in good]
            per_item = [r["wall_s"] / r["n"] * 1e6 for r in good]
            row: dict[str, Any] = {
                "contender": c,
                "label": LABELS[c],
                "n": sc.n_for(c),
                "runs": len(good),
                "errors": [r["error"] for r in mine if "error" in r],
                "valid": bool(good) and all(r["valid"] for r in good),
                "problems": sorted({p for r in good for p in r.get("problems", [])}),
                "wall_s": _median(walls),
                "us_per_item": _median(per_item),
                # The worst stall of any repetition: a target is about the worst case.
                "stall_ms": max((r["stall_ms"] for r in good), default=float("nan")),
                "stall_cpu_ms": max((r["stall_cpu_ms"] for r in good), default=float("nan")),
            }
            if sc.kind in ("stream", "report", "deadline"):
                row["rss_delta_mb"] = _median([r["rss_delta_mb"] for r in good])
                row["rss_kept_mb"] = _median([r.get("rss_kept_mb", math.nan) for r in good])
                row["rss_method"] = good[0]["rss_method"] if good else ""
            if sc.kind == "stream":
                row["read_ahead"] = max((r["read_ahead"] for r in good), default=0)
            if sc.kind == "deadline":
                row["wall_max_s"] = max(walls, default=math.nan)
            if sc.kind == "startup":
                row["import_ms"] = _median([r["import_ms"] for r in good])
                row["asyncio_import_ms"] = _median([r["asyncio_import_ms"] for r in good])
                row["import_cpu_ms"] = _median([r.get("import_cpu_ms", math.nan) for r in good])
            if sc.kind == "makespan":
                row["efficiency"] = sc.lower_bound() / row["wall_s"]
                row["vs_greedy"] = sc.greedy() / row["wall_s"]
            rows.append(row)
        for row in rows:
            # uvloop rows are compared with the pool on uvloop, measured in the same run.
            ref_name = REFERENCE + UVLOOP if row["contender"].endswith(UVLOOP) else REFERENCE
            ref = next((r for r in rows if r["contender"] == ref_name), None)
            key = "wall_s" if sc.kind == "makespan" else "us_per_item"
            row["ratio"] = _ratio(row[key], ref[key]) if ref is not None else None
        out[name] = {"title": sc.title, "kind": sc.kind, "note": sc.note, **_bounds(sc, rows)}
        out[name]["rows"] = rows
    return out


def _bounds(sc: Scenario, rows: list[dict[str, Any]]) -> dict[str, Any]:
    if sc.kind == "makespan":
        return {
            "lower_bound_s": sc.lower_bound(),
            "greedy_s": sc.greedy(),
            "greedy_efficiency": sc.lower_bound() / sc.greedy(),
            "sequential_s": sum(sc.durations()),
        }
    if sc.kind == "overhead":
        floor = next((r for r in rows if r["contender"] == "floor"), None)
        return {"floor_us_per_item": floor["us_per_item"] if floor else None}
    return {}
