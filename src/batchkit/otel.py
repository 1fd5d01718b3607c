"""OpenTelemetry traces and metrics for batch runs (extra ``aio-batchkit[otel]``).

::

    from batchkit.otel import OpenTelemetry

    report = await batch_process(items, fn, name="predictions", observers=[OpenTelemetry()])

**Spans.** One span per run (``batchkit.run <name>``), a child of whatever span is current
when the run starts; one span per item attempt (``batchkit.attempt``), current while ``fn``
runs, so the spans of your HTTP client or database driver nest under the attempt that made
them (in a sync ``fn``'s thread too). A failed attempt that is retried carries a
``batchkit.retry`` event with the wait (``batchkit.retry_in``), so the attempt's latency
and the backoff are never one span. The first ``max_child_spans`` items are children of the
run span; every later item (or every item, with ``item_spans="linked"``) starts a trace of
its own, linked to the run span, and its retries nest under its first attempt — a 100k-item
run is not a 100k-span trace.

**Metrics** (the run's ``name=`` in attribute ``batchkit.name``; none collides with
:mod:`batchkit.prometheus`'s names, so both can be used at once):

============================  ===============  ==============================================
``batchkit.item.duration``    histogram (s)    first attempt's start to the item's end, by
                                               ``batchkit.outcome`` (skipped items excluded)
``batchkit.items``            counter          items finished, by ``batchkit.outcome``
``batchkit.items.in_flight``  up-down counter  attempts running now
``batchkit.attempts``         counter          attempts ended, by ``batchkit.result``
============================  ===============  ==============================================

Only the OpenTelemetry *API* is needed. With no SDK configured (the API's default providers),
a run is detected as untraced once, at its start, and costs nothing more.

On the Dask backend (:mod:`batchkit.dask`) the run span and the metrics are made on the
client from the run's events; attempts run on the workers without spans, so the trace stops
at the run span.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final, Literal, cast, final

from ._model.errors import InvalidArgument, MissingExtra, describe
from ._model.events import (
    AttemptFailed,
    DeadlineHit,
    Event,
    ItemFinished,
    ItemsSkipped,
    ItemStarted,
    RunFinished,
    RunStarted,
    RunStopping,
)
from ._model.outcomes import KINDS

if TYPE_CHECKING:
    from collections.abc import Mapping

    from opentelemetry.context import Context
    from opentelemetry.metrics import Counter, Histogram, MeterProvider, UpDownCounter
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._model.attempt import AttemptResult, Job

__all__ = ["DEFAULT_MAX_CHILD_SPANS", "ItemSpans", "OpenTelemetry"]

DEFAULT_MAX_CHILD_SPANS: Final = 1000
"""How many items' attempt spans are children of the run span before items get own traces."""

ItemSpans = Literal["children", "linked"]
"""Where items' attempt spans go: under the run span (up to ``max_child_spans`` items), or
each item in a trace of its own, linked to the run span."""

SCOPE: Final = "batchkit"
"""The instrumentation scope's name (tracer and meter)."""


