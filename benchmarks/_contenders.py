"""The contenders: ways to apply ``fn`` to every item, at most ``C`` in flight, a per-item
timeout, every outcome collected, one failure never stopping the others.

Each uses the timeout that is idiomatic for it (``asyncio.timeout`` for asyncio code,
``asyncio.wait_for`` in the old barrier pattern, ``anyio.fail_after`` for anyio-based code,
batchkit's own ``timeout=``). Libraries that let an exception end the whole run (aiometer,
aiostream, anyio task groups) get a wrapper that turns the exception into a value, as a user
would have to write. Third-party libraries are imported lazily, so a worker only pays for the
one it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from batchkit import BatchReport

__all__ = ["CONTENDERS", "DEADLINE", "LABELS", "UVLOOP", "Collector", "Contender", "Job", "get"]

Fn: TypeAlias = Callable[[int], Awaitable[object]]


class Collector:
    """Where a contender puts outcomes. ``keep=True`` stores them all (a batch's result);
    ``keep=False`` only counts them and their failures (a stream's consumer), so memory stays
    flat and a stall measured is the contender's, not the collector's list. batchkit's
    ``batch_process`` hands over its report instead (``keep_report``): it is its result."""

    __slots__ = ("add", "extend", "failed", "kept", "n", "report")

    def __init__(self, *, keep: bool) -> None:
        self.kept: list[object] = []
        self.n = 0
        self.failed = 0
        self.report: BatchReport[Any, Any] | None = None
        self.add: Callable[[object], None]
        self.extend: Callable[[Iterable[object]], None]
        if keep:
            self.add = self.kept.append
            self.extend = self.kept.extend
        else:
            self.add = self._count
            self.extend = self._count_all

    def _count(self, outcome: object) -> None:
        self.n += 1
        if _is_failure(outcome):
            self.failed += 1

    def _count_all(self, outcomes: Iterable[object]) -> None:
        for outcome in outcomes:
            self._count(outcome)

    def keep_report(self, report: BatchReport[Any, Any]) -> None:
        self.report = report

    def consumed(self) -> int:
        return self.n + len(self.kept)

    def outcomes(self) -> tuple[int, int]:
        """How many outcomes arrived, and how many of them are failures."""
        if self.report is not None:
            counts = self.report.counts
            return sum(counts.values()), sum(counts.values()) - counts["success"]
        if self.kept:
            return len(self.kept), sum(1 for o in self.kept if _is_failure(o))
        return self.n, self.failed


def _is_failure(outcome: object) -> bool:
    if isinstance(outcome, BaseException):
        return True
    ok = getattr(outcome, "ok", True)  # a batchkit envelope
    return ok is False


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    items: Iterable[int]
    fn: Fn
    concurrency: int
    timeout: float
    cost: Callable[[int], float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Contender: TypeAlias = Callable[[Job, Collector], Awaitable[None]]


async def floor(job: Job, out: Collector) -> None:
    """Not a contender: a bare sequential loop, the cost of calling ``fn`` at all."""
    fn, add = job.fn, out.add
    for item in job.items:
        add(await fn(item))


async def pool(job: Job, out: Collector) -> None:
    """The hand-written sliding window (the reference): C workers pull from one iterator."""
    it = iter(job.items)
    fn, timeout, add = job.fn, job.timeout, out.add

    async def worker() -> None:
        for item in it:
            try:
                async with asyncio.timeout(timeout):
                    result: object = await fn(item)
            except Exception as e:
                result = e
            add(result)

    async with asyncio.TaskGroup() as tg:
        for _ in range(job.concurrency):
            tg.create_task(worker())


async def batch_process(job: Job, out: Collector) -> None:
    from batchkit import batch_process

    options: dict[str, Any] = {"timeout": job.timeout, "cost": job.cost, **job.extra}
    report = await batch_process(job.items, job.fn, concurrency=job.concurrency, **options)
    out.keep_report(report)  # the report is the result: reading it is the user's business


def _stream(ordered: bool) -> Contender:
    async def run(job: Job, out: Collector) -> None:
        from batchkit import stream

        add = out.add
        async with stream(
            job.items, job.fn, concurrency=job.concurrency, timeout=job.timeout, ordered=ordered
        ) as outcomes:
            async for outcome in outcomes:
                add(outcome)

    return run


async def gather(job: Job, out: Collector) -> None:
    """``asyncio.gather`` over every item, a ``Semaphore`` for the limit."""
    sem = asyncio.Semaphore(job.concurrency)
    fn, timeout = job.fn, job.timeout

    async def one(item: int) -> object:
        async with sem, asyncio.timeout(timeout):
            return await fn(item)

    out.extend(await asyncio.gather(*(one(x) for x in job.items), return_exceptions=True))


async def barrier(job: Job, out: Collector) -> None:
    """The old pattern: batches of 5, each a ``gather`` that waits for its slowest item."""
    sem = asyncio.Semaphore(job.concurrency)
    fn, timeout = job.fn, job.timeout

    async def guarded(item: int) -> object:
        async with sem:
            return await fn(item)

    it = iter(job.items)
    while batch := list(islice(it, 5)):
        out.extend(
            await asyncio.gather(
                *(asyncio.wait_for(guarded(x), timeout) for x in batch), return_exceptions=True
            )
        )


def _anyio_capture(job: Job) -> Callable[[int], Awaitable[object]]:
    import anyio

    fn, timeout = job.fn, job.timeout

    async def one(item: int) -> object:
        try:
            with anyio.fail_after(timeout):
                return await fn(item)
        except Exception as e:
            return e

    return one


async def aiometer(job: Job, out: Collector) -> None:
    import aiometer

    items = job.items if isinstance(job.items, range | list | tuple) else list(job.items)
    add = out.add
    async with aiometer.amap(_anyio_capture(job), items, max_at_once=job.concurrency) as results:
        async for result in results:
            add(result)


def _aiostream(ordered: bool) -> Contender:
    async def run(job: Job, out: Collector) -> None:
        from aiostream import stream as aiostream

        fn, timeout, add = job.fn, job.timeout, out.add

        async def one(item: int) -> object:
            try:
                async with asyncio.timeout(timeout):
                    return await fn(item)
            except Exception as e:
                return e

        xs: Any = aiostream.map(  # aiostream's operator types cannot express this map
            aiostream.iterate(job.items),
            one,  # type: ignore[arg-type]
            task_limit=job.concurrency,
            ordered=ordered,
        )
        async with xs.stream() as results:
            async for result in results:
                add(result)

    return run


async def anyio_group(job: Job, out: Collector) -> None:
    """A task per item in an anyio task group, a ``CapacityLimiter`` for the limit."""
    import anyio

    limiter = anyio.CapacityLimiter(job.concurrency)
    fn, timeout, add = job.fn, job.timeout, out.add

    async def one(item: int) -> None:
        async with limiter:
            try:
                with anyio.fail_after(timeout):
                    result: object = await fn(item)
            except Exception as e:
                result = e
        add(result)

    async with anyio.create_task_group() as tg:
        for item in job.items:
            tg.start_soon(one, item)


def _with(**extra: Any) -> Contender:
    """batch_process with one policy switched on (the policy-cost scenario)."""

    async def run(job: Job, out: Collector) -> None:
        await batch_process(
            Job(
                items=job.items,
                fn=job.fn,
                concurrency=job.concurrency,
                timeout=job.timeout,
                cost=job.cost,
                extra=extra,
            ),
            out,
        )

    return run


@contextlib.asynccontextmanager
async def _trivial_context() -> AsyncIterator[None]:
    yield None


async def _with_context(job: Job, out: Collector) -> None:
    """batch_process with context=: fn is then called as fn(item, ctx)."""
    from batchkit import batch_process

    fn = job.fn

    async def fn2(item: int, ctx: None) -> object:
        return await fn(item)

    report = await batch_process(
        job.items,
        fn2,
        concurrency=job.concurrency,
        timeout=job.timeout,
        context=_trivial_context,
    )
    out.keep_report(report)


def _otel_sdk() -> object:
    """OpenTelemetry with the SDK: spans to an in-memory exporter (exported as each ends),
    metrics to an in-memory reader."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from batchkit.otel import OpenTelemetry

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return OpenTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)


def get(name: str) -> Contender:
    """The contender called ``name`` (see ``LABELS``)."""
    from batchkit import RateLimit, Retry

    if name == "bp_retry":
        return _with(retry=Retry(attempts=3))
    if name == "bp_rate_limit":
        return _with(rate_limit=RateLimit(per_second=1e9, burst=1_000_000))
    if name == "bp_observer":
        return _with(observers=[lambda event: None])
    if name == "bp_context":
        return _with_context
    if name == "bp_otel_nosdk":
        from batchkit.otel import OpenTelemetry

        return _with(observers=[OpenTelemetry()])  # the API's default providers: no SDK
    if name == "bp_otel_imported":
        import opentelemetry.metrics
        import opentelemetry.trace  # noqa: F401 - the API's modules in memory, no observer

        return batch_process
    if name == "bp_otel_sdk":
        return _with(observers=[_otel_sdk()])
    if name == "bp_key":
        return _with(key=str)
    if name == "bp_deadline":
        return _with(deadline=DEADLINE, timeout=None)  # the call: no timeout
    return CONTENDERS[name.removesuffix(UVLOOP)]


UVLOOP = "_uvloop"
"""A contender name ending so runs the same code on a uvloop event loop."""
DEADLINE = 0.2
"""The deadline of the ``deadline_*`` scenarios (seconds)."""


CONTENDERS: dict[str, Contender] = {
    "floor": floor,
    "pool": pool,
    "batch_process": batch_process,
    "bp_cost": batch_process,  # the job carries cost= for this one
    "stream": _stream(ordered=False),
    "stream_ordered": _stream(ordered=True),
    "gather": gather,
    "barrier": barrier,
    "aiometer": aiometer,
    "aiostream": _aiostream(ordered=True),
    "aiostream_unordered": _aiostream(ordered=False),
    "anyio": anyio_group,
}

LABELS: dict[str, str] = {
    "floor": "sequential bare loop (floor, no concurrency)",
    "pool": "hand-written worker pool (reference)",
    "batch_process": "batchkit batch_process",
    "bp_cost": "batchkit batch_process, cost= hints",
    "stream": "batchkit stream",
    "stream_ordered": "batchkit stream, ordered=True",
    "gather": "asyncio.gather + Semaphore",
    "barrier": "batches of 5 with a barrier (gather + wait_for)",
    "aiometer": "aiometer.amap(max_at_once=C)",
    "aiostream": "aiostream map(task_limit=C), ordered",
    "aiostream_unordered": "aiostream map(task_limit=C), unordered",
    "anyio": "anyio task group + CapacityLimiter",
    "bp_retry": "batch_process + retry=Retry() (no failures)",
    "bp_rate_limit": "batch_process + rate_limit=RateLimit(1e9/s, burst 1e6)",
    "bp_observer": "batch_process + observers=[lambda e: None]",
    "bp_context": "batch_process + context= trivial async context manager",
    "bp_otel_imported": "batch_process, the OpenTelemetry API imported, no observer",
    "bp_otel_nosdk": "batch_process + observers=[OpenTelemetry()], no SDK configured",
    "bp_otel_sdk": "batch_process + OpenTelemetry(), SDK with in-memory exporter and reader",
    "bp_key": "batch_process + key=str (keys kept in the report)",
    "bp_deadline": f"batch_process + deadline={DEADLINE}",
    "import": "import batchkit (after import asyncio)",
}
for _name in ("pool", "batch_process", "stream", "stream_ordered"):
    LABELS[_name + UVLOOP] = LABELS[_name] + ", on uvloop"
