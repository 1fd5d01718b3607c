"""Shared test helpers. Virtual time for sync (Hypothesis) tests is the public
``batchkit.testing.run_virtual``: the suite uses what it ships."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchkit import Backoff, MemoryStateStore

if TYPE_CHECKING:
    from collections.abc import Mapping

    from batchkit import JsonValue, StateEntry

# Virtual-time budget for a call that should take at most a minute: a hang fails at once
# (virtual time jumps) instead of waiting for pytest-timeout. Deadline tests use less.
HANG = 600.0

NO_BACKOFF = Backoff(initial=0, maximum=0, jitter=False)


def now() -> float:
    return asyncio.get_running_loop().time()


@dataclass
class Recorder:
    """Records in-flight counts, starts and ends of item functions."""

    in_flight: int = 0
    peak: int = 0
    starts: dict[int, list[float]] = field(default_factory=dict)
    ends: dict[int, float] = field(default_factory=dict)
    cancelled: list[int] = field(default_factory=list)

    def enter(self, index: int) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.starts.setdefault(index, []).append(now())

    def exit(self, index: int) -> None:
        self.in_flight -= 1
        self.ends[index] = now()


class Wrapped:
    """A StateStore that hands every call to a MemoryStateStore (which is final)."""

    def __init__(self) -> None:
        self.inner = MemoryStateStore()

    async def get(self, key: str) -> StateEntry | None:
        return await self.inner.get(key)

    async def compare_and_set(
        self, key: str, value: JsonValue, *, expected: int
    ) -> StateEntry | None:
        return await self.inner.compare_and_set(key, value, expected=expected)

    async def set_many(self, values: Mapping[str, JsonValue]) -> None:
        await self.inner.set_many(values)

    async def scan(self, prefix: str) -> list[StateEntry]:
        return await self.inner.scan(prefix)

    async def prune(self, older_than: float, *, prefix: str = "") -> int:
        return await self.inner.prune(older_than, prefix=prefix)
