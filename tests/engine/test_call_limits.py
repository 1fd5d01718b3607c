"""Call-level limit groups (``async with batchkit.limit("news"):`` inside ``fn``): a group's
places in use never exceed its concurrency, its rate starts never exceed its bucket, every
place is given back (after errors, timeouts, the deadline), and each item gets exactly one
envelope — in virtual time, with exact timestamps."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import batchkit
from batchkit import (
    Adaptive,
    Deadline,
    Failure,
    Hedge,
    InvalidArgument,
    LimitGroup,
    RateLimit,
    Success,
    batch_process,
    limit,
    stream,
)
from batchkit._model.attempt import _SLOT
from batchkit.testing import run_virtual

from ..helpers import now

if TYPE_CHECKING:
    from batchkit._engine.meters.call_groups import CallGroups

pytestmark = pytest.mark.timeout(60)


class Busy(Exception):
    """The upstream says it is overloaded (an HTTP 429)."""


def run_limits() -> CallGroups:
    """The call-level groups of the run this attempt belongs to (white box: to check that
    every place was given back once the run is over)."""
    slot = _SLOT.get()
    assert slot is not None
    limits = slot.run.limits
    assert limits is not None
    return limits  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Call:
    """One upstream call inside an item's ``fn``: held ``duration`` seconds, taking
    ``weight`` tokens; ``fails``: it raises inside the block."""

    duration: int
    weight: int
    fails: bool


@dataclass(frozen=True)
class Case:
    calls: list[tuple[Call, ...]]
    concurrency: int
    group: int
    adaptive: bool
    """The group's concurrency is ``Adaptive(initial=1, max=group)``, cut by ``Busy``."""
    rate: RateLimit | None
    timeout: float | None
    deadline: float | None


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rate = None
    burst = 4
    if draw(st.booleans()):
        burst = draw(st.integers(1, 4))
        rate = RateLimit(per_second=draw(st.sampled_from([0.5, 1.0, 2.0])), burst=burst)
    fails = st.sampled_from([False, False, False, True])
    call = st.builds(Call, st.integers(0, 4), st.integers(1, burst), fails)
    items = draw(st.lists(st.lists(call, min_size=1, max_size=3).map(tuple), max_size=16))
    return Case(
        calls=items,
        concurrency=draw(st.integers(1, 6)),
        group=draw(st.integers(1, 3)),
        adaptive=draw(st.booleans()),
        rate=rate,
        timeout=draw(st.none() | st.integers(1, 8).map(float)),
        deadline=draw(st.none() | st.integers(2, 30).map(float)),
    )


