"""``--otel``: batchkit's spans and metrics (``batchkit.otel.OpenTelemetry``) exported to
stderr, one JSON document a line, or over OTLP when the standard environment configures it
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and the OTLP
exporter (``opentelemetry-exporter-otlp-proto-http``) is installed.

The providers are set globally, as an application does, so an instrumentation (httpx's,
SQLAlchemy's) installed beside the app nests its spans under batchkit's attempt spans.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import TextIO

    import batchkit

__all__ = ["OTLP_ENV", "telemetry"]

OTLP_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
EXTRA_HINT = "--otel needs the app's otel extra: pip install -e 'examples/predictions[otel]'"


def _exporters(err: TextIO) -> tuple[Any, Any, str]:
    """(span exporter, metric exporter, where they export)."""
    if any(os.environ.get(name) for name in OTLP_ENV):
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            print(
                "otel: OTEL_EXPORTER_OTLP_* is set but opentelemetry-exporter-otlp-proto-http "
                "is not installed; exporting to the console instead",
                file=err,
            )
        else:
            return OTLPSpanExporter(), OTLPMetricExporter(), "OTLP (OTEL_EXPORTER_OTLP_*)"
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return (
        ConsoleSpanExporter(out=err, formatter=lambda span: span.to_json(indent=None) + "\n"),
        ConsoleMetricExporter(out=err, formatter=lambda m: m.to_json(indent=None) + "\n"),
        "the console (stderr, one JSON document a line)",
    )


@contextmanager
def telemetry(enabled: bool, err: TextIO) -> Iterator[list[batchkit.Observer]]:
    """The observers ``--otel`` adds (none without it); spans and metrics are flushed on
    leaving."""
    if not enabled:
        yield []
        return
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from batchkit.otel import OpenTelemetry
    except ImportError:
        raise SystemExit(EXTRA_HINT) from None
    span_exporter, metric_exporter, where = _exporters(err)
    resource = Resource.create({"service.name": "predictions"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(metric_exporter)]
    )
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    print(f"otel: spans and metrics to {where}", file=err, flush=True)
    try:
        yield [OpenTelemetry()]
    finally:
        tracer_provider.shutdown()  # flushes the spans still batched
        meter_provider.shutdown()  # one last export of the metrics
