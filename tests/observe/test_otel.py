"""batchkit.otel.OpenTelemetry with the real SDK: in-memory span exporter and metric reader."""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from batchkit import InvalidArgument, MissingExtra, Retry, batch_process, stream
from batchkit.otel import OpenTelemetry
from batchkit.testing import instant, run_virtual
from tests.helpers import HANG

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.looptime


@dataclass
class Otel:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def observer(self, **kw: Any) -> OpenTelemetry:
        return OpenTelemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **kw
        )

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def run_span(self) -> ReadableSpan:
        (run,) = [s for s in self.spans() if s.name.startswith("batchkit.run")]
        return run

    def attempts(self) -> list[ReadableSpan]:
        found = [s for s in self.spans() if s.name == "batchkit.attempt"]
        return sorted(
            found, key=lambda s: (attr(s, "batchkit.item.index"), attr(s, "batchkit.attempt"))
        )

    def metrics(self) -> dict[str, dict[tuple[tuple[str, Any], ...], Any]]:
        """name -> sorted attributes -> value (sum) or (count, sum) for a histogram."""
        data = self.reader.get_metrics_data()
        assert data is not None
        out: dict[str, dict[tuple[tuple[str, Any], ...], Any]] = {}
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for p in metric.data.data_points:
                        key = tuple(sorted((p.attributes or {}).items()))
                        value = (p.count, p.sum) if hasattr(p, "count") else p.value  # type: ignore[union-attr]
                        out.setdefault(metric.name, {})[key] = value
        return out


