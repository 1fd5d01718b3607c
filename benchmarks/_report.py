"""Targets (met or missed), the markdown tables and the PNG plot."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._contenders import DEADLINE

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Target", "evaluate", "markdown", "plot", "write_docs"]

START = "<!-- results:start (written by python -m benchmarks --docs) -->"
END = "<!-- results:end -->"

BATCHKIT = ("batch_process", "stream", "stream_ordered", "bp_cost", "bp_retry", "bp_rate_limit",
            "bp_observer", "bp_context", "bp_key", "bp_deadline", "batch_process_uvloop",
            "stream_uvloop")  # fmt: skip
OVERHEAD_MAX = 1.3
GREEDY_MIN = 0.99  # within 1% of the greedy in-order ideal
IDEAL_SLACK = 1.02  # "at ideal": within 2% of the ideal makespan
RSS_MAX_MB = 60.0
STREAM_WALL_MAX = 1.5
STALL_MAX_MS = 20.0
COST_MIN = 0.97
# Issue 15.
STALL_100K_MS = 10.0
STALL_1M_MS = 20.0
REPORT_MB = 100.0
REPORT_KEY_MB = 150.0
ORDERED_MIN = 0.95
HUNG_SLACK = 1.05
GRACE_S = 1.0  # Deadline(grace=1.0), the default
IMPORT_MS = 20.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    name: str
    measured: str
    threshold: str
    met: bool
    value: float | None = None
    item: int | None = None
    """The item of issue 15 this target measures, if any."""


def _row(summary: dict[str, Any], scenario: str, contender: str) -> dict[str, Any] | None:
    sc = summary.get(scenario)
    if sc is None:
        return None
    return next((r for r in sc["rows"] if r["contender"] == contender and r["runs"]), None)


def _ok(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def evaluate(summary: dict[str, Any]) -> list[Target]:
    """Every target of issue 7 that this run measured."""
    out: list[Target] = []
    for sc in ("overhead_immediate", "overhead_sleep0"):
        for c in ("batch_process", "stream"):
            row = _row(summary, sc, c)
            if row is None or not _ok(row["ratio"]):
                continue
            out.append(
                Target(
                    name=f"{c} per-item overhead vs pool, {sc}",
                    measured=f"{row['ratio']:.2f}x ({row['us_per_item']:.2f} µs/item)",
                    threshold=f"<= {OVERHEAD_MAX}x",
                    met=row["ratio"] <= OVERHEAD_MAX and row["valid"],
                    value=row["ratio"],
                )
            )
    if "makespan" in summary:
        greedy_eff = summary["makespan"]["greedy_efficiency"]
        for c in ("batch_process", "stream", "pool"):
            row = _row(summary, "makespan", c)
            if row is None:
                continue
            out.append(
                Target(
                    name=f"makespan efficiency, {c}"
                    + (" (reference, not a batchkit target)" if c == "pool" else ""),
                    measured=(
                        f"{row['efficiency']:.3f} = {row['vs_greedy']:.3f} of greedy "
                        f"{greedy_eff:.3f}"
                    ),
                    threshold=f">= {GREEDY_MIN} of greedy",
                    met=row["vs_greedy"] >= GREEDY_MIN and row["valid"],
                    value=row["vs_greedy"],
                )
            )
    for sc in ("seed_x100", "hung"):
        if sc not in summary:
            continue
        ideal = summary[sc]["greedy_s"]
        for c in ("batch_process", "stream"):
            row = _row(summary, sc, c)
            if row is None:
                continue
            out.append(
                Target(
                    name=f"{sc} at ideal, {c}",
                    measured=f"{row['wall_s']:.3f} s = {row['wall_s'] / ideal:.3f}x ideal",
                    threshold=f"<= {IDEAL_SLACK}x ideal {ideal:.3f} s",
                    met=row["wall_s"] <= IDEAL_SLACK * ideal and row["valid"],
                    value=row["wall_s"] / ideal,
                )
            )
    row = _row(summary, "stream_memory", "stream")
    if row is not None:
        n = row["n"]
        out.append(
            Target(
                name=f"stream over {n:,} items: peak RSS growth",
                measured=f"{row['rss_delta_mb']:.1f} MB",
                threshold=f"<= {RSS_MAX_MB:g} MB",
                met=row["rss_delta_mb"] <= RSS_MAX_MB and row["valid"],
                value=row["rss_delta_mb"],
            )
        )
        if _ok(row["ratio"]):
            out.append(
                Target(
                    name=f"stream over {n:,} items: wall vs pool",
                    measured=f"{row['ratio']:.2f}x ({row['wall_s']:.2f} s)",
                    threshold=f"<= {STREAM_WALL_MAX}x",
                    met=row["ratio"] <= STREAM_WALL_MAX and row["valid"],
                    value=row["ratio"],
                )
            )
    for name, sc in summary.items():
        mine = [r for r in sc["rows"] if r["contender"] in BATCHKIT and r["runs"]]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r["stall_cpu_ms"])
        wall = max(r["stall_ms"] for r in mine)
        out.append(
            Target(
                name=f"longest event-loop stall, batchkit, {name}",
                measured=(
                    f"{worst['stall_cpu_ms']:.1f} ms loop CPU ({worst['contender']}); "
                    f"{wall:.1f} ms wall"
                ),
                threshold=f"<= {STALL_MAX_MS:g} ms",
                met=worst["stall_cpu_ms"] <= STALL_MAX_MS,
                value=worst["stall_cpu_ms"],
            )
        )
    out += _issue15(summary)
    row = _row(summary, "makespan", "bp_cost")
    if row is not None:
        out.append(
            Target(
                name="cost hints: makespan efficiency vs lower bound",
                measured=f"{row['efficiency']:.3f}",
                threshold=f">= {COST_MIN}",
                met=row["efficiency"] >= COST_MIN and row["valid"],
                value=row["efficiency"],
            )
        )
    return out


def _issue15(summary: dict[str, Any]) -> list[Target]:
    """The targets of issue 15 (loop stalls, report memory, ordered streams, a deadline over
    a big input, start-up, uvloop), each tagged with its item."""
    out: list[Target] = []

    def stall(sc: str, c: str, limit: float, what: str) -> None:
        row = _row(summary, sc, c)
        if row is not None:
            out.append(
                Target(
                    name=f"longest loop stall, {c}, {what}",
                    measured=f"{row['stall_cpu_ms']:.1f} ms CPU ({row['stall_ms']:.1f} wall)",
                    threshold=f"<= {limit:g} ms, report complete",
                    met=row["stall_cpu_ms"] <= limit and row["valid"],
                    value=row["stall_cpu_ms"],
                    item=1,
                )
            )

    for c in ("batch_process", "stream"):
        stall("overhead_immediate", c, STALL_100K_MS, "100k items")
        stall("report_1m", c, STALL_1M_MS, f"{_n(summary, 'report_1m')} items")
    for c, limit in (("batch_process", REPORT_MB), ("bp_key", REPORT_KEY_MB)):
        row = _row(summary, "report_1m", c)
        if row is not None:
            out.append(
                Target(
                    name=f"report memory, {c}, {_n(summary, 'report_1m')} outcomes kept",
                    measured=f"{row['rss_kept_mb']:.1f} MB kept (peak growth "
                    f"{row['rss_delta_mb']:.1f} MB)",
                    threshold=f"<= {limit:g} MB",
                    met=row["rss_kept_mb"] <= limit and row["valid"],
                    value=row["rss_kept_mb"],
                    item=2,
                )
            )
    for sc in ("makespan", "hung"):
        row = _row(summary, sc, "stream_ordered")
        if row is None:
            continue
        floor = ORDERED_MIN if sc == "makespan" else 1 / HUNG_SLACK
        out.append(
            Target(
                name=f"stream ordered=True, {sc}, vs greedy",
                measured=f"{row['vs_greedy']:.3f} of greedy ({row['wall_s']:.3f} s)",
                threshold=f">= {floor:.3f} of greedy",
                met=row["vs_greedy"] >= floor and row["valid"],
                value=row["vs_greedy"],
                item=3,
            )
        )
    for sc in ("deadline_1m", "deadline_5m"):
        row = _row(summary, sc, "bp_deadline")
        if row is not None:
            limit = DEADLINE + GRACE_S
            out.append(
                Target(
                    name=f"deadline=0.2 over range({row['n']:,}): returns in",
                    measured=f"{row['wall_max_s']:.2f} s, peak RSS growth "
                    f"{row['rss_delta_mb']:.0f} MB, loop stall {row['stall_cpu_ms']:.0f} ms",
                    threshold=f"<= deadline + grace = {limit:g} s",
                    met=row["wall_max_s"] <= limit and row["valid"],
                    value=row["wall_max_s"],
                    item=4,
                )
            )
    row = _row(summary, "startup", "import")
    if row is not None:
        out.append(
            Target(
                name="start-up: import batchkit beyond import asyncio",
                measured=f"{row['import_ms']:.1f} ms (asyncio itself "
                f"{row['asyncio_import_ms']:.1f} ms; in CPU time {row['import_cpu_ms']:.1f} ms)",
                threshold=f"<= {IMPORT_MS:g} ms",
                met=row["import_ms"] <= IMPORT_MS,
                value=row["import_ms"],
                item=5,
            )
        )
    for sc in ("overhead_immediate", "overhead_sleep0", "hung"):
        for c in ("batch_process_uvloop", "stream_uvloop"):
            row = _row(summary, sc, c)
            if row is None or not _ok(row["ratio"]):
                continue
            out.append(
                Target(
                    name=f"on uvloop, {c.removesuffix('_uvloop')} vs the pool on uvloop, {sc}",
                    measured=f"{row['ratio']:.2f}x",
                    threshold=f"<= {OVERHEAD_MAX}x, outcomes valid",
                    met=row["ratio"] <= OVERHEAD_MAX and row["valid"],
                    value=row["ratio"],
                    item=6,
                )
            )
    return out


def _n(summary: dict[str, Any], sc: str) -> str:
    rows = summary.get(sc, {}).get("rows", [])
    return f"{rows[0]['n']:,}" if rows else "?"


def _f(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _stall(row: dict[str, Any]) -> str:
    return f"{_f(row['stall_cpu_ms'], '.1f')} / {_f(row['stall_ms'], '.1f')}"


def _valid(row: dict[str, Any]) -> str:
    if row["errors"]:
        return "error: " + "; ".join(row["errors"])[:80]
    return "ok" if row["valid"] else "INVALID: " + "; ".join(row["problems"])


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: the machine, the targets, then one table per scenario."""
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"Run of {result['date']} — mode `{s['mode']}`, median of {s['reps']} repetition(s)"
        + (f" ({s['stream_reps']} for the streaming scenario)" if s.get("stream_reps") else "")
        + ", each in a fresh subprocess"
        + (
            f" ({result['merged_from']} runs of different scenarios made side by side, merged)"
            if result.get("merged_from")
            else ""
        )
        + f"; {m['cpus']} CPUs ({m['cpu_model']}), "
        f"{m['implementation']} {m['python']}, {m['platform']}; load average "
        f"{m['load_average'][0]:.2f} before, {result['load_average_after'][0]:.2f} after.",
        "",
        "Ratios are to the hand-written sliding-window worker pool measured in the same run. "
        "Stalls are the longest gap between the 5 ms ticks of a heartbeat task, minus 5 ms, "
        "the worst of all repetitions: `wall` counts time the OS gave to other processes too "
        "(large on a loaded machine); `CPU` counts only the event-loop thread's own CPU time "
        "between ticks, which is what the stall target is judged on.",
        "",
        "## Targets",
        "",
        "| target | measured | threshold | |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        lines.append(
            f"| {t['name']} | {t['measured']} | {t['threshold']} | "
            f"{'met' if t['met'] else '**missed**'} |"
        )
    lines += _before_after(result)
    for sc in result["scenarios"].values():
        lines += ["", f"## {sc['title']}", ""]
        if sc["note"]:
            lines += [f"_{sc['note']}._", ""]
        kind = sc["kind"]
        if kind == "overhead":
            if sc["floor_us_per_item"] is not None:
                lines += [
                    f"Lower bound: a bare sequential `await fn(item)` loop, "
                    f"{sc['floor_us_per_item']:.2f} µs/item.",
                    "",
                ]
            lines += [
                "| contender | items | µs/item | x pool | stall ms CPU / wall | outcomes |",
                "|---|--:|--:|--:|--:|---|",
            ]
            for r in sc["rows"]:
                lines.append(
                    f"| {r['label']} | {r['n']:,} | {_f(r['us_per_item'], '.2f')} | "
                    f"{_f(r['ratio'], '.2f')} | {_stall(r)} | {_valid(r)} |"
                )
        elif kind == "makespan":
            lines += [
                f"Lower bound max(sum/C, max) = {sc['lower_bound_s']:.3f} s; overhead-free "
                f"greedy in input order = {sc['greedy_s']:.3f} s (efficiency "
                f"{sc['greedy_efficiency']:.3f}); sequential = {sc['sequential_s']:.3f} s.",
                "",
                "| contender | makespan s | x pool | efficiency | of greedy | stall ms CPU / wall "
                "| outcomes |",
                "|---|--:|--:|--:|--:|--:|---|",
            ]
            for r in sc["rows"]:
                lines.append(
                    f"| {r['label']} | {_f(r['wall_s'], '.3f')} | {_f(r['ratio'], '.2f')} | "
                    f"{_f(r['efficiency'], '.3f')} | {_f(r['vs_greedy'], '.3f')} | "
                    f"{_stall(r)} | {_valid(r)} |"
                )
        elif kind in ("report", "deadline"):
            lines += [
                "| contender | items | wall s | µs/item | x pool | peak ΔRSS MB | kept ΔRSS MB "
                "| stall ms CPU / wall | outcomes |",
                "|---|--:|--:|--:|--:|--:|--:|--:|---|",
            ]
            for r in sc["rows"]:
                lines.append(
                    f"| {r['label']} | {r['n']:,} | {_f(r['wall_s'], '.2f')} | "
                    f"{_f(r['us_per_item'], '.2f')} | {_f(r['ratio'], '.2f')} | "
                    f"{_f(r['rss_delta_mb'], '.1f')} | {_f(r['rss_kept_mb'], '.1f')} | "
                    f"{_stall(r)} | {_valid(r)} |"
                )
        elif kind == "startup":
            lines += ["| what | runs | median ms |", "|---|--:|--:|"]
            for r in sc["rows"]:
                lines.append(f"| {r['label']} | {r['n']} | {_f(r['import_ms'], '.1f')} |")
                lines.append(
                    f"| import asyncio itself | {r['n']} | {_f(r['asyncio_import_ms'], '.1f')} |"
                )
                lines.append(
                    f"| import batchkit, process CPU time (with minus without) | {r['n']} | "
                    f"{_f(r['import_cpu_ms'], '.1f')} |"
                )
        else:
            lines += [
                "Lower bound: ΔRSS 0 MB and a read-ahead of C = 50 items; wall is per item "
                "because the slowest contenders ran on fewer items.",
                "",
                "| contender | items | wall s | µs/item | x pool | ΔRSS MB | max read-ahead "
                "| stall ms CPU / wall | outcomes |",
                "|---|--:|--:|--:|--:|--:|--:|--:|---|",
            ]
            for r in sc["rows"]:
                lines.append(
                    f"| {r['label']} | {r['n']:,} | {_f(r['wall_s'], '.2f')} | "
                    f"{_f(r['us_per_item'], '.2f')} | {_f(r['ratio'], '.2f')} | "
                    f"{_f(r['rss_delta_mb'], '.1f')} | {r['read_ahead']:,} | "
                    f"{_stall(r)} | {_valid(r)} |"
                )
    return "\n".join(lines) + "\n"


