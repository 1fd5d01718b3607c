"""LoggingObserver: exact lines and ``extra`` fields, levels, streams, JSON output."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import TYPE_CHECKING, Any

import pytest

import batchkit
from batchkit import (
    Deadline,
    Hedge,
    LimitChanged,
    Retry,
    RunStarted,
    batch_process,
    stream,
)
from batchkit._observe.log import LoggingObserver
from batchkit.testing import instant

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.looptime


class Boom(Exception):
    pass


async def work(item: str) -> str:
    """``ok-N`` takes N seconds; ``fail`` fails after 1 s; ``hang`` outlives any timeout."""
    kind, _, seconds = item.partition("-")
    if kind == "fail":
        await asyncio.sleep(1)
        raise Boom("no luck")
    if kind == "hang":
        await asyncio.sleep(3600)
    await asyncio.sleep(float(seconds))
    return item


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "batchkit"]


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in records(caplog)]


async def test_info_lines_and_one_warning_per_failed_item(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="batchkit")
    items = ["ok-2", "fail", "hang", "ok-1"]
    report = await batch_process(
        items,
        work,
        concurrency=3,
        timeout=5,
        key=lambda s: f"market {s}",
        name="predictions",
        observers=[LoggingObserver()],
    )
    assert report.counts == {
        "success": 2,
        "error": 1,
        "timeout": 1,
        "cancelled": 0,
        "skipped": 0,
        "lost": 0,
    }
    assert lines(caplog) == [
        ("INFO", "batch started name=predictions total=4 concurrency=3"),
        (
            "WARNING",
            'item failed name=predictions key="market fail" index=1 outcome=error attempts=1 '
            'elapsed=1.000s in_flight=2 error="Boom: no luck"',
        ),
        (
            "WARNING",
            'item failed name=predictions key="market hang" index=2 outcome=timeout attempts=1 '
            'elapsed=5.000s in_flight=0 error="ItemTimeout: attempt timed out after 5 s"',
        ),
        (
            "INFO",
            "batch finished name=predictions total=4 success=2 error=1 timeout=1 cancelled=0 "
            "skipped=0 lost=0 retries=0 peak_concurrency=3 wall=5.000s stop_reason=None",
        ),
    ]
    extras = [r.batchkit for r in records(caplog)]  # type: ignore[attr-defined]
    assert extras[0] == {
        "event": "run_started",
        "name": "predictions",
        "total": 4,
        "concurrency": 3,
    }
    assert extras[1] == {
        "event": "item_finished",
        "name": "predictions",
        "key": "market fail",
        "index": 1,
        "outcome": "error",
        "attempts": 1,
        "elapsed": 1.0,
        "in_flight": 2,
        "error": "Boom: no luck",
    }
    assert extras[-1] == {
        "event": "run_finished",
        "name": "predictions",
        "total": 4,
        "success": 2,
        "error": 1,
        "timeout": 1,
        "cancelled": 0,
        "skipped": 0,
        "lost": 0,
        "retries": 0,
        "peak_concurrency": 3,
        "wall": 5.0,
        "stop_reason": None,
    }
    # Every record's fields survive a JSON formatter.
    for extra in extras:
        assert json.loads(json.dumps(extra)) == extra


@instant()
async def test_debug_lines_per_attempt_and_retry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="batchkit")
    calls = 0

    async def flaky(item: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(1)
        if calls == 1:
            raise Boom("first try")
        return item

    retry = Retry(attempts=2, retry_on=Exception)
    await batch_process([7], flaky, retry=retry, observers=[LoggingObserver()])
    assert lines(caplog) == [
        ("INFO", "batch started name=None total=1 concurrency=10"),
        ("DEBUG", "item started name=None key=#0 index=0 attempt=1 in_flight=1"),
        (
            "DEBUG",
            "item retry name=None key=#0 index=0 attempt=1 kind=error retry_in=0.000s "
            'error="Boom: first try"',
        ),
        ("DEBUG", "item started name=None key=#0 index=0 attempt=2 in_flight=1"),
        (
            "DEBUG",
            "item finished name=None key=#0 index=0 outcome=success attempts=2 elapsed=2.000s "
            "in_flight=0",
        ),
        (
            "INFO",
            "batch finished name=None total=1 success=1 error=0 timeout=0 cancelled=0 "
            "skipped=0 lost=0 retries=1 peak_concurrency=1 wall=2.000s stop_reason=None",
        ),
    ]


async def test_a_hedge_is_logged_when_it_starts_and_which_attempt_won(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="batchkit")

    async def straggler(item: int) -> int:
        await asyncio.sleep(10 if batchkit.current_attempt().number == 1 else 1)
        return item

    report = await batch_process(
        [7], straggler, key=str, hedge=Hedge(after=2.0, budget=1.0), observers=[LoggingObserver()]
    )
    assert report.hedges == 1
    assert lines(caplog) == [
        ("INFO", "batch started name=None total=1 concurrency=10"),
        ("DEBUG", "item started name=None key=7 index=0 attempt=1 in_flight=1"),
        ("DEBUG", "item started name=None key=7 index=0 attempt=2 in_flight=2 hedge=True"),
        (
            "DEBUG",
            "item finished name=None key=7 index=0 outcome=success attempts=2 elapsed=3.000s "
            "in_flight=0 hedged=hedge",  # recorded once the loser has exited
        ),
        (
            "INFO",
            "batch finished name=None total=1 success=1 error=0 timeout=0 cancelled=0 "
            # retries counts attempts beyond the first, the hedge too; hedges says which
            "skipped=0 lost=0 retries=1 peak_concurrency=2 wall=3.000s stop_reason=None hedges=1",
        ),
    ]


async def test_deadline_warns_once_and_skipped_items_only_at_item_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="batchkit")
    items = [f"ok-{n}" for n in (1, 10, 10, 10, 10)]
    report = await batch_process(
        items,
        work,
        concurrency=2,
        deadline=Deadline(seconds=5),
        name="cron",
        observers=[LoggingObserver()],
    )
    assert report.counts["skipped"] == 2
    assert lines(caplog) == [
        ("INFO", "batch started name=cron total=5 concurrency=2"),
        ("WARNING", "batch deadline hit name=cron in_flight=2"),
        (
            "WARNING",
            "item failed name=cron key=#2 index=2 outcome=cancelled attempts=1 elapsed=4.000s "
            'in_flight=1 error="ItemCancelled: cancelled: the run stopped (deadline)"',
        ),
        (
            "WARNING",
            "item failed name=cron key=#1 index=1 outcome=cancelled attempts=1 elapsed=5.000s "
            'in_flight=0 error="ItemCancelled: cancelled: the run stopped (deadline)"',
        ),
        (
            "WARNING",
            "batch finished name=cron total=5 success=1 error=0 timeout=0 cancelled=2 "
            "skipped=2 lost=0 retries=0 peak_concurrency=2 wall=5.000s stop_reason=deadline "
            "unfinished=4",
        ),
    ]


async def test_run_stopping_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="batchkit")
    await batch_process(
        ["fail", "ok-5"], work, fail_fast=True, name="ff", observers=[LoggingObserver()]
    )
    assert lines(caplog) == [
        (
            "WARNING",
            "item failed name=ff key=#0 index=0 outcome=error attempts=1 elapsed=1.000s "
            'in_flight=1 error="Boom: no luck"',
        ),
        ("WARNING", "batch stopping name=ff reason=fail_fast in_flight=1"),
        (
            "WARNING",
            "item failed name=ff key=#1 index=1 outcome=cancelled attempts=1 elapsed=1.000s "
            'in_flight=0 error="ItemCancelled: cancelled: the run stopped (fail_fast)"',
        ),
    ]


async def test_stream_and_unknown_total(caplog: pytest.LogCaptureFixture) -> None:
    """A stream's final report keeps no outcomes: the counts come from what was observed."""
    caplog.set_level(logging.INFO, logger="batchkit")

    async def source() -> AsyncIterator[str]:
        for item in ("ok-1", "fail", "ok-2"):
            yield item

    seen = []
    async with stream(source(), work, concurrency=2, observers=[LoggingObserver()]) as outcomes:
        async for outcome in outcomes:
            seen.append(outcome.ok)
    assert sorted(seen) == [False, True, True]
    got = lines(caplog)
    assert got[0] == ("INFO", "batch started name=None total=None concurrency=2")
    assert got[-1] == (
        "INFO",
        "batch finished name=None total=3 success=2 error=1 timeout=0 cancelled=0 skipped=0 "
        "retries=0 peak_concurrency=2 wall=3.000s stop_reason=None",
    )


