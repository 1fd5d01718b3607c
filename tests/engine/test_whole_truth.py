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
    ItemSkipped,
    LoggingObserver,
    Retry,
    RunFinished,
    batch_process,
    stream,
    transient,
)

from ..helpers import HANG, now

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Iterator

    from batchkit import BatchReport

pytestmark = [pytest.mark.looptime, pytest.mark.timeout(10)]

T = TypeVar("T")


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


@pytest.mark.parametrize("option", [{"ordered": True}, {"buffer": 5}, {"ordered": False}], ids=str)
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

    async def run() -> tuple[list[Any], BatchReport[float, float]]:
        if entry == "batch":
            report = await batch_process(items, fn, **opts)
            return list(report), report
        async with stream(items, fn, **opts) as s:
            return [o async for o in s], s.report

    outcomes, report = await within(HANG, run(), entry)
    by_index = {o.index: o for o in outcomes}
    assert len(by_index) == 4
    skipped = by_index[0]
    assert isinstance(skipped, Failure)
    assert skipped.kind == "skipped"
    assert isinstance(skipped.error, ItemSkipped)
    assert skipped.error.reason == "out_of_time"
    assert [by_index[i].kind for i in (1, 2, 3)] == ["success"] * 3
    assert now() == 0.75
    # Only that item did not fit: the run went through its input, it did not stop.
    assert report.stop_reason is None


async def test_when_no_item_read_ahead_fits_the_run_stops_out_of_time_at_once() -> None:
    def endless() -> Iterator[float]:
        while True:
            yield 5.0

    async def fn(s: float) -> float:
        await asyncio.sleep(s)
        return s

    report = await within(
        HANG,
        batch_process(endless(), fn, cost=lambda s: s, deadline=1, batch_size=8),
        "batch_process over an endless input",
    )
    # Nothing read ahead fits: the run does not read and skip the input until the deadline.
    assert now() == 0
    assert report.stop_reason == "out_of_time"
    assert not report.input_exhausted
    assert report.counts["skipped"] == len(report) > 0


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
    async def convert() -> None:
        async with stream(_failing_input(), _ident) as s:
            try:
                async for _ in s:
                    pass
            except InputFailed as e:
                raise MyError("converted") from e

    with pytest.raises(MyError) as info:
        await within(HANG, convert(), "the stream block")
    assert isinstance(info.value.__cause__, InputFailed)


async def test_an_error_the_block_raises_wins_and_notes_an_unseen_run_error() -> None:
    async def leave_with_my_error() -> None:
        async with stream(_failing_input(), _ident):
            await asyncio.sleep(5)  # the run ends with the input's error meanwhile, unseen
            raise MyError("the block's own error")

    with pytest.raises(MyError) as info:
        await within(HANG, leave_with_my_error(), "the stream block")
    assert any("InputFailed" in n for n in info.value.__notes__)


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
    async def ignore_it() -> None:
        async with stream(_failing_input(), _ident):
            await asyncio.sleep(5)  # the run ends with the input's error meanwhile

    with pytest.raises(InputFailed):
        await within(HANG, ignore_it(), "the stream block")


# -- 7. a caller's cancel is told truthfully -------------------------------------------------
async def _short_then_long(i: int) -> int:
    await asyncio.sleep(0.5 if i < 3 else 10)
    return i


async def test_a_callers_cancel_is_told_in_run_finished_and_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[Event] = []
    caplog.set_level(logging.INFO, logger="batchkit")
    task = asyncio.create_task(
        batch_process(
            range(10),
            _short_then_long,
            concurrency=5,
            observers=[seen.append, LoggingObserver()],
        )
    )
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(HANG, task, "the cancelled batch_process")
    assert now() == 1
    last = seen[-1]
    assert isinstance(last, RunFinished)
    report = last.report
    assert report.stop_reason == "cancelled"
    # 0-2 done at 0.5; 3-7 in flight at 1 s (cut); 8-9 never started.
    assert [o.kind for o in report] == ["success"] * 3 + ["cancelled"] * 5 + ["skipped"] * 2
    assert all(o.error.reason == "cancelled" for o in report.failures)  # type: ignore[attr-defined]
    (line,) = [r for r in caplog.records if r.getMessage().startswith("batch finished")]
    assert line.levelno == logging.WARNING
    assert line.getMessage() == (
        "batch finished name=None total=10 success=3 error=0 timeout=0 cancelled=5 skipped=2 "
        "lost=0 retries=0 peak_concurrency=5 wall=1.000s stop_reason=cancelled unfinished=7"
    )


async def test_leaving_a_stream_early_counts_every_item_in_its_report() -> None:
    async with stream(range(10), _short_then_long, concurrency=5) as s:
        async for o in s:
            if o.index == 2:
                break
        assert now() == 0.5
    report = s.report
    assert report.stop_reason == "cancelled"
    assert report.total == 10
    assert report.counts["success"] == 3
    assert report.counts["cancelled"] == 5
    assert report.counts["skipped"] == 2


