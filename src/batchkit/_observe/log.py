"""``LoggingObserver``: a run's events as standard ``logging`` records (logger ``batchkit``).

Every record carries its fields twice: in the message as ``key=value`` (for people and
``grep``) and as one ``extra`` attribute, ``record.batchkit``, a flat dict of JSON-safe values
(for JSON formatters and structlog's stdlib integration). One attribute rather than one per
field because ``LogRecord`` reserves names such as ``name`` and ``msg``, and because a single
key keeps the fields together in JSON output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, final

from .._model.errors import describe
from .._model.events import (
    AttemptFailed,
    DeadlineHit,
    Event,
    ItemFinished,
    ItemsSkipped,
    ItemStarted,
    LimitChanged,
    RunFinished,
    RunStarted,
    RunStopping,
)
from .._model.outcomes import Success
from .._model.public import publish

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["LoggingObserver"]

_KINDS: Final = ("success", "error", "timeout", "cancelled", "skipped")


def _value(value: object) -> str:
    """``key=value`` formatting: plain when unambiguous, JSON-quoted when it has spaces etc."""
    if isinstance(value, float):  # every float field is a duration in seconds
        return f"{value:.3f}s"
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def _error(error: BaseException) -> str:
    return describe(error)  # an error whose __str__ raises does not break the log


@dataclass(slots=True)
class _RunCounts:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_KINDS, 0))
    retries: int = 0


@final
class LoggingObserver:
    """Log a run on the standard :mod:`logging` module.

    - INFO: run started, run finished (with counts by kind, wall time and stop reason), and
      decreases of an adaptive concurrency limit;
    - WARNING: every item that ended in ``error``, ``timeout``, ``cancelled`` or ``lost`` (or
      ``skipped`` after attempts), the deadline being hit, the run stopping early
      (``fail_fast``, thresholds), and the ``batch finished`` line of a run that did not
      finish every item (a stop reason, or items cancelled, skipped or lost), with
      ``unfinished=`` counting those items;
    - ``level_items`` (DEBUG by default): every attempt's start, every retry, every success,
      every ``skipped`` item (a stopped run may skip thousands; the WARNING saying why and the
      final counts are logged anyway) and increases of an adaptive limit.

    Items are named by the run's ``key=`` function (``#index`` without one). Nothing is
    formatted for a level the logger does not have enabled.
    """

    __slots__ = ("_level_items", "_logger", "_runs")

    def __init__(
        self, *, logger: logging.Logger | None = None, level_items: int = logging.DEBUG
    ) -> None:
        self._logger = logger if logger is not None else logging.getLogger("batchkit")
        self._level_items = level_items
        # Counts by run name: a stream's final report holds no outcomes, so the observer
        # counts what it saw rather than trusting the report alone.
        self._runs: dict[str | None, _RunCounts] = {}

    def __repr__(self) -> str:
        return f"LoggingObserver(logger={self._logger.name!r})"

    def _log(self, level: int, message: str, fields: dict[str, Any]) -> None:
        text = " ".join([message, *(f"{k}={_value(v)}" for k, v in fields.items() if k != "event")])
        self._logger.log(level, text, extra={"batchkit": fields})

    def __call__(self, event: Event) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:  # an event kind added later is ignored, not an error
            handler(self, event)

    def _item_finished(self, event: ItemFinished) -> None:
        outcome = event.outcome
        if type(outcome) is Success:
            kind = "success"
            level = self._level_items
        else:
            kind = outcome.kind
            # A skipped item that had made attempts (its retry did not fit before the
            # deadline) failed them: that is a WARNING like any failure.
            quiet = kind == "skipped" and not outcome.attempts
            level = self._level_items if quiet else logging.WARNING
        run = self._runs.get(event.name)
        if run is not None:
            # A kind only another backend produces ("lost") is counted when it happens.
            run.counts[kind] = run.counts.get(kind, 0) + 1
        if not self._logger.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "event": "item_finished",
            "name": event.name,
            "key": event.key,
            "index": outcome.index,
            "outcome": kind,
            "attempts": outcome.attempts,
            "elapsed": outcome.elapsed,
            "in_flight": event.in_flight,
        }
        if outcome.hedged is not None:  # hedge=: which attempt won, and whether both committed
            fields["hedged"] = outcome.hedged
            if outcome.both_committed:
                fields["both_committed"] = True
        if type(outcome) is Success:
            if outcome.resumed:
                fields["resumed"] = True  # read from the run journal, not run
            self._log(level, "item finished", fields)
        else:
            fields["error"] = _error(outcome.error)
            self._log(level, "item failed", fields)

    def _items_skipped(self, event: ItemsSkipped) -> None:
        run = self._runs.get(event.name)
        if run is not None:
            run.counts["skipped"] += len(event.indices)
        if self._logger.isEnabledFor(self._level_items):
            indices = event.indices
            fields: dict[str, Any] = {
                "event": "items_skipped",
                "name": event.name,
                "reason": event.reason,
                "count": len(indices),
                "first": indices.start,
                "last": indices.stop - 1,
            }
            self._log(self._level_items, "items skipped", fields)

    def _item_started(self, event: ItemStarted) -> None:
        if self._logger.isEnabledFor(self._level_items):
            self._log(
                self._level_items,
                "item started",
                {
                    "event": "item_started",
                    "name": event.name,
                    "key": event.key,
                    "index": event.index,
                    "attempt": event.attempt,
                    "in_flight": event.in_flight,
                    **({"hedge": True} if event.hedge else {}),
                },
            )

    def _attempt_failed(self, event: AttemptFailed) -> None:
        # The final failed attempt is logged once, at WARNING, by its ItemFinished.
        if event.retry_in is None:
            return
        run = self._runs.get(event.name)
        if run is not None:
            run.retries += 1
        if self._logger.isEnabledFor(self._level_items):
            self._log(
                self._level_items,
                "item retry",
                {
                    "event": "item_retry",
                    "name": event.name,
                    "key": event.key,
                    "index": event.index,
                    "attempt": event.attempt,
                    "kind": event.kind,
                    "retry_in": event.retry_in,
                    "error": _error(event.error),
                },
            )

    def _run_started(self, event: RunStarted) -> None:
        self._runs[event.name] = _RunCounts()
        if self._logger.isEnabledFor(logging.INFO):
            self._log(
                logging.INFO,
                "batch started",
                {
                    "event": "run_started",
                    "name": event.name,
                    "total": event.total,
                    "concurrency": event.concurrency,
                },
            )

    def _run_finished(self, event: RunFinished) -> None:
        seen = self._runs.pop(event.name, None)
        if not self._logger.isEnabledFor(logging.INFO):
            return
        report = event.report
        if len(report) or seen is None:
            counts, retries = report.counts, report.retries
        else:
            counts, retries = seen.counts, seen.retries
        unfinished = sum(counts.get(kind, 0) for kind in ("cancelled", "skipped", "lost"))
        early = report.stop_reason is not None or unfinished > 0
        fields = {
            "event": "run_finished",
            "name": event.name,
            "total": sum(counts.values()),
            **counts,
            "retries": retries,
            "peak_concurrency": report.peak_concurrency,
            "wall": report.wall_time,
            "stop_reason": report.stop_reason,
        }
        if report.hedges:
            fields["hedges"] = report.hedges
        if early:
            fields["unfinished"] = unfinished
        if report.resumed:
            fields["resumed"] = report.resumed
        self._log(logging.WARNING if early else logging.INFO, "batch finished", fields)

    def _limit_changed(self, event: LimitChanged) -> None:
        level = logging.INFO if event.new < event.old else self._level_items
        if self._logger.isEnabledFor(level):
            self._log(
                level,
                "concurrency limit changed",
                {
                    "event": "limit_changed",
                    "name": event.name,
                    "old": event.old,
                    "new": event.new,
                    "reason": event.reason,
                },
            )

    def _run_stopping(self, event: RunStopping) -> None:
        if self._logger.isEnabledFor(logging.WARNING):
            self._log(
                logging.WARNING,
                "batch stopping",
                {
                    "event": "run_stopping",
                    "name": event.name,
                    "reason": event.reason,
                    "in_flight": event.in_flight,
                },
            )

    def _deadline_hit(self, event: DeadlineHit) -> None:
        if self._logger.isEnabledFor(logging.WARNING):
            self._log(
                logging.WARNING,
                "batch deadline hit",
                {"event": "deadline_hit", "name": event.name, "in_flight": event.in_flight},
            )


_HANDLERS: Final[dict[type[Any], Callable[[LoggingObserver, Any], None]]] = {
    ItemFinished: LoggingObserver._item_finished,
    ItemsSkipped: LoggingObserver._items_skipped,
    ItemStarted: LoggingObserver._item_started,
    AttemptFailed: LoggingObserver._attempt_failed,
    RunStarted: LoggingObserver._run_started,
    RunFinished: LoggingObserver._run_finished,
    LimitChanged: LoggingObserver._limit_changed,
    RunStopping: LoggingObserver._run_stopping,
    DeadlineHit: LoggingObserver._deadline_hit,
}


publish(globals(), __all__)  # loaded lazily by ``batchkit``: published here, not there