async def test_nothing_is_formatted_for_disabled_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("batchkit.test.quiet")
    logger.setLevel(logging.ERROR)
    formatted: list[str] = []
    monkeypatch.setattr(
        LoggingObserver, "_log", lambda self, level, message, fields: formatted.append(message)
    )
    await batch_process(
        ["ok-1", "fail", "hang"],
        work,
        timeout=2,
        observers=[LoggingObserver(logger=logger)],
    )
    assert formatted == []
    logger.setLevel(logging.WARNING)  # the same run, with warnings on: the test can fail
    await batch_process(["ok-1", "fail"], work, observers=[LoggingObserver(logger=logger)])
    assert formatted == ["item failed"]


async def test_custom_logger_and_item_level(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("myapp.jobs")
    caplog.set_level(logging.INFO, logger="myapp.jobs")
    await batch_process(
        ["ok-1"], work, observers=[LoggingObserver(logger=logger, level_items=logging.INFO)]
    )
    got = [(r.name, r.getMessage().split(" name=")[0]) for r in caplog.records]
    assert got == [
        ("myapp.jobs", "batch started"),
        ("myapp.jobs", "item started"),
        ("myapp.jobs", "item finished"),
        ("myapp.jobs", "batch finished"),
    ]


def test_limit_changes_decrease_at_info_increase_at_item_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="batchkit")
    observer = LoggingObserver()
    observer(LimitChanged(name="a", old=8, new=6, reason="timeout", time=1.0))
    observer(LimitChanged(name="a", old=6, new=7, reason="increase", time=2.0))
    assert lines(caplog) == [
        ("INFO", "concurrency limit changed name=a old=8 new=6 reason=timeout"),
    ]