async def test_leaving_a_stream_after_every_item_ended_is_no_cancel() -> None:
    async with stream(range(3), _ident, concurrency=3) as s:
        got = []
        async for o in s:
            got.append(o)
            if len(got) == 3:
                break  # every item has ended; the run may not have returned yet
    assert s.report.stop_reason is None
    assert s.report.ok


# -- 8. a retry dropped for the deadline leaves a trace --------------------------------------
async def test_a_retry_dropped_for_the_deadline_says_so() -> None:
    seen: list[Event] = []

    async def fn(i: int) -> int:
        await asyncio.sleep(0.75)
        raise ConnectionError("upstream reset")

    retry = Retry(attempts=3, backoff=Backoff(initial=0.25, maximum=0.25, jitter=False))
    report = await within(
        HANG,
        batch_process([0], fn, retry=retry, deadline=1, observers=[seen.append]),
        "batch_process",
    )
    # The attempt ends at 0.75; a retry at 1.0 expected to take 0.75 cannot end by 1.
    assert now() == 0.75
    (failed,) = [e for e in seen if type(e).__name__ == "AttemptFailed"]
    assert failed.retry_in is None  # type: ignore[union-attr]  # no retry is announced
    failure = report[0]
    assert isinstance(failure, Failure)
    assert failure.kind == "skipped"
    assert isinstance(failure.error, ItemSkipped)
    assert failure.error.reason == "out_of_time"
    assert isinstance(failure.error.__cause__, ConnectionError)
    assert failure.attempts == 1
    assert [type(e) for e in failure.errors] == [ConnectionError, ItemSkipped]
    # The cron-jobs page's redo recipe picks it up for the next run.
    redo = {f.index for f in report.failures if f.kind in ("skipped", "cancelled")}
    assert redo == {0}


async def test_a_dropped_retry_is_logged_as_a_failure_not_a_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(0.75)
        raise ConnectionError("upstream reset")

    caplog.set_level(logging.DEBUG, logger="batchkit")
    retry = Retry(attempts=3, backoff=Backoff(initial=0.25, maximum=0.25, jitter=False))
    await within(
        HANG,
        batch_process([0], fn, retry=retry, deadline=1, observers=[LoggingObserver()]),
        "batch_process",
    )
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert not [m for _, m in messages if m.startswith("item retry")]
    (failed,) = [(lvl, m) for lvl, m in messages if m.startswith("item failed")]
    assert failed[0] == "WARNING"
    assert "outcome=skipped attempts=1" in failed[1]
    assert "out_of_time" in failed[1]


async def test_an_item_waiting_to_retry_when_the_run_stops_is_skipped_with_its_errors() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(1 + i)
        if i == 0:
            raise ConnectionError("transient: retried in 2 s")
        raise Boom("not retried: trips max_failures=1")

    retry = Retry(retry_on=ConnectionError, backoff=Backoff(initial=2, maximum=2, jitter=False))
    report = await within(
        HANG,
        batch_process(range(2), fn, concurrency=2, retry=retry, max_failures=1),
        "batch_process",
    )
    assert now() == 2
    assert report.stop_reason == "max_failures"
    waiting = report[0]
    assert isinstance(waiting, Failure)
    assert waiting.kind == "skipped"
    assert isinstance(waiting.error, ItemSkipped)
    assert waiting.error.reason == "max_failures"
    assert waiting.error.attempts == 1
    assert isinstance(waiting.error.__cause__, ConnectionError)
    assert [type(e) for e in waiting.errors] == [ConnectionError, ItemSkipped]


# -- 9. the end of a run that stopped early is a WARNING -------------------------------------
@pytest.mark.parametrize(
    ("options", "reason", "unfinished"),
    [
        ({"fail_fast": True}, "fail_fast", 3),
        ({"max_failures": 1}, "max_failures", 3),
        ({"deadline": 1.5}, "deadline", 3),
        ({"deadline": 3.5, "concurrency": 1}, "out_of_time", 2),
        ({"max_failure_ratio": FailureRatio(ratio=0.2, min_sample=1)}, "max_failure_ratio", 3),
    ],
    ids=["fail_fast", "max_failures", "deadline", "out_of_time", "max_failure_ratio"],
)
async def test_the_end_of_a_run_that_stopped_early_is_a_warning(
    caplog: pytest.LogCaptureFixture, options: dict[str, Any], reason: str, unfinished: int
) -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(1 + i)
        if i == 0:
            raise Boom("first")
        return i

    caplog.set_level(logging.INFO, logger="batchkit")
    kw: dict[str, Any] = {"concurrency": 2, **options}
    await within(
        HANG,
        batch_process(range(4), fn, observers=[LoggingObserver()], **kw),
        "batch_process",
    )
    (line,) = [r for r in caplog.records if r.getMessage().startswith("batch finished")]
    assert line.levelno == logging.WARNING
    assert f"stop_reason={reason} unfinished={unfinished}" in line.getMessage()


