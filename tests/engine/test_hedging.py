"""``hedge=``: hedged attempts for stragglers, in virtual time — a hedge starts at exactly
``after``, the first success wins, the loser's context exits with the cancellation, the
budget holds, and every item ends in exactly one envelope whatever the latencies."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchkit import (
    Adaptive,
    Deadline,
    Event,
    Failure,
    Hedge,
    InvalidArgument,
    ItemFinished,
    ItemStarted,
    LimitGroup,
    RateLimit,
    Retry,
    Success,
    batch_process,
    current_attempt,
    stream,
)
from batchkit.testing import run_virtual

from ..helpers import NO_BACKOFF, now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = [pytest.mark.timeout(20)]
virtual = pytest.mark.looptime


class Upstream:
    """An upstream whose latency is chosen per (item, attempt number); records every start,
    every context exit (with the exception it exited with) and what is in flight."""

    def __init__(self, latency: dict[tuple[int, int], float], default: float = 1.0) -> None:
        self.latency = latency
        self.default = default
        self.starts: list[tuple[int, int, float]] = []
        self.exits: list[tuple[int, int, str | None]] = []
        self.in_flight = 0
        self.peak = 0

    async def fn(self, item: int, ctx: object = None) -> int:
        attempt = current_attempt().number
        self.starts.append((item, attempt, now()))
        await asyncio.sleep(self.latency.get((item, attempt), self.default))
        return item * 10

    @contextlib.asynccontextmanager
    async def context(self) -> AsyncIterator[None]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            yield None
        except BaseException as e:
            self.exits.append((_index(), _number(), type(e).__name__))
            raise
        else:
            self.exits.append((_index(), _number(), None))
        finally:
            self.in_flight -= 1


def _index() -> int:
    return current_attempt().index


def _number() -> int:
    return current_attempt().number


def only(report: Any, index: int) -> Any:
    return report[index]


@virtual
async def test_a_straggler_is_hedged_at_exactly_after_and_the_hedge_wins() -> None:
    up = Upstream({(0, 1): 100.0})
    report = await batch_process(
        range(3), up.fn, concurrency=4, key=str, hedge=Hedge(after=2.0, budget=1.0)
    )
    assert (0, 2, 2.0) in up.starts  # the hedge: attempt 2, at exactly `after`
    assert [s for s in up.starts if s[0] != 0] == [(1, 1, 0.0), (2, 1, 0.0)]  # never hedged
    hedged = only(report, 0)
    assert isinstance(hedged, Success)
    assert (hedged.value, hedged.hedged, hedged.both_committed) == (0, "hedge", False)
    assert (hedged.attempts, hedged.elapsed) == (2, 3.0)
    assert [o.hedged for o in report] == ["hedge", None, None]
    assert report.hedges == 1
    assert report.wall_time == 3.0
    assert report.to_dict()["hedges"] == 1
    assert report.to_dict()["items"][0]["hedged"] == "hedge"


@virtual
async def test_the_first_success_wins_and_the_losers_context_exits_with_the_cancel() -> None:
    up = Upstream({(0, 1): 3.0, (0, 2): 10.0})
    report = await batch_process(
        [0], up.fn, context=up.context, key=str, hedge=Hedge(after=2.0, budget=1.0)
    )
    (outcome,) = report
    assert isinstance(outcome, Success)
    assert (outcome.hedged, outcome.attempts, outcome.elapsed) == ("first", 2, 3.0)
    # The hedge (attempt 2) was cut at 3 s: its context exited with the cancellation.
    assert sorted(up.exits) == [(0, 1, None), (0, 2, "CancelledError")]
    assert up.in_flight == 0
    assert report.wall_time == 3.0
    assert report.counts["success"] == 1


@virtual
async def test_a_loser_already_in_its_shielded_commit_finishes_and_both_commits_are_recorded() -> (
    None
):
    commits: list[tuple[int, float]] = []

    async def fn(item: int) -> int:
        attempt = current_attempt().number
        await asyncio.sleep(2.5 if attempt == 1 else 0.5)
        commit = asyncio.ensure_future(asyncio.sleep(1.0))  # the point of no return
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            await commit  # as sessions() does: a started commit is finished
        commits.append((attempt, now()))
        return attempt

    report = await batch_process([0], fn, key=str, hedge=Hedge(after=2.0, budget=1.0))
    (outcome,) = report
    assert isinstance(outcome, Success)
    # The hedge (started at 2) committed at 3.5; the first was already committing (2.5-3.5).
    assert sorted(commits) == [(1, 3.5), (2, 3.5)]
    assert outcome.both_committed
    assert outcome.hedged in ("first", "hedge")
    assert report.hedges == 1


@virtual
async def test_a_loser_that_will_not_stop_is_abandoned_after_grace_and_the_winner_recorded() -> (
    None
):
    async def fn(item: int) -> int:
        if current_attempt().number == 1:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(100)  # swallows the first cancellation...
            await asyncio.sleep(100)  # ...and is cut by the second
            return -1
        await asyncio.sleep(1)
        return 2

    report = await batch_process(
        [0], fn, key=str, deadline=Deadline(seconds=50, grace=3),
        hedge=Hedge(after=2.0, budget=1.0),
    )  # fmt: skip
    (outcome,) = report
    assert isinstance(outcome, Success)
    # The hedge won at 3; the first attempt was cancelled then, ignored it, was cancelled
    # again at 6 (grace 3 s) and ended: the item's one envelope is the hedge's success.
    assert (outcome.value, outcome.hedged, outcome.elapsed) == (2, "hedge", 3.0)
    assert report.wall_time == 6.0


@virtual
async def test_a_loser_that_ignores_every_cancel_is_abandoned() -> None:
    returned = False

    async def fn(item: int) -> int:
        if current_attempt().number == 1:
            while not returned:  # swallows every cancellation while the call runs
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(100)
            return -1
        await asyncio.sleep(1)
        return 2

    report = await batch_process(
        [0], fn, key=str, deadline=Deadline(seconds=50, grace=3),
        hedge=Hedge(after=2.0, budget=1.0),
    )  # fmt: skip
    (outcome,) = report
    assert isinstance(outcome, Success)
    assert (outcome.value, outcome.hedged) == (2, "hedge")
    returned = True
    assert report.abandoned == (0,)
    assert report.wall_time == 6.0


@virtual
async def test_the_budget_caps_the_extra_attempts() -> None:
    up = Upstream({}, default=10.0)  # every item straggles; slots to spare for hedges
    report = await batch_process(
        range(100), up.fn, concurrency=150, key=str, hedge=Hedge(after=1.0, budget=0.1)
    )
    assert report.hedges == 10
    assert [o.hedged for o in report].count("first") == 10  # each hedge lost (started later)
    assert report.counts["success"] == 100
    # At every hedge's start, hedges so far <= 10 % of the items started so far.
    events = sorted((t, a) for _, a, t in up.starts)
    firsts = hedges = 0
    for _, attempt in events:
        if attempt == 1:
            firsts += 1
        else:
            hedges += 1
            assert hedges <= 0.1 * firsts


@virtual
async def test_hedges_wait_for_a_free_slot_and_a_won_item_drops_its_queued_hedge() -> None:
    up = Upstream({}, default=10.0)  # every slot busy: no hedge can start
    report = await batch_process(
        range(40), up.fn, concurrency=20, key=str, hedge=Hedge(after=1.0, budget=1.0)
    )
    assert report.hedges == 0
    assert [s for s in up.starts if s[1] == 2] == []
    assert report.peak_concurrency == 20
    assert report.wall_time == 20.0


@virtual
@pytest.mark.parametrize("min_samples", [20, 100])
async def test_a_quantile_of_this_runs_durations_once_min_samples_ended(min_samples: int) -> None:
    # Items 0-19 take 1 s on two workers (20 samples by t=10, p95 = 1 s); item 20 straggles.
    up = Upstream({(20, 1): 50.0}, default=1.0)
    report = await batch_process(
        range(22), up.fn, concurrency=2, key=str,
        hedge=Hedge(after="p95", min_samples=min_samples),
    )  # fmt: skip
    hedge_starts = [t for i, a, t in up.starts if a == 2]
    if min_samples == 20:
        # Item 20 starts at 10 and is hedged 1 s later (item 21's worker is free by then).
        assert hedge_starts == [11.0]
        assert report[20].hedged == "hedge"
        assert report.hedges == 1
    else:  # never enough samples: never a hedge
        assert hedge_starts == []
        assert report.hedges == 0
        assert report.wall_time == 60.0


@virtual
async def test_no_hedge_of_work_not_marked_safe_to_repeat() -> None:
    up = Upstream({})
    with pytest.raises(InvalidArgument, match=r"hedge= .* needs key="):
        await batch_process([1], up.fn, hedge=Hedge(after=1.0))
    assert up.starts == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"after": "p10"}, "quantile from 'p50' to 'p99.9'"),
        ({"after": "fast"}, "quantile from 'p50' to 'p99.9'"),
        ({"after": 0}, "Hedge.after must be > 0"),
        ({"budget": 0}, "Hedge.budget must be a share"),
        ({"budget": 1.5}, "Hedge.budget must be a share"),
        ({"budget": "10%"}, "Hedge.budget must be a share"),
        ({"min_samples": 0}, "Hedge.min_samples must be >= 1"),
    ],
)
def test_a_bad_hedge_policy_is_refused_on_creation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        Hedge(**kwargs)


async def test_hedge_takes_a_hedge_policy() -> None:
    with pytest.raises(InvalidArgument, match=r"hedge must be batchkit\.Hedge"):
        await batch_process([1], Upstream({}).fn, key=str, hedge="p95")  # type: ignore[call-overload]


@virtual
async def test_a_hedge_waits_for_its_turn_of_the_rate_limit() -> None:
    # One start per 5 s: items 0, 1, 2 start at 0, 5, 10; item 0's hedge, due at 2, takes
    # the next turn, at 15, and wins at 16.
    up = Upstream({(0, 1): 50.0})
    report = await batch_process(
        range(3), up.fn, key=str, rate_limit=RateLimit(per_second=0.2, burst=1),
        hedge=Hedge(after=2.0, budget=1.0),
    )  # fmt: skip
    assert up.starts == [(0, 1, 0.0), (1, 1, 5.0), (2, 1, 10.0), (0, 2, 15.0)]
    assert (report[0].hedged, report.wall_time) == ("hedge", 16.0)


@virtual
async def test_a_cancelled_hedge_is_no_signal_to_adaptive() -> None:
    up = Upstream({(0, 1): 3.0, (0, 2): 10.0, (1, 1): 3.0, (1, 2): 10.0})
    policy = Adaptive(initial=4, min=1, max=4)
    report = await batch_process(
        range(2), up.fn, concurrency=policy, key=str, hedge=Hedge(after=2.0, budget=1.0)
    )
    assert report.hedges == 2
    assert [o.hedged for o in report] == ["first", "first"]
    assert all(change.new >= change.old for change in report.limit_changes)


@virtual
async def test_a_failed_attempt_lets_its_twin_decide_and_keeps_its_error() -> None:
    async def fn(item: int) -> int:
        attempt = current_attempt().number
        if attempt == 1:
            await asyncio.sleep(3)
            raise ConnectionError("first failed")
        await asyncio.sleep(2)
        return attempt

    report = await batch_process([0], fn, key=str, hedge=Hedge(after=1.0, budget=1.0))
    (outcome,) = report
    assert isinstance(outcome, Success)
    assert (outcome.value, outcome.hedged, outcome.elapsed) == (2, "hedge", 3.0)


@virtual
async def test_both_failing_go_on_to_one_retry_and_one_envelope() -> None:
    starts: list[tuple[int, float]] = []

    async def fn(item: int) -> int:
        attempt = current_attempt().number
        starts.append((attempt, now()))
        await asyncio.sleep(3 if attempt == 1 else 1)
        if attempt < 3:
            raise ConnectionError(f"attempt {attempt}")
        return attempt

    retry = Retry(attempts=3, backoff=NO_BACKOFF)
    report = await batch_process([0], fn, key=str, retry=retry, hedge=Hedge(after=1.0, budget=1.0))
    (outcome,) = report
    assert isinstance(outcome, Success)
    assert starts == [(1, 0.0), (2, 1.0), (3, 3.0)]
    assert (outcome.attempts, outcome.hedged) == (3, "first")
    assert len(report) == 1


@virtual
async def test_a_hedge_in_flight_at_the_deadline_ends_in_one_cancelled_envelope() -> None:
    up = Upstream({}, default=100.0)
    observed: list[Event] = []
    report = await batch_process(
        range(2), up.fn, key=str, deadline=Deadline(seconds=5, grace=1),
        hedge=Hedge(after=1.0, budget=1.0), observers=[observed.append],
    )  # fmt: skip
    assert [o.kind for o in report] == ["cancelled", "cancelled"]
    assert [o.hedged for o in report] == ["neither", "neither"]
    finished = [e for e in observed if isinstance(e, ItemFinished)]
    assert sorted(e.outcome.index for e in finished) == [0, 1]
    started = [e for e in observed if isinstance(e, ItemStarted)]
    assert sorted((e.index, e.attempt) for e in started) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert report.hedges == 2


@virtual
async def test_a_hedge_still_queued_at_the_deadline_leaves_its_item_cancelled_not_skipped() -> None:
    up = Upstream({}, default=100.0)
    observed: list[Event] = []
    report = await batch_process(
        [0], up.fn, concurrency=1, key=str, deadline=Deadline(seconds=5, grace=1),
        hedge=Hedge(after=1.0, budget=1.0), observers=[observed.append],
    )  # fmt: skip
    (outcome,) = report
    # No slot was free for the hedge: it never started, and the item was in flight.
    assert (outcome.kind, outcome.hedged, outcome.elapsed) == ("cancelled", None, 5.0)
    assert report.hedges == 0
    assert up.starts == [(0, 1, 0.0)]
    assert [type(e).__name__ for e in observed].count("ItemFinished") == 1


@virtual
async def test_under_a_deadline_a_straggler_that_would_miss_it_is_hedged_first() -> None:
    # Three slots. Item 0 straggles from 0 and is due a hedge at 3 (expected finish 6: in
    # time for the deadline at 7.9); item 3 straggles from 2 and is due one at 5 (expected
    # finish 8: it would miss). No slot is free until item 4 ends at 5.8: item 3's hedge
    # goes first, though item 0's was queued earlier.
    latency = {(0, 1): 100.0, (1, 1): 2.0, (2, 1): 2.9, (3, 1): 100.0, (4, 1): 2.9}
    up = Upstream(latency, default=0.5)
    report = await batch_process(
        range(5), up.fn, concurrency=3, key=str, cost=lambda i: 0.5,
        deadline=Deadline(seconds=7.9), hedge=Hedge(after=3.0, budget=1.0),
    )  # fmt: skip
    assert [(i, t) for i, a, t in up.starts if a == 2] == [(3, 5.8), (0, 6.3)]
    assert [o.hedged for o in report] == ["hedge", None, None, "hedge", None]


@virtual
async def test_a_hedge_is_cut_by_its_own_timeout_and_the_first_still_wins() -> None:
    up = Upstream({(0, 1): 4.0, (0, 2): 100.0})
    report = await batch_process([0], up.fn, key=str, timeout=5, hedge=Hedge(after=1.0, budget=1.0))
    (outcome,) = report
    assert isinstance(outcome, Success)
    assert (outcome.hedged, outcome.elapsed) == ("first", 4.0)


@virtual
async def test_the_item_budget_bounds_both_attempts() -> None:
    up = Upstream({}, default=100.0)
    report = await batch_process(
        [0], up.fn, key=str, item_budget=5, hedge=Hedge(after=1.0, budget=1.0)
    )
    (outcome,) = report
    assert isinstance(outcome, Failure)
    assert (outcome.kind, outcome.hedged, outcome.elapsed) == ("timeout", "neither", 5.0)
    assert report.wall_time == 5.0


@virtual
async def test_a_stream_yields_each_hedged_item_once() -> None:
    up = Upstream({(1, 1): 100.0})
    seen = []
    async with stream(
        range(4), up.fn, concurrency=2, key=str, hedge=Hedge(after=2.0, budget=1.0)
    ) as outcomes:
        async for o in outcomes:
            seen.append((o.index, o.hedged))
    assert sorted(seen) == [(0, None), (1, "hedge"), (2, None), (3, None)]


# -- properties ---------------------------------------------------------------------------
latencies = st.lists(
    st.sampled_from([0.5, 1.0, 1.5, 4.0, 30.0]), min_size=2, max_size=6
)  # per attempt number


@settings(max_examples=60, deadline=None)
@given(
    st.lists(latencies, min_size=1, max_size=25),
    st.integers(1, 5),
    st.sampled_from([0.25, 0.5, 1.0]),
    st.sampled_from([1.0, 2.0, "p75"]),
    st.booleans(),
    st.sampled_from([None, 3.0, 8.0]),
)
def test_exactly_one_envelope_per_item_and_limits_held_at_every_instant(
    plan: list[list[float]],
    concurrency: int,
    budget: float,
    after: float | str,
    fails: bool,
    deadline: float | None,
) -> None:
    n = len(plan)
    per_group: dict[int, int] = {}
    peaks = {"all": 0, "group": 0}
    inside = 0
    entered = exited = 0

    @contextlib.asynccontextmanager
    async def context() -> AsyncIterator[int]:
        nonlocal entered, exited, inside
        index = current_attempt().index
        entered += 1
        inside += 1
        peaks["all"] = max(peaks["all"], inside)
        per_group[index % 2] = per_group.get(index % 2, 0) + 1
        peaks["group"] = max(peaks["group"], per_group[index % 2])
        try:
            yield index
        finally:
            exited += 1
            inside -= 1
            per_group[index % 2] -= 1

    async def fn(item: int, ctx: int) -> int:
        number = current_attempt().number
        row = plan[item]
        await asyncio.sleep(row[min(number, len(row)) - 1])
        if fails and number == 1 and item % 3 == 0:
            raise ConnectionError("flaky")
        return item

    observed: list[Event] = []

    async def main() -> Any:
        return await batch_process(
            range(n), fn, context=context, concurrency=concurrency, key=str,
            hedge=Hedge(after=after, budget=budget, min_samples=3),
            retry=Retry(attempts=2, backoff=NO_BACKOFF),
            groups=[LimitGroup(by=lambda i: i % 2, concurrency=2)],
            deadline=deadline, observers=[observed.append],
        )  # fmt: skip

    report = run_virtual(main)
    assert sorted(o.index for o in report) == list(range(n))
    finished = sorted(e.outcome.index for e in observed if isinstance(e, ItemFinished))
    assert finished == list(range(n))  # exactly one ItemFinished per item
    assert report.peak_concurrency <= concurrency
    assert peaks["all"] <= concurrency  # at every instant, hedges included
    assert peaks["group"] <= 2
    assert entered == exited  # every loser's context exited
    assert report.hedges <= budget * n
    assert report.hedges == 0 or any(o.hedged is not None for o in report)
    for o in report:
        if isinstance(o, Success):
            assert o.value == o.index