def test_json_formatter_gets_the_fields() -> None:
    """What a JSON formatter (python-json-logger, structlog's ExtraAdder) sees."""

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            data: dict[str, Any] = {"message": record.getMessage(), **record.batchkit}  # type: ignore[attr-defined]
            return json.dumps(data)

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("batchkit.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        LoggingObserver(logger=logger)(
            RunStarted(name='say "hi"', concurrency=2, total=None, time=0)
        )
    finally:
        logger.removeHandler(handler)
    assert json.loads(out.getvalue()) == {
        "message": 'batch started name="say \\"hi\\"" total=None concurrency=2',
        "event": "run_started",
        "name": 'say "hi"',
        "total": None,
        "concurrency": 2,
    }


def test_a_lost_item_is_counted_not_an_observer_error(caplog: pytest.LogCaptureFixture) -> None:
    """The Dask backend's ``"lost"`` kind reaches the observer like any other failure."""
    from batchkit import Failure, ItemError, ItemFinished, LoggingObserver, RunStarted

    caplog.set_level(logging.INFO, logger="batchkit")
    observer = LoggingObserver()
    observer(RunStarted(name="n", concurrency=1, total=1, time=0.0))
    err = ItemError("the worker running it died")
    lost = Failure("a", err, "lost", 0, 1, 0.5, (err,))
    observer(ItemFinished(name="n", key="#0", outcome=lost, in_flight=0, time=0.5))
    assert any("lost" in r.getMessage() for r in caplog.records)
