"""Shared test helpers. Virtual time for sync (Hypothesis) tests is the public
``batchkit.testing.run_virtual``: the suite uses what it ships."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from batchkit import Backoff

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