def write_docs(table: str, png: Path, docs: Path) -> str:
    """Put ``table`` (headings one level down) between the markers of performance.md, and
    the plot into docs/img/; returns what was done."""
    page = docs / "performance.md"
    text = page.read_text()
    if START not in text or END not in text:
        return f"{page} has no results markers: not written"
    body = "\n".join("#" + line if line.startswith("#") else line for line in table.splitlines())
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{START}\n{body}\n{END}{tail}")
    if png.exists():
        (docs / "img" / "performance.png").write_bytes(png.read_bytes())
    return f"results written into {page}"


def _before_after(result: dict[str, Any]) -> list[str]:
    """Issue 15's targets side by side with a run of the code before it (``--before``)."""
    mine = [t for t in result["targets"] if t.get("item") is not None]
    if not mine:
        return []
    before = {t["name"]: t for t in result.get("before", {}).get("targets", [])}
    lines = [
        "",
        "## Issue 15: before and after",
        "",
        (
            f"Before: the same harness over the code before issue 15 "
            f"({result['before']['date']}, load average "
            f"{result['before']['machine']['load_average'][0]:.2f}); after: this run."
            if before
            else "No run of the code before issue 15 was given (`--before`)."
        ),
        "",
        "| item | target | before | after | threshold | |",
        "|--:|---|---|---|---|---|",
    ]
    for t in mine:
        b = before.get(t["name"])
        was = b["measured"] if b is not None else "-"
        lines.append(
            f"| {t['item']} | {t['name']} | {was} | {t['measured']} | {t['threshold']} | "
            f"{'met' if t['met'] else '**missed**'} |"
        )
    return lines


