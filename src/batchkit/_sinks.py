"""Where outcomes go: a batch keeps them all in input order; a stream hands them to its
consumer, with bounded memory. ``room()`` is the backpressure check made before pulling."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Generic, TypeVar

from ._outcomes import Failure

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._outcomes import Outcome

__all__ = ["BatchSink", "Sink", "StreamSink"]

T = TypeVar("T")
R = TypeVar("R")


def _nothing() -> None:
    return None


class Sink(Generic[T, R]):
    """The interface the engine writes to."""

    __slots__ = ("producers_waiting", "wake_producers")

    keeps: bool = False

    def __init__(self) -> None:
        self.wake_producers: Callable[[], None] = _nothing
        self.producers_waiting = False
        """Set when ``room()`` said no; the engine clears it when no one waits any more."""
        """Set by the engine: called when there is room again."""

    def reserve(self, index: int) -> None:
        """Item ``index`` was pulled from the input."""

    def put(self, outcome: Outcome[T, R]) -> None:
        raise NotImplementedError

    def room(self, next_index: int) -> bool:
        return True

    def outcomes(self) -> Sequence[Outcome[T, R]]:
        return ()

    def tally(self) -> dict[str, int] | None:
        return None

    def wake(self) -> None:
        """The run is stopping or ended: release whoever waits on the sink."""

    def count_skipped(self, n: int) -> None:
        """``n`` more items were skipped in bulk; their envelopes are built when read."""


class BatchSink(Sink[T, R]):
    """Every outcome, stored by input index (a slot is reserved when the item is pulled).
    The report reads them with ``outcomes()``; a column store can replace the list here."""

    __slots__ = ("_outcomes",)

    keeps = True

    def __init__(self) -> None:
        super().__init__()
        self._outcomes: list[Outcome[T, R] | None] = []

    def reserve(self, index: int) -> None:
        self._outcomes.append(None)

    def put(self, outcome: Outcome[T, R]) -> None:
        self._outcomes[outcome.index] = outcome

    def outcomes(self) -> Sequence[Outcome[T, R]]:
        return [o for o in self._outcomes if o is not None]


class StreamSink(Sink[T, R]):
    """Hands outcomes to the consumer. At most ``window`` items are ever pulled from the input
    but not yet taken by the consumer (in flight, waiting to retry or to be reordered, ready)."""

    __slots__ = (
        "consumed",
        "consumer",
        "counts",
        "next_emit",
        "ordered",
        "pending",
        "produced",
        "ready",
        "window",
    )

    def __init__(self, *, ordered: bool, window: int) -> None:
        super().__init__()
        self.ordered = ordered
        self.window = window
        self.ready: deque[Outcome[T, R]] = deque()
        self.pending: dict[int, Outcome[T, R]] = {}
        self.next_emit = 0
        self.consumed = 0
        self.counts: dict[str, int] = {}
        """Failures by kind (successes are ``produced`` minus the failures)."""
        self.produced = 0
        self.consumer: Callable[[], None] = _nothing

    def put(self, outcome: Outcome[T, R]) -> None:
        self.produced += 1
        if type(outcome) is Failure:
            kind = outcome.kind
            self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.ordered:
            self.pending[outcome.index] = outcome
            pending, n = self.pending, self.next_emit
            while n in pending:
                self.ready.append(pending.pop(n))
                n += 1
            if n == self.next_emit:
                return
            self.next_emit = n
        else:
            self.ready.append(outcome)
        self.consumer()

    def take(self) -> Outcome[T, R]:
        outcome = self.ready.popleft()
        self.consumed += 1
        if self.producers_waiting:
            self.wake_producers()
        return outcome

    def room(self, next_index: int) -> bool:
        if next_index - self.consumed < self.window:
            return True
        self.producers_waiting = True
        return False

    def tally(self) -> dict[str, int] | None:
        counts = dict(self.counts)
        counts["success"] = self.produced - sum(self.counts.values())
        return counts

    def wake(self) -> None:
        self.consumer()

    def count_skipped(self, n: int) -> None:
        self.produced += n
        self.counts["skipped"] = self.counts.get("skipped", 0) + n
