from __future__ import annotations

import asyncio
from typing import Any

import pytest

import batchkit
from batchkit.dask import DaskBackend

pytestmark = pytest.mark.timeout(60)


async def double(x: int) -> int:
    await asyncio.sleep(0.001)
    return 2 * x


async def fail_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


async def test_one_envelope_per_item_in_input_order(client: Any) -> None:
    report = await batchkit.batch_process(
        range(1000), double, concurrency=32, backend=DaskBackend(client, per_worker=16)
    )
    assert [o.index for o in report] == list(range(1000))
    assert report.values() == [2 * i for i in range(1000)]
    assert report.ok


async def test_failures_are_envelopes(client: Any) -> None:
    report = await batchkit.batch_process(
        range(20), fail_odd, concurrency=8, backend=DaskBackend(client, per_worker=4)
    )
    assert report.counts["error"] == 10
    f = report[3]
    assert isinstance(f, batchkit.Failure)
    assert isinstance(f.error, ValueError)
    assert str(f.error) == "odd 3"
