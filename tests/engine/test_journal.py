"""``journal=Journal(store, name)``: each item's final outcome kept by its key, so a later call
resumes (committed successes are not run again; failures and unfinished items are), rows
written in groups and on every way out, cleared by a call in which every item succeeded.
In virtual time, on the in-memory store (the SQL stores and the kill -9 loop are in
``tests/sqlalchemy/test_journal.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchkit import (
    Deadline,
    InvalidArgument,
    Journal,
    JsonValue,
    MemoryStateStore,
    StateStore,
    Success,
    batch_process,
    stream,
)
from batchkit.testing import run_virtual

from ..helpers import Wrapped, now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

pytestmark = pytest.mark.looptime

P = "batchkit/journal/j/"


async def kinds(store: StateStore) -> dict[str, str]:
    return await Journal(store, "j").kinds()


class Counted:
    """An ``fn`` that fails the items in ``failing`` and counts every call."""

    def __init__(self, failing: set[int] = frozenset(), seconds: float = 1.0) -> None:  # type: ignore[assignment]
        self.failing = set(failing)
        self.seconds = seconds
        self.calls: list[int] = []

    async def __call__(self, i: int) -> int:
        self.calls.append(i)
        await asyncio.sleep(self.seconds)
        if i in self.failing:
            raise ValueError(i)
        return i * 10


async def test_a_second_call_resumes_successes_and_reruns_failures() -> None:
    store = MemoryStateStore()
    journal = Journal(store, "j")
    fn = Counted(failing={2, 5})
    first = await batch_process(range(8), fn, key=str, journal=journal, concurrency=4)
    assert first.counts["error"] == 2
    assert first.resumed == 0
    assert await kinds(store) == {str(i): "error" if i in (2, 5) else "success" for i in range(8)}

    fn2 = Counted()
    second = await batch_process(range(8), fn2, key=str, journal=journal, concurrency=4)
    assert sorted(fn2.calls) == [2, 5]  # failures only: the successes were not run again
    assert [o.index for o in second] == list(range(8))  # one envelope per item
    assert all(o.ok for o in second)
    assert second.resumed == 6
    assert [o.resumed for o in second.successes] == [i not in (2, 5) for i in range(8)]
    assert second.values() == [i * 10 for i in range(8)]  # resumed values read back
    resumed = second[0]
    assert isinstance(resumed, Success)
    assert (resumed.attempts, resumed.elapsed) == (1, 0.0)
    assert "8 success (6 resumed)" in second.summary()
    assert second.to_dict()["resumed"] == 6
    assert second.to_dict()["items"][0]["resumed"] is True
    assert "resumed" not in second.to_dict()["items"][2]
    # Every item succeeded: the journal is cleared, the next call runs everything.
    assert await kinds(store) == {}
    fn3 = Counted()
    third = await batch_process(range(8), fn3, key=str, journal=journal)
    assert sorted(fn3.calls) == list(range(8))
    assert third.resumed == 0


async def test_resumed_items_take_no_time_and_no_place() -> None:
    store = MemoryStateStore()
    await store.set_many({P + str(i): {"kind": "success", "attempts": 2} for i in range(5)})
    fn = Counted()
    report = await batch_process(range(10), fn, key=str, journal=Journal(store, "j"), concurrency=5)
    assert sorted(fn.calls) == [5, 6, 7, 8, 9]
    assert now() == 1.0  # the five others ran at once, in one round
    assert [o.attempts for o in report][:5] == [2] * 5
    assert report.values()[:5] == [None] * 5  # no value was stored


async def test_unfinished_items_run_again_after_a_cancelled_call() -> None:
    store = MemoryStateStore()
    journal = Journal(store, "j", flush_every=1000, flush_after=1000.0)
    fn = Counted()
    task = asyncio.ensure_future(
        batch_process(range(10), fn, key=str, journal=journal, concurrency=2)
    )
    await asyncio.sleep(2.5)  # items 0-3 done, 4 and 5 running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Written on the way out, though neither flush_every nor flush_after was reached.
    assert await kinds(store) == {str(i): "success" for i in range(4)}
    fn2 = Counted()
    report = await batch_process(range(10), fn2, key=str, journal=journal, concurrency=2)
    assert sorted(fn2.calls) == list(range(4, 10))
    assert report.resumed == 4


@pytest.mark.parametrize("path", ["deadline", "fn_error", "base_exception", "max_failures"])
async def test_rows_are_written_on_every_way_out(path: str) -> None:
    store = MemoryStateStore()
    journal = Journal(store, "j", flush_every=1000, flush_after=1000.0)

    class Stop(BaseException):
        pass

    async def fn(i: int) -> int:
        await asyncio.sleep(1 + i)
        if path == "base_exception" and i == 3:
            raise Stop
        if path in ("fn_error", "max_failures") and i == 3:
            raise ValueError(i)
        return i

    kw: dict[str, Any] = {"deadline": Deadline(seconds=3.5)} if path == "deadline" else {}
    if path == "max_failures":
        kw["max_failures"] = 1
    if path == "base_exception":
        with pytest.raises(Stop):
            await batch_process(range(6), fn, key=str, journal=journal, concurrency=6)
    else:
        await batch_process(range(6), fn, key=str, journal=journal, concurrency=6, **kw)
    expected = {"0": "success", "1": "success", "2": "success"}
    if path in ("fn_error", "max_failures"):
        expected["3"] = "error"
    if path == "fn_error":
        expected |= {"4": "success", "5": "success"}
    assert await kinds(store) == expected


async def test_rows_are_written_every_flush_every_outcomes() -> None:
    store = Recording()
    journal = Journal(store, "j", flush_every=3, flush_after=1000.0)
    await batch_process(range(7), Counted(), key=str, journal=journal, concurrency=1)
    # 3 + 3 during the run, the last one when the call ends.
    assert store.writes == [(3.0, 3), (6.0, 3), (7.0, 1)]


async def test_rows_are_written_flush_after_seconds_after_the_first_waits() -> None:
    store = Recording()
    journal = Journal(store, "j", flush_every=1000, flush_after=2.5)
    await batch_process(range(7), Counted(), key=str, journal=journal, concurrency=1)
    # Item 0 ends at 1.0: rows of 0-2 written at 3.5; item 3 at 4.0: rows 3-5 at 6.5.
    assert store.writes == [(3.5, 3), (6.5, 3), (7.0, 1)]


class Recording(Wrapped):
    """A store that records when each ``set_many`` wrote how many rows."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, int]] = []

    async def set_many(self, values: Mapping[str, JsonValue]) -> None:
        self.writes.append((now(), len(values)))
        await super().set_many(values)


