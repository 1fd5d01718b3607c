"""Events a run reports to observers, and the :class:`Observer` seam.

Observers are plain callables taking one event. They run inline on the event loop, so they
must be quick and must not block. An observer that raises is logged once (logger
``batchkit``) and then dropped for the rest of the run; it never breaks the run. When no
observer is given, no event object is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, final

from .errors import safe_repr
from .public import publish

if TYPE_CHECKING:
    import logging

    from .errors import StopReason
    from .outcomes import Outcome
    from .report import BatchReport

__all__ = [
    "AttemptFailed",
    "DeadlineHit",
    "Event",
    "ItemFinished",
    "ItemStarted",
    "ItemsSkipped",
    "LimitChanged",
    "Observer",
    "RunFinished",
    "RunStarted",
    "RunStopping",
]


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RunStarted:
    """A run began (``time`` is loop time, as in every event)."""

    name: str | None
    concurrency: int
    """The starting concurrency limit."""
    total: int | None
    """How many items, when the input is sized; ``None`` for iterators and async iterables."""
    time: float


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ItemStarted:
    """An attempt of an item started (one event per attempt, retries included)."""

    name: str | None
    index: int
    key: str
    item: Any
    attempt: int
    """1 for the first attempt."""
    in_flight: int
    time: float
    hedge: bool = False
    """This attempt is a hedge (``hedge=``): one more attempt of an item that straggles,
    beside it. Its ``ItemFinished`` says which attempt won (``outcome.hedged``)."""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptFailed:
    """An attempt failed; ``retry_in`` says whether and when the item is retried."""

    name: str | None
    index: int
    key: str
    item: Any
    attempt: int
    error: BaseException
    kind: Literal["error", "timeout"]
    retry_in: float | None
    """Seconds until the next attempt, or ``None`` when the item will not be retried."""
    time: float


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ItemFinished:
    """An item ended, in its one ``Success`` or ``Failure`` envelope (``outcome``)."""

    name: str | None
    key: str
    outcome: Outcome[Any, Any]
    in_flight: int
    """Items still in flight after this one."""
    time: float


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ItemsSkipped:
    """Items that never started, skipped in bulk when the run stopped (the unread rest of a
    sized input): one event for all of them, so skipping a million items stays cheap. Count
    ``len(indices)``. Every item reaches observers exactly once: in its own ``ItemFinished``
    or in one of these. Their envelopes are in the report, built when read."""

    name: str | None
    reason: StopReason
    indices: range
    time: float


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class LimitChanged:
    """An adaptive concurrency limit moved from ``old`` to ``new`` (see ``Adaptive``)."""

    name: str | None
    old: int
    new: int
    reason: str
    time: float


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RunStopping:
    """The run stopped starting items early (a threshold or ``fail_fast``; not the deadline)."""

    name: str | None
    reason: StopReason
    in_flight: int
    time: float


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class DeadlineHit:
    """The run's deadline came: items in flight are cancelled, the rest skipped."""

    name: str | None
    in_flight: int
    """Items in flight when the deadline came; they are being cancelled."""
    time: float


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RunFinished:
    """The run ended; ``report`` is its ``BatchReport`` (the last event of a run)."""

    name: str | None
    report: BatchReport[Any, Any]
    time: float


Event: TypeAlias = (
    RunStarted
    | ItemStarted
    | AttemptFailed
    | ItemFinished
    | ItemsSkipped
    | LimitChanged
    | RunStopping
    | DeadlineHit
    | RunFinished
)
"""Every event, in the order a run emits them: ``RunStarted``, then per item ``ItemStarted``
(per attempt), ``AttemptFailed`` (per failed attempt), ``ItemFinished``; ``LimitChanged``,
``RunStopping`` and ``DeadlineHit`` when they happen; ``RunFinished`` last, with the report.
Items that never start (skipped) only get an ``ItemFinished``, or, when the run stops, the
unread rest of a sized input is told in one ``ItemsSkipped``.
For ``stream``, ``RunFinished`` carries a report of what was produced before the stream ended."""


class Observer(Protocol):
    """Anything callable with one :data:`Event`."""

    def __call__(self, event: Event, /) -> None: ...


Observers: TypeAlias = Sequence[Observer]


def notify(observers: list[Observer], event: Event, log: logging.Logger) -> None:
    """Give ``event`` to every observer. One that raises is logged once on ``log`` and removed
    from ``observers`` for the rest of the run: an observer never breaks the run."""
    for observer in tuple(observers):
        try:
            observer(event)
        except Exception:
            log.exception(
                "batchkit: observer %s raised; it is disabled for this run", safe_repr(observer)
            )
            observers.remove(observer)


publish(globals(), __all__)  # loaded lazily by ``batchkit``: published here, not there
