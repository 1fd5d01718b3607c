"""``breaker=Breaker(...)``: circuits open after consecutive failures, skip their items
(``circuit_open``, not counted by the failure thresholds), let one probe through after the
cool-down, and are carried to the next run through the store. In virtual time; the breaker's
clock is the loop's, so a cool-down across runs is exact."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from batchkit import (
    Backoff,
    Breaker,
    Failure,
    InvalidArgument,
    ItemSkipped,
    JsonValue,
    LimitGroup,
    MemoryStateStore,
    Retry,
    StateEntry,
    StateStore,
    batch_process,
    stream,
)

from ..helpers import now

if TYPE_CHECKING:
    from collections.abc import Mapping

pytestmark = pytest.mark.looptime

DOWN = 100  # items below DOWN fail


async def upstream(i: int) -> int:
    await asyncio.sleep(1)
    if i < DOWN:
        raise ConnectionError(i)
    return i


def breaker(store: StateStore, **kw: Any) -> Breaker:
    kw.setdefault("open_after", 3)
    kw.setdefault("cool_down", 10.0)
    return Breaker(store, name="up", clock=now, **kw)


async def test_opens_after_n_failures_and_skips_without_counting_them() -> None:
    store = MemoryStateStore()
    report = await batch_process(
        range(10), upstream, concurrency=1, breaker=breaker(store), max_failures=4
    )
    assert [o.kind for o in report] == ["error"] * 3 + ["skipped"] * 7
    assert report.stop_reason is None  # the 7 skipped items are not failures
    skipped = report[5]
    assert isinstance(skipped, Failure)
    error = skipped.error
    assert isinstance(error, ItemSkipped)
    assert error.reason == "circuit_open"
    assert now() == 3.0  # no skipped item waited for anything
    entry = await store.get("batchkit/breaker/up")
    assert entry is not None
    assert entry.value == {"": {"failures": 3, "opened_at": 3.0}}


async def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    items = [1, 2, 200, 3, 4, 200, 5]
    report = await batch_process(
        items, upstream, concurrency=1, breaker=breaker(MemoryStateStore())
    )
    assert "skipped" not in [o.kind for o in report]


async def test_half_open_lets_one_probe_through_and_its_failure_reopens() -> None:
    store = MemoryStateStore()
    b = breaker(store, cool_down=5.0)
    starts: list[float] = []

    async def slow_down(i: int) -> int:
        starts.append(now())
        await asyncio.sleep(1)
        if now() < 20:
            raise ConnectionError(i)
        return i

    # 4 workers: 3 failures at t=1 open the circuit; items wait 1 s apart (the input is slow).
    async def items() -> Any:
        for i in range(30):
            await asyncio.sleep(1)
            yield i

    report = await batch_process(items(), slow_down, concurrency=4, breaker=b)
    kinds = [o.kind for o in report]
    # t=1..3: items 0..2 start and fail (open at t=4); probes every 5 s after each reopening
    # each a single attempt: t=9 (fails at 10, reopens), t=15 (fails), t=21 succeeds.
    assert starts == [1.0, 2.0, 3.0, 9.0, 15.0, 21.0, 22.0, 23.0, 24.0, 25.0, 26.0, 27.0, 28.0,
                      29.0, 30.0]  # fmt: skip
    assert kinds.count("error") == 5
    assert kinds.count("success") == 10
    assert kinds.count("skipped") == 15


async def test_only_one_probe_at_a_time_while_half_open() -> None:
    b = breaker(MemoryStateStore(), open_after=1, cool_down=5.0)
    starts: list[float] = []

    async def probe(i: int) -> int:
        starts.append(now())
        if now() < 1:
            await asyncio.sleep(1)
            raise ConnectionError(i)
        await asyncio.sleep(10)  # the probe is slow: later items find it in flight
        return i

    async def items() -> Any:
        for i in range(20):
            yield i
            await asyncio.sleep(0.5)

    report = await batch_process(items(), probe, concurrency=10, breaker=b)
    # t=0 and 0.5: closed, both fail (open at t=1); t=1..5.5 open, skipped; t=6 the probe
    # (item 12); t=6.5..9.5: half-open with the probe in flight, so items 13..19 wait for its
    # verdict and start when it succeeds, at t=16.
    assert [o.kind for o in report] == ["error"] * 2 + ["skipped"] * 10 + ["success"] * 8
    assert starts == [0.0, 0.5, 6.0] + [16.0] * 7
    assert now() == 26.0


async def test_an_attempt_from_before_the_opening_is_no_verdict_on_the_probe() -> None:
    # Item 1 started while the circuit was closed and fails at t=3, while the probe (item 2,
    # t=2..4) is in flight: that is not the probe failing, so it neither reopens the circuit
    # nor lets a second probe start half a second later.
    b = breaker(MemoryStateStore(), open_after=1, cool_down=0.5)
    attempts: list[tuple[int, float, float]] = []
    latency = [1, 3, 2, 1, 1]

    async def down(i: int) -> int:
        start = now()
        await asyncio.sleep(latency[i])
        attempts.append((i, start, now()))
        raise ConnectionError(i)

    async def items() -> Any:
        for i, at in enumerate([0, 0, 2, 3.5, 3.5]):
            await asyncio.sleep(at - now())
            yield i

    report = await batch_process(items(), down, concurrency=2, breaker=b)
    assert [o.kind for o in report] == ["error"] * 3 + ["skipped"] * 2
    # Item 0 opens it at t=1; item 2 probes at 2 and fails at 4, reopening it; item 3 waited
    # for that verdict from 3.5 and is skipped at 4, item 4 (no free slot before) too.
    assert sorted(attempts) == [(0, 0.0, 1.0), (1, 0.0, 3.0), (2, 2.0, 4.0)]
    assert now() == 4.0


async def test_a_tick_that_starts_half_open_waits_for_the_probe_then_runs_everything() -> None:
    # The tick of a cron job after an outage: the first item probes, the others wait for its
    # verdict instead of being skipped, so the tick that finds the upstream back does its work.
    store = MemoryStateStore()
    await batch_process(range(3), upstream, concurrency=1, breaker=breaker(store))  # opens
    await asyncio.sleep(10)  # t=13, past the cool-down
    starts: list[float] = []

    async def back(i: int) -> int:
        starts.append(now())
        await asyncio.sleep(1)
        return i

    report = await batch_process(range(9), back, concurrency=4, breaker=breaker(store))
    assert [o.kind for o in report] == ["success"] * 9
    # Items 1..3 waited in their slots; item 4 takes the probe's slot when it ends.
    assert starts == [13.0] + [14.0] * 4 + [15.0] * 4


async def test_a_failed_probe_skips_the_items_that_waited_for_it() -> None:
    store = MemoryStateStore()
    await batch_process(range(3), upstream, concurrency=1, breaker=breaker(store))  # opens
    await asyncio.sleep(10)  # t=13
    report = await batch_process(range(9), upstream, concurrency=4, breaker=breaker(store))
    assert [o.kind for o in report] == ["error"] + ["skipped"] * 8
    assert now() == 14.0  # the waiters were skipped when the probe failed


async def test_a_probe_that_does_not_count_hands_over_to_a_waiting_item() -> None:
    store = MemoryStateStore()
    b = breaker(store, on=("error",))
    await batch_process(range(3), upstream, concurrency=1, breaker=b)  # opens at t=3
    await asyncio.sleep(10)  # t=13
    starts: list[float] = []

    async def first_hangs(i: int) -> int:
        starts.append(now())
        await asyncio.sleep(5 if i == 0 else 1)  # item 0 times out: not a kind in ``on``
        return i

    report = await batch_process(range(4), first_hangs, concurrency=4, timeout=2, breaker=b)
    assert [o.kind for o in report] == ["timeout"] + ["success"] * 3
    assert starts == [13.0, 15.0, 16.0, 16.0]  # item 1 probed next, then 2 and 3


async def test_state_and_cool_down_carry_to_the_next_run() -> None:
    store = MemoryStateStore()
    first = await batch_process(range(5), upstream, concurrency=1, breaker=breaker(store))
    assert [o.kind for o in first] == ["error"] * 3 + ["skipped"] * 2  # opened at t=3
    second = await batch_process([200, 200], upstream, concurrency=1, breaker=breaker(store))
    assert [o.kind for o in second] == ["skipped", "skipped"]  # t=3: still cooling down
    await asyncio.sleep(10)  # t=13: the next tick, past the cool-down
    third = await batch_process([200, 1, 2, 3], upstream, concurrency=1, breaker=breaker(store))
    assert [o.kind for o in third] == ["success", "error", "error", "error"]  # recovered
    entry = await store.get("batchkit/breaker/up")
    assert entry is not None
    assert entry.value == {"": {"failures": 3, "opened_at": 17.0}}


async def test_a_failed_probe_of_the_next_run_costs_one_attempt() -> None:
    store = MemoryStateStore()
    await batch_process(range(3), upstream, concurrency=1, breaker=breaker(store))
    await asyncio.sleep(10)
    report = await batch_process(range(10), upstream, concurrency=4, breaker=breaker(store))
    assert [o.kind for o in report].count("error") == 1  # the probe
    assert [o.kind for o in report].count("skipped") == 9


async def test_circuits_per_key() -> None:
    store = MemoryStateStore()
    b = breaker(store, by=lambda i: "down" if i < DOWN else "up")
    items = [1, 200, 2, 201, 3, 202, 4, 203]
    report = await batch_process(items, upstream, concurrency=1, breaker=b)
    assert [o.kind for o in report] == ["error", "success"] * 3 + ["skipped", "success"]


@pytest.mark.timeout(10)  # the groups' places of a skipped item were never given back: a hang
async def test_a_circuit_per_limit_group_through_the_group_s_by() -> None:
    def host(i: int) -> str:
        return "down" if i < DOWN else "up"

    groups = [LimitGroup(by=host, concurrency=1)]
    b = breaker(MemoryStateStore(), by=host)
    items = [1, 200, 2, 201, 3, 202, 4, 203, 5, 204]
    report = await batch_process(items, upstream, concurrency=2, groups=groups, breaker=b)
    kinds = [o.kind for o in report]
    assert kinds[1::2] == ["success"] * 5  # the other group's circuit stays closed
    assert kinds[0::2] == ["error"] * 3 + ["skipped"] * 2


@pytest.mark.parametrize("hold_slot", [True, False])
async def test_every_attempt_of_a_retried_item_passes_the_breaker(hold_slot: bool) -> None:
    store = MemoryStateStore()
    backoff = Backoff(initial=1, jitter=False)
    retry = Retry(attempts=5, backoff=backoff, hold_slot=hold_slot)
    report = await batch_process([1], upstream, retry=retry, breaker=breaker(store))
    failure = report[0]
    assert failure.kind == "skipped"
    assert failure.attempts == 3  # the 4th attempt found the circuit open
    assert isinstance(failure.error, ItemSkipped)
    assert isinstance(failure.error.__cause__, ConnectionError)


async def test_only_the_kinds_in_on_count() -> None:
    async def slow(i: int) -> int:
        await asyncio.sleep(5)
        return i

    b = breaker(MemoryStateStore(), on=("error",))
    report = await batch_process(range(5), slow, timeout=1, concurrency=1, breaker=b)
    assert [o.kind for o in report] == ["timeout"] * 5


async def test_a_by_that_raises_fails_its_item() -> None:
    def by(i: int) -> str:
        raise KeyError(i)

    report = await batch_process([200], upstream, breaker=breaker(MemoryStateStore(), by=by))
    assert report[0].kind == "error"
    assert isinstance(report[0].error, KeyError)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": ""}, "Breaker.name"),
        ({"name": "x", "open_after": 0}, "open_after"),
        ({"name": "x", "cool_down": -1}, "cool_down"),
        ({"name": "x", "on": ("cancelled",)}, "Breaker.on"),
        ({"name": "x", "by": 3}, "Breaker.by"),
    ],
)
def test_bad_arguments_are_refused(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        Breaker(MemoryStateStore(), **kw)


def test_a_store_must_be_a_state_store() -> None:
    with pytest.raises(InvalidArgument, match=r"Breaker\.store"):
        Breaker(object(), name="x")  # type: ignore[arg-type]


async def test_breaker_must_be_a_breaker() -> None:
    with pytest.raises(InvalidArgument, match="breaker must be"):
        await batch_process([1], upstream, breaker=3)  # type: ignore[call-overload]


class BrokenStore:
    async def get(self, key: str) -> StateEntry | None:
        raise OSError("database down")

    async def compare_and_set(self, key: str, value: object, *, expected: int) -> None:
        raise OSError("database down")


async def test_a_failing_store_never_fails_the_run(caplog: pytest.LogCaptureFixture) -> None:
    broken = breaker(BrokenStore())  # type: ignore[arg-type]
    report = await batch_process(range(5), upstream, concurrency=1, breaker=broken)
    assert [o.kind for o in report] == ["error"] * 3 + ["skipped"] * 2  # closed, then opened
    assert "could not read the breaker" in caplog.text
    assert "could not write the breaker" in caplog.text


async def test_runs_keep_each_others_circuits() -> None:
    store = MemoryStateStore()
    await store.compare_and_set(
        "batchkit/breaker/up", {"other": {"failures": 1, "opened_at": None}}, expected=0
    )
    await batch_process(range(3), upstream, concurrency=1, breaker=breaker(store))
    entry = await store.get("batchkit/breaker/up")
    assert entry is not None
    assert entry.value == {
        "": {"failures": 3, "opened_at": 3.0},
        "other": {"failures": 1, "opened_at": None},
    }


async def test_stream_passes_the_breaker_too() -> None:
    store = MemoryStateStore()
    async with stream(range(5), upstream, concurrency=1, breaker=breaker(store)) as outcomes:
        kinds = [o.kind async for o in outcomes]
    assert kinds == ["error"] * 3 + ["skipped"] * 2
    entry = await store.get("batchkit/breaker/up")
    assert entry is not None
    assert entry.value == {"": {"failures": 3, "opened_at": 3.0}}


class CountingStore:
    """A memory store that counts the calls a run makes."""

    def __init__(self) -> None:
        self.inner = MemoryStateStore(clock=now)
        self.calls = 0

    async def get(self, key: str) -> StateEntry | None:
        self.calls += 1
        return await self.inner.get(key)

    async def compare_and_set(
        self, key: str, value: JsonValue, *, expected: int
    ) -> StateEntry | None:
        self.calls += 1
        return await self.inner.compare_and_set(key, value, expected=expected)

    async def set_many(self, values: Mapping[str, JsonValue]) -> None:
        self.calls += 1
        await self.inner.set_many(values)

    async def scan(self, prefix: str) -> list[StateEntry]:
        self.calls += 1
        return await self.inner.scan(prefix)

    async def prune(self, older_than: float, *, prefix: str = "") -> int:
        self.calls += 1
        return await self.inner.prune(older_than, prefix=prefix)


@pytest.mark.parametrize("n", [40, 4000])
async def test_store_calls_per_run_do_not_grow_with_the_items(n: int) -> None:
    # Circuit "down" opens once (after 3 errors) and cools down past the run's end; "up"
    # succeeds throughout. Then a second run, in which no circuit changes, writes nothing.
    def by(i: int) -> str:
        return "down" if i < DOWN else "up"

    store = CountingStore()
    items = [i % 2 * DOWN + i // 2 % DOWN for i in range(n)]  # alternating down / up
    b = breaker(store, by=by, cool_down=3600.0)
    first = await batch_process(items, upstream, concurrency=8, breaker=b)
    assert [o.kind for o in first].count("error") == 4  # 3, and one in flight when it opened
    # One read before the first item; one read + write when "down" opened; one read + write
    # at the end.
    assert store.calls == 5
    store.calls = 0
    await batch_process([200] * n, upstream, concurrency=8, breaker=b)
    assert store.calls == 1  # the read: nothing this run did changed a circuit
