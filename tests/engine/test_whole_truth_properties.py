"""Misbehaving user objects, as a property, through ``batch_process`` and ``stream``.

Hypothesis draws a run whose user code misbehaves in every way the engine must survive: items
whose ``__repr__``/``__str__`` raise, values likewise, errors whose ``__str__``/``__repr__``
raise, errors with a ``retry_after`` that overflows a float or whose property raises, a
``retry_on`` predicate and an ``Adaptive(overload_on=)`` that raise, ``key=`` and ``cost=``
that raise, a context whose enter or exit raises an unprintable error, a limiter whose enter
raises, an observer that raises (beside ``LoggingObserver``), and inputs whose ``iter()``,
``aiter()`` or ``len()`` raise, or that break after a few items. Each example runs in virtual
time under a guard. Whatever was drawn:

- the call returns a report (or raises ``InputFailed`` carrying one, for a broken input):
  no user object's error ever escapes as the run's;
- every item pulled ends in exactly one envelope (for a sized, readable input: every item);
- every envelope is truthful: a ``Success`` holds the value ``fn`` returned for that item;
  an ``error`` holds the exception ``fn`` raised on its last attempt when ``fn`` ran and
  raised, else the hook's own exception (the context, the limiter, ``cost=``);
- the ``LoggingObserver`` is never disabled, and ``report.to_dict()``, ``summary()`` and
  ``table()`` work (and ``to_dict()`` is JSON).

It can fail: run over the engine before these fixes, it finds several distinct failures at
once; with the engine's catch of a retry decision's error narrowed to ``ZeroDivisionError``
(a hook's error let through), it fails on the first example that draws a raising
``retry_on``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchkit import (
    Adaptive,
    Backoff,
    Failure,
    InputFailed,
    LoggingObserver,
    Retry,
    Success,
    batch_process,
    stream,
)
from batchkit.testing import run_virtual

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from batchkit import BatchReport, Event

GUARD = 1000.0  # virtual seconds: far beyond any run drawn here

Entry = Literal["batch", "stream", "stream_ordered"]
Source = Literal["list", "generator", "async_generator", "breaks", "iter", "aiter", "len"]
Behaviour = Literal["ok", "odd_value", "error", "unprintable", "huge_hint", "raising_hint"]


# -- misbehaving user objects --------------------------------------------------------------
class Odd:
    """An item or a value whose ``__repr__`` and ``__str__`` raise."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __str__(self) -> str:
        raise RuntimeError("no str")


class Planned(Exception):
    """fn's own error."""


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class HugeHint(OSError):
    retry_after = 10**400


class RaisingHint(Exception):
    @property
    def retry_after(self) -> float:
        raise KeyError("broken hint")


class HookError(Unprintable):
    """What a misbehaving hook (context, limiter, cost, key, predicate) raises."""


def _raising_predicate(error: Exception) -> bool:
    raise HookError()


@dataclass(frozen=True)
class Run:
    entry: Entry
    source: Source
    behaviours: tuple[Behaviour, ...]
    concurrency: int
    retry: Retry | None
    adaptive: bool
    key_raises: bool
    cost_raises: bool
    context: Literal["none", "ok", "enter_raises", "exit_raises"]
    limiter_raises: bool
    timeout: float | None
    leave_after: int | None  # a stream's consumer leaves the block after this many outcomes

    @property
    def readable(self) -> bool:
        return self.source in ("list", "generator", "async_generator")


@st.composite
def runs(draw: st.DrawFn) -> Run:
    behaviours: tuple[Behaviour, ...] = tuple(
        draw(
            st.lists(
                st.sampled_from(
                    ["ok", "odd_value", "error", "unprintable", "huge_hint", "raising_hint"]
                ),
                max_size=8,
            )
        )
    )
    retry = None
    if draw(st.booleans()):
        retry = Retry(
            attempts=draw(st.integers(2, 3)),
            backoff=Backoff(initial=0.5, maximum=0.5, jitter=False),
            max_retry_after=1.0,
            retry_on=_raising_predicate if draw(st.booleans()) else Exception,
        )
    return Run(
        entry=draw(st.sampled_from(["batch", "stream", "stream_ordered"])),
        source=draw(
            st.sampled_from(
                ["list", "generator", "async_generator", "breaks", "iter", "aiter", "len"]
            )
        ),
        behaviours=behaviours,
        concurrency=draw(st.integers(1, 3)),
        retry=retry,
        adaptive=draw(st.booleans()),
        key_raises=draw(st.booleans()),
        cost_raises=draw(st.booleans()),
        context=draw(st.sampled_from(["none", "ok", "enter_raises", "exit_raises"])),
        limiter_raises=draw(st.booleans()),
        timeout=draw(st.sampled_from([None, 5.0])),
        leave_after=draw(st.sampled_from([None, 0, 1, 3])),
    )


class RaisingLimiter:
    async def __aenter__(self) -> None:
        raise HookError()

    async def __aexit__(self, *exc: object) -> None:
        return None


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.getMessage()  # format now: a record that cannot be formatted fails here
        self.records.append(record)


