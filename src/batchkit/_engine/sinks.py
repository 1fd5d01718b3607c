"""Where outcomes go: a batch keeps them all in input order; a stream hands them to its
consumer, with bounded memory. ``room()`` is the backpressure check made before pulling."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Generic, TypeVar

from .._model.outcomes import Failure, make_success
from .._model.store import OutcomeStore

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .._model.errors import StopReason
    from .._model.outcomes import Outcome

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
        """Set by the engine: called when there is room again."""
        self.producers_waiting = False
        """Set when ``room()`` said no; the engine clears it when no one waits any more."""

    def put(self, outcome: Outcome[T, R]) -> None:
        raise NotImplementedError

    def success_writer(self) -> Callable[[T, R, int, int, float], None]:
        """``put`` for a success, from its fields: what nearly every item ends in, so a sink
        may store it without building the envelope (``item, value, index, attempts,
        elapsed``)."""

        def put_success(item: T, value: R, index: int, attempts: int, elapsed: float) -> None:
            self.put(make_success(item, value, index, attempts, elapsed))

        return put_success

    def room(self, next_index: int) -> bool:
        return True

    def note_hedge(self, outcome: Outcome[T, R]) -> None:
        """``outcome`` (just put) is of an item that ran a hedge: a sink that stores columns
        keeps its ``hedged`` and ``both_committed`` (an envelope handed on carries them)."""

    def outcomes(self) -> Sequence[Outcome[T, R]]:
        return ()

    def tally(self) -> dict[str, int] | None:
        return None

    def wake(self) -> None:
        """The run is stopping or ended: release whoever waits on the sink."""

    def count_skipped(self, n: int) -> None:
        """``n`` more items were skipped in bulk; their envelopes are built when read."""

    def skip_range(
        self, indices: range, reason: StopReason, items: Sequence[T], first: int
    ) -> None:
        """Items ``indices`` never started (``items[first + i - indices.start]`` is the item of
        index ``i``); only a sink that keeps outcomes stores them."""


class BatchSink(Sink[T, R]):
    """Every outcome, by input index, in a column-wise :class:`~batchkit._model.store.OutcomeStore`
    (no envelope object is kept: the report's view builds each one when it is read)."""

    __slots__ = ("_store",)

    keeps = True

    def __init__(self) -> None:
        super().__init__()
        self._store: OutcomeStore[T, R] = OutcomeStore()

    def put(self, outcome: Outcome[T, R]) -> None:
        self._store.append(outcome)

    def success_writer(self) -> Callable[[T, R, int, int, float], None]:
        return self._store.append_success  # columns only: no envelope is built

    def note_hedge(self, outcome: Outcome[T, R]) -> None:
        if outcome.hedged is not None:
            self._store.note_hedge(outcome.index, outcome.hedged, outcome.both_committed)

    def skip_range(
        self, indices: range, reason: StopReason, items: Sequence[T], first: int
    ) -> None:
        self._store.skip_range(indices.start, indices.stop, reason, items, first)

    def outcomes(self) -> Sequence[Outcome[T, R]]:
        # A partial store's view (a stream's report while running) leaves out the holes.
        return self._store.view()


class StreamSink(Sink[T, R]):
    """Hands outcomes to the consumer. At most ``window`` items are ever pulled from the input
    but not yet taken by the consumer (in flight, waiting to retry or to be reordered, ready)."""

    __slots__ = (
        "consumed",
        "consumer",
        "consumer_waiting",
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
        """Wakes the consumer; called only while ``consumer_waiting`` (or on ``wake``)."""
        self.consumer_waiting = False

    def put(self, outcome: Outcome[T, R]) -> None:
        if type(outcome) is Failure:
            kind = outcome.kind
            self.counts[kind] = self.counts.get(kind, 0) + 1
        self._hand_over(outcome)

    def success_writer(self) -> Callable[[T, R, int, int, float], None]:
        if self.ordered:
            hand_over = self._hand_over

            def put_success(item: T, value: R, index: int, attempts: int, elapsed: float) -> None:
                hand_over(make_success(item, value, index, attempts, elapsed))

            return put_success
        ready = self.ready

        def put_unordered(item: T, value: R, index: int, attempts: int, elapsed: float) -> None:
            # _hand_over's unordered case, inline: once per item.
            ready.append(make_success(item, value, index, attempts, elapsed))
            self.produced += 1
            if self.consumer_waiting:
                self.consumer()

        return put_unordered

    def _hand_over(self, outcome: Outcome[T, R]) -> None:
        self.produced += 1
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
        if self.consumer_waiting:
            self.consumer()

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
