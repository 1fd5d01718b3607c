"""Static typing: checked by mypy --strict (the test suite runs it), and run by pytest.

``assert_type`` pins what mypy infers; the ``# type: ignore[...]`` lines are negative cases
that must stay errors (``warn_unused_ignores`` fails the build if one stops being an error).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, assert_type

import pytest

from batchkit import (
    BatchReport,
    Failure,
    InvalidArgument,
    Outcome,
    Stream,
    Success,
    batch_process,
    stream,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class Session:
    async def save(self, n: int) -> str:
        return str(n)


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[Session]:
    yield Session()


async def to_str(item: int) -> str:
    return str(item)


async def save(item: int, s: Session) -> str:
    return await s.save(item)


def blocking(item: int) -> float:
    return item / 2


async def test_item_and_result_types_flow_into_the_report() -> None:
    report = await batch_process([1, 2, 3], to_str)
    assert_type(report, BatchReport[int, str])
    assert_type(report.values(), list[str])
    for outcome in report:
        assert_type(outcome, Success[int, str] | Failure[int])
        match outcome:
            case Success(item=item, value=value):
                assert_type(item, int)
                assert_type(value, str)
            case Failure(item=item, error=error, kind=kind):
                assert_type(item, int)
                assert_type(error, BaseException)
                assert kind in ("error", "timeout", "cancelled", "skipped")
    assert report.values() == ["1", "2", "3"]


async def test_context_value_type_flows_into_fn() -> None:
    report = await batch_process(range(3), save, context=session)
    assert_type(report, BatchReport[int, str])
    assert report.values() == ["0", "1", "2"]


async def test_sync_functions_keep_their_result_type() -> None:
    report = await batch_process([2, 4], blocking)
    assert_type(report, BatchReport[int, float])
    assert report.values() == [1.0, 2.0]


async def test_stream_outcomes_are_typed() -> None:
    s = stream([1, 2], to_str, ordered=True)
    assert_type(s, Stream[int, str])
    async with s as outcomes:
        async for o in outcomes:
            assert_type(o, Outcome[int, str])


async def test_negative_cases_are_type_errors() -> None:
    # A fn for the wrong item type.
    await batch_process(["a"], to_str)  # type: ignore[arg-type]
    # A fn that takes a context, without a context.
    with pytest.raises(InvalidArgument):  # and at run time, before anything runs
        await batch_process([1], save)  # type: ignore[arg-type]

    # A context whose value fn cannot take.
    async def wrong_ctx(item: int, s: str) -> str:
        return s

    await batch_process([1], wrong_ctx, context=session)  # type: ignore[misc]
    # The report's values are str, not int.
    report = await batch_process([1], to_str)
    _: list[int] = report.values()  # type: ignore[assignment]
