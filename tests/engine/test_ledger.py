"""The ledger on its own: counts, thresholds as decisions, envelopes — no event loop.

The local engine and the Dask driver both act on what these functions return; nothing here
stops, cancels or awaits.
"""

from __future__ import annotations

from typing import Any

import pytest

from batchkit import FailureRatio, ItemCancelled, ItemSkipped, ItemTimeout, Success
from batchkit._engine import ledger as envelopes
from batchkit._engine.ledger import Ledger
from batchkit._model.attempt import Job
from batchkit._model.outcomes import Failure, Outcome, make_success


def _ledger(**options: Any) -> tuple[Ledger[int, int], list[Outcome[int, int]]]:
    put: list[Outcome[int, int]] = []
    return Ledger(put=put.append, **options), put


def _failure(index: int, kind: Any = "error") -> Failure[int]:
    e = ValueError(index)
    return Failure(index, e, kind, index, 1, 0.1, (e,))


def _success(index: int) -> Success[int, int]:
    return make_success(index, index * 10, index, 1, 0.1)


def test_it_records_to_the_sink_and_counts() -> None:
    ledger, put = _ledger()
    assert ledger.record(_success(0)) is None
    assert ledger.record(_failure(1)) is None
    assert ledger.record(_failure(2, "skipped")) is None
    assert (ledger.finished, ledger.failed) == (3, 2 - 1)
    assert [o.index for o in put] == [0, 1, 2]


def test_fail_fast_is_reached_by_the_first_error_or_timeout_only() -> None:
    ledger, _ = _ledger(fail_fast=True)
    assert ledger.record(_failure(0, "skipped")) is None
    assert ledger.record(_failure(1, "cancelled")) is None
    assert ledger.record(_failure(2, "timeout")) == "fail_fast"


def test_max_failures_is_reached_at_the_count() -> None:
    ledger, _ = _ledger(max_failures=2, fail_fast=True)
    assert ledger.record(_failure(0)) == "fail_fast"  # below max_failures: fail_fast decides
    ledger, _ = _ledger(max_failures=2)
    assert ledger.record(_failure(0)) is None
    assert ledger.record(_success(1)) is None
    assert ledger.record(_failure(2)) == "max_failures"


def test_the_ratio_waits_for_its_sample_and_a_success_can_complete_it() -> None:
    ledger, _ = _ledger(max_failure_ratio=FailureRatio(ratio=0.5, min_sample=3))
    assert not ledger.careful
    assert ledger.record(_failure(0)) is None  # 1 of 1, but the sample is not full
    assert ledger.careful  # so successes are recorded as envelopes, which check it
    assert ledger.record(_success(1)) is None
    assert ledger.record(_failure(2)) == "max_failure_ratio"  # 2 of 3 > 0.5
    assert not ledger.careful


def test_the_ratio_is_not_reached_at_exactly_the_ratio() -> None:
    ledger, _ = _ledger(max_failure_ratio=FailureRatio(ratio=0.5, min_sample=2))
    assert ledger.record(_success(0)) is None
    assert ledger.record(_failure(1)) is None  # 1 of 2 is not > 0.5


def test_a_success_written_to_the_columns_counts() -> None:
    ledger, put = _ledger()
    ledger.count_success()
    ledger.count_skipped(5)
    assert ledger.finished == 6
    assert put == []


def test_observers_hear_each_outcome_with_its_key_and_one_that_raises_is_dropped() -> None:
    heard: list[Any] = []

    def broken(event: Any) -> None:
        raise RuntimeError("observer bug")

    ledger, _ = _ledger(observers=[heard.append, broken], clock=lambda: 7.0)
    job = Job(0, "a", key="k-a")
    ledger.record(_success(0), job)
    ledger.record(_failure(1))
    assert [(e.key, e.time) for e in heard] == [("k-a", 7.0), ("#1", 7.0)]
    assert len(ledger.observers) == 1


def test_a_limit_change_is_kept() -> None:
    ledger, _ = _ledger()
    ledger.limit_changed(4, 2, "overload", 1.5)
    assert [(c.old, c.new, c.time) for c in ledger.limit_changes] == [(4, 2, 1.5)]


# -- envelopes -------------------------------------------------------------------------------
def _tried(errors: int) -> Job:
    job = Job(3, "x")
    job.first_start = 1.0
    job.attempt = errors + 1
    job.errors = [ValueError(i) for i in range(errors)]
    job.last_kind = "error"
    return job


def test_an_item_that_never_started_is_skipped_with_no_attempts() -> None:
    f = envelopes.stopped(Job(3, "x"), "deadline", 9.0, running=False)
    assert (f.kind, f.attempts, f.elapsed) == ("skipped", 0, 0.0)
    assert isinstance(f.error, ItemSkipped)
    assert f.errors == (f.error,)


def test_an_item_waiting_to_retry_is_skipped_with_its_errors() -> None:
    job = _tried(2)
    f = envelopes.stopped(job, "fail_fast", 4.0, running=False)
    assert (f.kind, f.attempts, f.elapsed) == ("skipped", 2, 3.0)
    assert f.error.__cause__ is job.errors[-1]  # type: ignore[index]
    assert f.errors[:2] == tuple(job.errors or ())


def test_a_running_item_is_cancelled_with_its_history() -> None:
    f = envelopes.stopped(_tried(1), "max_failures", 2.5, running=True)
    assert (f.kind, f.attempts, f.elapsed) == ("cancelled", 2, 1.5)
    assert isinstance(f.error, ItemCancelled)
    assert len(f.errors) == 2


def test_the_last_error_ends_an_item_with_its_kind() -> None:
    f = envelopes.last_error(_tried(3), 5.0)
    assert (f.kind, f.attempts, f.elapsed, str(f.error)) == ("error", 3, 4.0, "2")


def test_an_abandoned_attempt_times_out() -> None:
    f = envelopes.timed_out(_tried(0), 0.5, 3.0)
    assert (f.kind, f.attempts, f.elapsed) == ("timeout", 1, 2.0)
    assert isinstance(f.error, ItemTimeout)


def test_a_broken_cost_hint_is_the_items_error() -> None:
    e = TypeError("no cost")
    f = envelopes.bad_cost(Job(4, "y"), e)
    assert (f.kind, f.error, f.attempts) == ("error", e, 0)


@pytest.mark.parametrize("running", [True, False])
def test_stopped_never_needs_a_loop(running: bool) -> None:
    job = _tried(1)
    assert envelopes.stopped(job, "cancelled", 2.0, running=running).index == 3
