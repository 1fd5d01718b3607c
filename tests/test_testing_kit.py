"""batchkit.testing: probes, plans, strategies, run_virtual and instant mode."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchkit import (
    Adaptive,
    Backoff,
    InvalidArgument,
    MissingExtra,
    RateLimit,
    Retry,
    Success,
    batch_process,
)
from batchkit._engine import backoff as _backoff
from batchkit.testing import (
    Call,
    ContextProbe,
    ItemPlan,
    Probe,
    ProbeError,
    Step,
    instant,
    run_virtual,
    strategies,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from batchkit import BatchReport

# The property tests run batches of up to a few hundred virtual seconds each; virtual time
# makes that milliseconds, but Hypothesis' own per-example deadline is wall-clock noise.
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- Probe ---------------------------------------------------------------------------------
@pytest.mark.looptime
async def test_probe_records_exact_virtual_times_and_peak() -> None:
    probe = Probe(latency=lambda n: float(n))
    report = await batch_process([3, 1, 1, 2], probe, concurrency=2)
    assert report.values() == [3, 1, 1, 2]  # a fake probe returns the item
    assert probe.peak_in_flight == 2
    assert probe.in_flight == 0
    assert probe.started == 4
    # The two 1s are equal items: one key, two attempts ... unless keyed apart.
    assert probe.attempts(1) == 2
    assert [(c.item, c.start, c.end, c.result, c.in_flight) for c in probe.calls] == [
        (1, 0.0, 1.0, "ok", 2),
        (1, 1.0, 2.0, "ok", 2),
        (3, 0.0, 3.0, "ok", 1),
        (2, 2.0, 4.0, "ok", 2),
    ]


@pytest.mark.looptime
async def test_probe_wraps_fn_and_fails_on_request() -> None:
    async def double(n: int) -> int:
        return 2 * n

    def fail(n: int, attempt: int) -> Exception | None:
        return ValueError(f"{n} on try {attempt}") if n == 5 and attempt == 1 else None

    probe = Probe(double, latency=0.5, fail=fail)
    # Inference: Probe(fn) is Probe[item type, result type], not Probe[Any, Any] (the ignore
    # must stay necessary: warn_unused_ignores is on).
    wrong: Probe[str, int] = probe  # type: ignore[assignment]
    del wrong
    with instant():
        report: BatchReport[int, int] = await batch_process(
            [4, 5], probe, retry=Retry(attempts=2, retry_on=ValueError)
        )
    assert report.values() == [8, 10]
    assert probe.attempts(5) == 2
    assert [c.result for c in probe.calls_of(5)] == ["error", "ok"]
    assert probe.items == 2


@pytest.mark.looptime
async def test_probe_with_context_and_unhashable_items() -> None:
    async def fn(item: dict[str, int], ctx: int) -> tuple[int, int]:
        return item["id"], ctx

    probe = Probe(fn)
    contexts = ContextProbe()
    items = [{"id": 7}, {"id": 8}]
    report = await batch_process(items, probe, context=contexts, concurrency=1)
    assert report.values() == [(7, 0), (8, 1)]
    assert probe.attempts(items[0]) == 1  # keyed by id(): dicts are not hashable
    assert probe.attempts({"id": 7}) == 0  # an equal but different dict
    contexts.assert_balanced()
    assert (contexts.entered, contexts.exited, contexts.open, contexts.peak_open) == (2, 2, 0, 1)


@pytest.mark.looptime
async def test_probe_key_and_cancelled_attempts() -> None:
    plans = [ItemPlan(index=0, steps=(Step(kind="hang"),)), ItemPlan(index=1)]
    probe = Probe(key=lambda p: p.index)
    report = await batch_process(plans, probe, timeout=2)
    assert [o.ok for o in report] == [False, True]
    assert probe.calls[-1] == Call(
        item=plans[0], attempt=1, start=0.0, end=2.0, result="cancelled", in_flight=1
    )


@pytest.mark.looptime
async def test_context_probe_balances_on_every_path() -> None:
    """Success, error, timeout and a stopped run: every entered context is exited once."""
    contexts = ContextProbe(enter_latency=0.5, exit_latency=0.25)
    plans = [
        ItemPlan(index=0, steps=(Step(latency=2),)),
        ItemPlan(index=1, steps=(Step(kind="error", latency=1),)),
        ItemPlan(index=2, steps=(Step(kind="hang"),)),
        ItemPlan(index=3, steps=(Step(latency=1),)),
    ]
    probe: Probe[ItemPlan, ItemPlan] = Probe()

    async def fn(plan: ItemPlan, ctx: int) -> ItemPlan:
        return await probe(plan)

    report = await batch_process(plans, fn, context=contexts, concurrency=4, timeout=3)
    assert [o.ok for o in report] == [True, False, False, True]
    contexts.assert_balanced()
    assert contexts.peak_open == 4
    exits = {c.number: c.exit_error for c in contexts.contexts}
    assert exits == {0: None, 1: ProbeError, 2: asyncio.CancelledError, 3: None}


@pytest.mark.looptime
async def test_context_probe_wraps_a_factory_and_catches_double_exits() -> None:
    log: list[str] = []

    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[str]:
        log.append("open")
        yield "session"
        log.append("close")

    contexts = ContextProbe(session)
    cm = contexts()
    assert await cm.__aenter__() == "session"
    await cm.__aexit__(None, None, None)
    assert log == ["open", "close"]
    contexts.assert_balanced()
    with contextlib.suppress(RuntimeError):  # the generator refuses a second exit
        await cm.__aexit__(None, None, None)
    with pytest.raises(AssertionError, match="not exited exactly once"):
        contexts.assert_balanced()


# -- plans -------------------------------------------------------------------------------
def test_item_plan_expectations() -> None:
    retry = Retry(attempts=3)
    flaky = ItemPlan(index=0, steps=(Step(kind="error"), Step(latency=1)))
    assert flaky.expect() == ("error", 1)
    assert flaky.expect(retry=retry) == ("success", 2)
    slow = ItemPlan(index=1, steps=(Step(latency=9),))
    assert slow.expect() == ("success", 1)
    assert slow.expect(timeout=5, retry=retry) == ("timeout", 3)
    assert slow.expect(timeout=5, retry=Retry(attempts=3, timeouts=False)) == ("timeout", 1)
    assert ItemPlan(index=2, steps=(Step(kind="error"),)).expect(
        retry=Retry(retry_on=KeyError)
    ) == ("error", 1)
    with pytest.raises(InvalidArgument, match="hangs and there is no timeout"):
        ItemPlan(index=3, steps=(Step(kind="hang"),)).expect()


def test_plan_validation() -> None:
    with pytest.raises(InvalidArgument, match=r"Step\.kind"):
        Step(kind="slow")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"Step\.latency"):
        Step(latency=-1)
    with pytest.raises(InvalidArgument, match="at least one Step"):
        ItemPlan(index=0, steps=())
    with pytest.raises(InvalidArgument, match="fn must be"):
        Probe(42)  # type: ignore[call-overload]


# -- run_virtual -------------------------------------------------------------------------
def test_run_virtual_runs_in_exact_virtual_time() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()
        loops.append(loop)
        await asyncio.sleep(3600)
        return loop.time()

    assert run_virtual(main()) == 3600.0
    assert run_virtual(main, start=100) == 3700.0  # an async function works too
    assert all(loop.is_closed() for loop in loops)


def test_run_virtual_recipe_for_a_batch() -> None:
    """The documented recipe: a whole batch from a sync test, times exact."""
    probe = Probe(latency=10)
    report = run_virtual(batch_process(range(7), probe, concurrency=3))
    assert report.wall_time == 30.0  # 3 waves of 10 s
    assert probe.peak_in_flight == 3


def test_run_virtual_inside_a_running_loop_is_refused() -> None:
    async def outer() -> None:
        inner = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="running event loop"):
            run_virtual(inner)
        assert inspect.getcoroutinestate(inner) == "CORO_CLOSED"  # not left to warn

    run_virtual(outer())


def test_run_virtual_without_looptime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "looptime", None)
    coro = asyncio.sleep(1)
    with pytest.raises(MissingExtra, match=r"batchkit\[testing\]"):
        run_virtual(coro)
    # It was closed: no "coroutine was never awaited" warning (warnings are errors here).
    assert inspect.getcoroutinestate(coro) == "CORO_CLOSED"


# -- instant -----------------------------------------------------------------------------
def test_instant_restores_state_nested_and_on_errors() -> None:
    assert _backoff.INSTANT.get() is False
    mode = instant()
    with mode:
        assert _backoff.INSTANT.get() is True
        with instant(), mode:  # nested, even the same object
            assert _backoff.INSTANT.get() is True
        assert _backoff.INSTANT.get() is True
    assert _backoff.INSTANT.get() is False
    with pytest.raises(KeyError), instant():
        raise KeyError
    assert _backoff.INSTANT.get() is False


def test_instant_as_a_decorator() -> None:
    @instant()
    def sync() -> bool:
        return _backoff.INSTANT.get()

    @instant()
    async def coro() -> bool:
        return _backoff.INSTANT.get()

    assert sync() is True
    assert run_virtual(coro()) is True
    assert _backoff.INSTANT.get() is False


def test_instant_removes_backoff_waits_in_virtual_time() -> None:
    """Each item fails once, then succeeds; the backoff is a fixed 60 s."""
    retry = Retry(attempts=2, backoff=Backoff(initial=60, maximum=60, jitter=False))

    def run() -> float:
        plans = [
            ItemPlan(index=i, steps=(Step(kind="error", latency=1), Step(latency=1)))
            for i in range(3)
        ]
        probe: Probe[ItemPlan, ItemPlan] = Probe()
        report = run_virtual(batch_process(plans, probe, retry=retry))
        assert all(type(o) is Success and o.attempts == 2 for o in report)
        return report.wall_time

    assert run() == 62.0
    with instant():
        assert run() == 2.0
    assert run() == 62.0


# -- strategies: the documented property test ------------------------------------------
@PROPERTY
@given(
    plans=strategies.item_plans(max_size=25, timeout=2.0, max_latency=1.5),
    concurrency=st.integers(1, 6),
    retry=st.none() | strategies.retries(max_attempts=3),
)
def test_property_limits_hold_and_every_item_is_reported_once(
    plans: list[ItemPlan], concurrency: int, retry: Retry | None
) -> None:
    probe = Probe()
    # Real (jittered) backoffs: attempts start at arbitrary float times, which once froze
    # virtual time in the engine's watchdog (a timer due within the clock resolution).
    report = run_virtual(
        batch_process(plans, probe, concurrency=concurrency, timeout=2.0, retry=retry)
    )
    assert probe.peak_in_flight <= concurrency
    assert report.peak_concurrency == probe.peak_in_flight
    assert [o.index for o in report] == list(range(len(plans)))
    assert [o.item for o in report] == plans
    for plan, outcome in zip(plans, report, strict=True):
        kind, attempts = plan.expect(timeout=2.0, retry=retry)
        assert ("success" if outcome.ok else outcome.kind) == kind
        assert outcome.attempts == attempts == probe.attempts(plan)
    assert probe.in_flight == 0


@PROPERTY
@given(
    plans=strategies.item_plans(min_size=1, max_size=30, kinds=["ok"]),
    limit=strategies.rate_limits(max_per_second=20, max_burst=4),
)
def test_property_rate_limit_spaces_starts(plans: list[ItemPlan], limit: RateLimit) -> None:
    """Start k (0-based) can come no sooner than ``(k + 1 - burst) / per_second``."""
    probe = Probe()
    run_virtual(batch_process(plans, probe, concurrency=8, rate_limit=limit))
    starts = sorted(c.start for c in probe.calls)
    for k, start in enumerate(starts):
        # looptime keeps time in microseconds: allow one tick of rounding.
        assert start >= (k + 1 - limit.burst) / limit.per_second - 1e-6


@PROPERTY
@given(
    plans=strategies.item_plans(max_size=40, kinds=["ok", "error"]),
    adaptive=strategies.adaptives(max_limit=8),
)
def test_property_adaptive_stays_within_bounds(plans: list[ItemPlan], adaptive: Adaptive) -> None:
    probe = Probe()
    report = run_virtual(batch_process(plans, probe, concurrency=adaptive))
    assert probe.peak_in_flight <= adaptive.max
    assert all(adaptive.min <= c.new <= adaptive.max for c in report.limit_changes)


@given(
    step=strategies.steps(timeout=4.0, max_latency=10.0),
    latency=strategies.latencies(min_value=0.5, max_value=2.0),
    backoff=strategies.backoffs(max_initial=0.5),
)
def test_strategies_draw_what_they_promise(step: Step, latency: float, backoff: Backoff) -> None:
    assert 0.5 <= latency <= 2.0
    assert (latency * 64).is_integer()  # whole ticks of 1/64 s
    assert (latency * 1_000_000).is_integer()  # and whole microseconds, looptime's unit
    if step.kind != "hang":
        # Fast steps stay under half the timeout; slow ones go past 1.5 timeouts: no ties.
        assert step.latency <= 2.0 or step.latency >= 6.0
    assert backoff.initial <= 0.5


def test_strategies_argument_errors_and_missing_hypothesis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(InvalidArgument, match="no step kind left"):
        strategies.steps(kinds=["hang"])  # a hang needs a timeout
    with pytest.raises(InvalidArgument, match="min_value"):
        strategies.latencies(min_value=2, max_value=1)
    monkeypatch.setitem(sys.modules, "hypothesis.strategies", None)
    with pytest.raises(MissingExtra, match=r"batchkit\[testing\]"):
        strategies.item_plans()


# -- the pytest recipe -------------------------------------------------------------------
@pytest.mark.looptime
async def test_pytest_recipe_with_the_looptime_marker() -> None:
    """The documented async recipe: mark the test, then assert exact loop times."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    probe = Probe(latency=15)
    report = await batch_process(range(20), probe, concurrency=3, batch_size=5)
    assert loop.time() - start == 105.0  # 7 waves of 15 s: a sliding window, no barrier
    assert report.wall_time == 105.0
    assert probe.peak_in_flight == 3
