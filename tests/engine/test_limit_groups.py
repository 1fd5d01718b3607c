"""Limit groups (``groups=``): every limit holds at every instant, no head-of-line blocking
within the read-ahead, all-or-nothing places, state forgotten when idle — in virtual time."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import batchkit
from batchkit import (
    Backoff,
    Failure,
    InvalidArgument,
    LimitGroup,
    RateLimit,
    Retry,
    Success,
    batch_process,
    stream,
)
from batchkit._engine.meters.groups import Groups
from batchkit._model.attempt import Job
from batchkit.testing import run_virtual

from ..helpers import NO_BACKOFF, now

if TYPE_CHECKING:
    from collections.abc import Hashable, Sequence

pytestmark = pytest.mark.timeout(30)


@dataclass(frozen=True)
class Item:
    """An item that calls two upstreams: ``a`` and ``b`` name its group in each."""

    index: int
    duration: int
    a: int
    b: int


class Watch:
    """In flight now, per group and in all, checked against the limits at every start."""

    def __init__(self, concurrency: int, limit_a: int, limit_b: int) -> None:
        self.limits = (concurrency, limit_a, limit_b)
        self.running: Counter[Hashable] = Counter()
        self.starts: dict[int, list[float]] = {}
        self.ends: dict[int, float] = {}

    def enter(self, item: Item) -> None:
        run = self.running
        run["all"] += 1
        run["a", item.a] += 1
        run["b", item.b] += 1
        concurrency, limit_a, limit_b = self.limits
        assert run["all"] <= concurrency
        assert run["a", item.a] <= limit_a, f"group a={item.a} over its limit"
        assert run["b", item.b] <= limit_b, f"group b={item.b} over its limit"
        self.starts.setdefault(item.index, []).append(now())

    def exit(self, item: Item) -> None:
        for k in ("all", ("a", item.a), ("b", item.b)):
            self.running[k] -= 1
        self.ends[item.index] = now()


def groups_of(limit_a: int, limit_b: int) -> list[LimitGroup]:
    return [
        LimitGroup(by=lambda i: i.a, concurrency=limit_a),
        LimitGroup(by=lambda i: i.b, concurrency=limit_b),
    ]


def greedy_starts(items: Sequence[Item], concurrency: int, limit_a: int, limit_b: int) -> list[int]:
    """The greedy schedule that respects every limit: at each moment, once every item ending
    then has given its places back, start — in input order — each waiting item whose limits
    all have room (no overhead; integer times)."""
    starts = [-1] * len(items)
    running: list[tuple[int, Item]] = []
    waiting = list(items)
    t = 0
    while waiting:
        running = [(end, it) for end, it in running if end > t]
        for it in list(waiting):
            in_a = sum(1 for _, r in running if r.a == it.a)
            in_b = sum(1 for _, r in running if r.b == it.b)
            if len(running) < concurrency and in_a < limit_a and in_b < limit_b:
                starts[it.index] = t
                running.append((t + it.duration, it))
                waiting.remove(it)
        if waiting:
            t = min(end for end, _ in running)
    return starts


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Item], int, int, int]:
    n = draw(st.integers(0, 30))
    items = [
        Item(i, draw(st.integers(1, 6)), draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        for i in range(n)
    ]
    return items, draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3))


@settings(max_examples=150, deadline=None)
@given(cases())
# Two items end together, each freeing a place the third needs: both give their places back
# before either worker picks, so the third starts (not the fourth, which needs only one).
@example(([Item(0, 1, 0, 2), Item(1, 1, 1, 0), Item(2, 1, 0, 0), Item(3, 1, 0, 1)], 2, 1, 1))
def test_every_limit_holds_and_the_schedule_is_the_greedy_one(
    case: tuple[list[Item], int, int, int],
) -> None:
    """At every start, the run's concurrency and every group's hold; each item starts exactly
    when the greedy schedule over all limits says, so no item whose group is full delays
    another (no head-of-line blocking) and the makespan is the greedy one."""
    items, concurrency, limit_a, limit_b = case
    watch = Watch(concurrency, limit_a, limit_b)

    async def fn(item: Item) -> int:
        watch.enter(item)
        try:
            await asyncio.sleep(item.duration)
        finally:
            watch.exit(item)
        return item.index

    async def main() -> None:
        report = await batch_process(
            items, fn, concurrency=concurrency, groups=groups_of(limit_a, limit_b)
        )
        expected = greedy_starts(items, concurrency, limit_a, limit_b)
        assert [watch.starts[i][0] for i in range(len(items))] == expected
        makespan = max((s + it.duration for s, it in zip(expected, items, strict=True)), default=0)
        assert report.wall_time <= 1.02 * makespan
        assert [o.value for o in report.successes] == list(range(len(items)))

    run_virtual(main)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), max_size=25),
    st.integers(1, 6),
    st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    st.integers(1, 3),
    st.booleans(),
)
def test_group_rate_limits_hold_and_every_item_ends(
    items: list[tuple[int, int]], concurrency: int, per_second: float, burst: int, sleeps: bool
) -> None:
    """Each group's starts keep to its token bucket (GCRA: no more than ``burst`` at once,
    then one per interval), with a group concurrency too, and the run ends."""
    starts: dict[int, list[float]] = {}
    running: Counter[int] = Counter()

    async def fn(item: tuple[int, int]) -> None:
        duration, key = item
        starts.setdefault(key, []).append(now())
        running[key] += 1
        assert running[key] <= 2
        if sleeps:
            await asyncio.sleep(duration)
        running[key] -= 1

    paced = LimitGroup(
        by=lambda i: i[1], concurrency=2, rate_limit=RateLimit(per_second=per_second, burst=burst)
    )

    async def main() -> None:
        report = await batch_process(items, fn, concurrency=concurrency, groups=[paced])
        assert report.ok
        interval = 1 / per_second
        for times in starts.values():
            # GCRA: n starts after a burst span at least (n - burst) intervals, at any time.
            for j, i in itertools.combinations(range(len(times)), 2):
                assert times[i] - times[j] >= (i - j - (burst - 1)) * interval - 1e-9

    run_virtual(asyncio.wait_for(main(), 3600))


@settings(max_examples=100, deadline=None)
@given(cases(), st.frozensets(st.integers(0, 29)), st.booleans(), st.sampled_from([0, 1, 3]))
def test_limits_hold_with_retries_and_every_item_ends_once(
    case: tuple[list[Item], int, int, int], failing: frozenset[int], hold_slot: bool, wait: int
) -> None:
    """Items in ``failing`` fail their first attempt; their retries (in the slot or released
    to the heap, after a backoff) take their groups again: the limits hold at every start, and
    every item ends in one success."""
    items, concurrency, limit_a, limit_b = case
    watch = Watch(concurrency, limit_a, limit_b)

    async def fn(item: Item) -> int:
        watch.enter(item)
        try:
            await asyncio.sleep(item.duration)
        finally:
            watch.exit(item)
        if item.index in failing and len(watch.starts[item.index]) == 1:
            raise ConnectionError(item.index)
        return item.index

    retry = Retry(
        attempts=2, hold_slot=hold_slot, backoff=Backoff(initial=wait, maximum=wait, jitter=False)
    )

    async def main() -> None:
        report = await batch_process(
            items, fn, concurrency=concurrency, retry=retry, groups=groups_of(limit_a, limit_b)
        )
        assert [o.value for o in report.successes] == list(range(len(items)))
        assert all(len(watch.starts[i]) == 1 + (i in failing) for i in range(len(items)))
        assert watch.running["all"] == 0

    run_virtual(asyncio.wait_for(main(), 3600))


@pytest.mark.looptime
async def test_a_full_group_does_not_block_items_of_other_groups() -> None:
    """Two slow items of a group limited to one, then quick ones of another group: the second
    slow item waits for its group without a slot, and the quick ones run at once."""
    items = [Item(0, 10, 0, 0), Item(1, 10, 0, 1), *(Item(i, 1, 1, i) for i in range(2, 8))]
    watch = Watch(2, 1, 99)

    async def fn(item: Item) -> None:
        watch.enter(item)
        await asyncio.sleep(item.duration)
        watch.exit(item)

    report = await batch_process(items, fn, concurrency=2, groups=groups_of(1, 99))
    assert report.ok
    assert [watch.starts[i] for i in range(8)] == [[0], [10], [0], [1], [2], [3], [4], [5]]
    assert report.wall_time == 20


@pytest.mark.looptime
async def test_an_item_takes_all_its_groups_or_none() -> None:
    """Item 1 needs a (shared with item 2) and b (held by item 0): it holds no place in a
    while it waits for b, so item 2 starts at once."""
    items = [Item(0, 10, 9, 0), Item(1, 1, 0, 0), Item(2, 1, 0, 5)]
    watch = Watch(3, 1, 1)

    async def fn(item: Item) -> None:
        watch.enter(item)
        await asyncio.sleep(item.duration)
        watch.exit(item)

    await batch_process(items, fn, concurrency=3, groups=groups_of(1, 1))
    assert [watch.starts[i] for i in range(3)] == [[0], [10], [0]]


@pytest.mark.looptime
async def test_a_group_rate_limit_paces_its_starts_only() -> None:
    starts: dict[str, list[float]] = {"slow": [], "fast": []}

    async def fn(host: str) -> None:
        starts[host].append(now())

    hosts = ["slow"] * 4 + ["fast"] * 4
    # ``by`` returns None for an item outside the group: "fast" items are not paced at all.
    slow_only = LimitGroup(
        by=lambda h: h if h == "slow" else None, rate_limit=RateLimit(per_second=2)
    )
    report = await batch_process(hosts, fn, concurrency=8, groups=[slow_only])
    assert report.ok
    assert starts == {"slow": [0, 0.5, 1.0, 1.5], "fast": [0, 0, 0, 0]}


@pytest.mark.looptime
async def test_retries_give_their_places_back() -> None:
    """Every attempt takes its groups and gives them back, retries too (held in the slot or
    released to wait), and the limits hold throughout."""
    items = [Item(i, 2, i % 2, i % 3) for i in range(12)]
    for hold_slot in (False, True):
        watch = Watch(4, 1, 2)
        failed: set[int] = set()

        async def fn(item: Item, watch: Watch = watch, failed: set[int] = failed) -> int:
            watch.enter(item)
            try:
                await asyncio.sleep(item.duration)
            finally:
                watch.exit(item)
            if item.index not in failed:
                failed.add(item.index)
                raise ConnectionError(item.index)
            return item.index

        retry = Retry(attempts=2, backoff=NO_BACKOFF, hold_slot=hold_slot)
        report = await batch_process(items, fn, concurrency=4, retry=retry, groups=groups_of(1, 2))
        assert report.ok, report.failures
        assert all(len(watch.starts[i]) == 2 for i in range(12))
        # Group a has two keys at one place each: 24 attempts of 2 s take 24 s.
        assert report.wall_time == 24


@pytest.mark.looptime
async def test_groups_work_with_stream() -> None:
    items = [Item(i, 1 + i % 3, i % 2, i % 4) for i in range(20)]
    watch = Watch(3, 1, 2)

    async def fn(item: Item) -> int:
        watch.enter(item)
        await asyncio.sleep(item.duration)
        watch.exit(item)
        return item.index

    async with stream(items, fn, concurrency=3, groups=groups_of(1, 2)) as results:
        seen = sorted([o.value async for o in results if isinstance(o, Success)])
    assert seen == list(range(20))
    starts = greedy_starts(items, 3, 1, 2)
    assert [watch.starts[i][0] for i in range(20)] == starts


@pytest.mark.looptime
async def test_a_key_that_raises_or_is_unhashable_fails_only_its_item() -> None:
    def by(x: Any) -> Any:
        if x == 1:
            raise LookupError("no host")
        return [x] if x == 2 else x

    async def fn(x: Any) -> Any:
        return x

    report = await batch_process(range(4), fn, groups=[LimitGroup(by=by, concurrency=1)])
    kinds = [(o.kind, type(o.error).__name__) if isinstance(o, Failure) else o.kind for o in report]
    assert kinds == ["success", ("error", "LookupError"), ("error", "TypeError"), "success"]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LimitGroup(by=1, concurrency=1), "LimitGroup.by must be a callable"),  # type: ignore[arg-type]
        (lambda: LimitGroup(by=str, concurrency=0), "LimitGroup.concurrency must be >= 1"),
        (lambda: LimitGroup(by=str, concurrency=True), "LimitGroup.concurrency must be an int"),
        (lambda: LimitGroup(by=str), "LimitGroup limits nothing"),
        (lambda: LimitGroup(by=str, rate_limit=5), "LimitGroup.rate_limit must be"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_limit_group_is_refused(make: Any, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        make()


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        (LimitGroup(by=str, concurrency=1), "got one LimitGroup"),
        ("ab", "groups must be a sequence"),
        ([1], "every entry of groups must be"),
    ],
)
async def test_bad_groups_are_refused_before_any_work(groups: Any, match: str) -> None:
    called: list[int] = []

    async def fn(x: int) -> None:
        called.append(x)

    with pytest.raises(InvalidArgument, match=match):
        await batch_process([1, 2], fn, groups=groups)
    with pytest.raises(InvalidArgument, match=match):
        stream([1, 2], fn, groups=groups)
    assert called == []


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


def test_group_state_is_forgotten_once_idle_and_refilled() -> None:
    """Memory is bounded by the groups active, not every group seen; a bucket still refilling
    is kept (forgetting it would loosen the rate)."""
    loop = FakeLoop()
    plain = LimitGroup(by=lambda x: x, concurrency=2)
    paced = LimitGroup(by=lambda x: x % 3, rate_limit=RateLimit(per_second=1, burst=2))
    groups = Groups((plain, paced), loop)  # type: ignore[arg-type]
    most = 0
    for i in range(10_000):
        loop.now = i * 0.5
        job = Job(i, i)
        assert groups.try_take(job)
        most = max(most, groups.active())
        groups.release(job)
    # One plain group at a time; the three paced ones refill within their burst's time.
    assert most <= 4
    assert groups.active() >= 1  # the paced groups' buckets are still refilling
    loop.now += 10
    job = Job(0, 0)
    assert groups.try_take(job)
    groups.release(job)
    # Every older group is forgotten; only the bucket this very start emptied remains.
    assert groups.active() == 1


def test_a_refilling_bucket_keeps_its_limit_across_idleness() -> None:
    loop = FakeLoop()
    paced = LimitGroup(by=lambda x: "api", rate_limit=RateLimit(per_second=1))
    groups = Groups((paced,), loop)  # type: ignore[arg-type]
    first, second = Job(0, 0), Job(1, 1)
    assert groups.try_take(first)
    groups.release(first)  # idle at once, but its bucket is empty
    groups.epoch()
    assert not groups.try_take(second)
    need = groups.keys(second)
    assert not isinstance(need, BaseException)
    assert groups.wait_for(need) == 1.0
    loop.now = 0.5
    epoch = groups.epoch()
    assert not groups.try_take(second)
    loop.now = 1.0
    assert groups.epoch() != epoch  # the bucket refilled: refusals no longer stand
    assert groups.try_take(second)


def test_all_or_nothing_takes_no_partial_places() -> None:
    loop = FakeLoop()
    a = LimitGroup(by=lambda x: x[0], concurrency=1)
    b = LimitGroup(by=lambda x: x[1], concurrency=1)
    groups = Groups((a, b), loop)  # type: ignore[arg-type]
    assert groups.try_take(Job(0, ("x", "y")))
    assert not groups.try_take(Job(1, ("z", "y")))  # y is full: z is not taken either
    assert groups.held(0, "z") == 0
    assert groups.try_take(Job(2, ("z", "w")))


def test_limit_group_is_public() -> None:
    assert batchkit.LimitGroup is LimitGroup
    assert LimitGroup.__module__ == "batchkit"


@pytest.mark.looptime
async def test_with_cost_the_most_expensive_item_with_room_starts_first() -> None:
    """cost= orders the read-ahead; groups skip what has no room: item 1 (cost 9, group 0)
    waits for item 0's group, so item 3 (cost 5, group 1) starts before item 2 (cost 1)."""
    items = [Item(0, 4, 0, 0), Item(1, 9, 0, 1), Item(2, 1, 1, 2), Item(3, 5, 1, 3)]
    watch = Watch(2, 1, 9)
    order: list[int] = []

    async def fn(item: Item) -> None:
        order.append(item.index)
        watch.enter(item)
        await asyncio.sleep(item.duration)
        watch.exit(item)

    report = await batch_process(
        items, fn, concurrency=2, cost=lambda i: i.duration, groups=groups_of(1, 9)
    )
    assert report.ok
    # At 0: item 1 (most expensive, group a=0) and item 3 (a=1); at 5 item 2; at 9 item 0.
    assert order == [1, 3, 2, 0]
    assert [watch.starts[i] for i in (1, 3, 2, 0)] == [[0], [0], [5], [9]]


