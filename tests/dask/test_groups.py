"""``groups=`` and a weighted ``RateLimit`` on the Dask backend: each worker holds a share.

Every limit holds across the cluster because the shares add up to at most the limit
(``_dask/groups.py``); the chunks running at once on one worker share that worker's share.
Assertions use what was recorded inside ``fn`` (wall-clock times comparable across local
processes), never a sleep with a margin.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest

import batchkit
from batchkit import Failure, InvalidArgument, LimitGroup, RateLimit, Success
from batchkit._dask import worker as worker_side
from batchkit._dask.groups import check_shares, share_table
from batchkit._dask.wire import RunSpec, dumps
from batchkit._engine.plan import make_plan
from batchkit._model.options import Options
from batchkit.dask import DaskBackend

from . import _work
from ._spans import peak

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ the share rule, no cluster
def _plan(**options: Any) -> Any:
    return make_plan([1], _work.quick, Options(**options))


def test_shares_add_up_to_the_limit_and_the_first_workers_in_order_get_the_rest() -> None:
    group = LimitGroup(
        by=str, concurrency=7, rate_limit=RateLimit(per_second=9, burst=8, weight=float)
    )
    adaptive = LimitGroup(by=str, concurrency=batchkit.Adaptive(initial=4, min=2, max=5))
    table = share_table(_plan(groups=[group, adaptive]), ["tcp://c", "tcp://a", "tcp://b"])
    assert [table[a][0].concurrency for a in ("tcp://a", "tcp://b", "tcp://c")] == [3, 2, 2]
    limits = [table[a][1].concurrency for a in ("tcp://a", "tcp://b", "tcp://c")]
    assert limits == [
        batchkit.Adaptive(initial=2, min=2, max=2),
        batchkit.Adaptive(initial=2, min=2, max=2),
        batchkit.Adaptive(initial=1, min=1, max=1),
    ]
    rate = table["tcp://a"][0].rate_limit
    assert rate is not None
    assert (rate.per_second, rate.burst) == (3.0, 2)
    by = table["tcp://a"][0].by
    assert by is not None
    assert by((0, 12)) == "12"  # `by` takes the chunk's (index, item)


def test_a_weighted_run_rate_is_one_more_group_holding_every_item() -> None:
    table = share_table(
        _plan(rate_limit=RateLimit(per_second=10, burst=6, weight=float)), ["tcp://a", "tcp://b"]
    )
    (whole,) = table["tcp://b"]
    assert whole.by is not None
    assert whole.by((3, "x")) == whole.by((4, "y"))
    assert whole.rate_limit is not None
    assert (whole.rate_limit.per_second, whole.rate_limit.burst) == (5.0, 3)
    assert whole.rate_limit.weight is not None
    assert whole.rate_limit.weight((0, 3)) == 3
    with pytest.raises(InvalidArgument, match=r"burst=6 // 2 workers = 3(.|\n)*HINT.*at least 2 x"):
        whole.rate_limit.weight((0, 4))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"groups": [LimitGroup(by=str, concurrency=2)]}, r"concurrency=2 cannot be split"),
        (
            {"groups": [LimitGroup(by=str, concurrency=batchkit.Adaptive(initial=1, max=2))]},
            r"Adaptive\.max=2 cannot be split",
        ),
        (
            {"groups": [LimitGroup(by=str, rate_limit=RateLimit(per_second=5, burst=2))]},
            r"LimitGroup's RateLimit\(burst=2\) cannot be split",
        ),
        (
            {"rate_limit": RateLimit(per_second=5, burst=2, weight=float)},
            r"RateLimit\(burst=2\) cannot be split",
        ),
    ],
)
def test_a_share_of_zero_is_refused(options: dict[str, Any], match: str) -> None:
    check_shares(_plan(**options), 2)
    with pytest.raises(InvalidArgument, match=match + r"(.|\n)*HINT"):
        check_shares(_plan(**options), 3)


async def test_a_share_of_zero_is_refused_at_the_call_before_any_item_is_read(
    client: Any,
) -> None:
    read: list[int] = []

    def items() -> Any:
        read.append(1)
        yield 1

    one = [LimitGroup(by=str, concurrency=1)]
    with pytest.raises(InvalidArgument, match=r"among the 2 Dask workers(.|\n)*HINT"):
        await batchkit.batch_process(items(), _work.quick, groups=one, backend=DaskBackend(client))
    assert read == []


# ------------------------------------------------------ two chunks on one worker share a share
_RUNNING = {"now": 0, "most": 0}


async def _counted(item: str) -> str:
    _RUNNING["now"] += 1
    _RUNNING["most"] = max(_RUNNING["most"], _RUNNING["now"])
    try:
        await asyncio.sleep(1.0)
    finally:
        _RUNNING["now"] -= 1
    return item


@pytest.mark.looptime
async def test_two_chunks_on_one_worker_share_the_workers_share_of_a_group() -> None:
    """Run in this process (no Dask worker: its address is ""): two chunks at once, each
    free to run 4, under a group whose share here is 1."""
    plan = _plan(groups=[LimitGroup(by=str, concurrency=2)])
    spec = RunSpec(
        run_id="share-test", name=None, fn=_counted, context=None, concurrency=4,
        per_worker=8, timeout=None, retry=None, rate=None, burst=1, deadline_wall=None,
        fit_timeout=False, grace=1.0, fail_fast=False, max_failures=None, events=False,
        logs=False, groups=share_table(plan, ["", "tcp://other"]),
    )  # fmt: skip
    assert spec.groups is not None
    assert spec.groups[""][0].concurrency == 1
    blob = dumps(spec)
    _RUNNING.update(now=0, most=0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        results = await asyncio.gather(
            worker_side.run_chunk(blob, "share-test", 0, dumps(["a", "a", "a"])),
            worker_side.run_chunk(blob, "share-test", 3, dumps(["a", "a", "a"])),
        )
    finally:
        await worker_side.end_run("share-test")
    records = [r for blob in results for r in worker_side.decode(blob).records]
    assert sorted(r[1] for r in records) == ["success"] * 6, records
    assert _RUNNING["most"] == 1
    assert loop.time() - began == pytest.approx(6.0)  # one at a time: the share, not one each


# ------------------------------------------------------------------------ on the cluster
def _chunked_items(folder: Path, chunks: int, size: int) -> list[_work.Grouped]:
    """Each chunk of ``size``: three slow items first, then fast ones the slow ones wait for."""
    items: list[_work.Grouped] = []
    for c in range(chunks):
        fast = tuple(range(c * size + 3, (c + 1) * size))
        items += [("slow", c * size + k, str(folder), fast) for k in range(3)]
        items += [("fast", i, str(folder), ()) for i in fast]
    return items


async def test_a_groups_limit_holds_across_the_cluster_and_other_groups_keep_running(
    client: Any, tmp_path: Path
) -> None:
    """Each upstream at most 2 at once across both workers (1 each); a slow item finishes
    only once the fast items of its chunk ran beside it, so an item waiting for its group
    never holds a slot the others need (a chunk has 3 slots: two slow items waiting in them
    beside the one running would leave none for the fast ones, and the run would hang)."""
    await client.run(_work.reset_state)
    items = _chunked_items(tmp_path, chunks=6, size=8)
    run = batchkit.batch_process(
        items,
        _work.grouped,
        concurrency=6,
        context=_work.counting,
        groups=[LimitGroup(by=_work.upstream, concurrency=2)],
        backend=DaskBackend(client, per_worker=3, chunk_size=8),
    )
    try:
        report = await asyncio.wait_for(run, 30)
    except TimeoutError:
        pytest.fail("the run hung: slow items waiting for their group held the chunk's slots")
    assert report.ok
    assert [o.index for o in report] == list(range(len(items)))
    for name in ("slow", "fast"):
        spans = [(v[2], v[3]) for v in report.values() if v[1] == name]
        assert peak(spans) <= 2, name
    states: dict[str, dict[str, int]] = await client.run(_work.get_state)
    assert sum(s.get("entered", 0) for s in states.values()) == len(items)
    assert sum(s.get("exited", 0) for s in states.values()) == len(items)


async def test_an_adaptive_groups_max_is_split_among_the_workers(
    client: Any, tmp_path: Path
) -> None:
    items = [("slow", i, str(tmp_path), ()) for i in range(40)]
    adaptive = batchkit.Adaptive(initial=2, min=1, max=2)
    report = await batchkit.batch_process(
        items,
        _work.grouped,
        concurrency=8,
        context=_work.counting,
        groups=[LimitGroup(by=_work.upstream, concurrency=adaptive)],
        backend=DaskBackend(client, per_worker=4, chunk_size=5),
    )
    assert report.ok
    assert [o.index for o in report] == list(range(40))
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for pid, _, start, end in report.values():
        by_worker.setdefault(pid, []).append((start, end))
    assert max(peak(spans) for spans in by_worker.values()) <= 1  # max=2 over 2 workers
    assert peak([(v[2], v[3]) for v in report.values()]) <= 2


def _most_in_a_second(starts: list[tuple[float, float]]) -> float:
    """The most weight started in any 1 s window (from each start on)."""
    starts = sorted(starts)
    return max(sum(w for u, w in starts[i:] if u < t + 1.0) for i, (t, _) in enumerate(starts))


async def test_a_groups_rate_holds_across_the_cluster(client: Any) -> None:
    rate = 20.0
    items = [("api", i, "", ()) for i in range(50)]
    report = await batchkit.batch_process(
        items,
        _work.weighed,
        concurrency=16,
        groups=[LimitGroup(by=_work.upstream, rate_limit=RateLimit(per_second=rate, burst=2))],
        backend=DaskBackend(client, per_worker=8, chunk_size=5),
    )
    assert report.ok
    assert len(report.outcomes) == 50
    # No 1 s window holds more than the limit plus the burst (a token per worker).
    assert _most_in_a_second([(v[2], 1.0) for v in report.values()]) <= rate + 2


async def test_a_weighted_rate_holds_across_the_cluster_in_weight(client: Any) -> None:
    rate = 40.0
    items = [("api", 1 + i % 4, "", ()) for i in range(40)]  # weights 1..4, 100 in all
    report = await batchkit.batch_process(
        items,
        _work.weighed,
        concurrency=16,
        rate_limit=RateLimit(per_second=rate, burst=8, weight=_work.tokens),
        backend=DaskBackend(client, per_worker=8, chunk_size=5),
    )
    assert report.ok
    assert len(report.outcomes) == 40
    assert _most_in_a_second([(v[2], float(v[1])) for v in report.values()]) <= rate + 8


async def test_an_item_heavier_than_a_workers_share_of_the_burst_fails_alone(
    client: Any,
) -> None:
    items = [("api", w, "", ()) for w in (1, 2, 3, 1, 2)]
    report = await batchkit.batch_process(
        items,
        _work.weighed,
        rate_limit=RateLimit(per_second=100, burst=4, weight=_work.tokens),
        backend=DaskBackend(client, chunk_size=5),
    )
    assert [o.index for o in report] == [0, 1, 2, 3, 4]
    assert [type(o) for o in report] == [Success, Success, Failure, Success, Success]
    failed = report.outcomes[2]
    assert isinstance(failed, Failure)
    assert failed.kind == "error"
    assert failed.attempts == 1  # as locally: refused at admission, fn never called
    assert isinstance(failed.error, InvalidArgument)
    message = str(failed.error)
    assert "burst=4 // 2 workers = 2" in message
    assert "HINT: raise burst= to at least 2 x the heaviest weight" in message


# ------------------------------------------------- workers leaving and joining (no cluster)
class _Client:
    """Records what the driver sends to the workers (``client.run``)."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, tuple[Any, ...], list[str]]] = []

    async def run(self, fn: Any, *args: Any, workers: list[str]) -> None:
        self.sent.append((fn, args, workers))


