"""Column-wise storage of a run's outcomes, and the read-only sequence view over it.

A report of 1M items kept as 1M envelope objects costs ~185 MB and, worse, makes every full
pass of the cyclic garbage collector walk them all: tens to hundreds of milliseconds during
which the event loop stands still. The :class:`OutcomeStore` keeps what an envelope holds in
columns instead: kinds, attempts and elapsed times in typed arrays (plain memory the
collector never looks into), items and values in two flat lists, and the errors of the
(usually few) failures in a dict. Items that never started because the run stopped are one
``(start, stop, reason)`` range, however many there are.

Envelopes (:class:`Success`, :class:`Failure`) are built **one at a time, when read**, by
:class:`OutcomeView`. Reading the same index twice gives two equal envelopes, not the same
object; the item, value and error objects inside them are the stored ones (a skipped item of
a bulk skip gets a fresh :class:`ItemSkipped` error on each read).

The engine's batch sink calls :meth:`OutcomeStore.append` once per outcome (any order) and
:meth:`OutcomeStore.skip_range` once for the unstarted tail of a stopped sized input; the
report reads through :meth:`OutcomeStore.view`.
"""

from __future__ import annotations

import bisect
import heapq
import math
from array import array
from collections.abc import Sequence
from itertools import compress
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final, overload