class Watch:
    """The blocks inside the group now (checked at every entry), and the rate starts."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.in_use = 0
        self.starts: list[tuple[float, int]] = []
        self.limits: CallGroups | None = None
        self.over: list[float] = []
        """When more blocks were in the group than its concurrency."""

    async def call(self, c: Call) -> None:
        self.limits = run_limits()
        async with limit("news", weight=c.weight):
            self.in_use += 1
            try:
                # Recorded, not asserted: an assertion in fn would only fail its item.
                # With Adaptive, ``group`` is its max (a cut below the places held takes
                # effect as they are given back).
                if max(self.in_use, self.limits.held("news")) > self.case.group:
                    self.over.append(now())
                self.starts.append((now(), c.weight))
                await asyncio.sleep(c.duration)
                if c.fails:
                    raise Busy
            finally:
                self.in_use -= 1

    def check_rate(self) -> None:
        """The token bucket's bound over every interval between two starts."""
        rate = self.case.rate
        if rate is None:
            return
        starts = sorted(self.starts)
        for i, (ti, _) in enumerate(starts):
            spent = 0
            for tj, w in starts[i:]:
                spent += w
                assert spent <= rate.burst + (tj - ti) * rate.per_second + 1e-9, (ti, tj)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_a_call_level_group_holds_its_limits_and_gives_every_place_back(case: Case) -> None:
    """At every entry the group's places in use are within its concurrency; its starts stay
    within its bucket; after the run (fn errors, timeouts mid-wait and mid-block, the
    deadline's cancellation) no place is held and nobody waits; one envelope per item."""
    watch = Watch(case)

    async def fn(calls: tuple[Call, ...]) -> int:
        await asyncio.gather(*(watch.call(c) for c in calls))
        return len(calls)

    concurrency: int | Adaptive = case.group
    if case.adaptive:
        concurrency = Adaptive(initial=1, max=case.group, overload_on=(Busy,))
    group = LimitGroup(name="news", concurrency=concurrency, rate_limit=case.rate)
    run = batch_process(
        case.calls, fn, concurrency=case.concurrency, groups=[group],
        timeout=case.timeout, deadline=case.deadline,
    )  # fmt: skip
    report = run_virtual(run)
    for o in report.outcomes:
        if isinstance(o, Failure):
            event(f"an item failed: {o.kind}")  # --hypothesis-show-statistics: what ran
    assert sorted(o.index for o in report.outcomes) == list(range(len(case.calls)))
    assert watch.over == [], "more blocks in the group than its concurrency"
    assert not any(isinstance(o, Failure) and isinstance(o.error, AssertionError)
                   for o in report.outcomes)  # fmt: skip
    watch.check_rate()
    if watch.limits is not None:
        assert watch.limits.held("news") == 0
        assert watch.limits.waiting("news") == 0


@pytest.mark.looptime
async def test_calls_gathered_in_one_fn_each_take_their_own_place() -> None:
    """The cron job's fn: three upstream calls at once. A group of two runs two of them, the
    third when one gives its place back."""
    starts: list[float] = []

    async def fetch() -> None:
        async with limit("news"):
            starts.append(now())
            await asyncio.sleep(1)

    async def fn(item: int) -> int:
        await asyncio.gather(fetch(), fetch(), fetch())
        return item

    report = await batch_process([0], fn, groups=[LimitGroup(name="news", concurrency=2)])
    assert starts == [0, 0, 1]
    assert report.wall_time == 2


@pytest.mark.looptime
async def test_a_call_level_rate_takes_the_weight_of_each_block() -> None:
    starts: list[tuple[float, int]] = []

    async def fn(weight: int) -> None:
        async with limit("llm", weight=weight):
            starts.append((now(), weight))

    group = LimitGroup(name="llm", rate_limit=RateLimit(per_second=10, burst=10))
    await batch_process([10, 5, 5, 1], fn, concurrency=1, groups=[group])
    assert starts == [(0, 10), (0.5, 5), (1.0, 5), (1.1, 1)]


@pytest.mark.looptime
async def test_waiting_in_limit_holds_the_items_slot() -> None:
    """The trade-off against item-level groups: a block waits inside fn, in its slot."""
    starts: list[tuple[int, float]] = []

    async def fn(item: int) -> None:
        starts.append((item, now()))
        if item < 2:
            async with limit("news"):
                await asyncio.sleep(5)

    news = LimitGroup(name="news", concurrency=1)
    await batch_process([0, 1, 2], fn, concurrency=2, groups=[news])
    # Item 1 waits for item 0's place in its slot: item 2 (no call) starts only at 5.
    assert starts == [(0, 0), (1, 0), (2, 5)]


@pytest.mark.looptime
async def test_a_timeout_while_waiting_or_holding_leaves_no_place_held() -> None:
    """Item 0 holds the place past its timeout, item 1 waits for it past its own: both are
    cancelled at 5, and item 2, starting then in a free slot, gets the place at once."""
    held_at: list[tuple[int, float]] = []
    limits: list[CallGroups] = []

    async def fn(item: int) -> None:
        limits.append(run_limits())
        async with limit("news"):
            held_at.append((item, now()))
            await asyncio.sleep(10 if item < 2 else 1)

    group = LimitGroup(name="news", concurrency=1)
    report = await batch_process([0, 1, 2], fn, concurrency=2, timeout=5, groups=[group])
    assert held_at == [(0, 0), (2, 5)]
    kinds = [o.kind if isinstance(o, Failure) else "success" for o in report.outcomes]
    assert kinds == ["timeout", "timeout", "success"]
    assert limits[0].held("news") == 0
    assert limits[0].waiting("news") == 0


