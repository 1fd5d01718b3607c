"""Issue 26's claim for the breaker, from the outage scenario's rows
(``benchmarks/sim_outage.py``), with the circuits kept in SQLite and in PostgreSQL: an
upstream outage spanning 3 ticks costs at most one probe timeout in each of ticks 2 and 3
(instead of a full run of timeouts), and recovery is detected within one tick."""

from __future__ import annotations

import dataclasses

import pytest
from benchmarks import sim_outage
from benchmarks.sim_outage import DOWN_TICKS, ITEMS, OutageRow, outage_rows, recovery_tick


def by_tick(rows: list[OutageRow]) -> dict[int, OutageRow]:
    return {r.tick: r for r in rows}


@pytest.mark.timeout(120)
def test_an_outage_of_three_ticks_costs_one_probe_per_tick_after_the_first(db_url: str) -> None:
    without = by_tick(outage_rows("none"))
    ticks = by_tick(outage_rows("sql", db_url))
    assert sorted(DOWN_TICKS) == [1, 2, 3]
    for t in (2, 3):
        assert without[t].timeouts == ITEMS  # a full run of timeouts, every tick
        assert ticks[t].timeouts == ticks[t].probes == ticks[t].attempts == 1
        assert ticks[t].skipped == ITEMS - 1
        assert ticks[t].circuit == "open"
    # The first tick discovers the outage: fewer timeouts than without, more than a probe.
    assert 1 < ticks[1].timeouts < without[1].timeouts
    # Recovery within one tick: the first tick with the upstream back closes the circuit and
    # does all its work (its other items waited for the probe's verdict).
    assert recovery_tick(list(ticks.values())) == 4
    assert ticks[4].probes == 1
    assert ticks[4].succeeded == ITEMS
    assert ticks[4].seconds <= without[4].seconds + sim_outage.OK_S * 1.2


@pytest.mark.timeout(120)
def test_the_sql_store_gives_the_memory_store_s_figures(db_url: str) -> None:
    # The store only carries the circuits between ticks: where it keeps them changes nothing.
    memory = [dataclasses.replace(r, setup="") for r in outage_rows("memory")]
    assert [dataclasses.replace(r, setup="") for r in outage_rows("sql", db_url)] == memory
