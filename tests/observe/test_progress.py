"""ProgressObserver: rendered to a fake terminal, silent elsewhere, every backend."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sys
from typing import TYPE_CHECKING

import pytest

from batchkit import (
    InvalidArgument,
    MissingExtra,
    RunFinished,
    RunStarted,
    batch_process,
    stream,
)
from batchkit._observe import progress as _progress
from batchkit._observe.progress import ProgressObserver

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.looptime


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def work(seconds: int) -> int:
    await asyncio.sleep(seconds)
    if seconds == 3:
        raise ValueError("three")
    return seconds


async def test_plain_line_on_a_terminal() -> None:
    """Items of 1, 3 (fails), 5 and 2 s, two at a time: they end at 1, 3, 5 and 6 s."""
    term = FakeTerminal()
    observer = ProgressObserver(file=term, backend="plain", min_interval=0)
    report = await batch_process(
        [1, 3, 5, 2], work, concurrency=2, name="demo", observers=[observer]
    )
    assert report.wall_time == 6
    assert term.getvalue().split("\r") == [
        "",
        "demo: 0/4 done, 0 failed, 0 in flight",
        "demo: 0/4 done, 0 failed, 1 in flight",
        "demo: 0/4 done, 0 failed, 2 in flight",
        "demo: 1/4 done, 0 failed, 1 in flight, 1.0/s, ETA 00:03",  # t=1: 1 item per second
        "demo: 1/4 done, 0 failed, 2 in flight, 1.0/s, ETA 00:03",
        "demo: 2/4 done, 1 failed, 1 in flight, 0.7/s, ETA 00:03",  # t=3: 2 in 3 s
        "demo: 2/4 done, 1 failed, 2 in flight, 0.7/s, ETA 00:03",
        "demo: 3/4 done, 1 failed, 1 in flight, 0.6/s, ETA 00:02",  # t=5: 1 left at 0.6/s
        "demo: 4/4 done, 1 failed, 0 in flight, 0.7/s, ETA 00:00\n",  # t=6: 4 in 6 s
    ]


async def test_throttled_by_min_interval_on_the_loop_clock() -> None:
    term = FakeTerminal()
    observer = ProgressObserver(file=term, backend="plain", min_interval=10)
    await batch_process([1, 2, 4], work, concurrency=3, observers=[observer])
    # The first frame, then nothing for 10 s of loop time, then the final frame.
    assert term.getvalue().split("\r") == [
        "",
        "0/3 done, 0 failed, 0 in flight",
        "3/3 done, 0 failed, 0 in flight, 0.8/s, ETA 00:00\n",
    ]


@pytest.mark.parametrize("backend", ["auto", "plain", "tqdm", "rich"])
async def test_silent_when_not_a_terminal(backend: _progress.Backend) -> None:
    out = io.StringIO()
    await batch_process(
        [1, 2], work, observers=[ProgressObserver(file=out, backend=backend, min_interval=0)]
    )
    assert out.getvalue() == ""


async def test_force_draws_to_a_file() -> None:
    out = io.StringIO()
    await batch_process(
        [1], work, observers=[ProgressObserver(file=out, backend="plain", force=True)]
    )
    assert out.getvalue() == (
        "\r0/1 done, 0 failed, 0 in flight\r1/1 done, 0 failed, 0 in flight, 1.0/s, ETA 00:00\n"
    )


async def test_tqdm_bar() -> None:
    term = FakeTerminal()
    await batch_process(
        [1, 3, 2], work, name="tq", observers=[ProgressObserver(file=term, backend="tqdm")]
    )
    text = term.getvalue()
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("tq: 100%|")
    assert " 3/3 [" in last
    assert last.endswith(", 1 failed, 0 in flight]")
    assert text.endswith("\n")  # closed, the cursor is below the bar


async def test_rich_bar() -> None:
    term = FakeTerminal()
    await batch_process(
        [1, 3, 2], work, name="rc", observers=[ProgressObserver(file=term, backend="rich")]
    )
    text = term.getvalue()
    assert "rc" in text
    assert "3/3" in text
    assert "1 failed, 0 in flight, 1.0/s, ETA 00:00" in text
    assert text.endswith("\x1b[?25h")  # stopped: the cursor is shown again


async def test_unknown_total_with_stream() -> None:
    async def source() -> AsyncIterator[int]:
        for n in (1, 2, 3):
            yield n

    term = FakeTerminal()
    observer = ProgressObserver(file=term, backend="plain", min_interval=0)
    async with stream(source(), work, concurrency=3, observers=[observer]) as outcomes:
        results = [o.ok async for o in outcomes]
    assert sorted(results) == [False, True, True]
    frames = term.getvalue().split("\r")
    assert frames[1] == "0/? done, 0 failed, 0 in flight"
    assert frames[-1] == "3/? done, 1 failed, 0 in flight, 1.0/s\n"  # no ETA without a total


async def test_progress_true_draws_on_stderr_when_it_is_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(_progress, "_installed", lambda module: False)  # auto -> plain
    await batch_process([1, 2], work, progress=True)
    assert term.getvalue().endswith("2/2 done, 0 failed, 0 in flight, 1.0/s, ETA 00:00\n")


async def test_progress_true_is_silent_on_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    await batch_process([1, 2], work, progress=True)
    assert pipe.getvalue() == ""


def test_missing_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_progress, "_installed", lambda module: False)
    with pytest.raises(MissingExtra, match=r"batchkit\[progress\]"):
        ProgressObserver(backend="tqdm")
    with pytest.raises(MissingExtra, match=r"batchkit\[rich\]"):
        ProgressObserver(backend="rich")
    # "auto" never raises: it falls back to the plain line.
    term = FakeTerminal()
    observer = ProgressObserver(file=term)
    observer(RunStarted(name=None, concurrency=1, total=0, time=0.0))
    observer(RunFinished(name=None, report=None, time=0.0))  # type: ignore[arg-type]
    assert term.getvalue() == "\r0/0 done, 0 failed, 0 in flight\n"


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match="backend must be one of"):
        ProgressObserver(backend="fancy")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="min_interval"):
        ProgressObserver(min_interval=-1)


async def test_close_after_leaving_a_stream_early() -> None:
    """Leaving a stream early still ends the run with RunFinished, which ends the line;
    close() afterwards is a no-op."""
    term = FakeTerminal()
    observer = ProgressObserver(file=term, backend="plain", min_interval=0)
    async with stream([1, 5, 5], work, concurrency=3, observers=[observer]) as outcomes:
        async for _ in outcomes:
            break
    assert term.getvalue().endswith("\n")
    assert term.getvalue().count("\n") == 1
    observer.close()  # idempotent
    assert term.getvalue().count("\n") == 1


# -- a bar and log records on one terminal -----------------------------------------------
def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: carriage returns, line feeds, and the few ANSI
    sequences the backends use (erase line, cursor up; cursor visibility is ignored)."""
    lines: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|.|\n", text, re.DOTALL):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            while len(lines) <= row:
                lines.append([])
        elif token.startswith("\x1b["):
            code, arg = token[-1], token[2:-1]
            if code == "K":
                lines[row] = [] if arg == "2" else lines[row][:col]
            elif code == "A":
                row = max(row - int(arg or 1), 0)
        else:
            line = lines[row]
            line.extend(" " * (col - len(line) + 1))
            line[col] = token
            col += 1
    return ["".join(line).rstrip() for line in lines]


