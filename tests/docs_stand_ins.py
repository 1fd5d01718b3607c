"""Stand-ins for the names the docs' code fragments use without defining them.

A how-to shows the part that matters (``await batch_process(items, fn, retry=...)``) and leaves
``items`` and ``fn`` to the reader. The test suite runs those fragments against the real API
with these stand-ins, so a renamed keyword or a changed default breaks a test, not a reader.
Pages marked ``<!-- examples: self-contained -->`` get none of them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from sqlalchemy.ext.asyncio import create_async_engine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = [
    "Market",
    "Prediction",
    "RateLimited",
    "UpstreamBusy",
    "engine",
    "enough",
    "enrich",
    "fn",
    "httpx",
    "items",
    "mark_for_next_run",
    "markets",
    "process_single_market",
    "read_rows",
    "write",
]

items = list(range(20))


async def fn(item: int) -> int:
    """Any item function: one second of 'work'."""
    await asyncio.sleep(1.0)
    return item * 2


@dataclass(frozen=True)
class Market:
    id: str
    symbol: str


@dataclass(frozen=True)
class Prediction:
    market_id: str
    p: float


markets = [Market(id=f"market-{i}", symbol=f"SYM{i}") for i in range(20)]


async def process_single_market(market: Market, session: object = None) -> Prediction:
    await asyncio.sleep(15.0)
    return Prediction(market_id=market.id, p=0.5)


class RateLimited(Exception):
    retry_after = 1.0


class UpstreamBusy(Exception):
    pass


async def mark_for_next_run(ids: set[str]) -> None:
    await asyncio.sleep(0)


async def read_rows() -> AsyncIterator[int]:
    for row in range(50):
        yield row


async def enrich(row: int) -> int:
    await asyncio.sleep(0.5)
    return row + 1


async def write(outcome: object) -> None:
    await asyncio.sleep(0)


def enough(outcome: object) -> bool:
    return False


# An engine that never connects unless a block runs a statement (none of the stand-in-using
# blocks does): sessions made from it open and close without touching a database.
engine = create_async_engine("sqlite+aiosqlite://")