@final
class OpenTelemetry:
    """Trace runs and item attempts, and record metrics, through the OpenTelemetry API (see
    the module docstring). Pass it in ``observers=``.

    - ``tracer_provider``/``meter_provider``: default, the global ones (``trace.
      set_tracer_provider``). When one is the API's default (no SDK configured), that signal
      is off for the run.
    - ``item_spans``: ``"children"`` (the first ``max_child_spans`` items' attempts are
      children of the run span, later items get own traces linked to it) or ``"linked"``
      (every item its own trace, linked to the run span).
    - ``max_child_spans``: see ``item_spans``.

    Needs ``opentelemetry-api`` (``pip install 'aio-batchkit[otel]'``).
    """

    __slots__ = ("_children", "_instruments", "_meter_provider", "_runs", "_tracer_provider")

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        item_spans: ItemSpans = "children",
        max_child_spans: int = DEFAULT_MAX_CHILD_SPANS,
    ) -> None:
        try:
            # Both now, not at a run's start: the import is the user's set-up, not the run's.
            import opentelemetry.metrics
            import opentelemetry.trace  # noqa: F401
        except ImportError:
            raise MissingExtra("OpenTelemetry", "otel", "opentelemetry-api") from None
        if item_spans not in ("children", "linked"):
            raise InvalidArgument(
                f"item_spans must be 'children' or 'linked', got {item_spans!r}\nHINT: "
                "'children' nests item attempts under the run span up to max_child_spans"
            )
        if type(max_child_spans) is not int or max_child_spans < 0:
            raise InvalidArgument(
                f"max_child_spans must be an int >= 0, got {max_child_spans!r}\nHINT: "
                f"the default is {DEFAULT_MAX_CHILD_SPANS}; 0 is item_spans='linked'"
            )
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._children = 0 if item_spans == "linked" else max_child_spans
        self._instruments: tuple[object, _Instruments] | None = None
        self._runs: dict[str | None, _Run] = {}

    def __repr__(self) -> str:
        return "OpenTelemetry()"

    def _tracer(self) -> Tracer | None:
        from opentelemetry import trace

        provider = self._tracer_provider or trace.get_tracer_provider()
        # The API's defaults: no SDK was configured, so no span would be recorded.
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return None
        return provider.get_tracer(SCOPE)

    def _metrics(self) -> _Instruments | None:
        from opentelemetry import metrics

        provider = self._meter_provider or metrics.get_meter_provider()
        # The API's defaults (its proxy is private, so it is told by name).
        if isinstance(provider, metrics.NoOpMeterProvider) or (
            type(provider).__name__ == "_ProxyMeterProvider"
        ):
            return None
        cached = self._instruments
        if cached is None or cached[0] is not provider:
            cached = self._instruments = (provider, _Instruments(provider))
        return cached[1]

    def start_run(self, name: str | None, settings: Mapping[str, object]) -> _Run | None:
        """This run's hook, or ``None`` when neither traces nor metrics are configured."""
        tracer, instruments = self._tracer(), self._metrics()
        if tracer is None and instruments is None:
            return None
        return _Run(tracer, instruments, name, settings, self._children)

    def __call__(self, event: Event) -> None:
        # The local engine hears each run through its own start_run hook, not here. A
        # backend that calls observers directly (Dask, on the client) comes here: a run is
        # told apart by its name, so concurrent Dask runs sharing one observer need names
        # of their own.
        if type(event) is RunStarted:
            run = self.start_run(event.name, {})
            if run is None:
                return
            self._runs[event.name] = run
        run = self._runs.get(event.name)
        if run is not None:
            run(event)
            if type(event) is RunFinished:
                del self._runs[event.name]


class _Instruments:
    """The four instruments, made once per meter provider."""

    __slots__ = ("attempts", "duration", "in_flight", "items")

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter(SCOPE)
        self.duration: Histogram = meter.create_histogram(
            "batchkit.item.duration",
            unit="s",
            description="From an item's first attempt start to its end, by outcome.",
        )
        self.items: Counter = meter.create_counter(
            "batchkit.items", unit="{item}", description="Items finished, by outcome."
        )
        self.in_flight: UpDownCounter = meter.create_up_down_counter(
            "batchkit.items.in_flight", unit="{attempt}", description="Attempts running now."
        )
        self.attempts: Counter = meter.create_counter(
            "batchkit.attempts", unit="{attempt}", description="Attempts ended, by result."
        )


