"""The local engine tells the whole truth: misbehaving user objects and policies, odd inputs,
thresholds, per-item cost hints, stream misuse, a caller's cancel, dropped retries, the log
of an early stop, 429s without a header, rollbacks cut by a timeout, threads that outlive
their timeout, and errors a stream's consumer already handled.

Every test runs in virtual time (``looptime``) with exact timestamps, and every await that
could hang runs under :func:`within`, so a hang fails in (virtual) seconds with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from batchkit import (
    Adaptive,
    Backoff,
    Deadline,
    Event,
    Failure,
    FailureRatio,
    InputFailed,
    InvalidArgument,
    ItemCancelled,
    ItemSkipped,
    LoggingObserver,
    RateLimit,
    Retry,
    RunFinished,
    Success,
    batch_process,
    stream,
    transient,
)

from .helpers import now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Iterator

pytestmark = [pytest.mark.looptime, pytest.mark.timeout(10)]

T = TypeVar("T")
HANG = 600.0
NO_BACKOFF = Backoff(initial=0, maximum=0, jitter=False)


async def within(seconds: float, aw: Awaitable[T], what: str) -> T:
    """Await ``aw``; fail with a message (not hang) if it takes more than ``seconds``."""
    cm = asyncio.timeout(seconds)
    try:
        async with cm:
            return await aw
    except TimeoutError:
        if cm.expired():
            pytest.fail(f"hang: {what} did not return within {seconds:g} s", pytrace=False)
        raise


def assert_one_envelope_each(report_or_outcomes: Any, n: int) -> None:
    indices = Counter(o.index for o in report_or_outcomes)
    assert indices == Counter(range(n)), f"not exactly one envelope per item: {indices}"


class Boom(Exception):
    """fn's own error."""


