"""The observer seam: a raising observer is reported once and dropped; no listener, no events."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import pytest

from batchkit import (
    Event,
    ItemFinished,
    ItemStarted,
    Observer,
    Retry,
    RunFinished,
    RunStarted,
    batch_process,
    stream,
)
from batchkit._model import events as _events
from batchkit._observe.log import LoggingObserver
from batchkit._observe.progress import ProgressObserver
from batchkit.testing import instant

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.looptime


async def work(n: int) -> int:
    await asyncio.sleep(n)
    if n == 2:
        raise ValueError("two")
    return n


class Recording:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)


class Raising:
    """Raises on the first event of type ``on``; counts every call it gets."""

    def __init__(self, on: type[Any]) -> None:
        self.on = on
        self.calls = 0

    def __call__(self, event: Event) -> None:
        self.calls += 1
        if isinstance(event, self.on):
            raise RuntimeError("observer bug")

    def __repr__(self) -> str:
        return f"Raising({self.on.__name__})"


def reported(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "batchkit" and "observer" in r.getMessage()]


@pytest.mark.parametrize("on", [RunStarted, ItemStarted, ItemFinished, RunFinished])
async def test_a_raising_observer_is_reported_once_and_the_run_completes(
    caplog: pytest.LogCaptureFixture, on: type[Any]
) -> None:
    caplog.set_level(logging.ERROR, logger="batchkit")
    healthy_alone = Recording()
    await batch_process([1, 2, 3], work, concurrency=2, observers=[healthy_alone])

    broken, healthy = Raising(on), Recording()
    report = await batch_process([1, 2, 3], work, concurrency=2, observers=[broken, healthy])

    assert report.counts["success"] == 2
    assert report.counts["error"] == 1
    [record] = reported(caplog)
    assert record.getMessage() == (
        f"batchkit: observer Raising({on.__name__}) raised; it is disabled for this run"
    )
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "observer bug"
    # Dropped right after its first failure ...
    seen = [type(e) for e in healthy.events]
    assert broken.calls == seen.index(on) + 1
    # ... while the others saw the same run as without it.
    assert seen == [type(e) for e in healthy_alone.events]


async def test_a_raising_observer_in_a_stream(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="batchkit")
    broken = Raising(ItemFinished)
    async with stream([1, 2, 3], work, observers=[broken]) as outcomes:
        got = sorted([o.index async for o in outcomes])
    assert got == [0, 1, 2]
    assert len(reported(caplog)) == 1


@pytest.fixture
def constructions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count every event the engine builds, by wrapping the classes it uses."""
    built: list[str] = []

    def counting(cls: type[Any]) -> Callable[..., Any]:
        def build(**fields: Any) -> Any:
            built.append(cls.__name__)
            return cls(**fields)

        return build

    for name in (
        "RunStarted",
        "ItemStarted",
        "AttemptFailed",
        "ItemFinished",
        "LimitChanged",
        "RunStopping",
        "DeadlineHit",
        "RunFinished",
    ):
        # The engine imports event classes from _events at each emit site.
        monkeypatch.setattr(_events, name, counting(getattr(_events, name)))
    return built


@instant()
async def test_no_observer_no_event_is_built(constructions: list[str]) -> None:
    kwargs: dict[str, Any] = {"retry": Retry(attempts=2), "deadline": 3.5}
    await batch_process([1, 2, 3, 4], work, concurrency=2, **kwargs)
    await batch_process([1, 2], work, progress=False, **kwargs)
    async with stream([1, 2], work, **kwargs) as outcomes:
        [o async for o in outcomes]
    assert constructions == []
    # The same runs with one listener build events: the counting is live.
    await batch_process([1, 2, 3, 4], work, concurrency=2, observers=[Recording()], **kwargs)
    assert set(constructions) >= {
        "RunStarted",
        "ItemStarted",
        "AttemptFailed",
        "ItemFinished",
        "DeadlineHit",
        "RunFinished",
    }


async def test_events_stop_once_every_observer_is_dropped(
    constructions: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="batchkit")
    await batch_process([1, 3, 4], work, observers=[Raising(RunStarted)])
    assert constructions == ["RunStarted"]


async def test_quiet_builtin_observers_still_cost_little(
    constructions: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disabled logging and a progress bar off a terminal do no formatting work at all."""
    logger = logging.getLogger("batchkit.test.off")
    logger.setLevel(logging.CRITICAL)
    formatted: list[str] = []
    monkeypatch.setattr(LoggingObserver, "_log", lambda *args: formatted.append("x"))
    observers: list[Observer] = [LoggingObserver(logger=logger), ProgressObserver()]
    await batch_process([1, 2, 3], work, observers=observers)
    assert formatted == []
    assert constructions  # events are built (someone listens), but nothing is formatted