def _watched(plan: Any, workers: list[list[str]]) -> tuple[Any, Any, list[int]]:
    """A ``ClusterWatch`` over a run started on ``tcp://a`` and ``tcp://b`` that sees the
    scheduler's workers go through ``workers`` (the last stays)."""
    from batchkit._dask.cluster import ClusterWatch

    gave_up: list[int] = []
    state = SimpleNamespace(
        loop=asyncio.get_running_loop(), backend=SimpleNamespace(lost_after=2.0),
        kept=["tcp://a", "tcp://b"], outage=None, plan=plan, run_id="r", client=_Client(),
        event=lambda e: None, pending={}, gone=None,
    )  # fmt: skip
    watch = ClusterWatch(
        cast("Any", state), cast("Any", SimpleNamespace(give_up_now=lambda: gave_up.append(1)))
    )
    seen = iter(workers)
    last = workers[-1]

    async def scheduler_says() -> tuple[int, int, list[str]]:
        now = next(seen, last)
        return len(now), len(now), now

    watch.workers = scheduler_says  # type: ignore[method-assign]
    return watch, state, gave_up


@pytest.mark.looptime
async def test_a_worker_that_leaves_gives_its_share_to_the_others() -> None:
    plan = _plan(groups=[LimitGroup(by=str, concurrency=3)])
    watch, state, _ = _watched(plan, [["tcp://a", "tcp://b"], ["tcp://b", "tcp://c"]])
    await watch.start(["tcp://a", "tcp://b"])
    await asyncio.sleep(1.0)
    await watch.stop()
    ((fn, (run_id, table), to),) = state.client.sent
    assert run_id == "r"
    assert fn is worker_side.set_group_shares
    assert to == ["tcp://b"]  # not the worker that joined: it holds no share
    assert table["tcp://b"][0].concurrency == 3


