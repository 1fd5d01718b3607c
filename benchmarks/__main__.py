"""``python -m benchmarks [--quick]``: run every scenario and write the results folder."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from ._report import evaluate, markdown, plot, write_docs
from ._runner import ROOT, Settings, machine, run_all, summarise
from ._scenarios import SCENARIOS, Mode

__all__ = ["main"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="batchkit against the other ways to run a batch, in one run.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, one repetition (<1 min)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, for the harness's test")
    parser.add_argument("--reps", type=int, help="repetitions (default: 3 full, 1 quick)")
    parser.add_argument(
        "--scenarios", help=f"comma-separated subset of: {', '.join(SCENARIOS)}", default=""
    )
    parser.add_argument("--contenders", help="comma-separated subset of contenders", default="")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (matplotlib is slow)")
    parser.add_argument(
        "--docs",
        action="store_true",
        help="write the results into docs/performance.md (and the plot into docs/img/)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        action="append",
        help="results.json of a run over older code: its targets become a 'before' column "
        "(repeatable: runs of different scenarios are merged)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        action="append",
        help="run nothing: merge these results.json files (runs of different scenarios, e.g. "
        "made side by side) and write the tables from them",
    )
    args = parser.parse_args(argv)

    mode: Mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    scenarios = tuple(s for s in args.scenarios.split(",") if s) or SCENARIOS
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    full = mode == "full"
    settings = Settings(
        mode=mode,
        reps=args.reps or (3 if full else 1),
        scenarios=scenarios,
        only=frozenset(c for c in args.contenders.split(",") if c) or None,
        parallel_latency=1 if full else 3,
        stream_reps=2 if full and not args.reps else None,
    )
    if args.merge:
        result = _merge([json.loads(path.read_text()) for path in args.merge])
    else:
        started = time.perf_counter()
        machine_before = machine()
        _log(f"batchkit benchmarks, {mode} mode, {settings.reps} repetition(s)")
        runs = run_all(settings, _log)
        summary = summarise(settings, runs)
        result = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_before,
            "load_average_after": machine()["load_average"],
            "settings": {**dataclasses.asdict(settings), "only": sorted(settings.only or ())},
            "elapsed_s": time.perf_counter() - started,
            "scenarios": summary,
            "targets": [dataclasses.asdict(t) for t in evaluate(summary)],
            "runs": runs,
        }
    if args.before:
        olds = [json.loads(path.read_text()) for path in args.before]
        result["before"] = {k: olds[0][k] for k in ("date", "machine", "settings")}
        result["before"]["targets"] = [t for old in olds for t in old["targets"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / "results.md").write_text(table)
    why_not = "plot skipped (--no-plot)" if args.no_plot else plot(result, args.out / "results.png")
    print(table)
    if why_not:
        _log(why_not)
    if args.docs:
        _log(write_docs(table, args.out / "results.png", ROOT / "docs"))
    _log(f"done in {result['elapsed_s']:.0f} s; results in {args.out}")
    return 0


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of different scenarios: scenarios in the usual order, the
    targets evaluated again over all of them, the highest load average of any."""
    scenarios: dict[str, Any] = {}
    for r in results:
        scenarios.update(r["scenarios"])
    ordered = {name: scenarios[name] for name in SCENARIOS if name in scenarios}
    first = results[0]
    loads = [r["machine"]["load_average"] for r in results]
    return {
        **first,
        "machine": {**first["machine"], "load_average": max(loads)},
        "load_average_after": max(r["load_average_after"] for r in results),
        "settings": {**first["settings"], "scenarios": list(ordered)},
        "elapsed_s": max(r["elapsed_s"] for r in results),
        "scenarios": ordered,
        "targets": [dataclasses.asdict(t) for t in evaluate(ordered)],
        "runs": [run for r in results for run in r["runs"]],
        "merged_from": len(results),
    }


if __name__ == "__main__":
    sys.exit(main())
