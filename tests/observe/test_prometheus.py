"""PrometheusObserver: metrics read back from a fresh registry."""

from __future__ import annotations

import asyncio
import sys

import pytest
from prometheus_client import CollectorRegistry

from batchkit import Adaptive, InvalidArgument, MissingExtra, Retry, batch_process
from batchkit.prometheus import PrometheusObserver
from batchkit.testing import instant

pytestmark = pytest.mark.looptime


class Flaky(Exception):
    pass


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@instant()
async def test_counts_latency_gauges_and_runs() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry=registry)
    tries: dict[int, int] = {}
    seen_in_flight: list[float | None] = []

    async def work(n: int) -> int:
        tries[n] = tries.get(n, 0) + 1
        seen_in_flight.append(sample(registry, "batchkit_in_flight", batch="p"))
        await asyncio.sleep(n)
        if n == 2 and tries[n] == 1:
            raise Flaky  # retried once, then succeeds
        if n == 3:
            raise ValueError("always")
        if n == 9:
            await asyncio.sleep(100)  # times out
        return n

    report = await batch_process(
        [1, 2, 3, 9],
        work,
        concurrency=2,
        timeout=10,
        retry=Retry(attempts=2, retry_on=Flaky, timeouts=False),
        name="p",
        observers=[observer],
    )
    assert report.counts == {
        "success": 2,
        "error": 1,
        "timeout": 1,
        "cancelled": 0,
        "skipped": 0,
        "lost": 0,
    }

    def items(outcome: str) -> float | None:
        return sample(registry, "batchkit_items_total", batch="p", outcome=outcome)

    assert [items(k) for k in ("success", "error", "timeout", "cancelled", "skipped")] == [
        2.0,
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert sample(registry, "batchkit_attempts_total", batch="p") == 5.0
    assert sample(registry, "batchkit_retries_total", batch="p") == 1.0

    # Latency per outcome: item 2 took 2 + 2 s over its two attempts.
    def latency(stat: str, outcome: str, **labels: str) -> float | None:
        name = f"batchkit_item_duration_seconds_{stat}"
        return sample(registry, name, batch="p", outcome=outcome, **labels)

    assert latency("count", "success") == 2
    assert latency("sum", "success") == 5
    assert latency("sum", "timeout") == 10
    assert latency("bucket", "success", le="2.5") == 1
    # The gauge counted the attempt itself when fn read it (set at ItemStarted).
    assert max(x or 0 for x in seen_in_flight) == 2
    assert sample(registry, "batchkit_in_flight", batch="p") == 0
    assert sample(registry, "batchkit_concurrency_limit", batch="p") == 2
    assert sample(registry, "batchkit_runs_total", batch="p", stop_reason="none") == 1


async def test_two_observers_share_a_registry_and_an_unnamed_run() -> None:
    registry = CollectorRegistry()
    first, second = PrometheusObserver(registry=registry), PrometheusObserver(registry=registry)

    async def work(n: int) -> int:
        return n

    await batch_process([1, 2, 3], work, observers=[first, second])
    assert sample(registry, "batchkit_items_total", batch="unnamed", outcome="success") == 6


async def test_namespace_label_name_and_deadline_stop() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry=registry, namespace="jobs", name_label="job")

    async def work(n: int) -> int:
        await asyncio.sleep(n)
        return n

    await batch_process(
        [1, 10, 10], work, concurrency=1, deadline=5, name="cron", observers=[observer]
    )
    assert sample(registry, "jobs_items_total", job="cron", outcome="cancelled") == 1
    assert sample(registry, "jobs_items_total", job="cron", outcome="skipped") == 1
    # Skipped items never ran: no latency for them.
    assert (
        sample(registry, "jobs_item_duration_seconds_count", job="cron", outcome="skipped") is None
    )
    assert sample(registry, "jobs_runs_total", job="cron", stop_reason="deadline") == 1


async def test_adaptive_limit_gauge_follows_the_limit() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry=registry)

    async def work(n: int) -> int:
        await asyncio.sleep(1)
        return n

    report = await batch_process(
        range(40), work, concurrency=Adaptive(initial=2, max=8), name="a", observers=[observer]
    )
    assert report.limit_changes  # the limit did move
    assert sample(registry, "batchkit_concurrency_limit", batch="a") == report.limit_changes[-1].new


def test_different_buckets_on_one_registry_are_refused() -> None:
    registry = CollectorRegistry()
    PrometheusObserver(registry=registry, buckets=(1, 2))
    PrometheusObserver(registry=registry, buckets=(1.0, 2.0))  # the same, fine
    with pytest.raises(InvalidArgument, match="already registered with buckets"):
        PrometheusObserver(registry=registry, buckets=(1, 5))


def test_names_registered_by_someone_else() -> None:
    from prometheus_client import Counter

    registry = CollectorRegistry()
    Counter("batchkit_items", "not ours", registry=registry)
    with pytest.raises(InvalidArgument, match="namespace="):
        PrometheusObserver(registry=registry)


def test_bad_names() -> None:
    with pytest.raises(InvalidArgument, match="namespace"):
        PrometheusObserver(registry=CollectorRegistry(), namespace="has space")
    with pytest.raises(InvalidArgument, match="clashes"):
        PrometheusObserver(registry=CollectorRegistry(), name_label="outcome")


def test_default_registry() -> None:
    from prometheus_client import REGISTRY

    PrometheusObserver()
    PrometheusObserver()  # twice on the global registry: no "Duplicated timeseries"
    assert "batchkit_items" in REGISTRY._names_to_collectors


def test_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MissingExtra, match=r"pip install 'aio-batchkit\[prometheus\]'"):
        PrometheusObserver()
