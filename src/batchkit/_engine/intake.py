"""Taking items from the input: numbering them, their keys, the ``cost=`` read-ahead, closing
the input, and what is left of it when a run stops.

An :class:`Intake` knows nothing of workers or attempts. Both drivers take their items through
one (the local engine per slot, the Dask driver per chunk); ``tests/engine/test_intake.py``
drives it with no event loop for a plain iterable.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
from collections.abc import AsyncIterator, Iterator, Sequence, Sized
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, final

from .._model.attempt import Job
from .._model.errors import ItemSkipped, safe_repr
from .._model.outcomes import Failure

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._model.errors import StopReason
    from .sinks import Sink

__all__ = ["Intake", "Picker"]

T = TypeVar("T")

_log = logging.getLogger("batchkit")


def _nothing() -> None:
    pass


class Picker(Protocol):
    """Chooses among the read-ahead (limit groups): ``try_take`` takes what ``job`` needs to
    start now, or nothing (False); a refusal holds until ``epoch()`` changes."""

    def try_take(self, job: Job) -> bool: ...

    def epoch(self) -> object: ...


@final
class Intake(Generic[T]):
    """The input of one run. ``key``: the ``key=`` option (``keep_keys``: remember each item's
    key for the report); ``cost`` and ``read_ahead``: the ``cost=`` option and how many items
    it reads ahead to start the most expensive first. ``on_error`` is called once, when the
    input itself raises (the driver then starts nothing more)."""

    def __init__(
        self,
        items: Any,
        *,
        key: Callable[[T], object] | None = None,
        keep_keys: bool = False,
        cost: Callable[[T], float] | None = None,
        read_ahead: int = 0,
    ) -> None:
        self.items = items
        self.key = key
        self.cost = cost
        self.read_ahead = read_ahead
        self.exhausted = False
        """The input said it has no more items (or a stop read the rest as skipped)."""
        self.error: BaseException | None = None
        """What the input raised (its ``__len__``, ``iter()`` or next item)."""
        self.sized = isinstance(items, Sized)
        self.total: int | None = None
        if self.sized:
            try:
                self.total = len(items)
            except Exception as e:  # the input's own __len__ raised: an input error
                self.sized = False
                self.error = e
        self.it: Iterator[T] | None = None
        self.ait: AsyncIterator[T] | None = None
        self._lock: asyncio.Lock | None = None
        self.next_index = 0
        """How many items were taken: the index the next one gets."""
        self.keys: list[str] | None = [] if key is not None and keep_keys else None
        self._key_failed = False
        self.buffer: list[tuple[float, int, Job]] = []  # the cost-ordered read-ahead
        self._scanned = 0  # with a picker: the read-ahead before this index was refused
        self._scan_epoch: object = None
        self.on_error: Callable[[], None] = _nothing

    def open(self) -> bool:
        """``iter()`` or ``aiter()`` of the input; False if that (or ``len()``) raised."""
        if self.error is None:
            try:
                if hasattr(self.items, "__aiter__"):
                    self.ait = aiter(self.items)
                    self._lock = asyncio.Lock()
                    return True
                self.it = iter(self.items)
                return True
            except Exception as e:
                self.error = e
        self.it = iter(())
        return False

    # ----------------------------------------------------------------------- taking
    def take(self, item: T) -> Job:
        """Number ``item`` (and key it) as the next one taken."""
        index = self.next_index
        self.next_index = index + 1
        if self.key is None:
            return Job(index, item)
        key = self.key_of(index, item)
        if self.keys is not None:
            self.keys.append(key)
        return Job(index, item, key)

    def key_of(self, index: int, item: T) -> str:
        """``key(item)``, computed once per item; a key that raises falls back to ``#index``
        (the first such item is logged)."""
        assert self.key is not None
        try:
            return str(self.key(item))
        except Exception as e:
            if not self._key_failed:
                self._key_failed = True
                _log.warning(
                    "batchkit: key() raised for item #%d (%s); using #index", index, safe_repr(e)
                )
            return f"#{index}"

    def pull_now(self) -> Job | None:
        """The next job of a plain iterable without cost hints: no coroutine on the hot path."""
        if self.exhausted or self.error is not None:
            return None
        try:
            item = next(self.it)  # type: ignore[arg-type]  # set when this is used
        except StopIteration:
            self.exhausted = True
            return None
        except Exception as e:
            self.failed(e)
            return None
        if self.key is None:  # take(), inline: once per item
            index = self.next_index
            self.next_index = index + 1
            return Job(index, item)
        return self.take(item)

    async def next_item(self) -> tuple[T] | None:
        """The next raw item of the input, or ``None`` when there is none (or it failed)."""
        if self.exhausted or self.error is not None:
            return None
        try:
            if self.it is not None:
                return (next(self.it),)
            assert self.ait is not None
            assert self._lock is not None
            async with self._lock:
                if self.exhausted:
                    return None
                return (await anext(self.ait),)
        except (StopIteration, StopAsyncIteration):
            self.exhausted = True
        except Exception as e:
            self.failed(e)
        return None

    async def pull(
        self,
        bad_cost: Callable[[Job, Exception], None],
        pick: Picker | None = None,
    ) -> Job | None:
        """The next job to start; with cost hints, the most expensive of the read-ahead (an
        item whose hint raises goes to ``bad_cost`` instead: its failure, not the run's).
        With ``pick`` (limit groups), the first of the read-ahead — in input order, or by cost
        — that ``pick`` takes; ``None`` while none can start (``buffer`` then says whether
        items wait)."""
        if pick is not None:
            return await self._pick(bad_cost, pick)
        cost = self.cost
        if cost is None:
            got = await self.next_item()
            return self.take(got[0]) if got is not None else None
        buffer = self.buffer
        while len(buffer) < self.read_ahead and (got := await self.next_item()):
            job = self.take(got[0])
            try:
                c = float(cost(job.item))
            except Exception as e:
                bad_cost(job, e)
                continue
            heapq.heappush(buffer, (-c, job.index, job))
        return heapq.heappop(buffer)[2] if buffer else None

    async def _pick(self, bad_cost: Callable[[Job, Exception], None], pick: Picker) -> Job | None:
        """The read-ahead as a sorted list (most expensive first, then input order; a sorted
        list is a heap too, for :meth:`unstarted`): at most ``read_ahead`` items are held.

        Items the picker refused stay refused until its ``epoch`` changes (a place given
        back, the clock moved): the next scan starts after them, so a read-ahead full of
        waiting items costs one scan per release, not one per worker that looks."""
        buffer, cost = self.buffer, self.cost
        while len(buffer) < self.read_ahead and (got := await self.next_item()):
            job = self.take(got[0])
            c = 0.0
            if cost is not None:
                try:
                    c = float(cost(job.item))
                except Exception as e:
                    bad_cost(job, e)
                    continue
            entry = (-c, job.index, job)
            at = bisect.bisect_right(buffer, entry)
            buffer.insert(at, entry)
            self._scanned = min(self._scanned, at)
        epoch = pick.epoch()
        start = self._scanned if epoch == self._scan_epoch else 0
        self._scan_epoch = epoch
        take = pick.try_take
        for i in range(start, len(buffer)):
            job = buffer[i][2]
            if take(job):
                del buffer[i]
                self._scanned = i
                return job
        self._scanned = len(buffer)
        return None

    def failed(self, error: Exception) -> None:
        self.error = error
        self.on_error()

    # -------------------------------------------------------------------- the rest
    def more(self) -> bool:
        """Whether the input may still have items not yet taken (or read ahead)."""
        done = self.exhausted or self.error is not None
        done = done or (self.total is not None and self.next_index >= self.total)
        return not done or bool(self.buffer)

    def unstarted(self) -> list[Job]:
        """Empty the read-ahead: the jobs taken that never started, most expensive first."""
        buffer, self.buffer = self.buffer, []
        self._scanned = 0
        return [heapq.heappop(buffer)[2] for _ in range(len(buffer))]

    def rest_is_known(self) -> bool:
        """After a stop: whether the unread rest is known (a sized, synchronous input, read
        to the end of neither)."""
        return not self.exhausted and self.error is None and self.sized and self.it is not None

    def rest(self) -> range:
        """The indices of the unread rest of a sized input (``rest_is_known``)."""
        assert self.total is not None
        return range(self.next_index, self.total)

    def skip_rest(self, sink: Sink[T, Any], reason: StopReason) -> range:
        """The unread rest as one skipped range in ``sink``: O(1) for a range or a tuple
        (items are read from it when an envelope is built), a C-speed copy otherwise. Nothing
        is built per item."""
        start = self.next_index
        items = self.items
        rest: Sequence[T]
        if isinstance(items, range | tuple):
            rest, first = cast("Sequence[T]", items), start
        else:
            rest, first = (items[start:] if isinstance(items, list) else list(self.it or ())), 0
        skipped = range(start, start + len(rest) - first)
        sink.skip_range(skipped, reason, rest, first)
        self.next_index = skipped.stop
        self.exhausted = True
        return skipped

    def drain_one(self, reason: StopReason | None) -> Failure[T] | None:
        """After a stopped stream's run: the next unread item of a sized input, as skipped
        (observers heard of it in the run's ItemsSkipped event)."""
        if self.exhausted or reason is None or not self.sized or self.it is None:
            return None
        for item in self.it:
            index = self.next_index
            self.next_index += 1
            err = ItemSkipped(reason)
            return Failure(item, err, "skipped", index, 0, 0.0, (err,))
        self.exhausted = True
        return None

    async def close(self, grace: float) -> None:
        """``aclose()`` an async input, waiting at most ``grace``; never raises."""
        ait = self.ait
        if ait is None or not hasattr(ait, "aclose"):
            return
        try:
            async with asyncio.timeout(grace):
                await ait.aclose()
        except Exception as e:  # a hanging or broken aclose must not hide the report
            _log.warning("batchkit: closing the async input failed: %r", e)