def attr(span: ReadableSpan, name: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(name)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(exporter, reader, tracer_provider, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


class Flaky(Exception):
    pass


async def test_success_tree_user_spans_nest_and_nothing_leaks(otel: Otel) -> None:
    user = otel.tracer_provider.get_tracer("user")
    seen: dict[int, int] = {}
    tasks: set[asyncio.Task[Any] | None] = set()

    async def work(n: int) -> int:
        seen[n] = trace.get_current_span().get_span_context().span_id
        tasks.add(asyncio.current_task())
        with user.start_as_current_span(f"user {n}"):
            await asyncio.sleep(1)
        return n

    with user.start_as_current_span("request") as request:
        report = await batch_process(
            range(3), work, concurrency=1, name="p", key=str, observers=[otel.observer()]
        )
        assert trace.get_current_span() is request  # the caller's context is untouched
    assert report.ok
    run = otel.run_span()
    assert run.name == "batchkit.run p"
    assert parent_id(run) == request.get_span_context().span_id
    assert attr(run, "batchkit.concurrency") == 1
    assert attr(run, "batchkit.total") == 3
    assert attr(run, "batchkit.items.success") == 3
    assert attr(run, "batchkit.stop_reason") is None
    assert run.status.status_code is StatusCode.UNSET
    attempts = otel.attempts()
    assert [attr(s, "batchkit.item.key") for s in attempts] == ["0", "1", "2"]
    assert {parent_id(s) for s in attempts} == {span_id(run)}
    assert {attr(s, "batchkit.outcome") for s in attempts} == {"success"}
    # Each item saw its own attempt span as current, and its own spans nest under it.
    assert seen == {attr(s, "batchkit.item.index"): span_id(s) for s in attempts}
    users = {s.name: s for s in otel.spans() if s.name.startswith("user ")}
    assert {n: parent_id(users[f"user {n}"]) for n in range(3)} == seen
    # One worker did all three: the attached span did not count as a changed context.
    assert len(tasks) == 1


async def test_an_item_that_sets_a_context_variable_still_gets_a_fresh_worker(
    otel: Otel,
) -> None:
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=-1)
    seen: list[int] = []

    async def work(n: int) -> int:
        seen.append(var.get())
        var.set(n)
        await asyncio.sleep(0)
        return n

    await batch_process(range(3), work, concurrency=1, observers=[otel.observer()])
    assert seen == [-1, -1, -1]


@instant()
async def test_retry_timeout_and_error(otel: Otel) -> None:
    tries: dict[int, int] = {}

    async def work(n: int) -> int:
        tries[n] = tries.get(n, 0) + 1
        await asyncio.sleep(1)
        if n == 0 and tries[n] == 1:
            raise Flaky("once")
        if n == 1:
            await asyncio.sleep(HANG)
        if n == 2:
            raise ValueError("always")
        return n

    report = await batch_process(
        range(3), work, timeout=5, retry=Retry(attempts=2, retry_on=Flaky, timeouts=False),
        observers=[otel.observer()],
    )  # fmt: skip
    assert report.counts["success"] == 1
    run = otel.run_span()
    assert run.name == "batchkit.run"
    a = otel.attempts()
    assert [(attr(s, "batchkit.item.index"), attr(s, "batchkit.attempt"),
             attr(s, "batchkit.outcome")) for s in a] == [
        (0, 1, "error"), (0, 2, "success"), (1, 1, "timeout"), (2, 1, "error"),
    ]  # fmt: skip
    assert {parent_id(s) for s in a} == {span_id(run)}
    retried, _, timed_out, failed = a
    # The retry is an event on the failed attempt, with its wait; the last failures have none.
    assert [(e.name, dict(e.attributes or {})) for e in retried.events] == [
        ("exception", {**dict(retried.events[0].attributes or {})}),
        ("batchkit.retry", {"batchkit.retry_in": 0.0}),
    ]
    assert retried.status.status_code is StatusCode.ERROR
    assert [e.name for e in timed_out.events] == ["exception"]
    assert timed_out.status.description is not None
    assert "timed out" in timed_out.status.description
    assert [e.name for e in failed.events] == ["exception"]
    assert attr(run, "batchkit.items.timeout") == 1
    assert attr(run, "batchkit.retry.attempts") == 2
    assert attr(run, "batchkit.timeout") == 5

    m = otel.metrics()
    assert m["batchkit.attempts"] == {
        (("batchkit.name", "unnamed"), ("batchkit.result", "error")): 2,
        (("batchkit.name", "unnamed"), ("batchkit.result", "success")): 1,
        (("batchkit.name", "unnamed"), ("batchkit.result", "timeout")): 1,
    }
    items = m["batchkit.items"]
    assert items[(("batchkit.name", "unnamed"), ("batchkit.outcome", "success"))] == 1
    assert items[(("batchkit.name", "unnamed"), ("batchkit.outcome", "error"))] == 1
    duration = m["batchkit.item.duration"]
    # item 0: two attempts of 1 s (no backoff); item 1: its 5 s timeout.
    assert duration[(("batchkit.name", "unnamed"), ("batchkit.outcome", "success"))] == (1, 2.0)
    assert duration[(("batchkit.name", "unnamed"), ("batchkit.outcome", "timeout"))] == (1, 5.0)
    assert m["batchkit.items.in_flight"] == {(("batchkit.name", "unnamed"),): 0}


async def test_a_stop_cancels_skips_and_marks_the_run(otel: Otel) -> None:
    async def work(n: int) -> int:
        if n == 0:
            await asyncio.sleep(1)
            raise ValueError("first")
        await asyncio.sleep(HANG)
        return n

    report = await batch_process(
        range(5), work, concurrency=2, fail_fast=True, name="s", observers=[otel.observer()]
    )
    assert report.stop_reason == "fail_fast"
    run = otel.run_span()
    assert run.status.status_code is StatusCode.ERROR
    assert attr(run, "batchkit.stop_reason") == "fail_fast"
    assert attr(run, "batchkit.items.skipped") == 3
    assert [e.name for e in run.events] == ["batchkit.stopping"]
    a = otel.attempts()
    # Skipped items never started: no attempt span.
    assert [(attr(s, "batchkit.item.index"), attr(s, "batchkit.outcome")) for s in a] == [
        (0, "error"),
        (1, "cancelled"),
    ]
    assert a[1].status.status_code is StatusCode.ERROR
    m = otel.metrics()["batchkit.items"]
    assert m[(("batchkit.name", "s"), ("batchkit.outcome", "skipped"))] == 3


async def test_a_caller_cancel_ends_every_span(otel: Otel) -> None:
    started = asyncio.Event()

    async def work(n: int) -> int:
        started.set()
        await asyncio.sleep(HANG)
        return n

    task = asyncio.create_task(
        batch_process(range(4), work, concurrency=2, observers=[otel.observer()])
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    run = otel.run_span()
    assert attr(run, "batchkit.stop_reason") == "cancelled"
    assert run.status.status_code is StatusCode.ERROR
    assert [attr(s, "batchkit.outcome") for s in otel.attempts()] == ["cancelled", "cancelled"]
    assert otel.metrics()["batchkit.items.in_flight"] == {(("batchkit.name", "unnamed"),): 0}


@instant()
async def test_beyond_max_child_spans_items_get_linked_traces(otel: Otel) -> None:
    tries: dict[int, int] = {}

    async def work(n: int) -> int:
        tries[n] = tries.get(n, 0) + 1
        if n == 3 and tries[n] == 1:
            raise Flaky
        return n

    await batch_process(
        range(4), work, concurrency=1, retry=Retry(attempts=2, retry_on=Flaky),
        observers=[otel.observer(max_child_spans=2)],
    )  # fmt: skip
    run = otel.run_span()
    assert run.context is not None
    a = otel.attempts()
    assert [parent_id(s) for s in a[:2]] == [span_id(run)] * 2
    first_of_3, retry_of_3 = a[3], a[4]
    assert parent_id(a[2]) is None
    assert parent_id(first_of_3) is None
    assert parent_id(retry_of_3) == span_id(first_of_3)  # an item's retries stay in its trace
    assert a[2].context is not None
    assert a[2].context.trace_id != run.context.trace_id
    for s in a[2:]:
        assert [link.context.span_id for link in s.links] == [span_id(run)]
    assert not a[0].links


async def test_linked_for_every_item(otel: Otel) -> None:
    async def work(n: int) -> int:
        return n

    await batch_process(range(3), work, observers=[otel.observer(item_spans="linked")])
    traces = {s.context.trace_id for s in otel.attempts() if s.context is not None}
    assert len(traces) == 3


def test_a_sync_fn_sees_its_attempt_span_in_its_thread(otel: Otel) -> None:
    user = otel.tracer_provider.get_tracer("user")

    def work(n: int) -> int:
        with user.start_as_current_span(f"user {n}"):
            return n

    async def main() -> None:
        await batch_process(range(3), work, concurrency=2, observers=[otel.observer()])

    asyncio.run(main())
    attempts = {attr(s, "batchkit.item.index"): span_id(s) for s in otel.attempts()}
    users = {
        int(s.name.split()[1]): parent_id(s) for s in otel.spans() if s.name.startswith("user")
    }
    assert users == attempts


async def test_a_stream_is_traced_too(otel: Otel) -> None:
    async def work(n: int) -> int:
        return n

    async with stream(range(3), work, observers=[otel.observer()]) as outcomes:
        got = [o.index async for o in outcomes]
    assert sorted(got) == [0, 1, 2]
    assert len(otel.attempts()) == 3
    assert attr(otel.run_span(), "batchkit.items.success") == 3


async def test_metrics_only_and_traces_only(otel: Otel) -> None:
    async def work(n: int) -> int:
        return n

    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    metrics_only = OpenTelemetry(
        tracer_provider=NoOpTracerProvider(), meter_provider=otel.meter_provider
    )
    await batch_process(range(2), work, name="m", observers=[metrics_only])
    assert otel.spans() == ()
    assert otel.metrics()["batchkit.items"] == {
        (("batchkit.name", "m"), ("batchkit.outcome", "success")): 2
    }
    traces_only = OpenTelemetry(
        tracer_provider=otel.tracer_provider, meter_provider=NoOpMeterProvider()
    )
    await batch_process(range(2), work, observers=[traces_only])
    assert len(otel.attempts()) == 2


async def test_without_an_sdk_the_run_is_not_traced() -> None:
    # The API's global providers are the defaults here (no test sets them).
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    observer = OpenTelemetry()
    assert observer.start_run("x", {}) is None
    seen: list[bool] = []

    async def work(n: int) -> int:
        seen.append(trace.get_current_span().get_span_context().is_valid)
        return n

    report = await batch_process(range(3), work, observers=[observer])
    assert report.ok
    assert seen == [False] * 3


def test_importing_batchkit_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, batchkit, batchkit.testing; batchkit.batch_process; batchkit.Retry\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match="item_spans"):
        OpenTelemetry(item_spans="flat")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="max_child_spans"):
        OpenTelemetry(max_child_spans=-1)
    with pytest.raises(InvalidArgument, match="max_child_spans"):
        OpenTelemetry(max_child_spans=True)
    assert repr(OpenTelemetry()) == "OpenTelemetry()"