async def test_a_stream_resumes_too() -> None:
    store = MemoryStateStore()
    await store.set_many({P + "1": {"kind": "success", "attempts": 1, "value": 7}})
    fn = Counted()
    async with stream(range(3), fn, key=str, journal=Journal(store, "j")) as outcomes:
        got = [(o.index, o.ok and o.resumed) async for o in outcomes]
    assert sorted(got) == [(0, False), (1, True), (2, False)]
    assert outcomes.report.resumed == 1
    assert sorted(fn.calls) == [0, 2]


# ------------------------------------------------------------------------------ misuse
async def test_journal_needs_key() -> None:
    fn = Counted()
    with pytest.raises(InvalidArgument, match="journal= needs key="):
        await batch_process(range(3), fn, journal=Journal(MemoryStateStore(), "j"))
    assert fn.calls == []


async def test_duplicate_keys_of_a_list_are_refused_before_any_work() -> None:
    fn = Counted()
    with pytest.raises(InvalidArgument, match=r"duplicate key '1' \(items #1 and #3\)"):
        await batch_process([0, 1, 2, 1], fn, key=str, journal=Journal(MemoryStateStore(), "j"))
    assert fn.calls == []


async def test_a_duplicate_key_of_an_iterator_fails_that_item_and_writes_no_row() -> None:
    store = MemoryStateStore()
    fn = Counted(failing={1})
    report = await batch_process(
        iter([0, 1, 2, 1]), fn, key=str, journal=Journal(store, "j"), concurrency=1
    )
    assert [o.kind for o in report] == ["success", "error", "success", "error"]
    dup = report.failures[1]
    assert isinstance(dup.error, InvalidArgument)
    assert "duplicate key '1' (item #3)" in str(dup.error)
    assert fn.calls == [0, 1, 2]
    assert await kinds(store) == {"0": "success", "1": "error", "2": "success"}


