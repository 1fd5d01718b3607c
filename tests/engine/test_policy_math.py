"""The pure math behind the policies, as Hypothesis properties over (state, now)."""

from __future__ import annotations

import math

from hypothesis import example, given
from hypothesis import strategies as st

from batchkit import Adaptive, Backoff
from batchkit._engine.backoff import backoff_ceiling, retry_after_hint, retry_delay
from batchkit._engine.meters.adaptive_math import (
    AimdState,
    blend,
    is_stuck,
    on_overload,
    on_success,
    resumed,
)
from batchkit._engine.meters.rate_math import reserve

backoffs = st.builds(
    lambda initial, extra, multiplier, jitter: Backoff(
        initial=initial, maximum=initial + extra, multiplier=multiplier, jitter=jitter
    ),
    st.floats(0, 100),
    st.floats(0, 1000),
    st.floats(1, 10),
    st.booleans(),
)


@example(  # found by Hypothesis: exp(log(initial) + log(multiplier)) < initial
    Backoff(initial=0.02734375, maximum=1.02734375, multiplier=1.0000000000000002, jitter=False),
    1,
)
@given(backoffs, st.integers(1, 2000))
def test_backoff_ceiling_is_monotonic_and_capped(backoff: Backoff, retry: int) -> None:
    c = backoff_ceiling(backoff, retry)
    assert 0 <= c <= backoff.maximum
    assert backoff_ceiling(backoff, retry + 1) >= c
    if retry == 1:
        assert c == backoff.initial


@given(backoffs, st.integers(1, 50), st.floats(0, 1, exclude_max=True))
def test_full_jitter_stays_under_the_ceiling(backoff: Backoff, retry: int, draw: float) -> None:
    d = retry_delay(backoff, retry, draw, ValueError())
    ceiling = backoff_ceiling(backoff, retry)
    assert 0 <= d <= ceiling
    if not backoff.jitter:
        assert d == ceiling


@given(backoffs, st.integers(1, 50), st.floats(0, 1, exclude_max=True), st.floats(0, 1e4))
def test_a_retry_after_hint_is_a_floor(
    backoff: Backoff, retry: int, draw: float, hint: float
) -> None:
    err = ValueError()
    err.retry_after = hint  # type: ignore[attr-defined]
    assert retry_delay(backoff, retry, draw, err) >= hint


def test_unusable_hints_are_ignored() -> None:
    for bad in ("soon", None, math.nan, True):
        err = ValueError()
        err.retry_after = bad  # type: ignore[attr-defined]
        assert retry_after_hint(err) is None


@given(
    st.floats(0.1, 100),  # per second
    st.integers(1, 20),  # burst
    st.lists(st.floats(0, 0.5), min_size=1, max_size=200),  # gaps between requests
)
def test_rate_limit_never_exceeds_burst_plus_rate_in_any_window(
    rate: float, burst: int, gaps: list[float]
) -> None:
    interval = 1 / rate
    tolerance = (burst - 1) * interval
    tat, now, starts = 0.0, 0.0, []
    for gap in gaps:
        now += gap
        tat, wait = reserve(tat, now, interval, tolerance)
        assert wait >= 0
        starts.append(now + wait)
    starts.sort()
    eps = 1e-9
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            window = starts[j] - first
            assert j - i + 1 <= burst + window * rate + eps


@given(st.floats(0.1, 100), st.integers(1, 20))
def test_a_fresh_bucket_allows_exactly_burst_at_once(rate: float, burst: int) -> None:
    interval = 1 / rate
    tat, waits = 0.0, []
    for _ in range(burst + 1):
        tat, wait = reserve(tat, 0.0, interval, (burst - 1) * interval)
        waits.append(wait)
    assert waits[:burst] == [0.0] * burst
    assert math.isclose(waits[burst], interval)


policies = st.builds(
    lambda lo, extra, initial_frac, decrease: Adaptive(
        min=lo, max=lo + extra, initial=lo + int(extra * initial_frac), decrease=decrease
    ),
    st.integers(1, 20),
    st.integers(0, 100),
    st.floats(0, 1),
    st.floats(0.1, 0.95),
)
events = st.lists(st.tuples(st.booleans(), st.floats(0.001, 100), st.floats(0, 1)), max_size=300)


@given(policies, events)
def test_the_limit_always_stays_within_min_and_max(
    policy: Adaptive, evs: list[tuple[bool, float, float]]
) -> None:
    state = AimdState(limit=float(policy.initial))
    now = 0.0
    for ok, latency, gap in evs:
        now += gap
        started = now - latency
        if ok:
            state, overload = on_success(state, policy, latency, started, now)
            if overload is not None:
                state = on_overload(state, policy, started, now)
        else:
            state = on_overload(state, policy, started, now)
        assert policy.min <= state.limit <= policy.max


@given(policies, st.floats(0.001, 10))
def test_a_stale_signal_does_not_cut_twice(policy: Adaptive, latency: float) -> None:
    state = AimdState(limit=float(policy.max), baseline=latency)
    cut = on_overload(state, policy, started=5.0, now=6.0)
    # An attempt that started before that cut says nothing new.
    assert on_overload(cut, policy, started=5.5, now=6.5) == cut
    assert not is_stuck(cut, policy, started=5.5, now=100.0)
    assert is_stuck(cut, policy, started=6.0, now=6.0 + policy.latency_factor * latency * 1.01)


limits = st.floats(0.01, 1e6)


@given(st.integers(1, 100), st.integers(0, 100), limits, limits, st.floats(0.01, 1))
def test_a_remembered_start_stays_in_bounds_and_a_run_moves_it_by_weight(
    low: int, extra: int, before: float, final: float, weight: float
) -> None:
    policy = Adaptive(initial=low, min=low, max=low + extra)
    start = resumed(policy, before)
    assert policy.min <= start.limit <= policy.max
    assert start.ceiling == math.inf  # no slow start
    after = blend(before, final, weight)
    # Between the two, and never more than weight of the way: one bad run cannot erase it.
    assert min(before, final) - 1e-9 <= after <= max(before, final) + 1e-9
    assert abs(after - before) <= weight * abs(final - before) * (1 + 1e-9) + 1e-9
    assert blend(None, final, weight) == final