def test_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    with pytest.raises(MissingExtra, match=r"pip install 'aio-batchkit\[otel\]'"):
        OpenTelemetry()


@st.composite
def _plans(draw: st.DrawFn) -> list[tuple[float, str]]:
    """Per item: how long its attempts take and what they do."""
    n = draw(st.integers(1, 12))
    return [
        (
            draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
            draw(st.sampled_from(["ok", "ok", "flaky", "fail", "hang", "sets"])),
        )
        for _ in range(n)
    ]


@settings(max_examples=60, deadline=None)
@given(plan=_plans(), concurrency=st.integers(1, 4), linked=st.integers(0, 6))
def test_every_attempt_is_one_span_current_only_in_its_own_attempt(
    plan: list[tuple[float, str]], concurrency: int, linked: int
) -> None:
    """Whatever the mix (retries, timeouts, items that set a context variable) and
    concurrency: one span per attempt; each attempt sees its own span as current (never
    another item's); the caller's context is untouched; every span ended."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=-1)
    tries: dict[int, int] = {}
    seen: dict[tuple[int, int], int] = {}
    leaked: list[int] = []

    async def work(n: int) -> int:
        tries[n] = tries.get(n, 0) + 1
        seen[(n, tries[n])] = trace.get_current_span().get_span_context().span_id
        if var.get() != -1:
            leaked.append(n)
        delay, does = plan[n]
        await asyncio.sleep(delay)
        if (does == "flaky" and tries[n] == 1) or does == "fail":
            raise Flaky
        if does == "hang":
            await asyncio.sleep(HANG)
        if does == "sets":
            var.set(n)
        return n

    async def main() -> Any:
        report = await batch_process(
            range(len(plan)), work, concurrency=concurrency, timeout=5,
            retry=Retry(attempts=2, retry_on=Flaky, timeouts=False),
            observers=[OpenTelemetry(tracer_provider=provider, max_child_spans=linked)],
        )  # fmt: skip
        assert not trace.get_current_span().get_span_context().is_valid
        return report

    with instant():
        report = run_virtual(main)
    spans = exporter.get_finished_spans()
    attempts = {
        (attr(s, "batchkit.item.index"), attr(s, "batchkit.attempt")): span_id(s)
        for s in spans
        if s.name == "batchkit.attempt"
    }
    assert attempts == seen
    assert sum(o.attempts for o in report) == len(attempts)
    assert not leaked
    (run,) = [s for s in spans if s.name == "batchkit.run"]
    in_run = [s for s in spans if s.name == "batchkit.attempt" and parent_id(s) == span_id(run)]
    assert len({attr(s, "batchkit.item.index") for s in in_run}) == min(linked, len(plan))