async def test_the_end_of_a_run_that_ran_through_is_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fn(i: int) -> int:
        if i == 0:
            raise Boom("an ordinary failure")
        return i

    caplog.set_level(logging.INFO, logger="batchkit")
    await batch_process(range(3), fn, observers=[LoggingObserver()])
    (line,) = [r for r in caplog.records if r.getMessage().startswith("batch finished")]
    assert line.levelno == logging.INFO
    assert "unfinished" not in line.getMessage()


# -- 10. the documented 429 recipe retries without a header ---------------------------------
class _Headers(dict[str, str]):
    pass


class _Response:
    """What httpx's and requests' responses have that batchkit looks at."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
        self.status_code = status_code
        self.headers = _Headers(headers or {})
        self.url = "https://api.example/items"


class RateLimited(Exception):
    """The retries how-to's recipe, as written there."""

    def __init__(self, response: _Response) -> None:
        super().__init__(f"429 from {response.url}")
        self.retry_after = response.headers.get("Retry-After")  # parsed by batchkit


@pytest.mark.parametrize(("headers", "waited"), [({}, 0.5), ({"Retry-After": "3"}, 3)])
async def test_the_429_recipe_retries_with_or_without_a_retry_after_header(
    headers: dict[str, str], waited: float
) -> None:
    calls: list[float] = []

    async def fn(i: int) -> int:
        calls.append(now())
        if len(calls) == 1:
            raise RateLimited(_Response(429, headers))
        return i

    retry = Retry(backoff=Backoff(initial=0.5, maximum=0.5, jitter=False))
    report = await within(HANG, batch_process([7], fn, retry=retry), "batch_process")
    assert report.values() == [7]
    assert calls == [0, waited]


class _HttpxStatusError(Exception):
    """httpx.HTTPStatusError's shape: the status is on ``.response.status_code``."""

    def __init__(self, status: int) -> None:
        super().__init__(f"Client error '{status}'")
        self.request = object()
        self.response = _Response(status)


class _RequestsHTTPError(OSError):
    """requests.HTTPError's shape: an OSError (RequestException) with ``.response``."""

    def __init__(self, status: int) -> None:
        super().__init__(f"{status} Client Error")
        self.response = _Response(status)


class _AiohttpClientResponseError(Exception):
    """aiohttp.ClientResponseError's shape: the status is on ``.status``; ``.headers``."""

    def __init__(self, status: int) -> None:
        super().__init__(f"{status}, message='Too Many Requests'")
        self.status = status
        self.headers = _Headers()


@pytest.mark.parametrize(
    "make", [_HttpxStatusError, _RequestsHTTPError, _AiohttpClientResponseError], ids=repr
)
@pytest.mark.parametrize(("status", "expected"), [(429, True), (503, True), (404, False)])
def test_transient_reads_the_status_of_http_client_errors(
    make: Any, status: int, expected: bool
) -> None:
    error = make(status)
    # requests' errors are OSErrors: transient whatever the status.
    assert transient(error) is (expected or isinstance(error, OSError))


def test_transient_on_the_real_httpx_error() -> None:
    httpx = pytest.importorskip("httpx")
    request = httpx.Request("GET", "https://api.example/items")
    for status, expected in ((429, True), (502, True), (404, False)):
        response = httpx.Response(status, request=request)
        error = httpx.HTTPStatusError("status", request=request, response=response)
        assert transient(error) is expected


def test_transient_on_the_real_requests_error() -> None:
    requests = pytest.importorskip("requests")
    for status in (429, 503, 404):
        response = requests.Response()
        response.status_code = status
        # A RequestException is an OSError: transient whatever its status.
        assert transient(requests.HTTPError(response=response)) is True


# -- 11. a rollback cut by a timeout keeps fn's error -----------------------------------------
async def test_a_rollback_cut_by_the_timeout_keeps_fns_error() -> None:
    exits: list[str] = []

    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[None]:
        try:
            yield None
        except Exception:
            try:
                await asyncio.sleep(5)  # a slow rollback, cut by the item's timeout
            finally:
                exits.append(f"rollback ended at {now():g}")
            raise

    async def fn(i: int, _s: None) -> int:
        await asyncio.sleep(1)
        raise Boom("the write failed")

    report = await within(HANG, batch_process([0], fn, context=session, timeout=2), "batch_process")
    assert exits == ["rollback ended at 2"]
    failure = report[0]
    assert isinstance(failure, Failure)
    assert failure.kind == "error"
    assert isinstance(failure.error, Boom)
    assert failure.errors == (failure.error,)
    assert any("timeout interrupted" in n for n in failure.error.__notes__)


