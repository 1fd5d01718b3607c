"""``LimitGroup(concurrency=Adaptive(...))``: each group value finds its own limit — every
group's limit holds at every instant, one upstream's overload cuts only its own group's limit,
no head-of-line blocking across groups — in virtual time, with exact timestamps."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchkit import (
    Adaptive,
    InvalidArgument,
    LimitGroup,
    MemoryStateStore,
    Remembered,
    batch_process,
    stream,
)
from batchkit._engine.meters.groups import Groups
from batchkit._model.attempt import AttemptResult, Job, RunInfo, Slot
from batchkit.testing import run_virtual

from ..helpers import now

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from batchkit._engine.meters.group_state import Need

pytestmark = pytest.mark.timeout(60)

HEALTHY = 1, 2  # the groups whose upstream never complains; group 0's is overloaded


class Busy(Exception):
    """The upstream's "too many requests"."""


@dataclass(frozen=True)
class Item:
    index: int
    group: int
    duration: int


def adaptive_group(initial: int, **kw: Any) -> LimitGroup:
    policy = Adaptive(initial=initial, min=1, max=8, overload_on=(Busy,), **kw)
    return LimitGroup(by=lambda item: item.group, concurrency=policy)


class Spy:
    """Sees every take of places, at the instant it happens: the places held then in each of
    the item's groups, against that group's limit then."""

    def __init__(self) -> None:
        self.instances: list[Groups] = []
        self.limits: defaultdict[Any, list[float]] = defaultdict(list)
        self.cut: set[Any] = set()
        """The groups whose adaptive limit was ever cut."""

    @staticmethod
    @contextmanager
    def watching() -> Iterator[Spy]:
        spy = Spy()
        take: Callable[[Groups, Need, Job, float], None] = Groups._take

        def spied(groups: Groups, need: Need, job: Job, now: float) -> None:
            take(groups, need, job, now)
            if groups not in spy.instances:
                spy.instances.append(groups)
            for i, key in enumerate(need.keys):
                if key is not None:
                    limit = groups.limit(i, key)
                    assert groups.held(i, key) <= limit, f"group {key} over its limit {limit}"
                    spy.limits[key].append(limit)
                    aimd = groups._states[i][key].aimd
                    if aimd is not None and aimd.ceiling is not None:
                        spy.cut.add(key)

        with patch.object(Groups, "_take", spied):
            yield spy


def run(items: list[Item], cap: int, initial: int) -> tuple[Spy, dict[int, float], int]:
    """Group 0's upstream raises ``Busy`` when more than ``cap`` of its calls run at once."""
    running: Counter[int] = Counter()
    starts: dict[int, float] = {}
    busy = 0

    async def fn(item: Item) -> None:
        nonlocal busy
        starts[item.index] = now()
        running[item.group] += 1
        try:
            await asyncio.sleep(item.duration)
            if item.group == 0 and running[0] > cap:
                busy += 1
                raise Busy
        finally:
            running[item.group] -= 1

    # Latency is no signal here (durations differ by design): errors are.
    group = adaptive_group(initial, latency_factor=100.0)
    with Spy.watching() as spy:
        run_virtual(batch_process(items, fn, concurrency=len(items) + 1, groups=[group]))
    return spy, starts, busy


items_st = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 4)), max_size=30).map(
    lambda xs: [Item(i, g, d) for i, (g, d) in enumerate(xs)]
)


@settings(max_examples=100, deadline=None)
@given(items_st, st.integers(1, 3), st.integers(1, 4))
def test_each_group_finds_its_own_limit_and_holds_it(
    items: list[Item], cap: int, initial: int
) -> None:
    """At every take the places held in each group are within its limit then (the spy); the
    healthy groups' limits are never cut, the overloaded group's is as soon as it complains
    (and kept while idle); and the healthy groups start exactly when they would without the
    overloaded one."""
    spy, starts, busy = run(items, cap, initial)
    for key in HEALTHY:
        # Never cut; at least ``initial`` (where one forgotten when idle starts again).
        assert key not in spy.cut
        assert min(spy.limits[key], default=initial) >= initial
    assert busy or 0 not in spy.cut  # only its upstream's complaints cut it
    if spy.instances:
        # Its upstream's first complaint cuts the overloaded group's limit, kept to the end.
        state = spy.instances[0]._states[0].get(0)
        cut = state is not None and state.aimd is not None and state.aimd.ceiling is not None
        assert cut == (busy > 0)
    healthy = [it for it in items if it.group in HEALTHY]
    _, alone, _ = run(
        [Item(i, it.group, it.duration) for i, it in enumerate(healthy)], cap, initial
    )
    assert [starts[it.index] for it in healthy] == [alone[i] for i in range(len(healthy))]