class World:
    """The run's user code, and what it did: per item, the last thing fn returned or raised."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.items = [Odd(i) for i in range(len(run.behaviours))]
        self.last: dict[int, tuple[str, object]] = {}
        self.pulled = 0
        self.hook_errors: list[BaseException] = []

    async def fn(self, item: Odd, *ctx: object) -> object:
        i = item.n
        await asyncio.sleep(0.25)
        behaviour = self.run.behaviours[i]
        error: Exception | None = None
        if behaviour == "error":
            error = Planned(f"item {i}")
        elif behaviour == "unprintable":
            error = Unprintable()
        elif behaviour == "huge_hint":
            error = HugeHint("slow down")
        elif behaviour == "raising_hint":
            error = RaisingHint("slow down")
        if error is not None:
            self.last[i] = ("raised", error)
            raise error
        value: object = Odd(i) if behaviour == "odd_value" else i
        self.last[i] = ("returned", value)
        return value

    def key(self, item: Odd) -> object:
        if self.run.key_raises and item.n % 2:
            raise HookError()
        return item.n

    def cost(self, item: Odd) -> float:
        if self.run.cost_raises and item.n % 3 == 1:
            error = HookError()
            self.hook_errors.append(error)
            raise error
        return 0.25

    @contextlib.asynccontextmanager
    async def context(self) -> AsyncIterator[None]:
        if self.run.context == "enter_raises":
            error = HookError()
            self.hook_errors.append(error)
            raise error
        yield None
        if self.run.context == "exit_raises":
            error = HookError()
            self.hook_errors.append(error)
            raise error

    def _sync(self, breaks: bool) -> Iterator[Odd]:
        for n, item in enumerate(self.items):
            if breaks and n == 2:
                raise OSError("the source broke")
            self.pulled += 1
            yield item

    async def _async(self) -> AsyncIterator[Odd]:
        for item in self.items:
            self.pulled += 1
            yield item

    def source(self) -> Any:
        kind = self.run.source
        if kind == "list":
            return list(self.items)
        if kind == "generator":
            return self._sync(breaks=False)
        if kind == "breaks":
            return self._sync(breaks=True)
        if kind == "async_generator":
            return self._async()
        return {"iter": BrokenIter, "aiter": BrokenAiter, "len": BrokenLen}[kind]()

    def keywords(self, observers: list[Any]) -> dict[str, Any]:
        r = self.run
        kw: dict[str, Any] = {"observers": observers, "key": self.key, "cost": self.cost}
        kw["concurrency"] = Adaptive(initial=r.concurrency, max=3, overload_on=_raising_predicate)
        if not r.adaptive:
            kw["concurrency"] = r.concurrency
        if r.retry is not None:
            kw["retry"] = r.retry
        if r.timeout is not None:
            kw["timeout"] = r.timeout
        if r.context != "none":
            kw["context"] = self.context
        if r.limiter_raises:
            kw["rate_limit"] = RaisingLimiter()
        return kw


class BrokenIter:
    def __iter__(self) -> Iterator[Odd]:
        raise OSError("cannot open")


class BrokenAiter:
    def __aiter__(self) -> AsyncIterator[Odd]:
        raise OSError("cannot open")


class BrokenLen:
    def __len__(self) -> int:
        raise OSError("cannot size")

    def __iter__(self) -> Iterator[Odd]:
        return iter(())


def _raising_observer(event: Event) -> None:
    raise HookError()


async def _through(world: World) -> tuple[list[Any], BatchReport[Any, Any] | None]:
    """Run ``world``; (the envelopes, the report). ``InputFailed`` carries its report."""
    run = world.run
    observers: list[Any] = [LoggingObserver(), _raising_observer]
    kw = world.keywords(observers)
    if run.entry == "batch":
        try:
            report = await batch_process(world.source(), world.fn, **kw)
        except InputFailed as e:
            assert not run.readable
            return list(e.report), e.report
        return list(report), report
    got: list[Any] = []
    try:
        async with stream(
            world.source(), world.fn, ordered=run.entry == "stream_ordered", **kw
        ) as outcomes:
            async for o in outcomes:
                if len(got) == run.leave_after:
                    break  # the consumer leaves early: the caller's cancel
                got.append(o)
    except InputFailed:
        assert not run.readable
    return got, outcomes.report


def check(run: Run) -> None:
    world = World(run)
    handler = ListHandler()
    logger = logging.getLogger("batchkit")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)

    async def main() -> tuple[list[Any], BatchReport[Any, Any] | None]:
        async with asyncio.timeout(GUARD):
            return await _through(world)

    try:
        envelopes, report = run_virtual(main())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    # One envelope per item pulled; every item of a readable input.
    counts = Counter(o.index for o in envelopes)
    assert all(c == 1 for c in counts.values()), f"an item ended twice: {counts}"
    left_early = run.entry != "batch" and run.leave_after is not None
    if not left_early or run.entry == "stream_ordered":
        assert sorted(counts) == list(range(len(counts))), f"a gap: {counts}"
    if run.readable and not left_early:
        assert len(counts) == len(run.behaviours)
    elif not run.readable:
        assert len(counts) <= max(world.pulled, 0)

    # Every envelope is truthful.
    for o in envelopes:
        assert o.item is world.items[o.index]
        did = world.last.get(o.index)
        if isinstance(o, Success):
            assert did is not None
            assert did == ("returned", o.value)
            continue
        assert isinstance(o, Failure)
        if o.kind == "error":
            if did is not None and did[0] == "raised":
                assert o.error is did[1], "fn's exception is not the item's error"
            else:
                assert o.error in world.hook_errors or isinstance(o.error, HookError)
        else:
            assert o.kind in ("skipped", "timeout", "cancelled"), o.kind

    # Logging kept working (the observer was never disabled), and the report renders.
    messages = [r.getMessage() for r in handler.records]
    assert not [m for m in messages if "LoggingObserver" in m and "disabled" in m], messages
    if report is not None:
        if run.source == "list":
            # A caller's cancel (leaving early) too: the report counts every item.
            assert report.total == len(run.behaviours), (report.total, report.counts)
        json.dumps(report.to_dict())
        report.summary()
        report.table()


@pytest.mark.timeout(300)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(runs())
def test_misbehaving_user_objects_never_break_the_run_or_the_truth(run: Run) -> None:
    check(run)