@pytest.mark.looptime
async def test_a_wait_cancelled_inside_fn_leaves_the_queue() -> None:
    """Item 1 gives up its wait (its own asyncio timeout): item 2, queued behind it, gets
    the place when item 0 gives it back."""
    held_at: list[tuple[int, float]] = []

    async def take(item: int) -> None:
        async with limit("news"):
            held_at.append((item, now()))
            await asyncio.sleep(4)

    async def fn(item: int) -> None:
        if item == 1:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(take(item), 2)
        else:
            # Item 0 takes the place before any await (wait_for runs take() in item 1's own
            # task from 3.12 on, in a new task before); item 2 queues behind item 1 at t=1.
            if item == 2:
                await asyncio.sleep(1)
            await take(item)

    news = LimitGroup(name="news", concurrency=1)
    await batch_process([0, 1, 2], fn, concurrency=3, groups=[news])
    assert held_at == [(0, 0), (2, 4)]


@pytest.mark.looptime
async def test_the_deadline_cancels_a_wait_and_a_hold_and_no_place_stays_held() -> None:
    limits: list[CallGroups] = []
    entered: list[int] = []

    async def fn(item: int) -> None:
        limits.append(run_limits())
        async with limit("news"):
            entered.append(item)
            await asyncio.sleep(100)

    group = LimitGroup(name="news", concurrency=1)
    report = await batch_process(
        [0, 1], fn, concurrency=2, groups=[group], deadline=Deadline(seconds=10, grace=1)
    )
    assert entered == [0]
    assert report.wall_time == 10
    assert [o.ok for o in report.outcomes] == [False, False]
    assert limits[0].held("news") == 0
    assert limits[0].waiting("news") == 0


@pytest.mark.looptime
async def test_a_hedge_that_loses_gives_its_place_back() -> None:
    """The first attempt holds its place for 10 s; its hedge (at 1 s) holds one for 1 s and
    wins: the loser is cancelled in its block at 2, and gives the place back."""
    calls: list[float] = []
    limits: list[CallGroups] = []
    exits: list[tuple[float, str]] = []

    async def fn(item: int) -> int:
        limits.append(run_limits())
        calls.append(now())
        try:
            async with limit("news"):
                await asyncio.sleep(10 if len(calls) == 1 else 1)
        except asyncio.CancelledError:
            exits.append((now(), "cancelled"))
            raise
        exits.append((now(), "done"))
        return item

    report = await batch_process(
        [0], fn, key=str, hedge=Hedge(after=1.0, budget=1.0),
        groups=[LimitGroup(name="news", concurrency=2)],
    )  # fmt: skip
    assert calls == [0, 1]
    assert exits == [(2, "done"), (2, "cancelled")]
    assert report.ok
    assert limits[0].held("news") == 0


@pytest.mark.looptime
async def test_an_overload_in_a_block_cuts_the_groups_limit_only() -> None:
    """As for item-level groups: the group starts at 2; two blocks fail with Busy at 1 (the
    second, launched before the cut, is not counted again), the limit is 1 from then on."""
    starts: list[float] = []
    limits: list[CallGroups] = []

    async def fn(item: int) -> None:
        limits.append(run_limits())
        async with limit("news"):
            starts.append(now())
            await asyncio.sleep(1)
            raise Busy

    group = LimitGroup(name="news", concurrency=Adaptive(initial=2, max=8, overload_on=(Busy,)))
    report = await batch_process(range(5), fn, concurrency=99, groups=[group])
    assert starts == [0, 0, 1, 2, 3]
    assert limits[0].limit("news") == 1
    assert report.limit_changes == ()  # the call's concurrency is fixed: no group moves it


