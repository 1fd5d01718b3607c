"""For the app's tests: the real ``predictions`` entry point in a subprocess, and waits on it.

Every wait polls the thing itself (a line on stderr, a row, a process) with a deadline that
fails in seconds with a message; nothing sleeps a fixed time and hopes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select

from predictions.db import make_engine, make_session_factory
from predictions.models import Run, RunLease

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping

T = TypeVar("T")

PREDICTIONS = Path(sys.executable).parent / "predictions"
"""The console script, next to this interpreter (``.venv/bin/predictions``)."""

QUIET_SIM = ["--error-rate", "0", "--rate-limit-rate", "0", "--hang-rate", "0"]
# Calls of 0.2-0.3 s; durations long enough that a busy machine does not time markets out.
FAST = ["--time-factor", "0.02", "--timeout", "60", "--deadline", "300"]
WAIT = 60.0
"""Seconds any wait may take before the test fails (a busy machine, not a hang)."""


def env(**extra: str) -> dict[str, str]:
    """The environment for a child: no DATABASE_URL/token/upstream of the caller's."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "PREDICTIONS_TOKEN", "PREDICTIONS_UPSTREAM_URL")
    }
    base.update(extra)
    return base


def predictions(
    *argv: str,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """Run ``.venv/bin/predictions argv...`` to completion."""
    return subprocess.run(
        [str(PREDICTIONS), *argv],
        cwd=cwd,
        env=dict(environ) if environ is not None else env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start(
    *argv: str,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: bool = True,
) -> subprocess.Popen[str]:
    """Start ``.venv/bin/predictions argv...``; stdout piped (or discarded), stderr piped."""
    return subprocess.Popen(
        [str(PREDICTIONS), *argv],
        cwd=cwd,
        env=dict(environ) if environ is not None else env(),
        stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


class StderrLines:
    """Reads a child's stderr on a thread; ``wait_for`` a line containing some text."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._process = process
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stream = self._process.stderr
        assert stream is not None
        with stream:
            for line in stream:
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self.lines.append("")  # EOF marker
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = WAIT) -> str:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self.lines and self.lines[-1] == "":
                    raise AssertionError(f"exited without printing {text!r}: {self.lines}")
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {text!r} on stderr in {timeout} s: {self.lines}")
                self._cond.wait(left)

    def text(self) -> str:
        self._thread.join(timeout=WAIT)
        return "".join(self.lines)


def in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a loop of its own (tests here are sync)."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(asyncio.run(make()))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def runs(url: str) -> list[Run]:
    async def fetch() -> list[Run]:
        engine = make_engine(url)
        try:
            async with make_session_factory(engine)() as session:
                return list((await session.scalars(select(Run).order_by(Run.id))).all())
        finally:
            await engine.dispose()

    return in_thread(fetch)


def lease(url: str) -> RunLease | None:
    async def fetch() -> RunLease | None:
        engine = make_engine(url)
        try:
            async with make_session_factory(engine)() as session:
                return await session.get(RunLease, "predictions")
        finally:
            await engine.dispose()

    return in_thread(fetch)


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``check`` (a row, a file, a process) until true; fail after ``timeout`` s."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
