"""``item_budget=``: seconds per item across all its attempts, in virtual time — no attempt
starts and no backoff waits past it, a running attempt is cut at it, and the earlier of the
budget and the run's deadline decides how the item ends."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest

from batchkit import (
    Backoff,
    Failure,
    InvalidArgument,
    ItemSkipped,
    ItemTimeout,
    RateLimit,
    Retry,
    batch_process,
    stream,
)

from ..helpers import NO_BACKOFF, now

pytestmark = [pytest.mark.looptime, pytest.mark.timeout(10)]


def fixed(seconds: float) -> Backoff:
    return Backoff(initial=seconds, maximum=seconds, jitter=False)


class Flaky(ConnectionError):
    """A transient failure (retried by the default ``retry_on``)."""


def only_failure(report: Any) -> Failure[Any]:
    (outcome,) = list(report)
    assert isinstance(outcome, Failure)
    return outcome


async def test_a_running_attempt_is_cut_when_the_budget_runs_out() -> None:
    async def fn(x: int) -> None:
        await asyncio.sleep(100)

    report = await batch_process([1], fn, item_budget=5)
    failure = only_failure(report)
    assert failure.kind == "timeout"
    assert isinstance(failure.error, ItemTimeout)
    assert failure.error.budget
    assert failure.error.timeout == 5
    assert "time budget ran out" in str(failure.error)
    assert failure.elapsed == 5
    assert report.wall_time == 5


@pytest.mark.parametrize("hold_slot", [False, True])
async def test_the_budget_spans_attempts_and_cuts_the_last_one(hold_slot: bool) -> None:
    starts: list[float] = []

    async def fn(x: int) -> None:
        starts.append(now())
        await asyncio.sleep(2)
        raise Flaky("upstream down")

    retry = Retry(attempts=10, backoff=fixed(1), hold_slot=hold_slot)
    report = await batch_process([1], fn, item_budget=7, retry=retry)
    failure = only_failure(report)
    assert starts == [0, 3, 6]
    assert failure.kind == "timeout"
    assert failure.attempts == 3
    assert failure.elapsed == 7
    assert [type(e) for e in failure.errors] == [Flaky, Flaky, ItemTimeout]
    assert isinstance(failure.error, ItemTimeout)
    assert failure.error.budget


@pytest.mark.parametrize("hold_slot", [False, True])
async def test_no_backoff_waits_past_the_budget(hold_slot: bool) -> None:
    """The retry would start at 7, past the budget of 6: the item ends at once, at 2, a
    timeout caused by its last error, with its history."""

    async def fn(x: int) -> None:
        await asyncio.sleep(2)
        raise Flaky("upstream down")

    retry = Retry(backoff=fixed(5), hold_slot=hold_slot)
    report = await batch_process([1], fn, item_budget=6, retry=retry)
    failure = only_failure(report)
    assert report.wall_time == 2
    assert failure.kind == "timeout"
    assert failure.attempts == 1
    assert isinstance(failure.error, ItemTimeout)
    assert failure.error.budget
    assert isinstance(failure.error.__cause__, Flaky)
    assert [type(e) for e in failure.errors] == [Flaky, ItemTimeout]


async def test_a_retry_after_past_the_budget_is_not_waited_for() -> None:
    class Busy(Exception):
        retry_after = 30.0

    async def fn(x: int) -> None:
        raise Busy

    retry = Retry(retry_on=Busy, backoff=NO_BACKOFF)
    report = await batch_process([1], fn, item_budget=10, retry=retry)
    failure = only_failure(report)
    assert report.wall_time == 0
    assert failure.kind == "timeout"
    assert isinstance(failure.error.__cause__, Busy)


async def test_no_attempt_starts_past_the_budget_after_a_wait() -> None:
    """The second attempt waits for the run's rate limit until 10, past the budget of 5: it
    does not start."""
    calls: list[float] = []

    async def fn(x: int) -> None:
        calls.append(now())
        raise Flaky("down")

    report = await batch_process(
        [1], fn, item_budget=5, retry=Retry(backoff=NO_BACKOFF),
        rate_limit=RateLimit(per_second=0.1),
    )  # fmt: skip
    failure = only_failure(report)
    assert calls == [0]
    assert failure.kind == "timeout"
    assert failure.error.budget  # type: ignore[attr-defined]
    assert [type(e) for e in failure.errors] == [Flaky, ItemTimeout]


@pytest.mark.parametrize(("budget", "kind"), [(5.5, "timeout"), (6.5, "skipped")])
async def test_the_earlier_of_budget_and_deadline_decides(budget: float, kind: str) -> None:
    """The retry at 7 fits neither the deadline (6) nor the budget: the earlier says how the
    item ends — a budget timeout, or skipped for the deadline (``out_of_time``)."""

    async def fn(x: int) -> None:
        await asyncio.sleep(2)
        raise Flaky("down")

    report = await batch_process(
        [1], fn, item_budget=budget, deadline=6, retry=Retry(backoff=fixed(5))
    )
    failure = only_failure(report)
    assert failure.kind == kind
    assert report.wall_time == 2
    if kind == "skipped":
        assert isinstance(failure.error, ItemSkipped)
        assert failure.error.reason == "out_of_time"
    else:
        assert isinstance(failure.error, ItemTimeout)
        assert failure.error.budget


async def test_a_deadline_before_the_budget_cancels_as_a_deadline() -> None:
    async def fn(x: int) -> None:
        await asyncio.sleep(100)

    report = await batch_process([1], fn, item_budget=10, deadline=4)
    assert only_failure(report).kind == "cancelled"
    assert report.stop_reason == "deadline"


async def test_an_attempt_that_ignores_the_budget_is_abandoned_after_grace() -> None:
    done = False

    async def fn(x: int) -> None:
        while True:
            try:
                await asyncio.sleep(100)
            except asyncio.CancelledError:
                if done:
                    raise  # the test's own cleanup
                continue  # misbehaving code

    report = await batch_process([1], fn, item_budget=3)
    done = True
    failure = only_failure(report)
    assert failure.kind == "timeout"
    assert isinstance(failure.error, ItemTimeout)
    assert failure.error.budget
    assert report.abandoned == (0,)
    assert report.wall_time == 4  # the budget, then one second of grace


async def test_other_items_are_untouched_and_the_budget_works_in_a_stream() -> None:
    async def fn(x: int) -> int:
        await asyncio.sleep(x)
        return x

    async with stream([1, 9, 2], fn, item_budget=5) as results:
        kinds = {o.index: o.kind async for o in results}
    assert kinds == {0: "success", 1: "timeout", 2: "success"}


def test_a_budget_error_pickles_and_says_so() -> None:
    error = ItemTimeout(5, budget=True)
    error.__cause__ = Flaky("down")
    back = pickle.loads(pickle.dumps(error))
    assert back.budget
    assert back.timeout == 5
    assert str(back) == str(error)
    assert isinstance(back.__cause__, Flaky)
    assert not ItemTimeout(3).budget


@pytest.mark.parametrize("bad", [0, -1, True, "5", float("inf")])
async def test_a_bad_item_budget_is_refused_before_any_work(bad: Any) -> None:
    called: list[int] = []

    async def fn(x: int) -> None:
        called.append(x)

    with pytest.raises(InvalidArgument, match="item_budget must be"):
        await batch_process([1], fn, item_budget=bad)
    assert called == []