async def test_journal_policy_checks_its_fields() -> None:
    store = MemoryStateStore()
    with pytest.raises(InvalidArgument, match="without '/'"):
        Journal(store, "a/b")
    with pytest.raises(InvalidArgument, match=r"Journal\.store must be a StateStore"):
        Journal(object(), "j")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="mode must be"):
        Journal(store, "j", mode="eager")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="needs a store that writes in a session"):
        Journal(store, "j", mode="transactional")
    with pytest.raises(InvalidArgument, match="flush_every must be an int >= 1"):
        Journal(store, "j", flush_every=0)
    with pytest.raises(InvalidArgument, match="flush_after must be seconds > 0"):
        Journal(store, "j", flush_after=0)
    with pytest.raises(InvalidArgument, match="retain must be seconds > 0 or None"):
        Journal(store, "j", retain=-1)
    with pytest.raises(InvalidArgument, match=r"journal must be batchkit\.Journal"):
        await batch_process([1], Counted(), key=str, journal="j")  # type: ignore[call-overload]


# ------------------------------------------------------------------------------ values
async def test_values_json_by_default_with_a_size_cap(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStateStore()
    journal = Journal(store, "j", max_value_bytes=20)

    async def fn(i: int) -> Any:
        return ["x" * 30, {"a": [1, 2]}, {1, 2}, None][i]

    with caplog.at_level(logging.WARNING, logger="batchkit"):
        await batch_process(range(4), fn, key=str, journal=journal, max_failures=None)
    stored = {e.key[len(P) :]: e.value for e in await store.scan(P)}
    assert stored == {}  # every item succeeded: cleared
    warned = [r for r in caplog.records if "does not store a value" in r.getMessage()]
    assert len(warned) == 1  # once per call


async def test_resumed_values_go_through_load_and_dump() -> None:
    store = MemoryStateStore()
    journal = Journal(store, "j", dump=lambda v: {"n": v.n}, load=load_box)

    async def fn(i: int) -> Box:
        if i == 2:
            raise ValueError(i)
        return Box(i)

    await batch_process(range(3), fn, key=str, journal=journal)
    entry = await store.get(P + "1")
    assert entry is not None
    assert isinstance(entry.value, dict)
    assert entry.value["value"] == {"n": 1}
    report = await batch_process(range(3), Counted(), key=str, journal=journal)
    assert report.values()[:2] == [Box(0), Box(1)]


async def test_values_false_stores_none() -> None:
    store = MemoryStateStore()
    journal = Journal(store, "j", values=False)
    await batch_process(range(2), Counted(failing={1}), key=str, journal=journal)
    report = await batch_process(range(2), Counted(), key=str, journal=journal)
    assert report.values() == [None, 10]


def load_box(stored: JsonValue) -> Box:
    assert isinstance(stored, dict)
    n = stored["n"]
    assert isinstance(n, int)
    return Box(n)


class Box:
    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Box) and other.n == self.n

    __hash__ = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------ retention
async def test_rows_older_than_retain_are_pruned_not_resumed() -> None:
    clock = Clock(1_000.0)
    store = MemoryStateStore(clock=clock)
    journal = Journal(store, "j", retain=3600.0, clock=clock)
    await store.set_many({P + "0": {"kind": "success", "attempts": 1}})
    clock.now = 2_000.0
    await store.set_many({P + "1": {"kind": "success", "attempts": 1}})
    await store.set_many({"batchkit/breaker/x": {}})  # not the journal's: kept
    clock.now = 1_000.0 + 3600.0 + 1
    fn = Counted(failing={2})
    report = await batch_process(range(3), fn, key=str, journal=journal)
    assert sorted(fn.calls) == [0, 2]
    assert report.resumed == 1
    assert await store.get("batchkit/breaker/x") is not None


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_failures_first_recipe() -> None:
    store = MemoryStateStore()
    journal = Journal(store, "j")
    await batch_process(range(6), Counted(failing={4, 5}), key=str, journal=journal)
    seen = await journal.kinds()
    items = sorted(range(6), key=lambda i: seen.get(str(i)) != "error")
    assert items[:2] == [4, 5]
    fn = Counted()
    await batch_process(items, fn, key=str, journal=journal, concurrency=1)
    assert fn.calls == [4, 5]