@final
class _Run:
    """One run's spans and metrics: the observer of its events and the hook of its attempts
    (a :class:`batchkit._model.seams.RunHook`)."""

    __slots__ = (
        "_attrs",
        "_by_kind",
        "_children_left",
        "_in_flight",
        "_linked",
        "_m",
        "_name",
        "_parent",
        "_pending",
        "_result",
        "_settings",
        "_span",
        "_tracer",
    )

    def __init__(
        self,
        tracer: Tracer | None,
        instruments: _Instruments | None,
        name: str | None,
        settings: Mapping[str, object],
        children: int,
    ) -> None:
        self._tracer = tracer
        self._m = instruments
        self._name = name
        self._settings = settings
        self._children_left = children
        self._span: Span | None = None
        self._parent: Context | None = None
        self._linked: dict[int, Span] = {}
        """Items with a trace of their own: their first attempt's span, for their retries."""
        self._pending: dict[int, tuple[Span, int]] = {}
        """Failed attempts' spans, ended when their ``AttemptFailed`` says if a retry follows."""
        self._in_flight = 0
        self._attrs = {"batchkit.name": name or "unnamed"}
        self._by_kind = {k: {**self._attrs, "batchkit.outcome": k} for k in KINDS}
        self._result = {k: {**self._attrs, "batchkit.result": k} for k in KINDS}

    # -- the hook, in the attempt's task ------------------------------------------------
    def enter_attempt(self, job: Job) -> object:
        tracer = self._tracer
        if tracer is None:
            return None
        from opentelemetry import context, trace

        index = job.index
        links = None
        parent = self._parent
        if job.attempt == 1 and self._children_left > 0:
            self._children_left -= 1
        elif job.attempt == 1 or index in self._linked:
            # An item of its own trace: a root (or under its first attempt), linked to the run.
            first = self._linked.get(index)
            parent = trace.set_span_in_context(first) if first is not None else context.Context()
            if self._span is not None:
                links = [trace.Link(self._span.get_span_context())]
        attributes: dict[str, Any] = {
            "batchkit.name": self._attrs["batchkit.name"],
            "batchkit.item.index": index,
            "batchkit.attempt": job.attempt,
        }
        if job.key is not None:
            attributes["batchkit.item.key"] = job.key
        span = tracer.start_span(
            "batchkit.attempt", context=parent, attributes=attributes, links=links
        )
        if job.attempt == 1 and parent is not self._parent:
            self._linked[index] = span
        return span, context.attach(trace.set_span_in_context(span)), index

    def exit_attempt(self, token: object, result: AttemptResult | None) -> None:
        if token is None:
            return
        from opentelemetry import context
        from opentelemetry.trace import StatusCode

        span, attached, index = cast("tuple[Span, object, int]", token)
        context.detach(attached)  # type: ignore[arg-type]
        if result is None:
            span.set_attribute("batchkit.outcome", "raised")
            span.set_status(StatusCode.ERROR, "the attempt raised (a cancel or BaseException)")
            span.end()
            return
        kind = result.kind
        span.set_attribute("batchkit.outcome", kind)
        if kind == "success":
            span.end()
            return
        if result.error is not None:
            span.record_exception(result.error)
            span.set_status(StatusCode.ERROR, describe(result.error))
        else:
            span.set_status(StatusCode.ERROR, kind)
        if kind in ("error", "timeout"):
            # Ended when its AttemptFailed tells whether a retry follows (and after how long).
            self._pending[index] = (span, time.time_ns())
        else:
            span.end()

    # -- the observer -------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        m = self._m
        if type(event) is ItemStarted:
            self._moved(event.in_flight)
        elif type(event) is ItemFinished:
            outcome = event.outcome
            kind = outcome.kind
            index = outcome.index
            self._end_pending(index, None)
            self._linked.pop(index, None)
            if m is not None:
                m.items.add(1, self._by_kind[kind])
                if kind != "skipped":
                    m.duration.record(outcome.elapsed, self._by_kind[kind])
                if kind in ("success", "cancelled"):
                    m.attempts.add(1, self._result[kind])
            self._moved(event.in_flight)
        elif type(event) is AttemptFailed:
            self._end_pending(event.index, event.retry_in)
            if m is not None:
                m.attempts.add(1, self._result[event.kind])
        elif type(event) is ItemsSkipped:
            if m is not None:
                m.items.add(len(event.indices), self._by_kind["skipped"])
        elif type(event) is RunStarted:
            self._started(event)
        elif type(event) is RunStopping:
            if self._span is not None:
                self._span.add_event("batchkit.stopping", {"batchkit.stop_reason": event.reason})
        elif type(event) is DeadlineHit:
            if self._span is not None:
                self._span.add_event("batchkit.deadline", {"batchkit.in_flight": event.in_flight})
        elif type(event) is RunFinished:
            self._finished(event)

    def _moved(self, in_flight: int) -> None:
        if self._m is not None and in_flight != self._in_flight:
            self._m.in_flight.add(in_flight - self._in_flight, self._attrs)
        self._in_flight = in_flight

    def _end_pending(self, index: int, retry_in: float | None) -> None:
        pending = self._pending.pop(index, None)
        if pending is None:
            return
        span, ended = pending
        if retry_in is not None:
            span.add_event("batchkit.retry", {"batchkit.retry_in": retry_in}, timestamp=ended)
        span.end(end_time=ended)

    def _started(self, event: RunStarted) -> None:
        if self._tracer is None:
            return
        from opentelemetry import trace

        attributes: dict[str, Any] = {
            "batchkit.name": self._attrs["batchkit.name"],
            **{f"batchkit.{k}": v for k, v in self._settings.items()},
        }
        if event.total is not None:
            attributes["batchkit.total"] = event.total
        name = f"batchkit.run {self._name}" if self._name else "batchkit.run"
        self._span = self._tracer.start_span(name, attributes=attributes)
        self._parent = trace.set_span_in_context(self._span)

    def _finished(self, event: RunFinished) -> None:
        for index in list(self._pending):
            self._end_pending(index, None)
        self._moved(0)
        span = self._span
        if span is None:
            return
        from opentelemetry.trace import StatusCode

        report = event.report
        for kind, count in report.counts.items():
            span.set_attribute(f"batchkit.items.{kind}", count)
        span.set_attribute("batchkit.items.total", report.total)
        if report.stop_reason is not None:
            span.set_attribute("batchkit.stop_reason", report.stop_reason)
            span.set_status(StatusCode.ERROR, f"the run stopped early: {report.stop_reason}")
        span.end()