@pytest.mark.looptime
async def test_at_the_deadline_items_waiting_for_their_group_are_skipped() -> None:
    """Exactly one envelope per item: running ones cancelled, those waiting in the read-ahead
    for their group skipped, and the call returns at the deadline."""

    async def fn(item: Item) -> None:
        await asyncio.sleep(item.duration)

    items = [Item(0, 4, 0, 0), *(Item(i, 20, 0, i) for i in range(1, 5))]
    report = await batch_process(items, fn, concurrency=4, deadline=15, groups=groups_of(1, 9))
    assert report.wall_time == 15
    assert [o.kind for o in report] == ["success", "cancelled", "skipped", "skipped", "skipped"]
    assert report.stop_reason == "deadline"


@pytest.mark.looptime
async def test_an_item_waiting_out_its_backoff_holds_no_place() -> None:
    """Item 0 fails at 1 and waits 5 s for its retry: its group's one place goes to item 1
    meanwhile; the retry takes it back at 6 (when item 1 has ended)."""
    items = [Item(0, 1, 0, 0), Item(1, 3, 0, 1)]
    watch = Watch(2, 1, 9)

    async def fn(item: Item) -> None:
        watch.enter(item)
        await asyncio.sleep(item.duration)
        watch.exit(item)
        if item.index == 0 and len(watch.starts[0]) == 1:
            raise ConnectionError("once")

    retry = Retry(attempts=2, backoff=Backoff(initial=5, maximum=5, jitter=False))
    report = await batch_process(items, fn, concurrency=2, retry=retry, groups=groups_of(1, 9))
    assert report.ok
    assert watch.starts == {0: [0, 6], 1: [1]}


@pytest.mark.looptime
async def test_items_refused_by_an_open_circuit_give_their_places_back() -> None:
    """A picked item holds its group's places before the breaker is asked: when the circuit
    is open and refuses it, its places come back (else the group stays full and the run
    hangs), and every item gets one envelope."""

    async def fn(x: int) -> None:
        await asyncio.sleep(1)
        raise ConnectionError("down")

    breaker = batchkit.Breaker(batchkit.MemoryStateStore(), name="up")
    group = LimitGroup(by=lambda x: "up", concurrency=2)
    report = await asyncio.wait_for(
        batch_process(range(30), fn, concurrency=4, groups=[group], breaker=breaker), 100
    )
    assert report.counts["error"] + report.counts["skipped"] == 30
    assert report.counts["skipped"] > 0
    skipped = [o.error for o in report.failures if o.kind == "skipped"]
    assert all(isinstance(e, batchkit.ItemSkipped) and e.reason == "circuit_open" for e in skipped)
