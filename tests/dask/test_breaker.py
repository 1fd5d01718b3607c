"""``breaker=`` on the Dask backend: the circuits live on the driver, which does not send the
items of an open circuit, sends a half-open circuit's probe alone and holds the circuit's
other items for its verdict, learns from each chunk's result and writes the circuits back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

import batchkit
from batchkit import Breaker, ItemSkipped, MemoryStateStore, StateStore
from batchkit.dask import DaskBackend

from . import _work

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.timeout(90)

KEY = "batchkit/breaker/up"


@pytest.fixture(autouse=True)
async def _fresh_state(client: Any) -> None:
    await client.run(_work.reset_state)


async def ran(client: Any) -> int:
    """How many items reached a worker, over both workers."""
    states = await client.run(_work.get_state)
    return sum(state.get("ran", 0) for state in states.values())


def breaker(store: StateStore, **kw: Any) -> Breaker:
    return Breaker(store, name="up", open_after=2, cool_down=30, clock=lambda: 100.0, **kw)


async def opened_at(store: StateStore, when: float) -> None:
    assert await store.compare_and_set(KEY, {"": {"failures": 2, "opened_at": when}}, expected=0)


def kinds(report: batchkit.BatchReport[Any, Any]) -> list[str]:
    return [o.kind for o in report]


async def test_an_open_circuit_s_items_are_skipped_on_the_driver_and_never_sent(
    client: Any,
) -> None:
    store = MemoryStateStore()
    await opened_at(store, 90.0)  # 10 s into a 30 s cool-down
    report = await batchkit.batch_process(
        range(6), _work.counted, breaker=breaker(store), backend=DaskBackend(client, chunk_size=2)
    )
    assert kinds(report) == ["skipped"] * 6
    assert len(report.failures) == 6
    for o in report.failures:
        assert isinstance(o.error, ItemSkipped)
        assert o.error.reason == "circuit_open"
    assert report.stop_reason is None
    assert await ran(client) == 0


async def test_failures_open_the_circuit_and_later_items_are_not_sent(client: Any) -> None:
    """One chunk of one item in flight: the circuit opens after the second failure exactly,
    and a following local run with the same store reads it open."""
    store = MemoryStateStore()
    report = await batchkit.batch_process(
        range(6),
        _work.counted_down,
        concurrency=1,
        max_failures=3,  # not reached: skipped items are not failures
        breaker=breaker(store),
        backend=DaskBackend(client, chunk_size=1),
    )
    assert kinds(report) == ["error", "error"] + ["skipped"] * 4
    assert report.stop_reason is None
    assert await ran(client) == 2
    entry = await store.get(KEY)
    assert entry is not None
    assert entry.value == {"": {"failures": 2, "opened_at": 100.0}}
    local = await batchkit.batch_process([1, 2], _work.counted, breaker=breaker(store))
    assert kinds(local) == ["skipped", "skipped"]


async def test_a_half_open_probe_that_succeeds_closes_the_circuit_and_the_rest_run(
    client: Any,
) -> None:
    store = MemoryStateStore()
    await opened_at(store, 0.0)  # cooled down: half-open
    report = await batchkit.batch_process(
        range(6),
        _work.counted,
        concurrency=4,
        breaker=breaker(store),
        backend=DaskBackend(client, chunk_size=3),
    )
    assert kinds(report) == ["success"] * 6
    assert await ran(client) == 6
    entry = await store.get(KEY)
    assert entry is not None
    assert entry.value == {"": {"failures": 0, "opened_at": None}}


async def test_a_failed_probe_reopens_and_the_held_items_are_skipped(client: Any) -> None:
    store = MemoryStateStore()
    await opened_at(store, 0.0)
    report = await batchkit.batch_process(
        range(6),
        _work.counted_down,
        concurrency=4,
        breaker=breaker(store),
        backend=DaskBackend(client, chunk_size=3),
    )
    assert kinds(report) == ["error"] + ["skipped"] * 5  # the probe went alone
    assert await ran(client) == 1
    entry = await store.get(KEY)
    assert entry is not None
    assert entry.value == {"": {"failures": 3, "opened_at": 100.0}}


async def test_circuits_per_key_on_dask(client: Any) -> None:
    """Only the open circuit's items stay on the driver."""
    store = MemoryStateStore()
    assert await store.compare_and_set(KEY, {"odd": {"failures": 2, "opened_at": 90.0}}, expected=0)
    report = await batchkit.batch_process(
        range(6),
        _work.counted,
        breaker=breaker(store, by=lambda x: "odd" if x % 2 else "even"),
        backend=DaskBackend(client, chunk_size=3),
    )
    assert kinds(report) == ["success", "skipped"] * 3
    assert await ran(client) == 3


async def test_an_async_input_s_held_items_wait_for_the_probe(client: Any) -> None:
    """Items read from an async input and held behind the probe are sent once it succeeds,
    each with its own index."""
    store = MemoryStateStore()
    await opened_at(store, 0.0)

    async def items() -> AsyncIterator[int]:
        for i in range(7):
            yield i

    report = await batchkit.batch_process(
        items(),
        _work.counted,
        concurrency=4,
        breaker=breaker(store),
        backend=DaskBackend(client, chunk_size=3),
    )
    assert [(o.index, o.kind) for o in report] == [(i, "success") for i in range(7)]
    assert [o.value for o in report.successes] == list(range(7))
    assert await ran(client) == 7


async def test_a_stop_while_items_are_held_gives_each_one_envelope(client: Any) -> None:
    """The probe fails and ``max_failures=1`` stops the run: the held items end skipped, once."""
    store = MemoryStateStore()
    await opened_at(store, 0.0)
    report = await batchkit.batch_process(
        range(6),
        _work.counted_down,
        concurrency=4,
        max_failures=1,
        breaker=breaker(store),
        backend=DaskBackend(client, chunk_size=3),
    )
    assert [o.index for o in report] == list(range(6))
    assert kinds(report) == ["error"] + ["skipped"] * 5
    assert await ran(client) == 1
