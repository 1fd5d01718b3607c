"""The benchmark harness runs end to end on a tiny scenario and writes well-formed results.

No timing assertions: performance figures live in ``python -m benchmarks``, never in tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import TYPE_CHECKING

import pytest
from benchmarks import sim_hedging, sim_outage, simulated, worker
from benchmarks.__main__ import main
from benchmarks._report import evaluate
from benchmarks._scenarios import greedy_makespan, scenario

if TYPE_CHECKING:
    from pathlib import Path

    from benchmarks._contenders import Collector, Contender, Job


def test_greedy_makespan_is_in_input_order() -> None:
    # Two slots: 3 | 1+1+... the long item first keeps one slot busy.
    assert greedy_makespan([3.0, 1.0, 1.0, 1.0], 2) == 3.0
    assert greedy_makespan([1.0, 1.0, 1.0, 3.0], 2) == 4.0
    assert greedy_makespan([], 3) == 0.0


def test_seed_case_bounds_match_the_issue() -> None:
    sc = scenario("seed_x100", "full")
    assert sc.greedy() == pytest.approx(1.05)
    assert sum(sc.durations()) == pytest.approx(3.0)
    hung = scenario("hung", "full")
    assert hung.expected_failures == 10
    assert sum(1 for x in hung.durations() if x == hung.timeout) == 10
    assert all(math.isfinite(x) for x in hung.durations())


@pytest.mark.timeout(60)
def test_smoke_run_writes_json_and_markdown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--smoke",
            "--scenarios",
            "overhead_sleep0,stream_memory",
            "--contenders",
            "pool,stream",
            "--out",
            str(tmp_path),
            "--no-plot",  # matplotlib alone takes seconds; the plot is checked by make bench
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result) >= {"date", "machine", "settings", "scenarios", "targets", "runs"}
    assert result["machine"]["cpus"] >= 1
    assert result["settings"]["mode"] == "smoke"
    # One fresh-process run per (scenario, contender): 2 + 2.
    assert len(result["runs"]) == 4
    assert all("error" not in r and r["valid"] for r in result["runs"]), result["runs"]

    overhead = result["scenarios"]["overhead_sleep0"]
    rows = {r["contender"]: r for r in overhead["rows"]}
    assert set(rows) == {"pool", "stream"}
    assert rows["pool"]["ratio"] == 1.0
    for row in rows.values():
        assert row["us_per_item"] > 0
        assert row["n"] == 300
        # The summary keeps the worst stall of the row's runs (the meter itself is tested
        # below: a number >= 0 says nothing, max(0, ...) makes it so by construction).
        mine = [
            r
            for r in result["runs"]
            if r["scenario"] == "overhead_sleep0" and r["contender"] == row["contender"]
        ]
        assert row["stall_ms"] == max(r["stall_ms"] for r in mine)
        assert row["stall_cpu_ms"] == max(r["stall_cpu_ms"] for r in mine)

    streaming = {r["contender"]: r for r in result["scenarios"]["stream_memory"]["rows"]}
    assert set(streaming) == {"pool", "stream"}
    # Read-ahead is bounded by the window: C in flight plus C buffered at most.
    assert 0 < streaming["stream"]["read_ahead"] <= 100
    assert math.isfinite(streaming["stream"]["rss_delta_mb"])

    names = [t["name"] for t in result["targets"]]
    assert "stream per-item overhead vs pool, overhead_sleep0" in names
    assert any(n.startswith("stream over 2,000 items") for n in names)
    assert all(isinstance(t["met"], bool) for t in result["targets"])

    table = (tmp_path / "results.md").read_text()
    assert "## Targets" in table
    assert "hand-written worker pool (reference)" in table
    captured = capsys.readouterr()
    assert table in captured.out
    assert "plot skipped" in captured.err
    assert not (tmp_path / "results.png").exists()


def test_targets_report_a_miss() -> None:
    row = {
        "contender": "batch_process",
        "runs": 1,
        "ratio": 2.0,
        "us_per_item": 8.0,
        "valid": True,
        "stall_ms": 50.0,
        "stall_cpu_ms": 50.0,
    }
    summary = {"overhead_immediate": {"rows": [row]}}
    targets = {t.name: t for t in evaluate(summary)}
    assert not targets["batch_process per-item overhead vs pool, overhead_immediate"].met
    assert not targets["longest event-loop stall, batchkit, overhead_immediate"].met


# -- the meters measure: a known stall and a known allocation must show -------------------
# Lower bounds only: a busy machine can make a stall or the RSS look larger, never smaller.
BLOCK_S = 0.1
ALLOC_MB = 64


def _contender(monkeypatch: pytest.MonkeyPatch, run: Contender) -> None:
    monkeypatch.setattr(worker, "get", lambda name: run)


@pytest.mark.timeout(60)
async def test_stall_meter_sees_a_loop_blocked_for_100ms(monkeypatch: pytest.MonkeyPatch) -> None:
    async def blocks_the_loop(job: Job, out: Collector) -> None:
        start = time.thread_time()
        while time.thread_time() - start < BLOCK_S:  # 100 ms of loop CPU without an await
            pass
        for item in job.items:
            out.add(item)

    _contender(monkeypatch, blocks_the_loop)
    result = await worker.measure("overhead_sleep0", "pool", "smoke")
    assert result["valid"], result
    least = (BLOCK_S - worker.HEARTBEAT) * 1e3
    assert result["stall_cpu_ms"] >= least, result
    assert result["stall_ms"] >= least, result


@pytest.mark.timeout(60)
async def test_rss_meter_sees_a_64mb_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    async def allocates(job: Job, out: Collector) -> None:
        block = bytearray(b"\x01") * (ALLOC_MB << 20)  # every page written: resident
        # The heartbeat (every 5 ms, armed before this timer) samples RSS at least once
        # while the block is alive, for a meter without VmHWM.
        await asyncio.sleep(4 * worker.HEARTBEAT)
        for item in job.items:
            out.add(item)
        assert len(block) == ALLOC_MB << 20
        del block

    _contender(monkeypatch, allocates)
    result = await worker.measure("stream_memory", "stream", "smoke")
    assert result["valid"], result
    assert result["rss_delta_mb"] >= ALLOC_MB * 0.95, result


# -- the simulated scenarios (issue 25): virtual time, so exact and fast -------------------
@pytest.mark.timeout(60)
def test_limit_groups_keep_the_slow_upstream_at_4_and_a_global_limit_does_not() -> None:
    rows = {r.setup: r for r in simulated.groups_rows(40)}
    assert set(rows) == set(simulated.GROUP_SETUPS)
    assert all(r.succeeded == r.n == 40 for r in rows.values())
    assert rows["groups"].peak_slow == simulated.SLOW_LIMIT
    assert rows["global_4"].peak_slow <= simulated.SLOW_LIMIT
    assert rows["global_36"].peak_slow > simulated.SLOW_LIMIT
    # Groups beat the global limit that keeps the slow upstream safe.
    assert rows["groups"].makespan < rows["global_4"].makespan
    assert rows["groups"].makespan >= rows["groups"].lower_bound


@pytest.mark.timeout(60)
def test_item_budget_scenario_accounts_for_every_item(capsys: pytest.CaptureFixture[str]) -> None:
    rows = simulated.budget_rows(30)
    assert [(r.upstream, r.setup) for r in rows] == [
        (u, s) for u in ("sticky", "independent") for s in simulated.BUDGET_SETUPS
    ]
    for r in rows:
        assert r.succeeded + r.failed + r.not_run == r.n == 30
        assert r.attempts >= r.succeeded + r.failed
    assert simulated.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "limit 4 exceeded" in out
    assert "item_budget=11" in out
    assert "Hedging stragglers" in out


@pytest.mark.timeout(60)
def test_outage_scenario_with_and_without_a_breaker(capsys: pytest.CaptureFixture[str]) -> None:
    # The claims on SQL stores are in tests/sqlalchemy/test_breaker_outage.py.
    without = sim_outage.outage_rows("none")
    breaker = sim_outage.outage_rows("memory")
    assert [r.tick for r in without] == [r.tick for r in breaker] == [1, 2, 3, 4, 5]
    for r in without + breaker:
        assert r.timeouts + r.skipped + r.succeeded == sim_outage.ITEMS
    assert sum(r.timeouts for r in breaker) < sum(r.timeouts for r in without)
    assert [r.store_calls for r in without] == [0] * 5
    assert sim_outage.recovery_tick(breaker) == 4
    assert sim_outage.main([]) == 0
    out = capsys.readouterr().out
    assert "SQLAlchemyStateStore (SQLite)" in out
    assert "Recovery detected (the circuit closed) in" in out


@pytest.mark.timeout(60)
def test_hedging_scenario_accounts_for_every_item_and_keeps_its_budget() -> None:
    rows = {r.setup: r for r in sim_hedging.hedge_rows(60)}
    assert set(rows) == set(sim_hedging.HEDGE_SETUPS)
    none, hedged = rows["none"], rows["p95"]
    assert none.hedges == 0
    assert none.attempts == none.n == 60
    assert 0 < hedged.hedges <= 0.10 * hedged.n
    assert hedged.attempts == hedged.n + hedged.hedges
    assert hedged.finished >= none.finished
    text = sim_hedging.hedge_markdown([none, hedged])
    assert "Hedge(after='p95', budget=0.10)" in text