from .errors import ItemSkipped
from .outcomes import (
    KINDS,
    Failure,
    Success,
    make_failure,
    make_success,
    set_hedged,
    set_reruns,
    set_resumed,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from .errors import StopReason
    from .outcomes import FailureKind, HedgeWinner, Outcome

__all__ = ["OutcomeStore", "OutcomeView"]

T = TypeVar("T")
R = TypeVar("R")

_HOLE = -1  # an index taken from the input whose outcome is not in yet
_SUCCESS = 0
_SKIPPED = KINDS.index("skipped")
_CODE: dict[str, int] = {k: i for i, k in enumerate(KINDS)}
_FAILURE_KINDS: tuple[FailureKind, ...] = KINDS[1:]  # type: ignore[assignment]

_CHUNK = 4096  # columns grow by at least this many rows at a time
_HOLES = array("b", [_HOLE]) * _CHUNK
_ZERO_I = array("i", [0]) * _CHUNK
_ZERO_D = array("d", [0.0]) * _CHUNK
_NONES: list[None] = [None] * _CHUNK
# kinds.tobytes().translate(...) -> a 0/1 mask per row, computed in C.
_HOLE_BYTE = bytes([_HOLE & 0xFF])
_CODE_BYTES = tuple(bytes([code]) for code in range(len(KINDS)))
_IS_SUCCESS = bytes(1 if b == _SUCCESS else 0 for b in range(256))
_IS_FAILURE = bytes(1 if _SUCCESS < b < len(KINDS) else 0 for b in range(256))
_IS_FILLED = bytes(1 if b < len(KINDS) else 0 for b in range(256))
_IS_STARTED = bytes(1 if b < len(KINDS) and b != _SKIPPED else 0 for b in range(256))


@final
class OutcomeStore(Generic[T, R]):
    """The outcomes of one run, by input index. See the module docstring."""

    __slots__ = (
        "_attempts",
        "_cap",
        "_elapsed",
        "_errors",
        "_hedges",
        "_index",
        "_items",
        "_kinds",
        "_ranges",
        "_reruns",
        "_resumed",
        "_values",
    )

    def __init__(self) -> None:
        self._kinds = array("b")
        self._attempts = array("i")
        self._elapsed = array("d")
        self._items: list[Any] = []
        self._values: list[Any] = []
        self._errors: dict[int, tuple[BaseException, tuple[BaseException, ...]]] = {}
        self._cap = 0
        # Only for a report built by hand whose envelopes' indices are not their positions:
        # rows are positions, and this maps each to the envelope's own index.
        self._index: list[int] | None = None
        # Bulk skips: (start, stop, reason, items, first); the item of index i is
        # items[first + i - start].
        self._ranges: list[tuple[int, int, StopReason, Sequence[Any], int]] = []
        # Envelopes' ``reruns`` (a cluster backend's), only the non-zero ones: the local
        # engine never writes here.
        self._reruns: dict[int, int] = {}
        # Successes read from a run journal (``Success.resumed``), by index.
        self._resumed: set[int] = set()
        # Envelopes' ``hedged`` and ``both_committed`` (``hedge=``), only of items that ran
        # a hedge: a run without hedging never writes here.
        self._hedges: dict[int, tuple[HedgeWinner, bool]] = {}

    def __setstate__(self, state: tuple[None, dict[str, Any]]) -> None:
        """Unpickle; a store pickled before a column existed gets that column empty (a
        report pickled before re-runs were counted has none)."""
        self._reruns = {}
        self._resumed = set()
        self._hedges = {}
        for name, value in state[1].items():
            setattr(self, name, value)

    @classmethod
    def from_outcomes(
        cls, outcomes: Iterable[Outcome[T, R]], reruns: Mapping[int, int] | None = None
    ) -> OutcomeStore[T, R]:
        """A store holding ``outcomes`` (for a report built by hand, or by a cluster backend,
        which passes each index's ``reruns`` when it knows them: then the envelopes' are not
        read)."""
        store: OutcomeStore[T, R] = cls()
        given = list(outcomes)
        if any(o.index != pos for pos, o in enumerate(given)):
            store._index = [o.index for o in given]
            given = [_at(o, pos) for pos, o in enumerate(given)]
        if reruns is not None:
            for o in given:
                store.append(o)
                if o.hedged is not None:
                    store._hedges[o.index] = (o.hedged, o.both_committed)
            store._reruns = {i: n for i, n in reruns.items() if n}
            return store
        for o in given:
            store.append(o)
            if o.reruns:
                store._reruns[o.index] = o.reruns
            if o.hedged is not None:
                store._hedges[o.index] = (o.hedged, o.both_committed)
        return store

    # ------------------------------------------------------------------ writing
    def _grow(self, index: int) -> None:
        add = max(_CHUNK, index + 1 - self._cap)
        if add == _CHUNK:
            self._kinds += _HOLES
            self._attempts += _ZERO_I
            self._elapsed += _ZERO_D
            self._items += _NONES
            self._values += _NONES
        else:
            self._kinds += array("b", [_HOLE]) * add
            self._attempts += array("i", [0]) * add
            self._elapsed += array("d", [0.0]) * add
            self._items += [None] * add
            self._values += [None] * add
        self._cap += add

    def append(self, outcome: Outcome[T, R]) -> None:
        """Store one outcome (in any order; each index once). The hot path: per item, only
        column writes (lengths and counts are computed from the kinds column when read).
        Keys are not stored here: the engine keeps them (``BatchReport.keys``)."""
        i = outcome.index
        if i >= self._cap:
            self._grow(i)
        if type(outcome) is Success:
            self._kinds[i] = _SUCCESS
            self._values[i] = outcome.value
            if outcome.resumed:
                self._resumed.add(i)
        else:
            assert isinstance(outcome, Failure)
            self._kinds[i] = _CODE[outcome.kind]
            self._errors[i] = (outcome.error, outcome.errors)
        self._items[i] = outcome.item
        self._attempts[i] = outcome.attempts
        self._elapsed[i] = outcome.elapsed

    def note_hedge(self, index: int, hedged: HedgeWinner, both: bool) -> None:
        """The outcome of ``index`` (appended, or a success written from its fields) is
        of an item that ran a hedge: its envelope's ``hedged`` and ``both_committed``."""
        self._hedges[index] = (hedged, both)

    def append_success(self, item: T, value: R, index: int, attempts: int, elapsed: float) -> None:
        """``append`` of a success, from its fields (no envelope is built)."""
        if index >= self._cap:
            self._grow(index)
        self._kinds[index] = _SUCCESS
        self._values[index] = value
        self._items[index] = item
        self._attempts[index] = attempts
        self._elapsed[index] = elapsed

    def skip_range(
        self, start: int, stop: int, reason: StopReason, items: Sequence[T], first: int = 0
    ) -> None:
        """Items ``start..stop-1`` never started because the run stopped for ``reason``.

        O(1): nothing per item is stored. The item of index ``i`` is
        ``items[first + i - start]``, read when its envelope is built (so ``items`` must not
        change afterwards: pass an immutable sequence or a copy).
        """
        if stop <= start:
            return
        assert start >= self._appended(), "a skipped range comes after every appended index"
        assert not self._ranges or start >= self._ranges[-1][1]
        self._ranges.append((start, stop, reason, items, first))

    # ------------------------------------------------------------------ reading
    def _kind_bytes(self) -> bytes:
        """The kinds column up to the highest index appended, as bytes (holes are 0xff)."""
        return self._kinds.tobytes().rstrip(_HOLE_BYTE)

    def _appended(self) -> int:
        """1 + the highest index appended."""
        return len(self._kind_bytes())

    def __len__(self) -> int:
        return self._ranges[-1][1] if self._ranges else self._appended()

    @property
    def complete(self) -> bool:
        """Every index below ``len(self)`` has its outcome."""
        return _HOLE_BYTE not in self._kind_bytes() and (
            not self._ranges or self._ranges[0][0] == self._appended()
        )

    def outcome(self, index: int) -> Outcome[T, R]:
        """Build the envelope of input index ``index`` (a new object on every call)."""
        k = self._kinds[index] if 0 <= index < self._cap else _HOLE
        if self._reruns or self._resumed or self._hedges:
            return self._with_reruns(index, k)
        if self._index is not None and k != _HOLE:
            return _at(self._build(index, k), self._index[index])
        return self._build(index, k)

    def _with_reruns(self, index: int, k: int) -> Outcome[T, R]:
        out = self._build(index, k)
        if self._index is not None and k != _HOLE:
            out = _at(out, self._index[index])
        n = self._reruns.get(index)
        if n:
            set_reruns(out, n)
        if index in self._resumed and type(out) is Success:
            set_resumed(out)
        hedge = self._hedges.get(index)
        if hedge is not None and k != _HOLE:
            set_hedged(out, *hedge)
        return out

    def _build(self, index: int, k: int) -> Outcome[T, R]:
        if k == _SUCCESS:
            return make_success(
                self._items[index],
                self._values[index],
                index,
                self._attempts[index],
                self._elapsed[index],
            )
        if k != _HOLE:
            error, errors = self._errors[index]
            return make_failure(
                self._items[index],
                error,
                _FAILURE_KINDS[k - 1],
                index,
                self._attempts[index],
                self._elapsed[index],
                errors,
            )
        ranges = self._ranges
        r = bisect.bisect_right(ranges, index, key=_range_start) - 1
        if r >= 0:
            start, stop, reason, items, first = ranges[r]
            if index < stop:
                err = ItemSkipped(reason)
                item = items[first + index - start]
                return make_failure(item, err, "skipped", index, 0, 0.0, (err,))
        raise IndexError(f"no outcome for index {index}")

    def view(self) -> OutcomeView[T, R]:
        """Every outcome in input order, as of now; a partial store's missing ones are left
        out."""
        if self.complete:
            return OutcomeView(self, range(len(self)))
        kinds = self._kind_bytes()
        filled = array("q", compress(range(len(kinds)), kinds.translate(_IS_FILLED)))
        for start, stop, *_ in self._ranges:
            filled.extend(range(start, stop))
        return OutcomeView(self, filled)

    # -------------------------------------------------------------- aggregates
    # Computed over the columns in C where possible; no envelope is built.
    def counts(self) -> dict[str, int]:
        kinds = self._kind_bytes()
        counts: dict[str, int] = {
            k: kinds.count(code) for k, code in zip(KINDS, _CODE_BYTES, strict=True)
        }
        for start, stop, *_ in self._ranges:
            counts["skipped"] += stop - start
        return counts

    def _mask(self, table: bytes) -> bytes:
        return self._kind_bytes().translate(table)

    def values(self) -> list[R]:
        return list(compress(self._values, self._mask(_IS_SUCCESS)))

    def successes(self) -> Iterator[int]:
        mask = self._mask(_IS_SUCCESS)
        return compress(range(len(mask)), mask)

    def failures(self) -> Iterator[int]:
        mask = self._mask(_IS_FAILURE)
        yield from compress(range(len(mask)), mask)
        for start, stop, *_ in self._ranges:
            yield from range(start, stop)

    def item_time(self) -> float:
        return math.fsum(self._elapsed)

    def reruns(self) -> int:
        return sum(self._reruns.values())

    def resumed(self) -> int:
        return len(self._resumed)

    def retries(self) -> int:
        att = self._attempts
        return sum(att) - (len(att) - att.count(0))

    def longest(self) -> float:
        return max(self._elapsed, default=0.0)

    def started_elapsed(self) -> list[float]:
        """Sorted ``elapsed`` of every item that started."""
        return sorted(compress(self._elapsed, self._mask(_IS_STARTED)))

    def slowest(self, n: int) -> list[int]:
        """Indices of the ``n`` longest items (ties: lower index first)."""
        elapsed = self._elapsed
        top = heapq.nlargest(n, range(self._appended()), key=elapsed.__getitem__)
        if len(top) < n:  # bulk-skipped items all took 0.0 s
            for start, stop, *_ in self._ranges:
                top.extend(range(start, min(stop, start + n - len(top))))
        return top[:n]


def _range_start(r: tuple[int, int, StopReason, Sequence[Any], int]) -> int:
    return r[0]


def _at(o: Outcome[T, R], index: int) -> Outcome[T, R]:
    """``o`` with another index."""
    if type(o) is Success:
        return make_success(o.item, o.value, index, o.attempts, o.elapsed)
    assert isinstance(o, Failure)
    return make_failure(o.item, o.error, o.kind, index, o.attempts, o.elapsed, o.errors)


@final
class OutcomeView(Sequence["Outcome[T, R]"], Generic[T, R]):
    """A read-only sequence of a store's outcomes in input order, each envelope built when
    read. ``rows`` lists the input indices shown: ``range(n)``, or the filled ones of a
    partial report."""

    __slots__ = ("_rows", "_store")

    def __init__(self, store: OutcomeStore[T, R], rows: Sequence[int]) -> None:
        self._store = store
        self._rows = rows

    @property
    def store(self) -> OutcomeStore[T, R]:
        return self._store

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Outcome[T, R]: ...
    @overload
    def __getitem__(self, index: slice) -> list[Outcome[T, R]]: ...
    def __getitem__(self, index: int | slice) -> Outcome[T, R] | list[Outcome[T, R]]:
        if isinstance(index, slice):
            return [self._store.outcome(i) for i in self._rows[index]]
        return self._store.outcome(self._rows[index])

    def __iter__(self) -> Iterator[Outcome[T, R]]:
        build = self._store.outcome
        for i in self._rows:
            yield build(i)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OutcomeView | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{len(self)} outcomes>"