@pytest.mark.looptime
async def test_a_run_with_groups_is_lost_when_its_workers_are_gone_even_if_others_joined() -> None:
    plan = _plan(groups=[LimitGroup(by=str, concurrency=2)])
    watch, state, gave_up = _watched(plan, [["tcp://c"]])
    await watch.start(["tcp://a", "tcp://b"])
    await asyncio.sleep(3.0)
    await watch.stop()
    assert gave_up
    assert "no Dask worker was left" in str(state.gone)


@pytest.mark.looptime
async def test_a_grown_share_lets_a_waiting_item_of_a_running_chunk_start() -> None:
    plan = _plan(groups=[LimitGroup(by=str, concurrency=2)])
    spec = RunSpec(
        run_id="grow-test", name=None, fn=_counted, context=None, concurrency=4,
        per_worker=8, timeout=None, retry=None, rate=None, burst=1, deadline_wall=None,
        fit_timeout=False, grace=1.0, fail_fast=False, max_failures=None, events=False,
        logs=False, groups=share_table(plan, ["", "tcp://other"]),
    )  # fmt: skip
    _RUNNING.update(now=0, most=0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    chunk = asyncio.ensure_future(
        worker_side.run_chunk(dumps(spec), "grow-test", 0, dumps(["a", "a", "a", "a"]))
    )
    try:
        await asyncio.sleep(0.5)
        assert _RUNNING["now"] == 1  # the share of 1 here
        here = SimpleNamespace(address="")
        await worker_side.set_group_shares("grow-test", share_table(plan, [""]), here)
        await chunk
    finally:
        await worker_side.end_run("grow-test")
    assert _RUNNING["most"] == 2
    # The second starts at 0.5, as the share grows; then two at a time: 4 items end at 2.5.
    assert loop.time() - began == pytest.approx(2.5)