class Unprintable(Exception):
    """An error whose ``__str__`` and ``__repr__`` raise."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


# -- 1. policy code that raises is the item's failure, never the run's ----------------------
class HugeHint(Exception):
    retry_after = 10**400  # float() of it overflows


class RaisingHint(Exception):
    @property
    def retry_after(self) -> float:
        raise KeyError("the hint is broken")


def _raising_predicate(error: Exception) -> bool:
    raise LookupError("retry_on is broken")


async def test_a_huge_retry_after_hint_is_capped_not_the_runs_error() -> None:
    async def fn(i: int) -> int:
        if i == 0:
            raise HugeHint("slow down")
        return i

    retry = Retry(attempts=2, max_retry_after=5)
    report = await within(HANG, batch_process(range(3), fn, retry=retry), "batch_process")
    assert report.values() == [1, 2]
    failure = report[0]
    assert isinstance(failure, Failure)
    assert isinstance(failure.error, HugeHint)
    assert failure.attempts == 2
    assert now() == 5  # the hint, capped at max_retry_after


async def test_a_raising_retry_after_property_is_the_items_failure() -> None:
    async def fn(i: int) -> int:
        if i == 0:
            raise RaisingHint("slow down")
        return i

    report = await within(HANG, batch_process(range(3), fn, retry=Retry()), "batch_process")
    assert report.values() == [1, 2]
    failure = report[0]
    assert isinstance(failure, Failure)
    assert failure.kind == "error"
    assert isinstance(failure.error, RaisingHint)  # fn's exception stays the item's error
    assert failure.attempts == 1
    assert any("KeyError" in note for note in failure.error.__notes__)


@pytest.mark.parametrize("entry", ["batch", "stream"])
async def test_a_raising_retry_on_is_the_items_failure(entry: str) -> None:
    async def fn(i: int) -> int:
        if i == 1:
            raise Boom("fn failed")
        return i

    retry = Retry(retry_on=_raising_predicate)
    if entry == "batch":
        outcomes = list(
            await within(HANG, batch_process(range(3), fn, retry=retry), "batch_process")
        )
    else:

        async def collect() -> list[Any]:
            async with stream(range(3), fn, retry=retry) as s:
                return [o async for o in s]

        outcomes = await within(HANG, collect(), "stream")
    assert_one_envelope_each(outcomes, 3)
    (failure,) = [o for o in outcomes if not o.ok]
    assert isinstance(failure.error, Boom)
    assert failure.kind == "error"
    assert any("retry_on" in n and "LookupError" in n for n in failure.error.__notes__)


async def test_a_raising_overload_on_is_the_items_failure() -> None:
    async def fn(i: int) -> int:
        if i == 1:
            raise Boom("fn failed")
        return i

    concurrency = Adaptive(overload_on=_raising_predicate)
    report = await within(
        HANG, batch_process(range(3), fn, concurrency=concurrency), "batch_process"
    )
    assert report.values() == [0, 2]
    assert isinstance(report[1], Failure)
    assert isinstance(report[1].error, Boom)
    assert any("overload_on" in n for n in report[1].error.__notes__)


class _BrokenLimiter:
    async def __aenter__(self) -> None:
        raise ConnectionError("limiter backend down")

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_a_raising_limiter_is_the_items_failure_when_fn_never_ran() -> None:
    ran: list[int] = []

    async def fn(i: int) -> int:
        ran.append(i)
        return i

    report = await within(
        HANG, batch_process(range(3), fn, rate_limit=_BrokenLimiter()), "batch_process"
    )
    assert ran == []
    assert [o.kind for o in report] == ["error"] * 3
    assert all(isinstance(o.error, ConnectionError) for o in report.failures)


async def test_an_unprintable_error_keeps_logging_and_to_dict_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fn(i: int) -> int:
        if i == 0:
            raise Unprintable()
        return i

    caplog.set_level(logging.DEBUG, logger="batchkit")
    report = await within(
        HANG, batch_process(range(3), fn, observers=[LoggingObserver()]), "batch_process"
    )
    assert "disabled" not in caplog.text  # the observer was not dropped
    finished = [r for r in caplog.records if r.getMessage().startswith("batch finished")]
    assert len(finished) == 1
    assert "error=1" in finished[0].getMessage()
    row = report.to_dict()["items"][0]
    assert row["error"].startswith("Unprintable: <")


async def test_an_unprintable_error_from_exiting_the_context_keeps_fns_error() -> None:
    @contextlib.asynccontextmanager
    async def ctx() -> AsyncIterator[None]:
        try:
            yield None
        except Exception:
            raise Unprintable() from None

    async def fn(i: int, _ctx: None) -> int:
        raise Boom("fn failed")

    report = await within(HANG, batch_process(range(1), fn, context=ctx), "batch_process")
    failure = report[0]
    assert isinstance(failure, Failure)
    assert isinstance(failure.error, Boom)
    assert any("exiting the context also failed" in n for n in failure.error.__notes__)


# -- 2. validated on creation means validated ------------------------------------------------
@pytest.mark.parametrize(
    "overload_on",
    [42, "ValueError", KeyboardInterrupt, (ValueError, 3)],
    ids=["int", "str", "KeyboardInterrupt", "tuple-with-int"],
)
def test_adaptive_overload_on_is_validated(overload_on: Any) -> None:
    with pytest.raises(InvalidArgument, match=r"Adaptive\.overload_on.*\n.*HINT"):
        Adaptive(overload_on=overload_on)


async def test_an_async_observer_is_refused_before_any_work() -> None:
    ran: list[int] = []

    async def observer(event: Event) -> None:
        ran.append(0)

    async def fn(i: int) -> int:
        ran.append(i)
        return i

    with pytest.raises(InvalidArgument, match=r"observer.*async.*\n.*HINT"):
        await batch_process(range(3), fn, observers=[observer])  # type: ignore[list-item]
    assert ran == []


@pytest.mark.parametrize(
    "option", [{"ordered": True}, {"buffer": 5}, {"ordered": False}], ids=str
)
async def test_stream_only_options_are_refused_by_batch_process(option: dict[str, Any]) -> None:
    async def fn(i: int) -> int:
        return i

    with pytest.raises(InvalidArgument, match=r"stream\(\).*\n.*HINT"):
        await batch_process(range(3), fn, **option)


# -- 3. input errors are InputFailed ---------------------------------------------------------
class _RaisingIter:
    def __iter__(self) -> Iterator[int]:
        raise OSError("cannot open the source")


class _RaisingAiter:
    def __aiter__(self) -> AsyncIterator[int]:
        raise OSError("cannot open the source")


class _RaisingLen:
    def __len__(self) -> int:
        raise OSError("cannot size the source")

    def __iter__(self) -> Iterator[int]:
        return iter(range(3))


@pytest.mark.parametrize(
    "items", [_RaisingIter(), _RaisingAiter(), _RaisingLen()], ids=["iter", "aiter", "len"]
)
@pytest.mark.parametrize("entry", ["batch", "stream"])
async def test_an_input_whose_iter_raises_is_input_failed(items: Any, entry: str) -> None:
    async def fn(i: int) -> int:
        return i

    async def run() -> None:
        if entry == "batch":
            await batch_process(items, fn)
        else:
            async with stream(items, fn) as s:
                async for _ in s:
                    pass

    with pytest.raises(InputFailed) as info:
        await within(HANG, run(), entry)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.report.total == 0


# -- 4. thresholds fire when they are reached ------------------------------------------------
async def test_a_failure_ratio_fires_when_a_success_completes_the_sample() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(1)
        if i < 3:
            raise Boom(f"item {i}")
        return i

    report = await within(
        HANG,
        batch_process(
            range(10), fn, concurrency=1, max_failure_ratio=FailureRatio(ratio=0.5, min_sample=4)
        ),
        "batch_process",
    )
    assert report.stop_reason == "max_failure_ratio"
    assert [o.kind for o in report] == ["error"] * 3 + ["success"] + ["skipped"] * 6
    assert now() == 4


# -- 5. one item's cost= does not decide for the others --------------------------------------
@pytest.mark.parametrize("entry", ["batch", "stream"])
async def test_one_items_cost_does_not_skip_the_others(entry: str) -> None:
    async def fn(s: float) -> float:
        await asyncio.sleep(s)
        return s

    items = [5.0, 0.25, 0.25, 0.25]
    opts: dict[str, Any] = {"cost": lambda s: s, "deadline": 1, "concurrency": 1}
    if entry == "batch":
        outcomes = list(await within(HANG, batch_process(items, fn, **opts), "batch"))
        report_reason = None
    else:
        async with stream(items, fn, **opts) as s:
            outcomes = [o async for o in s]
        report_reason = s.report.stop_reason
    by_index = {o.index: o for o in outcomes}
    assert len(by_index) == 4
    skipped = by_index[0]
    assert isinstance(skipped, Failure)
    assert skipped.kind == "skipped"
    assert isinstance(skipped.error, ItemSkipped)
    assert skipped.error.reason == "out_of_time"
    assert [by_index[i].kind for i in (1, 2, 3)] == ["success"] * 3
    assert now() == 0.75
    del report_reason


# -- 6. Stream misuse gets answers, not hangs ------------------------------------------------
async def _ident(i: int) -> int:
    await asyncio.sleep(1)
    return i


async def test_a_streams_report_is_readable_at_once_and_after_an_empty_block() -> None:
    async with stream(range(3), _ident) as s:
        first = s.report
        assert first.total == 0
        assert first.wall_time == 0
    after = s.report
    assert after.stop_reason == "cancelled"
    assert after.total == 3


async def test_a_second_consumer_of_a_stream_gets_an_error_at_once() -> None:
    async def consume(s: Any) -> list[int]:
        return [o.index async for o in s]

    async with stream(range(3), _ident) as s:
        first = asyncio.create_task(consume(s))
        await asyncio.sleep(0.5)  # the first consumer waits for an outcome now
        with pytest.raises(RuntimeError, match="one consumer"):
            await within(10, anext(s), "a second consumer")
        got = await within(HANG, first, "the first consumer")
    assert sorted(got) == [0, 1, 2]
    assert now() == 1


# -- 13. a handled error stays handled -------------------------------------------------------
def _failing_input() -> Iterator[int]:
    yield 0
    raise OSError("the source broke")


async def test_a_caught_input_failed_is_not_raised_again_when_the_block_exits() -> None:
    caught: list[InputFailed] = []
    async with stream(_failing_input(), _ident) as s:
        try:
            async for _ in s:
                pass
        except InputFailed as e:
            caught.append(e)
    assert len(caught) == 1


class MyError(Exception):
    pass


async def test_an_error_the_block_converts_is_what_leaves_the_block() -> None:
    with pytest.raises(MyError):
        async with stream(_failing_input(), _ident) as s:
            try:
                async for _ in s:
                    pass
            except InputFailed as e:
                raise MyError("converted") from e


async def test_a_caught_base_exception_from_fn_is_not_raised_again() -> None:
    class Fatal(BaseException):
        pass

    async def fn(i: int) -> int:
        raise Fatal()

    caught: list[BaseException] = []
    async with stream(range(1), fn) as s:
        try:
            async for _ in s:
                pass
        except Fatal as e:
            caught.append(e)
    assert len(caught) == 1


async def test_an_unseen_input_error_still_leaves_the_block() -> None:
    with pytest.raises(InputFailed):
        async with stream(_failing_input(), _ident) as s:
            await asyncio.sleep(5)  # the run ends with the input's error meanwhile
            del s
