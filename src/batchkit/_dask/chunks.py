"""Chunks: how many go out at once, how big each is, and what one is while it is out.

Values and pure arithmetic only; the driver's parts (``schedule.py``, ``inflight.py``) read
the input into :class:`Chunk` objects sized by a :class:`ChunkSizer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["PARTIAL_WAIT", "Chunk", "ChunkSizer", "plan_chunks"]

# A chunk should keep a worker busy about this long: long enough that the round trip per
# chunk is noise, short enough that the last chunks even out across workers.
_TARGET_CHUNK_SECONDS = 0.5
_MIN_CHUNK_SECONDS = 0.2
_MAX_CHUNK = 5000
PARTIAL_WAIT = 0.1
"""Seconds a chunk of an async input waits for more items after its first one was read
before it is sent as it is (a stalled input's items run instead of waiting for a full chunk)."""


def plan_chunks(concurrency: int, per_worker: int, n_workers: int, threads: int) -> tuple[int, int]:
    """``(per_chunk, chunks_in_flight)``: the concurrency of one chunk on its worker and how
    many chunks may be submitted at once, so that ``per_chunk * chunks_in_flight`` never
    exceeds ``concurrency`` while every worker thread has a chunk and one queued behind it."""
    threads = max(threads, 1)
    per_chunk = max(1, min(per_worker, concurrency // threads or 1))
    most = max(1, concurrency // per_chunk)
    return per_chunk, max(1, min(most, threads + n_workers))


class ChunkSizer:
    """Chunk sizes from the observed worker time per item, unless ``chunk_size`` is fixed.

    A chunk aims at ``_TARGET_CHUNK_SECONDS`` of work on its worker, and never less than
    ``_MIN_CHUNK_SECONDS`` (below that the round trip per chunk shows). For sized inputs,
    guided self-scheduling (``remaining / (2 * worker threads)``) shrinks the last chunks so
    the workers finish together. The first chunks, before any observation, are small.
    """

    def __init__(self, fixed: int | None, per_chunk: int, threads: int, total: int | None) -> None:
        self.fixed = fixed
        self.per_chunk = per_chunk
        self.threads = max(threads, 1)
        self.total = total
        self.seconds_per_item: float | None = None

    def observe(self, n: int, seconds: float) -> None:
        """A chunk of ``n`` items kept its worker busy ``seconds``."""
        if n <= 0 or seconds <= 0:
            return
        spi = seconds / n
        old = self.seconds_per_item
        self.seconds_per_item = spi if old is None else 0.5 * old + 0.5 * spi

    def next_size(self, taken: int) -> int:
        if self.fixed is not None:
            return self.fixed
        spi = self.seconds_per_item
        if spi is None:
            size, floor = 4 * self.per_chunk, self.per_chunk
        else:
            size = int(_TARGET_CHUNK_SECONDS / spi)
            floor = max(self.per_chunk, int(_MIN_CHUNK_SECONDS / spi))
        if self.total is not None:
            remaining = self.total - taken
            size = min(size, math.ceil(remaining / (2 * self.threads)))
        return max(1, min(max(size, floor), _MAX_CHUNK))


@dataclasses.dataclass(slots=True, eq=False)
class Chunk:
    offset: int
    items: list[Any]
    submitted: float = 0.0
    bad: dict[int, Exception] = dataclasses.field(default_factory=dict)
    """Items that could not be pickled to send them (position -> error)."""
    open: set[int] = dataclasses.field(default_factory=set)
    """Items not sent because their circuit was open (``skipped``, ``circuit_open``)."""
    circuits: dict[int, tuple[str, object]] = dataclasses.field(default_factory=dict)
    """With a breaker: each sent item's circuit and the token its verdict is told by."""
    done: dict[int, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    """Items the driver ends without sending them (``journal=``: resumed, or a duplicate
    key): position -> their record."""
    starts: dict[str, str] = dataclasses.field(default_factory=dict)
    """Each run of this chunk on a worker: token -> worker address, in order."""

    def unsent(self, i: int) -> bool:
        """Was the item at position ``i`` kept on the driver (unpicklable, circuit open, or
        ended by the journal)?"""
        return i in self.bad or i in self.open or i in self.done
