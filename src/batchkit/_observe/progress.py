"""``ProgressObserver``: a live progress line on a terminal (tqdm, rich, or plain text).

tqdm and rich are optional and imported only when a bar is actually shown, so
``progress=True`` costs nothing when the output is not a terminal (a cron job, CI, a pipe).

While a bar shows, log records bound for the same terminal are written *above* it: the
stream of every console ``logging.StreamHandler`` that writes to the bar's file (or to
stdout/stderr when both are the terminal) is swapped for a proxy that clears the bar, writes
the record, and draws the bar again — what tqdm's ``logging_redirect_tqdm`` and rich's
``RichHandler`` do, for every backend and with no change to the user's logging setup. The
original streams are put back when the bar closes.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, Literal, TextIO, TypeAlias, final

from .._model.errors import InvalidArgument, MissingExtra
from .._model.events import Event, ItemFinished, ItemsSkipped, ItemStarted, RunFinished, RunStarted
from .._model.outcomes import Success
from .._model.public import publish

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from tqdm import tqdm

__all__ = ["ProgressObserver"]

Backend: TypeAlias = Literal["auto", "tqdm", "rich", "plain"]
_BACKENDS: tuple[str, ...] = ("auto", "tqdm", "rich", "plain")
_EXTRAS = {"tqdm": "progress", "rich": "rich"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # pragma: no cover - a broken install
        return False


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m:02d}:{s:02d}"


def _interval(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidArgument(f"min_interval must be a number of seconds >= 0, got {value!r}")
    return float(value)


class _State:
    """Counts of one run, shared by every backend."""

    __slots__ = ("done", "failed", "in_flight", "name", "now", "start", "total")

    def __init__(self, event: RunStarted) -> None:
        self.name = event.name
        self.total = event.total
        self.start = self.now = event.time
        self.done = 0
        self.failed = 0
        self.in_flight = 0

    def rate(self, now: float) -> float | None:
        elapsed = now - self.start
        return self.done / elapsed if elapsed > 0 else None

    def stats(self, now: float) -> str:
        """``1 failed, 3 in flight, 4.0/s, ETA 00:02``: rate and ETA on the loop's clock."""
        parts = [f"{self.failed} failed", f"{self.in_flight} in flight"]
        rate = self.rate(now)
        if rate is not None:
            parts.append(f"{rate:.1f}/s")
            if self.total is not None and rate > 0:
                parts.append(f"ETA {_duration(max(self.total - self.done, 0) / rate)}")
        return ", ".join(parts)

    def line(self, now: float) -> str:
        """``predictions: 12/20 done, 1 failed, 3 in flight, 4.0/s, ETA 00:02``."""
        total = "?" if self.total is None else str(self.total)
        prefix = f"{self.name}: " if self.name else ""
        return f"{prefix}{self.done}/{total} done, {self.stats(now)}"


class _Display:
    """One backend's view of a run; created at ``RunStarted``, closed at ``RunFinished``."""

    def update(self, state: _State, now: float, final: bool) -> None:
        raise NotImplementedError

    def close(self, state: _State, now: float) -> None:
        raise NotImplementedError

    def write_above(self, stream: Any, text: str) -> None:
        """Write whole lines of ``text`` to ``stream`` above the bar, and redraw the bar."""
        raise NotImplementedError


def _terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except (OSError, ValueError):  # a closed stream
        return False


class _AboveBar:
    """A log handler's stream while a bar shows: whole lines go above the bar."""

    def __init__(self, stream: Any, display: _Display, lock: threading.RLock) -> None:
        self.stream = stream
        self._display = display
        self._lock = lock
        self._pending = ""

    def write(self, text: str) -> int:
        with self._lock:
            lines, newline, rest = (self._pending + text).rpartition("\n")
            self._pending = rest
            if newline:
                self._display.write_above(self.stream, lines + newline)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:  # a record without a line end: give it one, above the bar
                text, self._pending = self._pending, ""
                self._display.write_above(self.stream, text + "\n")
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, ...
        return getattr(self.stream, name)


