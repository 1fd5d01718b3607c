"""OpenTelemetry on the Dask backend: the run span and the metrics are made on the client from
the run's events; attempts run on the workers without spans (the trace stops at the run span,
as docs/how-to/opentelemetry.md says)."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import batchkit
from batchkit.dask import DaskBackend
from batchkit.otel import OpenTelemetry

from . import _work

pytestmark = pytest.mark.timeout(90)


def _sums(reader: InMemoryMetricReader, name: str) -> dict[str, Any]:
    """A counter's values by outcome (or result); ``"-"`` when it has neither attribute."""
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, Any] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name != name:
                    continue
                for p in m.data.data_points:
                    a = dict(p.attributes or {})
                    kind = a.get("batchkit.outcome", a.get("batchkit.result", "-"))
                    out[str(kind)] = p.value  # type: ignore[union-attr]
    return out


async def test_the_run_span_and_metrics_are_made_on_the_client(client: Any) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    observer = OpenTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    caller = tracer_provider.get_tracer("user")
    with caller.start_as_current_span("request") as request:
        report = await batchkit.batch_process(
            range(10), _work.fail_odd, concurrency=4, name="cluster", observers=[observer],
            backend=DaskBackend(client, per_worker=2),
        )  # fmt: skip
        assert trace.get_current_span() is request
    assert report.counts["error"] == 5
    spans = exporter.get_finished_spans()
    (run,) = [s for s in spans if s.name == "batchkit.run cluster"]
    assert run.parent is not None
    assert run.parent.span_id == request.get_span_context().span_id
    assert run.attributes is not None
    assert run.attributes["batchkit.items.success"] == 5
    assert run.attributes["batchkit.items.error"] == 5
    assert run.status.status_code is StatusCode.UNSET
    # Where the trace stops: no attempt spans from the workers.
    assert not [s for s in spans if s.name == "batchkit.attempt"]
    assert _sums(reader, "batchkit.items") == {"success": 5, "error": 5}
    assert _sums(reader, "batchkit.attempts") == {"success": 5, "error": 5}
    assert _sums(reader, "batchkit.items.in_flight") == {"-": 0}
    tracer_provider.shutdown()
    meter_provider.shutdown()


async def test_fn_on_a_worker_sees_no_span(client: Any) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    report = await batchkit.batch_process(
        range(4), _work.sees_a_span, observers=[OpenTelemetry(tracer_provider=tracer_provider)],
        backend=DaskBackend(client, per_worker=2),
    )  # fmt: skip
    assert report.values() == [False] * 4
    assert [s.name for s in exporter.get_finished_spans()] == ["batchkit.run"]
    tracer_provider.shutdown()
