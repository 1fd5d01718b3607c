"""The engine's parts on their own: options, the per-item runner, the attempt accessor, the
seams for tests (seeded jitter, scoped instant mode), the backend dispatch (virtual time)."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import random
from typing import Any

import pytest

import batchkit
from batchkit import (
    Attempt,
    Backoff,
    BatchReport,
    InvalidArgument,
    ItemTimeout,
    Retry,
    batch_process,
    current_attempt,
    stream,
)
from batchkit._engine.plan import make_plan
from batchkit._engine.runner import Runner
from batchkit._engine.watchdog import Watchdog
from batchkit._model.attempt import Job, RunInfo, Slot
from batchkit._model.options import VALIDATORS, Options, RunOptions, StreamOptions
from batchkit.testing import instant, run_virtual

from ..helpers import now

pytestmark = pytest.mark.looptime


# -- options: declared once -----------------------------------------------------------------
def test_every_option_is_declared_once_and_has_one_validator() -> None:
    names = [f.name for f in dataclasses.fields(Options)]
    assert list(VALIDATORS) == names
    typed = set(RunOptions.__annotations__) | {"context"}
    assert set(names) - {"ordered", "buffer"} == typed
    assert set(StreamOptions.__annotations__) | {"context"} == set(names)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("timeout", 10**400),
        ("concurrency", 0),
        ("ordered", "yes"),
        ("backend", object()),
        ("retry", 3),
    ],
)
def test_each_validator_names_its_option(name: str, value: object) -> None:
    with pytest.raises(InvalidArgument, match=name):
        VALIDATORS[name](value)


async def test_an_unknown_keyword_is_invalid_argument() -> None:
    async def fn(i: int) -> int:
        return i

    with pytest.raises(InvalidArgument, match="concurrancy"):
        await batch_process([1], fn, concurrancy=2)  # type: ignore[call-overload]


# -- the runner, driven directly --------------------------------------------------------------
async def test_the_runner_runs_one_attempt_at_a_time_on_its_own() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(i)
        if i == 2:
            raise ValueError(i)
        return i * 10

    loop = asyncio.get_running_loop()
    plan = make_plan([], fn, Options(timeout=5))
    slot = Slot(RunInfo("run", plan.timeout, None, loop.time))
    abandoned: list[Slot] = []
    watchdog = Watchdog(loop, 5, 1.0, abandoned.append)
    runner = Runner(plan, loop, watchdog=watchdog)
    results = []

    async def drive() -> None:
        for i in (1, 2, 9):
            results.append(await runner.run(slot, Job(i, i)))

    watching = loop.create_task(watchdog.run())
    slot.task = loop.create_task(drive())
    await slot.task
    watching.cancel()
    assert [(r.kind, r.value, r.started, r.ended) for r in results] == [
        ("success", 10, 0, 1),
        ("error", None, 1, 3),
        ("timeout", None, 3, 8),
    ]
    assert isinstance(results[1].error, ValueError)
    assert isinstance(results[2].error, ItemTimeout)
    assert runner.peak == 1
    assert runner.in_flight == 0
    assert abandoned == []


# -- current_attempt -------------------------------------------------------------------------
async def test_an_attempt_knows_its_number_key_and_time_left() -> None:
    seen: list[tuple[Attempt, float | None, float | None]] = []

    async def fn(i: str) -> str:
        await asyncio.sleep(1)
        a = current_attempt()
        seen.append((a, a.timeout_remaining(), a.deadline_remaining()))
        if a.number == 1:
            raise ConnectionError("flaky")
        return i

    retry = Retry(attempts=2, backoff=Backoff(initial=1, jitter=False))
    report = await batch_process(["a"], fn, key=str.upper, timeout=5, deadline=60, retry=retry)
    assert report.ok
    assert [(a.index, a.number, a.idempotency_key, t, d) for a, t, d in seen] == [
        (0, 1, "A", 4, 59),
        (0, 2, "A", 4, 57),
    ]
    with pytest.raises(RuntimeError, match="only available inside fn"):
        current_attempt()


async def test_without_key_the_idempotency_key_is_per_run_and_index() -> None:
    keys: list[str] = []

    async def fn(i: int) -> int:
        keys.append(current_attempt().idempotency_key)
        return i

    await batch_process(range(3), fn)
    run_id = keys[0].split(":")[0]
    assert keys == [f"{run_id}:0", f"{run_id}:1", f"{run_id}:2"]


# -- seams for tests ---------------------------------------------------------------------------
async def _retry_starts(seed: int) -> list[float]:
    starts: list[float] = []

    async def fn(i: int) -> int:
        starts.append(now())
        if len(starts) % 3:
            raise ConnectionError("flaky")
        return i

    retry = Retry(attempts=5, backoff=Backoff(initial=1, maximum=8), rng=random.Random(seed))
    await batch_process(range(4), fn, concurrency=1, retry=retry)
    return starts


@pytest.mark.looptime(False)
def test_a_seeded_run_is_reproducible() -> None:
    first = run_virtual(_retry_starts(7))
    assert len(first) == 12
    assert first == run_virtual(_retry_starts(7))
    assert first != run_virtual(_retry_starts(8))


async def test_instant_mode_is_scoped_to_the_block_not_the_process() -> None:
    async def flaky_once(i: int) -> float:
        if current_attempt().number == 1:
            raise ConnectionError("flaky")
        return now()

    retry = Retry(attempts=2, backoff=Backoff(initial=10, jitter=False))
    go = asyncio.Event()

    async def elsewhere() -> BatchReport[int, float]:
        await go.wait()
        return await batch_process([0], flaky_once, retry=retry)

    other = asyncio.create_task(elsewhere())  # started outside the block
    t0 = now()
    with instant():
        go.set()
        inside = await batch_process([0], flaky_once, retry=retry)
    assert inside.values() == [t0]  # retried at once
    assert (await other).values() == [t0 + 10]  # kept its backoff


# -- the backend seam --------------------------------------------------------------------------
class _Recording:
    def __init__(self) -> None:
        self.options: list[Options] = []

    async def run_batch(self, items: Any, fn: Any, options: Options) -> BatchReport[Any, Any]:
        self.options.append(options)
        return BatchReport(outcomes=[], wall_time=0, concurrency=1, peak_concurrency=0)

    def open_stream(self, items: Any, fn: Any, options: Options) -> Any:
        self.options.append(options)
        return "a stream"


async def test_backend_receives_the_options_unchanged() -> None:
    async def fn(i: int) -> int:
        raise AssertionError("runs on the backend")

    backend = _Recording()
    await batch_process([1], fn, backend=backend, concurrency=7, timeout=3)
    assert stream([1], fn, backend=backend, ordered=True) == "a stream"  # type: ignore[comparison-overlap]
    assert backend.options[0] == Options(concurrency=7, timeout=3, backend=backend)
    assert backend.options[1] == Options(ordered=True, backend=backend)


# -- errors cross process boundaries intact -----------------------------------------------------
def test_batchkit_errors_pickle_with_message_attributes_and_cause() -> None:
    err = ItemTimeout(2.5)
    err.__cause__ = asyncio.CancelledError("timer")
    err.add_note("batchkit: item index=3")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ItemTimeout
    assert str(back) == str(err)
    assert back.timeout == 2.5
    assert back.__notes__ == err.__notes__
    assert isinstance(back.__cause__, asyncio.CancelledError)
    skipped = pickle.loads(pickle.dumps(batchkit.ItemSkipped("deadline")))
    assert str(skipped) == str(batchkit.ItemSkipped("deadline"))
    assert skipped.reason == "deadline"