class _LogRedirect:
    """Swaps the streams of console log handlers for :class:`_AboveBar` proxies, and back."""

    def __init__(self, file: TextIO, display: _Display, lock: threading.RLock) -> None:
        self._swapped: list[tuple[logging.StreamHandler[Any], _AboveBar]] = []
        std = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s}
        shared_terminal = _terminal(file)
        for handler in _stream_handlers():
            stream = handler.stream
            if isinstance(stream, _AboveBar):
                continue  # another bar's proxy already
            if stream is file or (shared_terminal and id(stream) in std and _terminal(stream)):
                proxy = _AboveBar(stream, display, lock)
                handler.setStream(proxy)
                self._swapped.append((handler, proxy))

    def restore(self) -> None:
        for handler, proxy in reversed(self._swapped):
            if handler.stream is proxy:
                proxy.flush()
                handler.setStream(proxy.stream)
        self._swapped.clear()


def _stream_handlers() -> list[logging.StreamHandler[Any]]:
    """Console handlers of the root logger and of every logger created so far."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        lg
        for lg in list(logging.Logger.manager.loggerDict.values())
        if isinstance(lg, logging.Logger)
    ]
    found: dict[int, logging.StreamHandler[Any]] = {}
    for lg in loggers:
        for handler in list(lg.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                found.setdefault(id(handler), handler)
    return list(found.values())


class _PlainDisplay(_Display):
    """A carriage-return line: no dependency, and nothing but ``\\r`` and spaces to clear."""

    def __init__(self, file: TextIO, min_interval: float) -> None:
        self._file = file
        self._width = 0
        self._min_interval = min_interval
        self._last = -float("inf")
        self._text = ""

    def update(self, state: _State, now: float, final: bool) -> None:
        # Throttled on the loop's clock, which is the wall clock outside virtual-time tests.
        if not final and now - self._last < self._min_interval:
            return
        self._last = now
        text = state.line(now)
        if text == self._text:
            return
        self._text = text
        pad = " " * max(self._width - len(text), 0)
        self._width = len(text)
        self._file.write(f"\r{text}{pad}")
        self._file.flush()

    def close(self, state: _State, now: float) -> None:
        self.update(state, now, True)
        self._file.write("\n")
        self._file.flush()

    def write_above(self, stream: Any, text: str) -> None:
        self._file.write("\r" + " " * self._width + "\r")  # the bar's line, blank
        if stream is not self._file:
            self._file.flush()
        stream.write(text)
        stream.flush()
        self._file.write(self._text)
        self._file.flush()


class _TqdmDisplay(_Display):
    def __init__(self, state: _State, file: TextIO, min_interval: float) -> None:
        from tqdm import tqdm as base

        class _Bar(base):  # type: ignore[type-arg]
            # No tqdm monitor thread: a bar must not leave a thread behind the run.
            monitor_interval = 0

        self._bar: tqdm[Any] = _Bar(
            total=state.total,
            file=file,
            desc=state.name,
            unit="item",
            mininterval=min_interval,
            leave=True,
        )
        self._file = file
        self._failed = -1
        self._in_flight = -1

    def update(self, state: _State, now: float, final: bool) -> None:
        bar = self._bar
        if state.failed != self._failed or state.in_flight != self._in_flight:
            self._failed, self._in_flight = state.failed, state.in_flight
            bar.set_postfix_str(
                f"{state.failed} failed, {state.in_flight} in flight", refresh=False
            )
        delta = state.done - bar.n
        if delta:
            bar.update(delta)  # redraws at most every ``mininterval``

    def close(self, state: _State, now: float) -> None:
        self.update(state, now, True)
        self._bar.close()

    def write_above(self, stream: Any, text: str) -> None:
        # What tqdm.write does: clear the bars on this terminal, write, redraw them.
        with self._bar.external_write_mode(file=self._file):
            stream.write(text)
            stream.flush()


class _RichDisplay(_Display):
    def __init__(self, state: _State, file: TextIO, min_interval: float) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
        )

        console = Console(file=file, force_terminal=True)
        # No refresh thread and no stdout redirection: both are process-wide side effects.
        self._progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            # Rate and ETA on the loop's clock, like the plain line (rich's own use wall time).
            TextColumn("{task.fields[stats]}"),
            console=console,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._progress.start()
        self._task: TaskID = self._progress.add_task(
            state.name or "batch", total=state.total, stats=state.stats(state.start)
        )
        self._min_interval = min_interval
        self._last = -float("inf")

    def update(self, state: _State, now: float, final: bool) -> None:
        self._progress.update(self._task, completed=state.done, stats=state.stats(now))
        if final or now - self._last >= self._min_interval:
            self._last = now
            self._progress.refresh()

    def close(self, state: _State, now: float) -> None:
        self.update(state, now, True)
        self._progress.stop()

    def write_above(self, stream: Any, text: str) -> None:
        # Through rich's console, like RichHandler: the live display is drawn again below.
        # (A record bound for the other standard stream shows on the bar's stream meanwhile.)
        self._progress.console.print(
            text.rstrip("\n"), markup=False, highlight=False, emoji=False, soft_wrap=True
        )


@final
class ProgressObserver:
    """Show done / failed / in flight / rate / ETA while a run goes.

    ``progress=True`` on :func:`batchkit.batch_process` or :func:`batchkit.stream` adds one
    with the defaults. Arguments:

    - ``file``: where to draw (default: ``sys.stderr`` at the run's start);
    - ``backend``: ``"tqdm"`` (extra ``batchkit[progress]``), ``"rich"`` (extra
      ``batchkit[rich]``), ``"plain"`` (a carriage-return text line, no dependency), or
      ``"auto"`` (the default: tqdm, else rich, else plain);
    - ``min_interval``: seconds between redraws;
    - ``force``: draw even when ``file`` is not a terminal (by default nothing is written to
      a file, a pipe or a CI log).

    Works with unknown totals (iterators, async iterables): the bar then counts up with no ETA.
    The bar is closed when the run finishes. Show one run at a time per observer.

    While the bar shows, records of console ``logging`` handlers that write to the same
    terminal are printed above it instead of being glued to it; the handlers get their
    streams back when the bar closes.
    """

    __slots__ = (
        "_backend",
        "_display",
        "_file",
        "_force",
        "_lock",
        "_min_interval",
        "_redirect",
        "_state",
    )

    def __init__(
        self,
        *,
        file: TextIO | None = None,
        backend: Backend = "auto",
        min_interval: float = 0.1,
        force: bool = False,
    ) -> None:
        if backend not in _BACKENDS:
            raise InvalidArgument(
                f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}"
            )
        if backend in _EXTRAS and not _installed(backend):
            raise MissingExtra(f"ProgressObserver(backend={backend!r})", _EXTRAS[backend], backend)
        self._min_interval = _interval(min_interval)
        self._file = file
        self._backend: Backend = backend
        self._force = force
        self._state: _State | None = None
        self._display: _Display | None = None
        self._redirect: _LogRedirect | None = None
        # Log records may come from other threads; a bar is drawn by one writer at a time.
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"ProgressObserver(backend={self._backend!r})"

    def _open(self, event: RunStarted) -> None:
        file = self._file if self._file is not None else sys.stderr
        if not self._force:
            isatty = getattr(file, "isatty", None)
            if isatty is None or not isatty():
                return
        state = self._state = _State(event)
        backend = self._backend
        if backend == "auto":
            backend = next((b for b in ("tqdm", "rich") if _installed(b)), "plain")
        if backend == "tqdm":
            self._display = _TqdmDisplay(state, file, self._min_interval)
        elif backend == "rich":
            self._display = _RichDisplay(state, file, self._min_interval)
        else:
            self._display = _PlainDisplay(file, self._min_interval)
        with self._lock:
            self._display.update(state, event.time, False)
        self._redirect = _LogRedirect(file, self._display, self._lock)

    def __call__(self, event: Event) -> None:
        if type(event) is RunStarted:
            self.close()
            self._open(event)
            return
        state = self._state
        display = self._display
        if state is None or display is None:
            return  # not a terminal: stay silent, and cheap
        state.now = event.time
        if type(event) is ItemFinished:
            state.done += 1
            if type(event.outcome) is not Success:
                state.failed += 1
            state.in_flight = event.in_flight
        elif type(event) is ItemsSkipped:
            state.done += len(event.indices)
            state.failed += len(event.indices)
        elif type(event) is ItemStarted:
            state.in_flight = event.in_flight
        elif type(event) is RunFinished:
            state.in_flight = 0
            self.close(event.time)
            return
        else:
            return
        with self._lock:
            display.update(state, event.time, False)

    def close(self, now: float | None = None) -> None:
        """Close the bar now. Called at the run's end; call it yourself if you leave a
        ``stream`` early, which ends the run without a ``RunFinished`` event."""
        state, display, redirect = self._state, self._display, self._redirect
        self._state = self._display = self._redirect = None
        if redirect is not None:
            redirect.restore()
        if state is not None and display is not None:
            with self._lock:
                display.close(state, state.now if now is None else now)


publish(globals(), __all__)  # loaded lazily by ``batchkit``: published here, not there