def plot(result: dict[str, Any], path: Path) -> str | None:
    """Draw ratios to the pool per scenario; returns why not if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    scenarios = [(k, v) for k, v in result["scenarios"].items() if v["rows"]]
    if not scenarios:
        return "nothing to plot"
    cols = 2
    rows_n = math.ceil(len(scenarios) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(13, 3.2 * rows_n), squeeze=False)
    for ax, (name, sc) in zip(axes.flat, scenarios, strict=False):
        rows = [r for r in sc["rows"] if r["ratio"] is not None]
        labels = [r["contender"] for r in rows]
        values = [r["ratio"] for r in rows]
        colors = [
            "tab:green"
            if r["contender"] in BATCHKIT
            else "tab:gray"
            if r["contender"] in ("pool", "floor")
            else "tab:blue"
            for r in rows
        ]
        ax.barh(labels, values, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log minor labels overlap
        ax.invert_yaxis()
        what = "makespan" if sc["kind"] == "makespan" else "time per item"
        ax.set_title(f"{name}: {what}, x pool (lower is better)", fontsize=9)
        ax.tick_params(labelsize=7)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    for ax in list(axes.flat)[len(scenarios) :]:
        ax.axis("off")
    fig.suptitle(
        f"batchkit benchmarks ({result['settings']['mode']} mode, "
        f"{result['machine']['cpus']} CPUs, Python {result['machine']['python']})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
