"""Prometheus metrics for batch runs (extra ``aio-batchkit[prometheus]``).

::

    from batchkit.prometheus import PrometheusObserver

    report = await batch_process(items, fn, name="predictions",
                                 observers=[PrometheusObserver()])

Metrics (``namespace`` defaults to ``batchkit``; every one has the ``batch`` label, the run's
``name=`` or ``"unnamed"``):

========================================  =========  ===========================================
``batchkit_items_total``                  counter    items finished, label ``outcome``: success,
                                                     error, timeout, cancelled, skipped
``batchkit_attempts_total``               counter    attempts started (retries included)
``batchkit_retries_total``                counter    failed attempts that will be retried
``batchkit_item_duration_seconds``        histogram  per item, first attempt's start to its end
                                                     (label ``outcome``; skipped items excluded)
``batchkit_in_flight``                    gauge      attempts running now
``batchkit_concurrency_limit``            gauge      the current limit (moves with ``Adaptive``)
``batchkit_runs_total``                   counter    finished runs, label ``stop_reason``
                                                     (``none`` when the run went through)
========================================  =========  ===========================================
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Final, final

from ._model.errors import InvalidArgument, MissingExtra
from ._model.events import (
    AttemptFailed,
    Event,
    ItemFinished,
    ItemsSkipped,
    ItemStarted,
    LimitChanged,
    RunFinished,
    RunStarted,
)
from ._model.outcomes import Success

if TYPE_CHECKING:
    from collections.abc import Sequence

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DEFAULT_BUCKETS", "PrometheusObserver"]

DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
"""Item latency buckets in seconds: from a fast query to a slow model call."""

UNNAMED: Final = "unnamed"


class _Metrics:
    """The collectors of one (registry, namespace, label name); registered once."""

    __slots__ = (
        "attempts",
        "buckets",
        "duration",
        "in_flight",
        "items",
        "limit",
        "retries",
        "runs",
    )

    def __init__(
        self,
        registry: CollectorRegistry,
        namespace: str,
        label: str,
        buckets: tuple[float, ...],
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        kw: dict[str, Any] = {"namespace": namespace, "registry": registry}
        self.buckets = buckets
        self.items: Counter = Counter(
            "items", "Items finished, by outcome.", [label, "outcome"], **kw
        )
        self.attempts: Counter = Counter(
            "attempts", "Attempts started, retries included.", [label], **kw
        )
        self.retries: Counter = Counter(
            "retries", "Failed attempts that will be retried.", [label], **kw
        )
        self.duration: Histogram = Histogram(
            "item_duration_seconds",
            "Seconds from an item's first attempt start to its end, by outcome.",
            [label, "outcome"],
            buckets=buckets,
            **kw,
        )
        self.in_flight: Gauge = Gauge("in_flight", "Attempts running now.", [label], **kw)
        self.limit: Gauge = Gauge(
            "concurrency_limit", "The current concurrency limit.", [label], **kw
        )
        self.runs: Counter = Counter(
            "runs", "Runs finished, by stop reason.", [label, "stop_reason"], **kw
        )


# Collectors can be registered only once per registry; observers share them.
_cache: weakref.WeakKeyDictionary[CollectorRegistry, dict[tuple[str, str], _Metrics]] = (
    weakref.WeakKeyDictionary()
)
_cache_lock = threading.Lock()


def _metrics(
    registry: CollectorRegistry, namespace: str, label: str, buckets: tuple[float, ...]
) -> _Metrics:
    with _cache_lock:
        per_registry = _cache.setdefault(registry, {})
        metrics = per_registry.get((namespace, label))
        if metrics is None:
            try:
                metrics = _Metrics(registry, namespace, label, buckets)
            except ValueError as e:  # prometheus_client: "Duplicated timeseries"
                raise InvalidArgument(
                    f"{e}\nHINT: something else registered {namespace}_* metrics on this "
                    "registry; pass PrometheusObserver(namespace=...) to use other names"
                ) from e
            per_registry[(namespace, label)] = metrics
        elif metrics.buckets != buckets:
            raise InvalidArgument(
                f"the {namespace}_item_duration_seconds histogram is already registered with "
                f"buckets {metrics.buckets}, not {buckets}\nHINT: pass the same buckets to "
                "every PrometheusObserver on a registry, or use another namespace"
            )
        return metrics


class _Children:
    """The labelled children of one batch name, looked up once rather than per event."""

    __slots__ = ("attempts", "duration", "in_flight", "items", "limit", "retries")

    def __init__(self, metrics: _Metrics, name: str) -> None:
        self.attempts = metrics.attempts.labels(name)
        self.retries = metrics.retries.labels(name)
        self.in_flight = metrics.in_flight.labels(name)
        self.limit = metrics.limit.labels(name)
        self.items = {
            kind: metrics.items.labels(name, kind)
            for kind in ("success", "error", "timeout", "cancelled", "skipped")
        }
        self.duration = {
            kind: metrics.duration.labels(name, kind)
            for kind in ("success", "error", "timeout", "cancelled")
        }


def _check_name(arg: str, value: object) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise InvalidArgument(f"{arg} must be a metric name part like 'batchkit', got {value!r}")


@final
class PrometheusObserver:
    """Record runs as Prometheus metrics (see the module docstring for the list).

    - ``registry``: where to register (default: ``prometheus_client.REGISTRY``). Any number
      of observers may share a registry; the metrics are registered once.
    - ``namespace``: the metric name prefix.
    - ``name_label``: the label holding the run's ``name=``.
    - ``buckets``: the item latency histogram's buckets, in seconds.

    Needs ``prometheus-client`` (``pip install 'aio-batchkit[prometheus]'``).
    """

    __slots__ = ("_children", "_metrics")

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "batchkit",
        name_label: str = "batch",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        try:
            import prometheus_client
        except ImportError:
            raise MissingExtra("PrometheusObserver", "prometheus", "prometheus-client") from None
        _check_name("namespace", namespace)
        _check_name("name_label", name_label)
        if name_label in ("outcome", "stop_reason"):
            raise InvalidArgument(f"name_label {name_label!r} clashes with a metric's own label")
        if registry is None:
            registry = prometheus_client.REGISTRY
        self._metrics = _metrics(registry, namespace, name_label, tuple(map(float, buckets)))
        self._children: dict[str | None, _Children] = {}

    def __repr__(self) -> str:
        return "PrometheusObserver()"

    def _for(self, name: str | None) -> _Children:
        children = self._children.get(name)
        if children is None:
            children = self._children[name] = _Children(self._metrics, name or UNNAMED)
        return children

    def __call__(self, event: Event) -> None:
        if type(event) is ItemStarted:
            c = self._for(event.name)
            c.attempts.inc()
            c.in_flight.set(event.in_flight)
        elif type(event) is ItemFinished:
            c = self._for(event.name)
            outcome = event.outcome
            kind = "success" if type(outcome) is Success else outcome.kind
            c.items[kind].inc()
            if kind != "skipped":
                c.duration[kind].observe(outcome.elapsed)
            c.in_flight.set(event.in_flight)
        elif type(event) is ItemsSkipped:
            self._for(event.name).items["skipped"].inc(len(event.indices))
        elif type(event) is AttemptFailed:
            if event.retry_in is not None:
                self._for(event.name).retries.inc()
        elif type(event) is LimitChanged:
            self._for(event.name).limit.set(event.new)
        elif type(event) is RunStarted:
            c = self._for(event.name)
            c.limit.set(event.concurrency)
            c.in_flight.set(0)
        elif type(event) is RunFinished:
            self._for(event.name).in_flight.set(0)
            reason = event.report.stop_reason or "none"
            self._metrics.runs.labels(event.name or UNNAMED, reason).inc()
