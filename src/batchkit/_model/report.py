"""The :class:`BatchReport` of a run, and :class:`InputFailed`, the error that carries one."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, final, overload

from .errors import BatchkitError, describe
from .outcomes import KINDS, ROW_FIELDS, Failure

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from .errors import StopReason
    from .outcomes import Outcome, Success
    from .store import OutcomeStore, OutcomeView

__all__ = ["BatchReport", "InputFailed", "LimitChange"]

T = TypeVar("T")
R = TypeVar("R")


@final
@dataclass(frozen=True, slots=True)
class LimitChange:
    """The adaptive concurrency limit moved from ``old`` to ``new`` at loop time ``time``."""

    time: float
    old: int
    new: int
    reason: str


def _rebuild_report(fields: dict[str, Any]) -> BatchReport[Any, Any]:
    return BatchReport(**fields)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    # Nearest-rank percentile: always one of the observed values.
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class BatchReport(Generic[T, R]):
    """Everything that happened in one run: one outcome per item, in input order.

    Iterate it, index it or take ``len()`` of it like the sequence of outcomes.

    The outcomes are stored column-wise and each envelope is built when it is read (see
    ``docs/performance.md``): ``report[i] is not report[i]``, and the item, value and error
    objects inside are the ones the run produced (so the two envelopes are equal), except for
    items skipped in bulk when a run stopped early, which get a new ``ItemSkipped`` error on
    each read. Counts, values, latencies and times come from the columns without building
    envelopes.
    """

    outcomes: Sequence[Outcome[T, R]]
    """A read-only sequence view (any sequence given is stored column-wise)."""
    wall_time: float
    """Seconds from the call's start to its end (loop time)."""
    concurrency: int
    """The concurrency limit the run started with (for adaptive limits: ``initial``, or the
    remembered limit with ``Adaptive(remember=...)``)."""
    peak_concurrency: int
    """The most items that were ever in flight at once."""
    stop_reason: StopReason | None = None
    """Why the run stopped early, or ``None`` if it ran through its input."""
    input_exhausted: bool = True
    """False when the run stopped before it read an unsized input to its end: such items were
    never pulled, so they have no envelope (sized inputs are drained into ``skipped``)."""
    limit_changes: tuple[LimitChange, ...] = ()
    """How an adaptive concurrency limit moved, in order."""
    name: str | None = None
    key: Callable[[T], object] | None = field(default=None, repr=False, compare=False)
    """The run's ``key=`` function, for :meth:`item_key`. Not pickled: a pickled report
    carries every item's computed key in ``keys`` instead (functions such as lambdas do not
    cross a process boundary)."""
    abandoned: tuple[int, ...] = ()
    """Input indices whose work did not stop after being cancelled twice and was left running
    when the call returned (also logged at WARNING). Their envelopes are in ``outcomes``."""
    threads_running: int = 0
    """Threads of a sync ``fn`` still running when the call returned (a thread cannot be
    interrupted: one that outlived its timeout runs to its end)."""
    keys: Sequence[str] | None = field(default=None, repr=False, compare=False)
    """Each item's key, computed once (by input index), when ``key=`` was given."""
    tally: Mapping[str, int] | None = field(default=None, repr=False, compare=False)
    """Outcomes by kind when the outcomes themselves are not kept (a stream's report)."""
    reruns: int = 0
    """Re-executions a cluster backend caused by losing workers: the sum of every item's
    ``reruns`` (0 on the local engine). Items of a lost worker's chunk run again elsewhere,
    so this many item runs happened (at least in part) more than once."""
    resumed: int = 0
    """Successes read from the run journal (``journal=``) instead of run: the items whose
    ``Success.resumed`` is ``True``."""
    hedges: int = 0
    """Hedged attempts that started (``hedge=``): the extra attempts the run spent on
    stragglers. Each hedged item's envelope says which attempt won (``hedged``)."""

    def __post_init__(self) -> None:
        from .store import OutcomeStore, OutcomeView

        if not isinstance(self.outcomes, OutcomeView):
            store = OutcomeStore[T, R].from_outcomes(self.outcomes)
            object.__setattr__(self, "outcomes", store.view())
            if not self.reruns:
                object.__setattr__(self, "reruns", store.reruns())
            if not self.resumed:
                object.__setattr__(self, "resumed", store.resumed())

    @property
    def _store(self) -> OutcomeStore[T, R]:
        return cast("OutcomeView[T, R]", self.outcomes).store

    # -- sequence behaviour ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.outcomes)

    def __iter__(self) -> Iterator[Outcome[T, R]]:
        return iter(self.outcomes)

    @overload
    def __getitem__(self, index: int) -> Outcome[T, R]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Outcome[T, R]]: ...
    def __getitem__(self, index: int | slice) -> Outcome[T, R] | Sequence[Outcome[T, R]]:
        return self.outcomes[index]

    # -- views ----------------------------------------------------------------------------
    @property
    def successes(self) -> list[Success[T, R]]:
        """The ``Success`` envelopes, in input order."""
        build = self._store.outcome
        return [cast("Success[T, R]", build(i)) for i in self._store.successes()]

    @property
    def failures(self) -> list[Failure[T]]:
        """The ``Failure`` envelopes (every kind), in input order."""
        build = self._store.outcome
        return [cast("Failure[T]", build(i)) for i in self._store.failures()]

    def values(self) -> list[R]:
        """The values of the successes, in input order."""
        return self._store.values()

    @property
    def counts(self) -> dict[str, int]:
        """Outcomes by kind, every kind of :data:`OutcomeKind` (``lost`` only ever counts with a
        cluster backend)."""
        if self.tally is not None:
            counts: dict[str, int] = dict.fromkeys(KINDS, 0)
            counts.update(self.tally)
            return counts
        return self._store.counts()

    @property
    def total(self) -> int:
        """How many outcomes the run produced (for a stream's report: produced so far)."""
        return sum(self.tally.values()) if self.tally is not None else len(self.outcomes)

    @property
    def ok(self) -> bool:
        """True when every item succeeded and the whole input was read."""
        if self.tally is not None:
            return self.input_exhausted and self.tally.get("success", 0) == self.total
        return self.input_exhausted and self._store.counts()["success"] == len(self.outcomes)

    @property
    def deadline_hit(self) -> bool:
        """True when the run was stopped by its deadline."""
        return self.stop_reason == "deadline"

    @property
    def item_time(self) -> float:
        """The sum of every item's ``elapsed``: the work a sequential run would have waited for."""
        return self._store.item_time()

    @property
    def retries(self) -> int:
        """Attempts beyond the first, over all items (hedges included: see ``hedges``)."""
        return self._store.retries()

    @property
    def ideal_time(self) -> float:
        """``max(item_time / concurrency, longest item)``: no schedule can finish sooner."""
        return max(self.item_time / max(self.concurrency, 1), self._store.longest())

    def latency(self, q: float) -> float:
        """The ``q`` quantile (0..1, nearest rank) of item ``elapsed`` over started items."""
        return _percentile(self._store.started_elapsed(), q)

    def item_key(self, outcome: Outcome[T, R]) -> str:
        """How logs and tables name an item: ``key(item)`` if given, else ``#index``."""
        keys = self.keys
        if keys is not None and 0 <= outcome.index < len(keys):
            return keys[outcome.index]
        if self.key is not None:
            try:
                return str(self.key(outcome.item))
            except Exception:
                return f"#{outcome.index}"
        return f"#{outcome.index}"

    def __reduce__(self) -> tuple[Any, ...]:
        # The key function stays behind: keys are computed now (by input index), including
        # those of items skipped in bulk, which item_key() otherwise names lazily.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.key is not None:
            named = {o.index: self.item_key(o) for o in self}
            keys = [named.get(i, f"#{i}") for i in range(max(named, default=-1) + 1)]
            fields.update(key=None, keys=keys)
        return (_rebuild_report, (fields,))

    # -- raising, output ------------------------------------------------------------------
    def raise_for_failures(self) -> None:
        """Raise an :class:`ExceptionGroup` of every failure's error; do nothing if none.

        Each error gets a note naming its item's index (and key), so a traceback says which
        item it came from. The group is never collapsed, even for a single failure.
        """
        failures = self.failures
        if not failures:
            return
        errors: list[Exception] = []
        for f in failures:
            err = f.error
            if not isinstance(err, Exception):  # pragma: no cover - envelopes hold Exceptions
                err = RuntimeError(repr(err))
            note = f"batchkit: item index={f.index} key={self.item_key(f)} kind={f.kind}"
            if note not in getattr(err, "__notes__", ()):
                err.add_note(note)
            errors.append(err)
        raise ExceptionGroup(
            f"{len(failures)} of {len(self.outcomes)} items failed"
            + (f" (run stopped: {self.stop_reason})" if self.stop_reason else ""),
            errors,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe summary (``json.dumps`` works on it): counts, times and one row per item."""
        rows: list[dict[str, Any]] = []
        for o in self.outcomes:
            row: dict[str, Any] = {"index": o.index, "key": self.item_key(o), "ok": o.ok}
            for name, how in ROW_FIELDS[1:]:  # (index is first, before key and ok)
                if how == "always":
                    row[name] = getattr(o, name)
                elif how == "if_set":
                    if value := getattr(o, name, None):  # (resumed: a Success's only)
                        row[name] = value
                elif type(o) is Failure:  # "described"
                    row[name] = describe(getattr(o, name))
            rows.append(row)
        return {
            "name": self.name,
            "total": self.total,
            "counts": self.counts,
            "ok": self.ok,
            "stop_reason": self.stop_reason,
            "deadline_hit": self.deadline_hit,
            "input_exhausted": self.input_exhausted,
            "wall_time": self.wall_time,
            "item_time": self.item_time,
            "ideal_time": self.ideal_time,
            "concurrency": self.concurrency,
            "peak_concurrency": self.peak_concurrency,
            "retries": self.retries,
            "reruns": self.reruns,
            "resumed": self.resumed,
            "hedges": self.hedges,
            "latency": {
                "p50": self.latency(0.5),
                "p95": self.latency(0.95),
                "max": self.latency(1.0),
            },
            "limit_changes": [
                {"time": c.time, "old": c.old, "new": c.new, "reason": c.reason}
                for c in self.limit_changes
            ],
            "items": rows,
        }

    def summary(self) -> str:
        """One line: ``20 items in 105.0s: 18 success, 2 timeout (peak concurrency 3)``."""
        counts = {k: v for k, v in self.counts.items() if v}
        parts = ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing to do"
        if self.resumed:
            n = counts["success"]
            parts = parts.replace(f"{n} success", f"{n} success ({self.resumed} resumed)", 1)
        stop = f", stopped: {self.stop_reason}" if self.stop_reason else ""
        return (
            f"{self.total} items in {self.wall_time:.3f}s: {parts} "
            f"(peak concurrency {self.peak_concurrency}/{self.concurrency}{stop})"
        )

    def table(self, *, slowest: int = 5) -> str:
        """A compact text table: counts by kind, latency percentiles, slowest items, timing."""
        lines = [self.summary(), ""]
        lines.append(f"{'kind':<10}{'count':>8}")
        for kind, count in self.counts.items():
            lines.append(f"{kind:<10}{count:>8}")
        lines.append("")
        lines.append(
            f"latency p50 {self.latency(0.5):.3f}s  p95 {self.latency(0.95):.3f}s  "
            f"max {self.latency(1.0):.3f}s  retries {self.retries}"
        )
        lines.append(
            f"wall {self.wall_time:.3f}s  ideal {self.ideal_time:.3f}s "
            f"(sum of item time {self.item_time:.3f}s / concurrency {self.concurrency})"
        )
        worst = [self._store.outcome(i) for i in self._store.slowest(slowest)]
        if worst:
            lines.append("")
            lines.append("slowest items:")
            for o in worst:
                lines.append(f"  {self.item_key(o):<24} {o.elapsed:>9.3f}s  {o.kind}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class InputFailed(BatchkitError):
    """The input iterable itself raised. The error is the ``__cause__``; ``report`` holds the
    outcomes of every item pulled before it (in-flight items were allowed to finish)."""

    def __init__(self, report: BatchReport[Any, Any], pulled: int | None = None) -> None:
        n = report.total if pulled is None else pulled
        super().__init__(f"the input raised after {n} items; see __cause__")
        self.report = report
