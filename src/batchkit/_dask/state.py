"""What every part of one Dask run reads and writes: the plan, the engine's intake and ledger,
the cluster client, the chunks out, and how the run stands (stopping, the cluster gone).

The driver (``driver.py``) is built from parts that each own one job (``stopping.py``,
``alerts.py``, ``envelopes.py``, ``inflight.py``, ``cluster.py``, ``schedule.py``); this is
the one object they share, as trio's ``Runner`` shares itself with its subsystems.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .._engine.intake import Intake
from .._engine.ledger import Ledger
from .._engine.plan import make_plan
from .breaker import DriverBreaker

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from .._engine.plan import Plan
    from .._model.errors import StopReason
    from .._model.events import Event
    from .._model.options import Options
    from .chunks import Chunk, ChunkSizer
    from .events import ChunkRerun, WorkerLost

__all__ = ["RunState"]

T = TypeVar("T")
R = TypeVar("R")


class RunState(Generic[T, R]):
    """One Dask run's shared state (mutable; only the driver's parts touch it)."""

    def __init__(self, backend: Any, items: Any, fn: Callable[..., Any], options: Options) -> None:
        # CORE's validators, the same as a local run: bad arguments raise here, at the call.
        self.plan: Plan = make_plan(items, fn, options)
        self.backend = backend
        self.items = items
        self.fn = fn
        self.run_id = uuid.uuid4().hex
        self.topic = f"batchkit-{self.run_id}"
        o = self.plan
        self.ledger: Ledger[T, R] = Ledger(
            put=_no_sink, name=o.name, fail_fast=o.fail_fast, max_failures=o.max_failures,
            max_failure_ratio=o.max_failure_ratio, observers=o.observers,  # progress=True too
            clock=self.now, in_flight=self.in_flight,
        )  # fmt: skip
        self.observers = self.ledger.observers  # the same list: a raising one is dropped
        # The local engine's bookkeeping: the intake (numbering, keys, the unread rest) and
        # the ledger (counts, the threshold decision, the observers).
        self.intake: Intake[T] = Intake(items, key=o.key)
        if self.intake.error is not None:
            raise self.intake.error  # the input's own __len__ raised: at the call, as before
        self.loop: asyncio.AbstractEventLoop | None = None
        self.client: Any = None
        self.start = 0.0
        self.wall_offset = 0.0  # wall clock - loop time (workers stamp wall-clock times)
        self.grace = 1.0
        self.deadline_at: float | None = None
        self.effective = 1  # the run's effective concurrency (BatchReport.concurrency)
        self.sizer: ChunkSizer | None = None
        self.spec_blob = b""  # the pickled RunSpec every chunk carries
        self.stop_reason: StopReason | None = None
        self.stopping = False
        self.gone: BaseException | None = None  # the cluster was lost: what is out is lost
        self.outage: tuple[float, str] | None = None  # since when, and what is missing
        self.closed = False
        self.pending: dict[int, Chunk] = {}  # chunks out: accepted by Dask, no result yet
        self.in_flight_items = 0
        # groups= or a weighted RateLimit: the workers the run started with, the only ones
        # holding a share (chunks go to them only; see groups.py)
        self.kept: list[str] | None = None
        self.breaker = DriverBreaker(o.breaker) if o.breaker is not None else None

    def event(self, event: Event | ChunkRerun | WorkerLost) -> None:
        # The cluster's own events go to the same observers, through the ledger; they are not
        # in the core's Event union (observers that do not know them ignore them).
        self.ledger.event(cast("Event", event))

    def key(self, index: int, item: Any) -> str:
        return f"#{index}" if self.plan.key is None else self.intake.key_of(index, item)

    def now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    def in_flight(self) -> int:
        return self.in_flight_items


def _no_sink(outcome: Any) -> None:  # the driver puts outcomes in its own queue
    raise AssertionError("the Dask driver records envelopes itself")
