"""The circuit breaker of a Dask run (``breaker=``), kept on the driver: the circuits are read
from the store once before the first chunk, decide which items are sent, learn from each
chunk's result and are written back when the run ends. The state machine is the local
engine's (:class:`~batchkit._engine.meters.breaker.Circuits`); only its granularity differs.

Items whose circuit is open are not sent (``skipped``, ``circuit_open``). A half-open circuit
sends one probe; the reading of the input stops at the circuit's next item until the probe's
chunk returns (its verdict). Failures are counted per item, from its final outcome, when its
chunk returns (a worker's failure alerts carry counts, not items): a circuit that opens mid-run
stops the sending of its items, while those already out in chunks run out — at most the
chunks in flight.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .._engine.meters.breaker import Circuits

if TYPE_CHECKING:
    from .._model.policies import Breaker
    from .chunks import Chunk
    from .wire import ChunkResult

__all__ = ["DriverBreaker"]


class DriverBreaker:
    """The run's circuits on the driver: which items go, and what came back."""

    def __init__(self, breaker: Breaker) -> None:
        self.circuits = Circuits(breaker)
        self._verdict = asyncio.Event()  # set when a chunk came back: a probe may have ended

    async def load(self) -> None:
        await self.circuits.load()

    async def save(self) -> None:
        await self.circuits.save()

    def sort(self, chunk: Chunk) -> int | None:
        """Mark the chunk's items: sent (with their circuit), or open (not sent). Returns the
        position of the first item held behind a half-open circuit's probe (``None``: none);
        the caller cuts the chunk there."""
        circuits = self.circuits
        for i, item in enumerate(chunk.items):
            try:
                name = circuits.circuit_of(item)
            except Exception:  # ``by`` raising: the item runs, uncounted
                continue
            token = object()
            admitted = circuits.admit(name, token)
            if admitted is None:
                return i
            if admitted:
                chunk.circuits[i] = (name, token)
            else:
                chunk.open.add(i)
        return None

    def held(self, item: Any) -> bool:
        """Is ``item`` still held: its circuit's probe is out?"""
        try:
            return self.circuits.probing(self.circuits.circuit_of(item))
        except Exception:  # ``by`` raising: not held
            return False

    async def wait_verdict(self) -> None:
        """Until the next chunk comes back."""
        self._verdict.clear()
        await self._verdict.wait()

    def observe(self, chunk: Chunk, result: ChunkResult) -> None:
        """A chunk came back: each sent item's final kind is its circuit's news."""
        kinds = {rec[0]: rec[1] for rec in result.records}
        for i, (name, token) in chunk.circuits.items():
            self.circuits.ended(name, kinds.get(i, "cancelled"), token)
        self._verdict.set()
