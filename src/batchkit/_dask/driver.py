"""The driver side of the Dask backend: chunks out, envelopes back, one report.

The driver cuts the input into chunks and schedules them with batchkit's own engine
(``stream`` over chunks, its concurrency = chunks in flight); each chunk is one Dask task that
runs its items with the local engine on a worker (``_dask/worker.py``). Chunk results come back as
compact records and are turned into the same envelopes a local run makes, with input indices,
in one :class:`BatchReport` (or one stream of outcomes).

Stopping (deadline, ``fail_fast``, thresholds, the caller leaving or cancelling) sends every
worker a stop message that cancels the run's coroutines there; the call's exit sends an end
message that cancels whatever is left, disposes per-worker resources and waits for it.

:class:`DaskRun` is built from parts, each with one job, sharing one :class:`RunState`: the
options it refuses and the spec it sends (``spec.py``), reading the input into chunks
(``schedule.py``), the chunks out (``inflight.py``), records to envelopes (``envelopes.py``),
the workers' messages (``alerts.py``), stopping (``stopping.py``) and the cluster's watch
(``cluster.py``). Every chunk start on a worker is announced on the run's event topic, so the
driver counts re-runs after a worker died (``Success.reruns``) and counts a re-run chunk's
failures once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._model.errors import BatchkitError, ItemCancelled
from .._model.events import RunFinished, RunStarted
from .._model.outcomes import Failure, Outcome
from .._model.report import BatchReport, InputFailed
from .._model.store import OutcomeStore
from . import worker as worker_side
from .alerts import Alerts
from .cluster import ClusterWatch
from .envelopes import Envelopes
from .inflight import InFlight
from .schedule import ChunkReader
from .spec import check_options, plan_run
from .state import RunState
from .stopping import Stopper

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from .._model.options import Options
    from .chunks import Chunk
    from .journal import DriverJournal
    from .wire import ChunkResult

__all__ = ["DaskRun", "run_batch"]

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger("batchkit.dask")


class DaskRun(Generic[T, R]):
    """One run on a Dask cluster: an async context manager and iterator of outcomes."""

    def __init__(
        self,
        backend: Any,
        items: Any,
        fn: Callable[..., Any],
        options: Options,
        *,
        keep: bool,
    ) -> None:
        s = self._s = RunState[T, R](backend, items, fn, options)
        self._keep = keep
        self._outcomes: list[Outcome[T, R]] = []
        self._stopper = Stopper(s)
        self._alerts = Alerts(s, self._stopper)
        self._envelopes = Envelopes(s, self._alerts)
        self._inflight = InFlight(s, self._envelopes, self._stopper)
        self._cluster = ClusterWatch(s, self._stopper)
        self._reader = ChunkReader(s, self._envelopes.skip_unsent)
        self._subscribed = False
        self._announced = False  # RunStarted was sent: RunFinished will be
        self._consumed = 0
        self._final: BatchReport[T, R] | None = None
        self._outer: Any = None  # the local stream over chunks
        self._outer_done = False
        self._entered = False
        self._journal: DriverJournal | None = None  # journal=: read and written here

    # ------------------------------------------------------------------ entering
    async def __aenter__(self) -> DaskRun[T, R]:
        if self._entered:
            raise RuntimeError("a stream can be entered only once")
        self._entered = True
        check_options(self._s.plan, self._s.fn)
        self._s.loop = asyncio.get_running_loop()
        try:
            await self._enter()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _enter(self) -> None:
        s = self._s
        o = s.plan
        loop = s.loop
        assert loop is not None
        # The run (and a relative deadline) starts at the call, connecting included.
        s.start = loop.time()
        if o.journal is not None:
            await self._open_journal(o.journal)  # before anything is sent
        s.client = await s.backend._connect()
        n_workers, threads, addresses = await self._cluster.workers()
        if n_workers == 0:
            raise BatchkitError(
                "the Dask cluster has no workers\nHINT: start some (`dask worker ADDRESS`) or "
                "await client.wait_for_workers(n) before the call"
            )
        s.wall_offset = time.time() - loop.time()
        if s.breaker is not None:
            await s.breaker.load()  # one read: the circuits as the run starts
        in_flight = plan_run(s, addresses, threads)
        s.client.subscribe_topic(s.topic, self._alerts.on_alert)
        self._subscribed = True
        await self._cluster.start(addresses)
        self._reader.open()
        self._stopper.arm_deadline()
        total = s.intake.total
        s.event(RunStarted(name=o.name, concurrency=s.effective, total=total, time=s.start))
        self._announced = True
        from .._api import stream

        chunks, run_chunk = self._reader.chunks(), self._inflight.run_chunk
        # buffer=in_flight: an ordered stream waiting on a slow chunk holds at most twice the
        # chunks in flight (the default reorder buffer, 8 per slot, would hold 36 chunks).
        outer = stream(
            chunks, run_chunk, concurrency=in_flight, ordered=o.ordered, buffer=in_flight
        )
        await outer.__aenter__()
        self._outer = outer

    async def _open_journal(self, policy: Any) -> None:
        from .journal import DriverJournal  # lazy: start-up time

        journal = self._journal = DriverJournal(self._s, policy)
        await journal.load()
        self._reader.mark = journal.mark
        self._envelopes.journal = journal.ended

    # ------------------------------------------------------------------- iterating
    def __aiter__(self) -> DaskRun[T, R]:
        return self

    async def __anext__(self) -> Outcome[T, R]:
        if not self._entered:
            raise RuntimeError("iterate a stream inside `async with stream(...) as outcomes:`")
        ready = self._envelopes.ready
        while True:
            if ready:
                out = ready.popleft()
                self._consumed += 1
                if self._keep:
                    self._outcomes.append(out)
                return out
            if not self._outer_done:
                await self._next_chunk()
                continue
            drained = self._envelopes.drain_one()
            if drained is not None:
                ready.append(drained)
                continue
            if self._s.intake.error is not None:
                raise InputFailed(self.report) from self._s.intake.error
            raise StopAsyncIteration

    async def _next_chunk(self) -> None:
        nxt = asyncio.ensure_future(self._outer.__anext__())
        force = asyncio.ensure_future(self._stopper.force.wait())
        try:
            await asyncio.wait({nxt, force}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            force.cancel()
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
        if nxt.cancelled():
            await self._give_up()
            return
        try:
            outcome = nxt.result()
        except StopAsyncIteration:
            await self._close_outer()
            return
        self._expand(outcome)

    def _expand(self, outcome: Outcome[Chunk, ChunkResult | None]) -> None:
        """One chunk's outcome from the outer stream -> its items' envelopes (and events)."""
        chunk = outcome.item
        returned = self._inflight.returned.pop(chunk.offset, None)
        if returned is None:
            # The outer stream ended the chunk itself (it cannot, short of a bug here).
            err = outcome.error if type(outcome) is Failure else ItemCancelled("fail_fast")
            self._envelopes.emit_chunk(chunk, self._envelopes.lost(chunk, err))  # pragma: no cover
            return
        result = returned[1]
        self._envelopes.emit_chunk(chunk, result)
        if result.stop_reason is not None and self._s.stop_reason is None:
            # The chunk stopped itself (its own fail_fast / max_failures / the deadline).
            if result.stop_reason == "deadline":
                self._stopper.on_deadline()
            else:
                self._stopper.stop(result.stop_reason)
        self._stopper.check_thresholds()

    async def _give_up(self, *, abandon: bool = True) -> None:
        """A stop's grace ran out (or the cluster is gone): drain what already came back,
        then end every chunk still out — ``lost`` if the cluster is gone, else
        ``cancelled`` and (unless the caller cancelled) listed in ``report.abandoned``."""
        try:
            await self._close_outer()  # cancels the chunk tasks; a pending chunk stays pending
        finally:
            self._inflight.end_chunks_out(abandon=abandon)

    async def _close_outer(self) -> None:
        if not self._outer_done:
            self._outer_done = True
            await self._outer.__aexit__(None, None, None)

    # --------------------------------------------------------------------- leaving
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._s.closed:
            return
        self._s.closed = True
        try:
            if self._outer is not None and not self._outer_done:
                await self._left_early()
        finally:
            await asyncio.shield(self._shutdown())

    async def _left_early(self) -> None:
        """The caller cancelled the call, or left a stream block, before the run ended: as on
        the local engine, items out end ``cancelled``, items not started ``skipped``, the
        report counts every item, and the stop reason is ``"cancelled"`` unless every item
        had already ended."""
        s, counts = self._s, self._envelopes.counts
        if s.stop_reason is None:
            s.stop_reason = "cancelled"
            s.stopping = True
        before = counts.get("cancelled", 0) + counts.get("skipped", 0)
        try:
            # Closing the chunk stream re-raises the caller's cancel once it has cleaned up.
            await self._give_up(abandon=False)
        finally:
            ready = self._envelopes.ready
            while (drained := self._envelopes.drain_one()) is not None:
                ready.append(drained)
            after = counts.get("cancelled", 0) + counts.get("skipped", 0)
            if s.stop_reason == "cancelled" and after == before:
                s.stop_reason = None  # nothing was left to cancel
            if self._keep:
                # Nobody will iterate any more: what is ready belongs in the report.
                self._outcomes.extend(ready)
                ready.clear()

    async def _shutdown(self) -> None:
        s = self._s
        self._stopper.cancel_timers()
        await self._cluster.stop()
        await self._stopper.wait_background()
        if s.client is not None:
            if self._subscribed:
                try:
                    s.client.unsubscribe_topic(s.topic)
                except Exception:  # pragma: no cover - a client already closing
                    _log.debug("batchkit: unsubscribing failed", exc_info=True)
            grace = min(s.grace, self._stopper.time_left())
            await self._stopper.broadcast(worker_side.end_run, s.run_id, grace)
        await self._reader.close()
        if s.breaker is not None and self._announced:
            await s.breaker.save()  # this run's circuits merged over the stored ones
        if self._journal is not None:
            await self._journal.close()  # the rows still waiting, on every way out
        if self._announced:
            assert s.loop is not None
            report = self.report
            s.event(RunFinished(name=s.plan.name, report=report, time=s.loop.time()))

    # ---------------------------------------------------------------------- report
    @property
    def consumed(self) -> int:
        return self._consumed

    @property
    def report(self) -> BatchReport[T, R]:
        s = self._s
        if s.loop is None:
            raise RuntimeError(
                "Stream.report is available once the stream is entered: read it inside or "
                "after the `async with` block"
            )
        if self._final is not None:
            return self._final
        envelopes = self._envelopes
        outcomes = sorted(self._outcomes, key=lambda o: o.index) if self._keep else []
        # The store is built here with each index's re-runs: reading them back from the
        # envelopes would cost a raised AttributeError per item (see _outcomes.set_reruns).
        store = OutcomeStore[T, R].from_outcomes(outcomes, envelopes.rerun_of)
        report = BatchReport(
            outcomes=store.view(),
            wall_time=s.loop.time() - s.start,
            concurrency=s.effective,
            peak_concurrency=envelopes.peak_concurrency(),
            stop_reason=s.stop_reason,
            input_exhausted=s.intake.exhausted,
            name=s.plan.name,
            key=s.plan.key,
            abandoned=tuple(sorted(self._inflight.abandoned)),
            tally=None if self._keep else dict(envelopes.counts),
            reruns=envelopes.reruns,
            resumed=self._journal.resumed if self._journal is not None else 0,
        )
        if s.closed and not self._stopper.background and self._cluster.done():
            self._final = report  # nothing can change it any more
        return report


async def run_batch(
    backend: Any, items: Any, fn: Callable[..., Any], options: Options
) -> BatchReport[Any, Any]:
    run: DaskRun[Any, Any] = DaskRun(backend, items, fn, options, keep=True)
    async with run:
        async for _ in run:
            pass
    return run.report
