"""``RateLimit(weight=...)``: each attempt start takes the item's weight from the bucket, in
virtual time with exact timestamps, against a reference token bucket."""

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
    RateLimit,
    Success,
    batch_process,
)
from batchkit._engine.meters.rate_math import reserve, reserve_weighted
from batchkit.testing import run_virtual

from ..helpers import now

pytestmark = pytest.mark.timeout(30)


def reference_starts(weights: list[int], per_second: float, burst: int) -> list[float]:
    """A plain token bucket, full at 0, refilled continuously up to ``burst``; items start in
    order, each as soon as the bucket holds its weight."""
    tokens, last, starts = float(burst), 0.0, []
    for w in weights:
        if tokens < w:
            last += (w - tokens) / per_second
            tokens = float(w)
        starts.append(last)
        tokens -= w
    return starts


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0]),
    st.integers(1, 16),
    st.data(),
)
def test_weighted_starts_pace_exactly_as_a_token_bucket(
    per_second: float, burst: int, data: st.DataObject
) -> None:
    weights = data.draw(st.lists(st.integers(1, burst), min_size=1, max_size=30))
    starts: list[float] = []

    async def fn(w: int) -> int:
        starts.append(now())
        return w

    policy = RateLimit(per_second=per_second, burst=burst, weight=lambda w: w)
    report = run_virtual(batch_process(weights, fn, concurrency=len(weights), rate_limit=policy))
    assert report.ok
    assert starts == reference_starts(weights, per_second, burst)


@given(
    st.floats(0.1, 100),
    st.integers(1, 20),
    st.floats(0, 1000),
    st.floats(0, 1000),
)
def test_weight_one_is_the_unweighted_rule(
    rate: float, burst: int, tat: float, now_: float
) -> None:
    interval = 1 / rate
    tolerance = (burst - 1) * interval
    assert reserve_weighted(tat, now_, interval, tolerance, 1.0) == reserve(
        tat, now_, interval, tolerance
    )


@pytest.mark.looptime
async def test_tokens_per_minute_example() -> None:
    """90 000 tokens a minute, all of it at once: 60k + 30k go at 0, 30k more waits 20 s."""
    starts: list[tuple[int, float]] = []

    async def fn(tokens: int) -> int:
        starts.append((tokens, now()))
        return tokens

    policy = RateLimit(per_second=1500, burst=90_000, weight=lambda tokens: tokens)
    await batch_process([60_000, 30_000, 30_000], fn, concurrency=3, rate_limit=policy)
    assert starts == [(60_000, 0.0), (30_000, 0.0), (30_000, 20.0)]


@pytest.mark.looptime
async def test_a_weight_above_burst_fails_only_that_item() -> None:
    async def fn(w: int) -> int:
        return w

    policy = RateLimit(per_second=1, burst=5, weight=lambda w: w)
    report = await batch_process([1, 6, 2], fn, concurrency=1, rate_limit=policy)
    outcomes = list(report)
    assert [type(o) for o in outcomes] == [Success, Failure, Success]
    failure = outcomes[1]
    assert isinstance(failure, Failure)
    assert failure.kind == "error"
    assert isinstance(failure.error, InvalidArgument)
    assert "RateLimit.weight 6" in str(failure.error)
    assert "burst=5" in str(failure.error)
    assert now() == 0.0  # nothing waited for a weight that never fits


@pytest.mark.looptime
@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "3", True, None])
async def test_a_bad_weight_fails_only_that_item(bad: Any) -> None:
    async def fn(item: Any) -> Any:
        return item

    policy = RateLimit(per_second=1, burst=5, weight=lambda item: bad if item == "bad" else 1)
    report = await batch_process(["a", "bad", "b"], fn, concurrency=1, rate_limit=policy)
    outcomes = list(report)
    assert [type(o) for o in outcomes] == [Success, Failure, Success]
    failure = outcomes[1]
    assert isinstance(failure, Failure)
    assert failure.kind == "error"
    assert isinstance(failure.error, InvalidArgument)
    assert "finite number > 0" in str(failure.error)


@pytest.mark.looptime
async def test_a_weight_that_cannot_be_granted_before_the_deadline_is_skipped() -> None:
    """burst 10 at 1 token/s, deadline 5 s: 8 goes at 0; 9 more would need 7 s (past the
    deadline), so that item is skipped at 0 and the light one after it still runs."""
    starts: list[tuple[int, float]] = []

    async def fn(w: int) -> int:
        starts.append((w, now()))
        return w

    policy = RateLimit(per_second=1, burst=10, weight=lambda w: w)
    report = await batch_process(
        [8, 9, 2], fn, concurrency=1, rate_limit=policy, deadline=Deadline(seconds=5)
    )
    outcomes = list(report)
    assert starts == [(8, 0.0), (2, 0.0)]
    skipped = outcomes[1]
    assert isinstance(skipped, Failure)
    assert skipped.kind == "skipped"
    assert isinstance(skipped.error, ItemSkipped)
    assert skipped.error.reason == "out_of_time"


@pytest.mark.looptime
async def test_weights_granted_within_the_deadline_wait() -> None:
    starts: list[float] = []

    async def fn(w: int) -> int:
        starts.append(now())
        return w

    policy = RateLimit(per_second=1, burst=4, weight=lambda w: w)
    report = await batch_process(
        [4, 3], fn, concurrency=1, rate_limit=policy, deadline=Deadline(seconds=5)
    )
    assert report.ok
    assert starts == [0.0, 3.0]


def test_weight_must_be_callable() -> None:
    with pytest.raises(InvalidArgument, match=r"RateLimit\.weight must be a callable"):
        RateLimit(per_second=1, weight=3)  # type: ignore[arg-type]


def test_without_weight_the_unweighted_meter_is_used() -> None:
    from batchkit._engine.meters import open_meters
    from batchkit._engine.meters.rate import RateMeter, WeightedRateMeter

    class _Plan:
        adaptive = None
        limiter = None
        rate_limit = RateLimit(per_second=1)

    loop = asyncio.new_event_loop()
    try:
        meters, _, _ = open_meters(_Plan(), loop, None, lambda *_: None)  # type: ignore[arg-type]
        assert [type(m) for m in meters] == [RateMeter]
        _Plan.rate_limit = RateLimit(per_second=1, weight=len)
        meters, _, _ = open_meters(_Plan(), loop, None, lambda *_: None)  # type: ignore[arg-type]
        assert [type(m) for m in meters] == [WeightedRateMeter]
    finally:
        loop.close()


@pytest.mark.looptime
async def test_a_weight_that_raises_fails_only_that_item_with_its_error() -> None:
    async def fn(item: dict[str, int]) -> int:
        return item["tokens"]

    policy = RateLimit(per_second=1, burst=5, weight=lambda item: item["tokens"])
    report = await batch_process([{"tokens": 1}, {}, {"tokens": 2}], fn, rate_limit=policy)
    outcomes = list(report)
    assert [type(o) for o in outcomes] == [Success, Failure, Success]
    failure = outcomes[1]
    assert isinstance(failure, Failure)
    assert failure.kind == "error"
    assert isinstance(failure.error, KeyError)