@pytest.mark.looptime
async def test_an_overloaded_upstream_cuts_only_its_own_group() -> None:
    """Both groups start at 2. Group "bad" fails every call with Busy: its limit is cut to
    1 at 1 s (the second failure, launched before the cut, is not counted again), so its items
    go one at a time. Group "good" doubles per round trip (2, 4, 8) as if alone."""
    starts: dict[str, list[float]] = {"good": [], "bad": []}

    async def fn(group: str) -> None:
        starts[group].append(now())
        await asyncio.sleep(1)
        if group == "bad":
            raise Busy

    group = LimitGroup(by=lambda g: g, concurrency=Adaptive(initial=2, max=8, overload_on=(Busy,)))
    report = await batch_process(["bad"] * 5 + ["good"] * 8, fn, concurrency=99, groups=[group])
    assert starts == {"bad": [0, 0, 1, 2, 3], "good": [0, 0, 1, 1, 1, 1, 2, 2]}
    assert report.limit_changes == ()  # the call's concurrency is fixed: no group moves it
    assert report.wall_time == 4


@pytest.mark.looptime
async def test_a_timeout_is_an_overload_of_the_group_only() -> None:
    starts: dict[str, list[float]] = {"good": [], "slow": []}

    async def fn(group: str) -> None:
        starts[group].append(now())
        await asyncio.sleep(10 if group == "slow" else 1)

    group = LimitGroup(by=lambda g: g, concurrency=Adaptive(initial=2, max=4))
    await batch_process(["slow"] * 3 + ["good"] * 6, fn, concurrency=99, timeout=2, groups=[group])
    # slow: two time out at 2, the limit goes to 1; good: 2, then 4 at once.
    assert starts == {"slow": [0, 0, 2], "good": [0, 0, 1, 1, 1, 1]}


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


async def test_forgetting_keeps_a_cut_limit_and_bounds_memory() -> None:
    """A group never cut is forgotten once idle (back at ``initial`` in slow start, as it
    began); a cut one keeps its limit while idle, so forgetting never loosens it."""
    loop = FakeLoop()
    group = LimitGroup(by=lambda x: x, concurrency=Adaptive(initial=4, overload_on=(Busy,)))
    groups = Groups((group,), loop)  # type: ignore[arg-type]
    slot = Slot(RunInfo("r", None, None, loop.time))
    most = 0
    for i in range(1_000):
        loop.now = float(i)
        job = Job(i, i % 50)
        assert groups.try_take(job)
        groups.notify_task_started(slot, job, loop.now)
        most = max(most, groups.active())
        error = Busy() if i == 7 else None
        result = (
            AttemptResult("error", None, error, i, i + 1)
            if error
            else AttemptResult("success", None, None, i, i + 1)
        )
        await groups.notify_task_finished(slot, job, result)
    assert most == 2  # the one running, and the cut one
    # The last one is idle for less than a round trip (1 s): kept until then.
    assert groups.active() == 2
    loop.now += 1
    job = Job(1_000, "other")
    assert groups.try_take(job)
    groups.release(job)
    assert groups.active() == 1
    assert groups.limit(0, 7) == 3  # 4 x 0.75, kept while idle
    assert groups.limit(0, 8) == 4  # forgotten: as fresh


def test_a_group_adaptive_limit_is_not_remembered() -> None:
    remember = Remembered(store=MemoryStateStore(), name="prices")
    with pytest.raises(InvalidArgument, match="not supported"):
        LimitGroup(by=str, concurrency=Adaptive(remember=remember))


@pytest.mark.looptime
async def test_adaptive_groups_work_with_stream() -> None:
    """The same run as above through ``stream``: the same starts, one outcome per item."""
    starts: dict[str, list[float]] = {"good": [], "bad": []}

    async def fn(group: str) -> None:
        starts[group].append(now())
        await asyncio.sleep(1)
        if group == "bad":
            raise Busy

    group = LimitGroup(by=lambda g: g, concurrency=Adaptive(initial=2, max=8, overload_on=(Busy,)))
    items = ["bad"] * 5 + ["good"] * 8
    async with stream(items, fn, concurrency=99, groups=[group]) as outcomes:
        kinds = sorted([o.kind async for o in outcomes])
    assert kinds == ["error"] * 5 + ["success"] * 8
    assert starts == {"bad": [0, 0, 1, 2, 3], "good": [0, 0, 1, 1, 1, 1, 2, 2]}
