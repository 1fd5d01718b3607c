"""Every bad argument fails at once, before any item runs, naming the argument."""

from __future__ import annotations

import math
from typing import Any

import pytest

from batchkit import (
    Adaptive,
    Backoff,
    Deadline,
    FailureRatio,
    InvalidArgument,
    RateLimit,
    Retry,
    batch_process,
    stream,
)

calls: list[object] = []


async def fn(item: object) -> object:
    calls.append(item)
    return item


async def fn2(item: object, ctx: object) -> object:
    calls.append(item)
    return item


class _CM:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


BAD: list[tuple[dict[str, Any], str]] = [
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": -3}, "concurrency"),
    ({"concurrency": 2.5}, "concurrency"),
    ({"concurrency": True}, "concurrency"),
    ({"concurrency": "4"}, "concurrency"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": math.nan}, "timeout"),
    ({"timeout": math.inf}, "timeout"),
    ({"timeout": "30"}, "timeout"),
    ({"context": "session"}, "context"),
    ({"key": 3}, "key"),
    ({"cost": "big"}, "cost"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.0}, "batch_size"),
    ({"fail_fast": 1}, "fail_fast"),
    ({"retry": 3}, "retry"),
    ({"rate_limit": 10}, "rate_limit"),
    ({"deadline": 0}, "deadline"),
    ({"deadline": math.nan}, "deadline"),
    (
        {"deadline": Deadline(seconds=10, fit_timeout=True), "timeout": 30},
        "longer than the deadline",
    ),
    ({"max_failures": 0}, "max_failures"),
    ({"max_failures": True}, "max_failures"),
    ({"max_failure_ratio": 1.5}, "max_failure_ratio"),
    ({"max_failure_ratio": "half"}, "max_failure_ratio"),
    ({"observers": [1]}, "observer"),
    ({"observers": print}, "observers"),
    ({"progress": "yes"}, "progress"),
    ({"name": 5}, "name"),
]


@pytest.mark.parametrize(("kwargs", "mentions"), BAD)
async def test_bad_keyword_is_rejected_before_any_item_runs(
    kwargs: dict[str, Any], mentions: str
) -> None:
    calls.clear()
    with pytest.raises(InvalidArgument, match=mentions):
        await batch_process([1, 2, 3], fn, **kwargs)
    with pytest.raises(InvalidArgument, match=mentions):
        stream([1, 2, 3], fn, **kwargs)
    assert calls == []


async def test_bad_items_and_fn() -> None:
    with pytest.raises(InvalidArgument, match="iterable"):
        await batch_process(42, fn)  # type: ignore[call-overload]
    with pytest.raises(InvalidArgument, match="string"):
        await batch_process("abc", fn)
    with pytest.raises(InvalidArgument, match="callable"):
        await batch_process([1], "fn")  # type: ignore[call-overload]
    # Wrong arity, with and without a context: the hint says how fn is called.
    with pytest.raises(InvalidArgument, match=r"fn\(item, ctx\)"):
        await batch_process([1], fn, context=_CM)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="pass context="):
        await batch_process([1], fn2)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="ordered"):
        stream([1], fn, ordered=1)  # type: ignore[call-overload]
    with pytest.raises(InvalidArgument, match="buffer"):
        stream([1], fn, buffer=0)
    assert calls == []


def test_invalid_argument_is_a_type_and_value_error() -> None:
    assert issubclass(InvalidArgument, TypeError)
    assert issubclass(InvalidArgument, ValueError)


@pytest.mark.parametrize(
    ("factory", "mentions"),
    [
        (lambda: Retry(attempts=0), "attempts"),
        (lambda: Retry(retry_on=(KeyboardInterrupt,)), "retry_on"),  # type: ignore[arg-type]
        (lambda: Retry(retry_on=3), "retry_on"),  # type: ignore[arg-type]
        (lambda: Retry(backoff=1.0), "backoff"),  # type: ignore[arg-type]
        (lambda: Backoff(initial=-1), "initial"),
        (lambda: Backoff(initial=5, maximum=1), "maximum"),
        (lambda: Backoff(multiplier=0.5), "multiplier"),
        (lambda: RateLimit(per_second=0), "per_second"),
        (lambda: RateLimit(per_second=5, burst=0), "burst"),
        (lambda: Deadline(), "exactly one"),
        (lambda: Deadline(seconds=5, at=3), "exactly one"),
        (lambda: Deadline(seconds=-5), "seconds"),
        (lambda: FailureRatio(ratio=1.0), "ratio"),
        (lambda: FailureRatio(ratio=0.5, min_sample=0), "min_sample"),
        (lambda: Adaptive(min=0), "min"),
        (lambda: Adaptive(min=5, max=2), "max"),
        (lambda: Adaptive(initial=100, max=10), "initial"),
        (lambda: Adaptive(decrease=1.5), "decrease"),
        (lambda: Adaptive(latency_factor=0.5), "latency_factor"),
    ],
)
def test_bad_policies_are_rejected(factory: Any, mentions: str) -> None:
    with pytest.raises(InvalidArgument, match=mentions):
        factory()


async def test_fit_timeout_off_allows_a_timeout_longer_than_the_deadline() -> None:
    report = await batch_process(
        [1], fn, timeout=30, deadline=Deadline(seconds=10, fit_timeout=False)
    )
    assert report.values() == [1]
