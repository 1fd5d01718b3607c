"""The run's bookkeeping, without I/O: counts, the threshold decision, envelopes, recording.

A :class:`Ledger` counts what ended, decides whether a threshold (``fail_fast``,
``max_failures``, ``max_failure_ratio``) has been reached — it returns the
:data:`~batchkit.StopReason`, it does not stop anything — builds the envelopes of items that
end without a last attempt of their own (stopped, skipped, timed out, a broken ``cost=``), and
records envelopes to the sink and the observers. Both drivers use it: the local engine and the
Dask driver, each acting on the reason the ledger returns (``tests/engine/test_ledger.py``
drives it with no event loop).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, final

from .._model.attempt import CancelKind
from .._model.errors import ItemCancelled, ItemSkipped, ItemTimeout
from .._model.outcomes import Failure
from .._model.report import LimitChange

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .._model.attempt import Job
    from .._model.errors import SkipReason, StopReason
    from .._model.events import Event, Observer
    from .._model.outcomes import Outcome
    from .._model.policies import FailureRatio
    from .._model.report import BatchReport
    from .journal import RunJournal
    from .plan import Plan
    from .stopper import Stopper

__all__ = ["Ledger", "abandoned", "cancelled", "last_error", "skipped", "stopped", "timed_out"]

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger("batchkit")


@final
class Ledger(Generic[T, R]):
    """Counts, thresholds and recording for one run. ``put`` takes an envelope (the sink's);
    ``clock`` is the run's loop time; ``in_flight`` how many attempts run now (for events).

    ``careful`` is the one flag a driver's hot path reads: True when a success must be
    recorded as an envelope (observers listen, or a failure ratio waits for its sample),
    False when it may go straight to the sink's columns and :meth:`count_success`.
    """

    __slots__ = (
        "_clock",
        "_in_flight",
        "_put",
        "careful",
        "emit_events",
        "fail_fast",
        "failed",
        "finished",
        "journal",
        "limit_changes",
        "max_failure_ratio",
        "max_failures",
        "name",
        "observers",
        "ratio_armed",
    )

    def __init__(
        self,
        *,
        put: Callable[[Outcome[T, R]], None],
        name: str | None = None,
        fail_fast: bool = False,
        max_failures: int | None = None,
        max_failure_ratio: FailureRatio | None = None,
        observers: Sequence[Observer] = (),
        clock: Callable[[], float] = lambda: 0.0,
        in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self._put = put
        self._clock = clock
        self._in_flight = in_flight
        self.name = name
        self.fail_fast = fail_fast
        self.max_failures = max_failures
        self.max_failure_ratio = max_failure_ratio
        self.finished = 0
        """Items that ended (every kind)."""
        self.failed = 0
        """Items that ended in ``error`` or ``timeout``: what the thresholds count."""
        self.observers: list[Observer] = list(observers)
        self.emit_events = bool(self.observers)
        self.ratio_armed = False
        self.careful = self.emit_events
        self.limit_changes: list[LimitChange] = []
        self.journal: RunJournal | None = None
        """With ``journal=``: told every recorded outcome (then ``careful`` stays True, so
        every success is recorded as an envelope)."""

    # ------------------------------------------------------------------- decisions
    def threshold_reached(self) -> StopReason | None:
        """After a counted failure: the threshold it reaches, if any."""
        if self.max_failures is not None and self.failed >= self.max_failures:
            return "max_failures"
        if self.fail_fast and self.failed:
            return "fail_fast"
        if self.max_failure_ratio is not None:
            return self.ratio_reached()
        return None

    def ratio_reached(self) -> StopReason | None:
        """The failure ratio, once ``min_sample`` items ended. Until then, after a failure,
        every outcome checks it (``careful``): the sample may be completed by a success."""
        ratio = self.max_failure_ratio
        assert ratio is not None
        if self.finished < ratio.min_sample:
            self.ratio_armed = self.careful = True
            return None
        if self.ratio_armed:
            self.ratio_armed = False
            self.careful = self.emit_events or self.journal is not None
        if self.failed / self.finished > ratio.ratio:
            return "max_failure_ratio"
        return None

    # ------------------------------------------------------------------- recording
    def count_success(self) -> None:
        """A success written straight to the sink's columns (``careful`` is False)."""
        self.finished += 1

    def record(self, outcome: Outcome[T, R], job: Job | None = None) -> StopReason | None:
        """Put ``outcome`` in the sink, tell the observers, count it; the threshold it
        reaches, if any (observers hear of the failure before the stop it causes)."""
        self.finished += 1
        self._put(outcome)
        if self.journal is not None and job is not None and job.key is not None:
            self.journal.ended(outcome, job.key)
        if self.emit_events:
            key = event_key(job) if job is not None else f"#{outcome.index}"
            from .._model.events import ItemFinished

            self.event(
                ItemFinished(
                    name=self.name, key=key, outcome=outcome, in_flight=self._in_flight(),
                    time=self._clock(),
                )
            )  # fmt: skip
        if type(outcome) is Failure and outcome.kind in ("error", "timeout"):
            self.failed += 1
            return self.threshold_reached()
        if self.ratio_armed:
            return self.ratio_reached()
        return None

    def count_skipped(self, n: int) -> None:
        """``n`` items skipped in bulk (their envelopes are built when read)."""
        self.finished += n

    def limit_changed(self, old: int, new: int, reason: str, now: float) -> None:
        self.limit_changes.append(LimitChange(time=now, old=old, new=new, reason=reason))
        if self.emit_events:
            from .._model.events import LimitChanged

            self.event(LimitChanged(name=self.name, old=old, new=new, reason=reason, time=now))

    # -- what the observers hear (each sent only when some listen: ``emit_events``) ----
    def run_started(self, concurrency: int, total: int | None, now: float) -> None:
        from .._model.events import RunStarted

        self.event(RunStarted(name=self.name, concurrency=concurrency, total=total, time=now))

    def item_started(self, job: Job, in_flight: int, now: float) -> None:
        from .._model.events import ItemStarted

        pair = getattr(job, "pair", None)  # with hedge= (hedges.py)
        self.event(
            ItemStarted(
                name=self.name, index=job.index, key=event_key(job), item=job.item,
                attempt=job.attempt, in_flight=in_flight, time=now,
                hedge=pair is not None and pair.hedge is job,
            )
        )  # fmt: skip

    def attempt_failed(
        self, job: Job, error: BaseException, kind: str, retry_in: float | None, now: float
    ) -> None:
        from .._model.events import AttemptFailed

        self.event(
            AttemptFailed(
                name=self.name, index=job.index, key=event_key(job), item=job.item,
                attempt=job.attempt, error=error, kind=kind,  # type: ignore[arg-type]
                retry_in=retry_in, time=now,
            )
        )  # fmt: skip

    def run_stopping(self, reason: StopReason) -> None:
        from .._model.events import RunStopping

        self.event(
            RunStopping(
                name=self.name, reason=reason, in_flight=self._in_flight(), time=self._clock()
            )
        )

    def deadline_hit(self) -> None:
        from .._model.events import DeadlineHit

        self.event(DeadlineHit(name=self.name, in_flight=self._in_flight(), time=self._clock()))

    def items_skipped(self, reason: StopReason, indices: range) -> None:
        from .._model.events import ItemsSkipped

        self.event(ItemsSkipped(name=self.name, reason=reason, indices=indices, time=self._clock()))

    def run_finished(self, report: BatchReport[T, R]) -> None:
        from .._model.events import RunFinished

        self.event(RunFinished(name=self.name, report=report, time=self._clock()))

    def event(self, event: Event) -> None:
        """Tell every observer; one that raises is dropped (and logged) for the rest of the
        run. Only runs with observers get here: the events module (a third of
        ``import batchkit``) is imported on first use, by this and the emission sites."""
        from .._model.events import notify

        notify(self.observers, event, _log)
        self.emit_events = bool(self.observers)
        self.careful = self.emit_events or self.ratio_armed or self.journal is not None


def event_key(job: Job) -> str:
    """The item's ``key=`` in events, or ``#index``."""
    return job.key if job.key is not None else f"#{job.index}"


# -- envelopes of items that end without a last attempt of their own ------------------------
def last_error(job: Job, now: float) -> Failure[Any]:
    """The item's last attempt failed and it is not retried: its error and kind."""
    assert job.errors
    assert job.first_start is not None
    kind = cast("Any", job.last_kind)
    errors = job.errors
    return Failure(
        job.item, errors[-1], kind, job.index, len(errors), now - job.first_start, tuple(errors)
    )


def skipped(job: Job, reason: SkipReason, now: float) -> Failure[Any]:
    """``job``'s next attempt does not start: ``skipped``, with the errors of the attempts
    it made (the last one is the new error's ``__cause__``)."""
    if not job.errors:
        err = ItemSkipped(reason)
        return Failure(job.item, err, "skipped", job.index, 0, 0.0, (err,))
    assert job.first_start is not None
    err = ItemSkipped(reason, len(job.errors))
    err.__cause__ = job.errors[-1]
    return Failure(
        job.item, err, "skipped", job.index, len(job.errors), now - job.first_start,
        (*job.errors, err),
    )  # fmt: skip


def cancelled(job: Job, reason: StopReason, now: float) -> Failure[Any]:
    """The run stopped with ``job`` in an attempt: ``cancelled``."""
    err = ItemCancelled(reason)
    history = (*job.errors, err) if job.errors else (err,)
    assert job.first_start is not None
    return Failure(
        job.item, err, "cancelled", job.index, job.attempt, now - job.first_start, history
    )


def stopped(job: Job, reason: StopReason, now: float, *, running: bool) -> Failure[Any]:
    """The run stopped around ``job``: ``cancelled`` if it was running, else ``skipped``
    (with its attempts' errors if it was waiting to retry: the retry is dropped)."""
    return cancelled(job, reason, now) if running else skipped(job, reason, now)


def timed_out(job: Job, timeout: float, now: float, *, budget: bool = False) -> Failure[Any]:
    """An attempt that did not stop after its timeout's (or the item budget's, ``budget``)
    two cancellations (abandoned)."""
    err = ItemTimeout(timeout, budget=budget)
    history = (*job.errors, err) if job.errors else (err,)
    assert job.first_start is not None
    return Failure(job.item, err, "timeout", job.index, job.attempt, now - job.first_start, history)


def abandoned(
    job: Job, kind: CancelKind | None, plan: Plan, stopper: Stopper, now: float
) -> Failure[Any] | None:
    """The envelope of an attempt abandoned after its item budget's or timeout's two
    cancellations; ``None`` when the run's stop cut it (the caller records it ``stopped``).
    Logged as a warning: a thread or task still runs somewhere."""
    _log.warning(
        "batchkit: item #%d did not stop after being cancelled twice; abandoned", job.index
    )
    if kind is CancelKind.BUDGET and plan.item_budget is not None:
        return timed_out(job, plan.item_budget, now, budget=True)
    if kind is CancelKind.STOP or stopper.stopping or plan.timeout is None:
        return None
    return timed_out(job, plan.timeout, now)


def budget_spent(job: Job, budget: float, now: float) -> Failure[Any]:
    """The item's next attempt would start at or past its ``item_budget``: a ``timeout``
    whose error says so, caused by the last attempt's error (kept in the history too)."""
    assert job.errors
    assert job.first_start is not None
    err = ItemTimeout(budget, budget=True)
    err.__cause__ = job.errors[-1]
    history = (*job.errors, err)
    return Failure(job.item, err, "timeout", job.index, len(job.errors), now - job.first_start,
                   history)  # fmt: skip


def bad_cost(job: Job, error: Exception) -> Failure[Any]:
    """A ``cost=`` hint that raised: the item's failure, not the run's."""
    return Failure(job.item, error, "error", job.index, 0, 0.0, (error,))
