"""Shared test helpers: virtual time for sync (Hypothesis) tests, and a recording item function."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import looptime

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

T = TypeVar("T")


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` on a fresh event loop whose clock is virtual and starts at 0."""
    loop = looptime.new_event_loop(start=0)
    try:
        return loop.run_until_complete(main())
    finally:
        # As asyncio.run does: cancel what is left (after a KeyboardInterrupt escaped the
        # loop, say) and let it clean up before closing.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


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
