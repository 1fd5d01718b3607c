"""The circuit breaker of a run, a meter (``breaker=Breaker(...)``): its circuits, read from
the store before the first item and written back when one opens and when the run ends, held
in memory in between (no store round trip per item).

While a half-open circuit's probe is in flight its other items wait for the probe's verdict
rather than being skipped: a batch's tick that starts half-open (the usual case after an
outage, when ``cool_down`` is shorter than the cron period) then does its work if the
upstream is back, and skips it at the probe's end if not. Either way the tick lasts as long
as the probe, which it would have waited for anyway."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..._model.errors import describe

if TYPE_CHECKING:
    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import SkipReason
    from ..._model.policies import Breaker
    from ..._model.state import JsonValue

__all__ = ["BreakerMeter", "Circuit", "Circuits"]

_log = logging.getLogger("batchkit")
_WRITE_TRIES = 5


@dataclass(slots=True)
class Circuit:
    """One circuit: consecutive failures, when it opened (the breaker's clock; ``None``:
    closed) and the job whose half-open probe is in flight (``None``: none)."""

    failures: int = 0
    opened_at: float | None = None
    probe: object = None


class Circuits:
    """Every circuit of one breaker, as this run sees it."""

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        self.by = breaker.by
        self.circuits: dict[str, Circuit] = {}
        self.touched: set[str] = set()  # written back: this run's word wins for these

    def circuit_of(self, item: Any) -> str:
        by = self.by
        return "" if by is None else str(by(item))

    def admit(self, name: str, job: object) -> bool | None:
        """May an attempt of ``job`` in this circuit start now? A cooled-down open circuit
        admits one probe at a time (half-open); ``None``: not yet, its probe is in flight."""
        c = self.circuits.get(name)
        if c is None or c.opened_at is None:
            return True
        if self.breaker.clock() < c.opened_at + self.breaker.cool_down:
            return False
        if c.probe is not None:
            return None
        c.probe = job
        return True

    def probing(self, name: str) -> bool:
        c = self.circuits.get(name)
        return c is not None and c.probe is not None

    def ended(self, name: str, kind: str, job: object) -> bool:
        """An admitted attempt of ``job`` ended with ``kind``; True when this opened the
        circuit. Only the probe's own end is its verdict: an attempt admitted before the
        circuit opened may end while the probe is in flight."""
        c = self.circuits.get(name)
        probe = False
        if c is not None and c.probe is job:
            probe, c.probe = True, None
        if kind == "success":
            if c is not None and (c.failures or c.opened_at is not None):
                c.failures, c.opened_at, c.probe = 0, None, None
                self.touched.add(name)
            return False
        if kind not in self.breaker.on:  # cancelled, refused, or a kind not counted
            return False
        if c is None:
            c = self.circuits[name] = Circuit()
        self.touched.add(name)
        c.failures += 1
        if probe or (c.opened_at is None and c.failures >= self.breaker.open_after):
            c.opened_at = self.breaker.clock()
            return True
        return False

    async def load(self) -> None:
        """Read the circuits; a store that fails or holds something else is logged, and the
        run starts with closed circuits."""
        key = self.breaker.key
        try:
            entry = await self.breaker.store.get(key)
        except Exception as e:
            _log.warning("batchkit: could not read the breaker %r (%s)", key, describe(e))
            return
        if entry is not None:
            self.circuits = _decode(entry.value)

    async def save(self) -> None:
        """Write this run's circuits over the stored ones (others' circuits kept), by
        compare-and-set; a store that fails is logged, never raised."""
        if not self.touched:
            return
        store, key = self.breaker.store, self.breaker.key
        try:
            for _ in range(_WRITE_TRIES):
                entry = await store.get(key)
                stored = _decode(entry.value) if entry is not None else {}
                stored.update({n: self.circuits[n] for n in self.touched})
                value: JsonValue = {
                    n: {"failures": c.failures, "opened_at": c.opened_at}
                    for n, c in sorted(stored.items())
                }
                if await store.compare_and_set(key, value, expected=entry.version if entry else 0):
                    return
            _log.warning("batchkit: the breaker %r was not written: other writers won", key)
        except Exception as e:
            _log.warning("batchkit: could not write the breaker %r (%s)", key, describe(e))


def _decode(value: JsonValue) -> dict[str, Circuit]:
    out: dict[str, Circuit] = {}
    if not isinstance(value, dict):
        return out
    for name, c in value.items():
        if not isinstance(c, dict):
            continue
        failures, opened = c.get("failures"), c.get("opened_at")
        if isinstance(failures, int) and (opened is None or isinstance(opened, int | float)):
            out[name] = Circuit(failures, None if opened is None else float(opened))
    return out


class BreakerMeter:
    """The breaker as a meter: it refuses an attempt of an open circuit (``circuit_open``:
    the item ends ``skipped``) and counts what each attempt it admitted ended with. Asked
    before the run's own limits, so a refused item takes no rate-limit turn or place; after
    the limit groups, whose places the window took when it picked the item."""

    def __init__(self, circuits: Circuits, loop: asyncio.AbstractEventLoop) -> None:
        self.circuits = circuits
        self._loop = loop
        self.saving: set[asyncio.Task[None]] = set()  # circuits written as they open
        self._verdicts: dict[str, asyncio.Future[None]] = {}  # half-open: a probe's end

    async def wait_task_can_start(self, slot: Slot, job: Job) -> SkipReason | None:
        try:
            name = job.circuit
        except AttributeError:  # the item's first attempt: ``by`` raising fails the item
            name = job.circuit = self.circuits.circuit_of(job.item)
        while (admitted := self.circuits.admit(name, job)) is None:
            verdict = self._verdicts.get(name)
            if verdict is None:
                verdict = self._verdicts[name] = self._loop.create_future()
            await asyncio.shield(verdict)  # one waiter cancelled leaves the others waiting
        return None if admitted else "circuit_open"

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None:
        pass

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None:
        # None: a later meter refused, or the run stopped, before the attempt started.
        kind = result.kind if result is not None else "refused"
        name = job.circuit
        if self.circuits.ended(name, kind, job):
            task = self._loop.create_task(self.circuits.save())
            self.saving.add(task)
            task.add_done_callback(self.saving.discard)
        if not self.circuits.probing(name) and (verdict := self._verdicts.pop(name, None)):
            verdict.set_result(None)  # the waiters ask again: closed, open, or one probes

    async def close(self) -> None:
        """On every way out: the writes of circuits that opened, then this run's circuits."""
        if self.saving:
            await asyncio.gather(*self.saving, return_exceptions=True)
        await self.circuits.save()