@pytest.mark.looptime
async def test_a_timeout_in_a_block_is_an_overload() -> None:
    starts: list[float] = []

    async def fn(seconds: int) -> None:
        async with limit("news"):
            starts.append(now())
            await asyncio.sleep(seconds)

    group = LimitGroup(name="news", concurrency=Adaptive(initial=2, max=4))
    await batch_process([10, 10, 1, 1, 1, 1], fn, concurrency=2, timeout=2, groups=[group])
    # Two time out at 2: the limit is cut to 1, so items 2 and 3 (started at 2) go one at a
    # time; without the signal both would enter at 2.
    assert starts[:4] == [0, 0, 2, 3]


@pytest.mark.looptime
async def test_works_with_stream_and_beside_item_level_groups() -> None:
    in_use = 0
    peak = 0

    async def fn(item: int) -> int:
        nonlocal in_use, peak
        async with limit("news"):
            in_use += 1
            peak = max(peak, in_use)
            await asyncio.sleep(1)
            in_use -= 1
        return item

    groups = [LimitGroup(by=lambda i: i % 2, concurrency=2), LimitGroup(name="news", concurrency=3)]
    async with stream(range(12), fn, concurrency=8, groups=groups) as outcomes:
        got = [o async for o in outcomes]
    assert sorted(o.value for o in got if isinstance(o, Success)) == list(range(12))
    assert peak == 3


@pytest.mark.looptime
async def test_misuse_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"only inside fn"):
        limit("news")
    errors: list[BaseException] = []

    async def fn(name: str) -> None:
        try:
            async with limit(name):
                pass
        except (InvalidArgument, RuntimeError) as e:
            errors.append(e)

    host = LimitGroup(by=str, name="host", concurrency=1)
    groups = [host, LimitGroup(name="news", concurrency=1)]
    await batch_process(["nope", "host"], fn, groups=groups, concurrency=1)
    assert "no call-level group named 'nope'" in str(errors[0])
    assert "'news'" in str(errors[0])
    assert "item-level" in str(errors[1])
    await batch_process(["news"], fn)  # a run without groups
    assert "no call-level group named 'news'" in str(errors[2])


@pytest.mark.looptime
async def test_a_bad_weight_is_the_items_error() -> None:
    async def fn(weight: Any) -> None:
        async with limit("llm", weight=weight):
            pass

    group = LimitGroup(name="llm", rate_limit=RateLimit(per_second=1, burst=5))
    report = await batch_process([6, 0, True, 2], fn, groups=[group])
    errors = [o.error for o in report.outcomes if isinstance(o, Failure)]
    assert len(errors) == 3
    assert all(isinstance(e, InvalidArgument) for e in errors)
    assert "larger than its burst=5" in str(errors[0])


def test_limit_group_names_are_checked() -> None:
    with pytest.raises(InvalidArgument, match=r"needs by= .* or name="):
        LimitGroup(concurrency=1)
    with pytest.raises(InvalidArgument, match="non-empty str"):
        LimitGroup(name="", concurrency=1)
    with pytest.raises(InvalidArgument, match="non-empty str"):
        LimitGroup(name=3, concurrency=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"weight="):
        LimitGroup(name="llm", rate_limit=RateLimit(per_second=1, weight=len))
    assert LimitGroup(name="news", concurrency=1).call_level
    assert not LimitGroup(by=str, name="host", concurrency=1).call_level


async def test_a_name_twice_is_refused_at_the_call() -> None:
    groups = [
        LimitGroup(name="news", concurrency=1),
        LimitGroup(by=str, name="news", concurrency=2),
    ]
    with pytest.raises(InvalidArgument, match=r"unique.*'news'.*\nHINT"):
        await batch_process([1], str, groups=groups)


def test_limit_is_public() -> None:
    assert batchkit.limit is limit
    assert limit.__module__ == "batchkit"