async def test_a_timeout_in_fn_is_still_a_timeout_with_a_slow_rollback() -> None:
    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[None]:
        try:
            yield None
        except BaseException:
            await asyncio.sleep(0.5)  # the rollback finishes within grace
            raise

    async def fn(i: int, _s: None) -> int:
        await asyncio.sleep(10)
        return i

    report = await within(HANG, batch_process([0], fn, context=session, timeout=2), "batch_process")
    assert report[0].kind == "timeout"
    assert now() == 2.5


# -- 12. a sync fn's thread that outlives its timeout does not outlive its context ------------
# Real time (a thread cannot be paused by a virtual clock); the thread blocks on an event the
# test sets after the call returned, never on a sleep; the 30 s waits are hang guards.
class _SessionOfAThread:
    """A context whose value a sync fn uses from its thread; it logs use and exit in order."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.log: list[str] = []
        self.exited = asyncio.Event()

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[list[str]]:
        try:
            yield self.log
        finally:
            self.log.append("context exited")
            self.exited.set()

    def fn(self, i: int, ctx: list[str]) -> int:
        self.started.set()
        self.release.wait(30)  # a hang guard, not a margin: the test sets it
        ctx.append("thread used the session")
        return i


@pytest.mark.looptime(False)
@pytest.mark.parametrize(
    ("options", "kind"),
    [
        ({"timeout": 0.2, "deadline": Deadline(seconds=30, grace=0.1)}, "timeout"),
        ({"deadline": Deadline(seconds=0.2, grace=0.1)}, "cancelled"),
    ],
    ids=["timeout", "deadline"],
)
async def test_a_sync_fns_context_is_not_exited_while_its_thread_runs(
    options: dict[str, Any], kind: str
) -> None:
    s = _SessionOfAThread()
    try:
        report = await within(30, batch_process([0], s.fn, context=s, **options), "batch_process")
        assert report[0].kind == kind
        if report.threads_running:
            # The call returned (after grace) with the thread still blocked: its context is
            # still open, and the item is listed as abandoned.
            assert s.log == []
            assert report.abandoned == (0,)
        else:  # pragma: no cover - the thread had not started when it was cancelled
            assert s.log == ["context exited"]
    finally:
        s.release.set()
    await within(30, s.exited.wait(), "the context's exit")
    if s.started.is_set():
        assert s.log == ["thread used the session", "context exited"]


@pytest.mark.looptime(False)
async def test_a_callers_cancel_waits_for_a_sync_fns_thread_then_abandons_it() -> None:
    s = _SessionOfAThread()
    seen: list[Event] = []
    task = asyncio.create_task(
        batch_process(
            [0], s.fn, context=s, deadline=Deadline(seconds=30, grace=0.1), observers=[seen.append]
        )
    )
    try:
        assert await asyncio.to_thread(s.started.wait, 30), "hang: the thread never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(30, task, "the cancelled batch_process")
        assert s.log == []  # the thread still runs: its context is still open
        last = seen[-1]
        assert isinstance(last, RunFinished)
        assert last.report.abandoned == (0,)
        assert last.report[0].kind == "cancelled"
        assert last.report.stop_reason == "cancelled"
    finally:
        s.release.set()
    await within(30, s.exited.wait(), "the context's exit after the thread returned")
    assert s.log == ["thread used the session", "context exited"]


# -- the seams of the fixes ------------------------------------------------------------------
class _ExitFailsLimiter:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        raise ConnectionError("limiter release failed")


async def test_a_limiter_whose_exit_raises_fails_a_success_and_notes_a_failure() -> None:
    async def fn(i: int) -> int:
        if i == 1:
            raise Boom("fn failed")
        return i

    report = await within(
        HANG, batch_process(range(2), fn, rate_limit=_ExitFailsLimiter()), "batch_process"
    )
    assert isinstance(report[0], Failure)
    assert isinstance(report[0].error, ConnectionError)
    assert isinstance(report[1], Failure)
    assert isinstance(report[1].error, Boom)
    assert any("releasing the limiter" in n for n in report[1].error.__notes__)


async def test_a_stream_cancelled_while_entering_leaves_no_task_behind() -> None:
    before = asyncio.all_tasks()
    entered = asyncio.Event()

    async def enter() -> None:
        entered.set()
        async with stream(range(3), _ident):
            raise AssertionError("the block must not run")

    task = asyncio.create_task(enter())
    await entered.wait()
    task.cancel()  # lands in __aenter__'s yield to the run
    with pytest.raises(asyncio.CancelledError):
        await within(HANG, task, "the cancelled enter")
    assert asyncio.all_tasks() == before
