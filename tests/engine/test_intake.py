"""The intake on its own: numbering, keys, reading the rest — no event loop for a plain
iterable."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest

from batchkit import ItemSkipped
from batchkit._engine.intake import Intake
from batchkit._engine.sinks import BatchSink

if TYPE_CHECKING:
    from collections.abc import Iterator


def test_items_are_numbered_in_order_and_the_end_is_noticed() -> None:
    intake: Intake[str] = Intake(["a", "b"])
    assert intake.open()
    jobs = [intake.pull_now(), intake.pull_now()]
    assert [(j.index, j.item) for j in jobs if j is not None] == [(0, "a"), (1, "b")]
    assert intake.more() is False  # sized: all were taken
    assert intake.pull_now() is None
    assert intake.exhausted


def test_keys_are_computed_once_and_a_broken_key_falls_back_to_the_index(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def key(item: int) -> str:
        if item % 2:
            raise KeyError(item)
        return f"k{item}"

    intake: Intake[int] = Intake([0, 1, 2, 3], key=key, keep_keys=True)
    intake.open()
    with caplog.at_level(logging.WARNING, logger="batchkit"):
        jobs = [intake.pull_now() for _ in range(4)]
    assert [j.key for j in jobs if j is not None] == ["k0", "#1", "k2", "#3"]
    assert intake.keys == ["k0", "#1", "k2", "#3"]
    # The first failing key is logged, once.
    assert [r.getMessage() for r in caplog.records] == [
        "batchkit: key() raised for item #1 (KeyError(1)); using #index"
    ]


def test_an_input_that_raises_is_an_input_error_told_once() -> None:
    def items() -> Iterator[int]:
        yield 0
        raise OSError("disk")

    told: list[str] = []
    intake: Intake[int] = Intake(items())
    intake.on_error = lambda: told.append("stop")
    intake.open()
    assert intake.pull_now() is not None
    assert intake.pull_now() is None
    assert isinstance(intake.error, OSError)
    assert told == ["stop"]
    assert intake.pull_now() is None  # nothing more is read
    assert not intake.more()


@pytest.mark.parametrize("stage", ["len", "iter"])
def test_an_input_whose_len_or_iter_raises_does_not_open(stage: str) -> None:
    class Broken:
        def __len__(self) -> int:
            if stage == "len":
                raise RuntimeError("len")
            return 3

        def __iter__(self) -> Any:
            raise RuntimeError("iter")

    intake: Intake[int] = Intake(Broken())
    assert not intake.open()
    assert str(intake.error) == stage


@pytest.mark.parametrize("items", [range(5), (0, 1, 2, 3, 4), [0, 1, 2, 3, 4]])
def test_the_unread_rest_of_a_sized_input_is_skipped_as_one_range(items: Any) -> None:
    intake: Intake[int] = Intake(items)
    intake.open()
    intake.pull_now()
    intake.pull_now()
    assert intake.rest_is_known()
    assert intake.rest() == range(2, 5)
    sink: BatchSink[int, int] = BatchSink()
    assert intake.skip_rest(sink, "deadline") == range(2, 5)
    assert intake.exhausted
    assert not intake.rest_is_known()


def test_a_stream_drains_the_rest_one_skipped_envelope_at_a_time() -> None:
    intake: Intake[str] = Intake(["a", "b", "c"])
    intake.open()
    intake.pull_now()
    assert intake.drain_one(None) is None  # no stop: nothing to drain
    first = intake.drain_one("fail_fast")
    assert first is not None
    assert (first.index, first.item, first.kind) == (1, "b", "skipped")
    assert isinstance(first.error, ItemSkipped)
    assert intake.drain_one("fail_fast") is not None
    assert intake.drain_one("fail_fast") is None
    assert intake.exhausted


def test_an_unsized_input_has_no_known_rest() -> None:
    intake: Intake[int] = Intake(iter([1, 2]))
    intake.open()
    assert intake.total is None
    assert not intake.rest_is_known()
    assert intake.more()