@pytest.mark.parametrize("backend", ["plain", "tqdm", "rich"])
async def test_log_records_are_written_above_the_bar(backend: _progress.Backend) -> None:
    """A record logged while the bar shows gets a line of its own, never glued to the bar
    (``...2 in flight]WARNING ...``); the handler gets its stream back when the bar closes."""
    term = FakeTerminal()
    logger = logging.getLogger(f"test_progress.{backend}")
    handler = logging.StreamHandler(term)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False

    async def noisy(seconds: int) -> int:
        await asyncio.sleep(seconds)
        logger.warning("item %d says hello", seconds)
        return seconds

    observer = ProgressObserver(file=term, backend=backend, min_interval=0, force=True)
    try:
        await batch_process([1, 2, 3], noisy, concurrency=2, name="logs", observers=[observer])
    finally:
        logger.removeHandler(handler)
    assert handler.stream is term
    shown = [line for line in screen(term.getvalue()) if line]
    assert [line for line in shown if "hello" in line] == [
        "WARNING item 1 says hello",
        "WARNING item 2 says hello",
        "WARNING item 3 says hello",
    ]
    assert "3/3" in shown[-1]  # the bar, last, in its final state


async def test_records_to_other_streams_are_left_alone() -> None:
    term, elsewhere = FakeTerminal(), io.StringIO()
    handler = logging.StreamHandler(elsewhere)
    logger = logging.getLogger("test_progress.elsewhere")
    logger.addHandler(handler)
    logger.propagate = False

    async def noisy(seconds: int) -> int:
        logger.warning("to a file")
        assert handler.stream is elsewhere
        return seconds

    try:
        await batch_process(
            [1], noisy, observers=[ProgressObserver(file=term, backend="plain", force=True)]
        )
    finally:
        logger.removeHandler(handler)
    assert elsewhere.getvalue() == "to a file\n"
    assert "to a file" not in term.getvalue()
