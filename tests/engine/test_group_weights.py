"""``LimitGroup(rate_limit=RateLimit(weight=...))``: each attempt takes the item's weight from
its group's bucket, in virtual time with exact timestamps, against a reference token bucket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchkit import (
    Deadline,
    Failure,
    InvalidArgument,
    ItemSkipped,
    LimitGroup,
    RateLimit,
    Retry,
    Success,
    batch_process,
)
from batchkit.testing import run_virtual

from ..helpers import HANG, NO_BACKOFF, now
from .test_weighted_rate import reference_starts

pytestmark = pytest.mark.timeout(30)


def weighted(per_second: float, burst: int) -> LimitGroup:
    """A group per ``item[0]``, weighed by ``item[1]``."""
    rate = RateLimit(per_second=per_second, burst=burst, weight=lambda item: item[1])
    return LimitGroup(by=lambda item: item[0], rate_limit=rate)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([0.5, 1.0, 2.0, 4.0]), st.integers(1, 12), st.data())
def test_each_group_paces_its_weights_exactly_as_its_own_token_bucket(
    per_second: float, burst: int, data: st.DataObject
) -> None:
    """Items of three groups, interleaved: each group's starts are those of a token bucket of
    its own taking its items' weights in input order (a heavy item is not passed by lighter
    ones of its group), whatever the other groups do."""
    items = data.draw(
        st.lists(st.tuples(st.integers(0, 2), st.integers(1, burst)), min_size=1, max_size=30)
    )
    starts: dict[int, list[float]] = {}

    async def fn(item: tuple[int, int]) -> None:
        starts.setdefault(item[0], []).append(now())

    report = run_virtual(
        batch_process(items, fn, concurrency=len(items), groups=[weighted(per_second, burst)])
    )
    assert report.ok
    for key, times in starts.items():
        weights = [w for k, w in items if k == key]
        assert times == reference_starts(weights, per_second, burst), key


@pytest.mark.looptime
async def test_a_heavy_item_is_not_starved_by_lighter_ones_of_its_group() -> None:
    """Burst 10 at 1 token/s: 8 goes at 0; 9 waits until 7 — the ones after it wait their
    turn behind it rather than taking each token as it comes; another group is not held."""
    starts: list[tuple[tuple[str, int], float]] = []

    async def fn(item: tuple[str, int]) -> None:
        starts.append((item, now()))

    items = [("a", 8), ("a", 9), ("a", 1), ("b", 10), ("a", 1)]
    report = await batch_process(items, fn, concurrency=5, groups=[weighted(1, 10)])
    assert report.ok
    assert starts == [(("a", 8), 0), (("b", 10), 0), (("a", 9), 7), (("a", 1), 8), (("a", 1), 9)]


@pytest.mark.looptime
async def test_a_weight_above_its_groups_burst_fails_only_that_item_before_any_wait() -> None:
    async def fn(item: tuple[str, int]) -> int:
        return item[1]

    items = [("a", 1), ("a", 6), ("b", 2)]
    report = await batch_process(items, fn, concurrency=1, groups=[weighted(1, 5)])
    outcomes = list(report)
    assert [type(o) for o in outcomes] == [Success, Failure, Success]
    failure = outcomes[1]
    assert isinstance(failure, Failure)
    assert failure.kind == "error"
    assert isinstance(failure.error, InvalidArgument)
    assert "RateLimit.weight 6" in str(failure.error)
    assert "burst=5" in str(failure.error)
    assert failure.attempts == 1
    assert now() == 0.0


@pytest.mark.looptime
@pytest.mark.parametrize("bad", [0, -1, float("nan"), "3", True, None])
async def test_a_bad_weight_fails_only_that_item(bad: Any) -> None:
    async def fn(item: tuple[str, Any]) -> str:
        return item[0]

    items = [("a", 1), ("a", bad), ("a", 1)]
    report = await batch_process(items, fn, groups=[weighted(1, 5)])
    outcomes = list(report)
    assert [type(o) for o in outcomes] == [Success, Failure, Success]
    failure = outcomes[1]
    assert isinstance(failure, Failure)
    assert isinstance(failure.error, InvalidArgument)
    assert "finite number > 0" in str(failure.error)


@pytest.mark.looptime
async def test_an_item_outside_the_group_is_not_weighed() -> None:
    calls: list[str] = []

    def weight(item: str) -> int:
        calls.append(item)
        return 1

    rate = RateLimit(per_second=1, weight=weight)
    group = LimitGroup(by=lambda item: item if item != "free" else None, rate_limit=rate)

    async def fn(item: str) -> str:
        return item

    report = await batch_process(["a", "free", "a"], fn, groups=[group])
    assert report.ok
    assert calls == ["a", "a"]  # once per item in the group, not per attempt or scan


@pytest.mark.looptime
async def test_a_weight_its_group_cannot_grant_before_the_deadline_is_skipped() -> None:
    """Burst 10 at 1 token/s, deadline 5 s: 8 goes at 0; 9 more in group a would need 7 s,
    so that item is skipped at 0 (``out_of_time``), and a light item of the group runs."""
    starts: list[tuple[tuple[str, int], float]] = []

    async def fn(item: tuple[str, int]) -> None:
        starts.append((item, now()))

    items = [("a", 8), ("a", 9), ("a", 2), ("b", 9)]
    report = await batch_process(
        items, fn, concurrency=1, groups=[weighted(1, 10)], deadline=Deadline(seconds=5)
    )
    outcomes = list(report)
    assert starts == [(("a", 8), 0.0), (("a", 2), 0.0), (("b", 9), 0.0)]
    skipped = outcomes[1]
    assert isinstance(skipped, Failure)
    assert skipped.kind == "skipped"
    assert isinstance(skipped.error, ItemSkipped)
    assert skipped.error.reason == "out_of_time"
    assert report.stop_reason is None


@pytest.mark.looptime
async def test_weights_granted_within_the_deadline_wait_for_their_group() -> None:
    starts: list[float] = []

    async def fn(item: tuple[str, int]) -> None:
        starts.append(now())

    report = await batch_process(
        [("a", 4), ("a", 3)], fn, groups=[weighted(1, 4)], deadline=Deadline(seconds=5)
    )
    assert report.ok
    assert starts == [0.0, 3.0]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(1, 4), st.booleans()), max_size=20),
    st.sampled_from([1.0, 2.0, 4.0]),
    st.integers(4, 8),
    st.booleans(),
    st.integers(1, 6),
)
def test_weighted_groups_hold_with_retries_and_a_group_concurrency(
    items: list[tuple[int, int, bool]],
    per_second: float,
    burst: int,
    hold_slot: bool,
    concurrency: int,
) -> None:
    """Items fail their first attempt when asked to; retries (in the slot or back to the
    heap) pay their weight again. In every group, the weight started in any span of time is
    at most ``burst`` plus what the bucket refilled in it; at most 2 attempts of a group run
    at once; every item ends once, in a success."""
    starts: dict[int, list[tuple[float, int]]] = {}
    running: dict[int, int] = {}
    tries: dict[int, int] = {}

    async def fn(item: tuple[int, tuple[int, int, bool]]) -> int:
        index, (key, weight, fails) = item
        starts.setdefault(key, []).append((now(), weight))
        running[key] = running.get(key, 0) + 1
        assert running[key] <= 2
        try:
            await asyncio.sleep(1)
        finally:
            running[key] -= 1
        tries[index] = tries.get(index, 0) + 1
        if fails and tries[index] == 1:
            raise ConnectionError(index)
        return index

    rate = RateLimit(per_second=per_second, burst=burst, weight=lambda item: item[1][1])
    group = LimitGroup(by=lambda item: item[1][0], concurrency=2, rate_limit=rate)
    retry = Retry(attempts=2, hold_slot=hold_slot, backoff=NO_BACKOFF)

    async def main() -> None:
        report = await batch_process(
            list(enumerate(items)), fn, concurrency=concurrency, retry=retry, groups=[group]
        )
        assert [o.value for o in report.successes] == list(range(len(items)))

    run_virtual(asyncio.wait_for(main(), HANG))
    for times in starts.values():
        for i in range(len(times)):
            for j in range(i, len(times)):
                spent = sum(w for _, w in times[i : j + 1])
                span = times[j][0] - times[i][0]
                assert spent <= burst + span * per_second + 1e-6, (times, i, j)
