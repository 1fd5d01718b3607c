"""What an attempt knows about itself: :func:`current_attempt`.

The engine keeps one :class:`Slot` per worker; each worker runs in a copy of the caller's
context in which ``_SLOT`` names its slot, so :func:`current_attempt` reads the attempt's
facts without the runner building anything per attempt.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, final

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from concurrent.futures import Future
    from contextvars import Context

    from .errors import SkipReason

__all__ = [
    "Attempt",
    "AttemptKind",
    "AttemptResult",
    "CancelKind",
    "Job",
    "RunInfo",
    "Slot",
    "current_attempt",
]


class CancelKind(IntEnum):
    """Why batchkit cancelled what runs in a slot (``Slot.cancel_kind``)."""

    NONE = 0
    TIMEOUT = 1
    """The attempt ran past its ``timeout`` (the watchdog)."""
    STOP = 2
    """The run is stopping (a threshold, the deadline, the caller's cancel)."""
    BUDGET = 3
    """The item's ``item_budget`` ran out during the attempt."""
    HEDGE = 4
    """Its twin (``hedge=``) succeeded first: this attempt is rolled back."""


AttemptKind = Literal["success", "error", "timeout", "cancelled", "refused", "settled"]


class AttemptResult(NamedTuple):
    """How one attempt ended. ``refused``: a meter did not let it start (``reason`` says why);
    ``cancelled``: the run stopped while it ran (or its hedge's twin won); ``settled``: a
    hedged item's pair took it over (``_engine/hedges.py``), its worker has nothing to do."""

    kind: AttemptKind
    value: Any
    error: BaseException | None
    started: float
    ended: float
    reason: SkipReason | None = None


@final
class RunInfo:
    """Facts of one run that every attempt may ask for."""

    __slots__ = ("clock", "deadline_at", "limits", "run_id", "timeout")

    def __init__(
        self,
        run_id: str,
        timeout: float | None,
        deadline_at: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.run_id = run_id
        self.timeout = timeout
        self.deadline_at = deadline_at
        self.clock = clock
        self.limits: Any = None
        """The run's call-level limit groups (``_engine/meters/call_groups.py``), if any."""


@final
class Job:
    """One item and its history across attempts (also an entry of the retry heap)."""

    __slots__ = (
        "attempt",
        "circuit",
        "errors",
        "first_start",
        "groups",
        "holds",
        "index",
        "item",
        "key",
        "last_kind",
        "pair",
        "ready",
    )

    def __init__(self, index: int, item: Any, key: str | None = None) -> None:
        self.index = index
        self.item = item
        self.key = key
        self.attempt = 1
        """The number of the attempt that runs next (or is running), from 1."""
        self.first_start: float | None = None
        self.errors: list[BaseException] | None = None
        # Set with ``groups=`` only (unset otherwise, so a run without groups pays nothing
        # per item): ``groups``, the item's key in each group (or the error ``by`` raised);
        # ``holds``, whether it holds its places in its groups now.
        self.groups: Any
        self.holds: bool
        self.circuit: str  # its circuit, set with ``breaker=`` only (when first admitted)
        # Set when an attempt fails (with ``errors``) and when it enters the retry heap:
        self.last_kind: str
        self.ready: float
        self.pair: Any  # its hedge's Pair, set with ``hedge=`` only, once it is hedged

    def __lt__(self, other: Job) -> bool:
        return (self.ready, self.index) < (other.ready, other.index)


@final
class Slot:
    """One worker's state. ``gen`` is bumped at each attempt's start and end, so a watchdog
    entry ``(deadline, slot, gen)`` is live only while ``slot.gen == gen``; ``cancels`` counts
    the cancellations batchkit sent to the attempt running now."""

    __slots__ = (
        "abandoned",
        "baseline",
        "cancel_gen",
        "cancel_kind",
        "cancellable",
        "cancels",
        "gen",
        "job",
        "polluted",
        "run",
        "started",
        "task",
        "thread",
    )

    def __init__(self, run: RunInfo) -> None:
        self.run = run
        self.gen = 0
        self.cancel_gen = -1
        self.cancel_kind = CancelKind.NONE
        self.cancels = 0
        self.cancellable = False
        self.abandoned = False
        self.baseline: Context | None = None
        """The worker's context as it started; an attempt that changes it pollutes the slot."""
        self.polluted = False
        self.job: Job | None = None
        self.started = 0.0
        self.task: asyncio.Task[None] | None = None
        self.thread: Future[Any] | None = None
        """The thread of the last attempt of a sync ``fn`` (it may outlive its timeout)."""

    @property
    def in_attempt(self) -> bool:
        return self.gen % 2 == 1


_SLOT: ContextVar[Slot | None] = ContextVar("batchkit_attempt", default=None)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """The attempt running now, as :func:`current_attempt` sees it."""

    index: int
    """The item's position in the input."""
    number: int
    """1 for the first attempt, 2 for the first retry, ..."""
    idempotency_key: str
    """Stable per item across attempts (and backends): ``"<run id>:<index>"``, or the
    item's ``key=`` when one was given. Send it upstream so a retried write happens once."""
    started: float = field(repr=False)
    timeout: float | None = field(repr=False)
    deadline_at: float | None = field(repr=False)
    clock: Callable[[], float] = field(repr=False, compare=False)

    def timeout_remaining(self) -> float | None:
        """Seconds left before this attempt's ``timeout``, or ``None`` without one."""
        if self.timeout is None:
            return None
        return max(0.0, self.started + self.timeout - self.clock())

    def deadline_remaining(self) -> float | None:
        """Seconds left before the run's deadline, or ``None`` without one."""
        if self.deadline_at is None:
            return None
        return max(0.0, self.deadline_at - self.clock())


def current_attempt() -> Attempt:
    """The attempt of ``fn`` (or its context) running now: item index, attempt number,
    idempotency key, time left. Raises ``RuntimeError`` outside an attempt."""
    slot = _SLOT.get()
    job = slot.job if slot is not None else None
    if slot is None or job is None or not slot.in_attempt:
        raise RuntimeError(
            "batchkit.current_attempt() is only available inside fn (or its context) "
            "while batch_process() or stream() runs it"
        )
    run = slot.run
    return Attempt(
        index=job.index,
        number=job.attempt,
        idempotency_key=job.key if job.key is not None else f"{run.run_id}:{job.index}",
        started=slot.started,
        timeout=run.timeout,
        deadline_at=run.deadline_at,
        clock=run.clock,
    )