async def test_a_store_that_cannot_write_never_fails_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Wrapped):
        async def set_many(self, values: Mapping[str, JsonValue]) -> None:
            raise OSError("disk full")

    with caplog.at_level(logging.WARNING, logger="batchkit"):
        report = await batch_process(range(3), Counted(), key=str, journal=Journal(Broken(), "j"))
    assert report.ok
    assert any("could not write 3 rows" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ property
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sets(st.integers(0, 11)), min_size=1, max_size=4),
    st.integers(1, 5),
    st.integers(1, 4),
)
def test_every_item_once_and_no_committed_success_runs_again(
    failing: list[set[int]], flush_every: int, concurrency: int
) -> None:
    """Calls in a row, each failing some items: every call gives one envelope per item; an
    item that succeeded is not run again until a call in which every item succeeded."""

    async def main() -> None:
        store = MemoryStateStore()
        journal = Journal(store, "j", flush_every=flush_every)
        done: set[int] = set()
        for fails in failing:
            fn = Counted(failing=fails)
            report = await batch_process(
                range(12), fn, key=str, journal=journal, concurrency=concurrency
            )
            assert [o.index for o in report] == list(range(12))
            assert sorted(fn.calls) == sorted(set(range(12)) - done)
            assert report.resumed == len(done)
            ok = {o.index for o in report if o.ok}
            done = set() if len(ok) == 12 else ok
            assert {int(k) for k, v in (await journal.kinds()).items() if v == "success"} == done

    run_virtual(main())


async def test_resumed_items_give_back_their_limit_group_places() -> None:
    from batchkit import LimitGroup

    store = MemoryStateStore()
    await store.set_many({P + str(i): {"kind": "success", "attempts": 1} for i in range(0, 8, 2)})
    fn = Counted()
    report = await batch_process(
        range(8),
        fn,
        key=str,
        journal=Journal(store, "j"),
        groups=[LimitGroup(by=lambda i: i % 2, concurrency=1)],
        concurrency=4,
    )
    assert report.ok
    assert report.resumed == 4
    assert sorted(fn.calls) == [1, 3, 5, 7]
    assert now() == 4.0  # group 1 one at a time; group 0's places were given back at once


class InSession(Wrapped):
    """A SessionWriter whose "session" writes at once (as a commit that went through)."""

    async def set_in_session(self, session: object, values: Mapping[str, JsonValue]) -> None:
        await self.inner.set_many(values)


async def test_a_failure_after_the_commit_never_replaces_a_committed_success() -> None:
    """Transactional: the item's row and its commit went through, then its timeout cut the
    rest of the context's exit: the item is a timeout, but its committed success stands."""
    store = InSession()
    journal = Journal(store, "j", mode="transactional")

    @contextlib.asynccontextmanager
    async def slow_exit() -> AsyncIterator[str]:
        yield "session"
        await asyncio.sleep(10)  # the commit is done; closing hangs past the timeout

    async def fn(i: int, session: str) -> int:
        return i

    report = await batch_process(
        range(2), fn, key=str, journal=journal, context=slow_exit, timeout=2.0
    )
    assert [o.kind for o in report] == ["timeout", "timeout"]
    assert await kinds(store) == {"0": "success", "1": "success"}
    again = await batch_process(range(2), fn, key=str, journal=journal, context=slow_exit)
    assert again.resumed == 2


async def test_log_lines_say_what_was_resumed(caplog: pytest.LogCaptureFixture) -> None:
    from batchkit import LoggingObserver

    store = MemoryStateStore()
    await store.set_many({P + "0": {"kind": "success", "attempts": 1}})
    with caplog.at_level(logging.DEBUG, logger="batchkit"):
        await batch_process(
            range(2), Counted(), key=str, journal=Journal(store, "j"),
            observers=[LoggingObserver(level_items=logging.INFO)],
        )  # fmt: skip
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("batchkit: journal 'j' holds 1 committed successes") for m in lines)
    assert any(m.startswith("item finished") and "key=0" in m and "resumed=True" in m
               for m in lines)  # fmt: skip
    assert any(m.startswith("batch finished") and m.endswith("resumed=1") for m in lines)
