"""The front door of the Dask backend: arguments, the extra, the seam (no cluster needed)."""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest

import batchkit
from batchkit import InvalidArgument, MissingExtra
from batchkit._dask.chunks import ChunkSizer, plan_chunks
from batchkit._dask.worker import _RUNS, _Gate, _run_state, set_share
from batchkit.dask import DaskBackend, WorkerResource, per_worker

if TYPE_CHECKING:
    from collections.abc import Iterator

    from batchkit._dask.wire import RunSpec


async def quick(x: int) -> int:
    return x


class _AsyncClientStandIn:
    asynchronous = True


def _no_context(*args: Any) -> Any:
    raise AssertionError("never called: refused at the call")


class _SessionStore:
    """What a transactional journal accepts: a state store that writes in a session."""

    get = compare_and_set = set_many = scan = prune = set_in_session = staticmethod(_no_context)


async def _quick_in(x: int, ctx: Any) -> int:
    return x


def test_missing_distributed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(MissingExtra, match=r"pip install 'aio-batchkit\[dask\]'") as info:
        DaskBackend("tcp://127.0.0.1:8786")
    assert info.value.extra == "dask"
    assert isinstance(info.value, ImportError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_worker": 0}, "per_worker must be an int >= 1"),
        ({"per_worker": True}, "per_worker must be an int >= 1"),
        ({"chunk_size": 0}, "chunk_size must be an int >= 1 or None"),
        ({"lost_after": 0}, "lost_after must be a number of seconds > 0 or None"),
        ({"lost_after": True}, "lost_after must be a number of seconds > 0 or None"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        DaskBackend("tcp://127.0.0.1:8786", **kwargs)


def test_a_synchronous_client_is_refused_with_a_hint() -> None:
    class SyncClient:
        asynchronous = False

    with pytest.raises(InvalidArgument, match="asynchronous=True"):
        DaskBackend(SyncClient())


async def test_a_backend_must_be_a_backend() -> None:
    with pytest.raises(InvalidArgument, match="backend must be None"):
        await batchkit.batch_process([1], quick, backend=object())  # type: ignore[call-overload]


async def test_options_that_cannot_hold_across_a_cluster_are_refused() -> None:
    backend = DaskBackend(_AsyncClientStandIn())

    class Limiter:
        async def __aenter__(self) -> None: ...
        async def __aexit__(self, *exc: object) -> None: ...

    with pytest.raises(InvalidArgument, match=r"must be batchkit\.RateLimit"):
        await batchkit.batch_process([1], quick, rate_limit=Limiter(), backend=backend)
    with pytest.raises(InvalidArgument, match="cost= is not supported"):
        await batchkit.batch_process([1], quick, cost=float, backend=backend)
    remembered = batchkit.Adaptive(
        remember=batchkit.Remembered(store=batchkit.MemoryStateStore(), name="job")
    )
    with pytest.raises(InvalidArgument, match=r"Adaptive\(remember=\.\.\.\) is not supported"):
        await batchkit.batch_process([1], quick, concurrency=remembered, backend=backend)
    journal = batchkit.Journal(cast("Any", _SessionStore()), "job", mode="transactional")
    with pytest.raises(
        InvalidArgument, match=r"Journal\(mode='transactional'\) is not supported(.|\n)*HINT"
    ):
        await batchkit.batch_process(
            [1], _quick_in, key=str, journal=journal, context=_no_context, backend=backend
        )
    both = batchkit.Breaker(batchkit.MemoryStateStore(), name="up")
    batched = batchkit.Journal(batchkit.MemoryStateStore(), "job")
    with pytest.raises(InvalidArgument, match=r"journal= and breaker= together(.|\n)*HINT"):
        await batchkit.batch_process(
            [1], quick, key=str, journal=batched, breaker=both, backend=backend
        )


async def test_call_level_groups_are_refused_on_dask_before_any_work() -> None:
    """batchkit.limit() in fn would limit each worker alone: refused at the call."""
    backend = DaskBackend(_AsyncClientStandIn())
    news = [batchkit.LimitGroup(name="news", concurrency=4)]
    with pytest.raises(InvalidArgument, match=r"call-level limit groups .* not supported"):
        await batchkit.batch_process([1], quick, groups=news, backend=backend)
    with pytest.raises(InvalidArgument, match=r"call-level limit groups .* not supported"):
        batchkit.stream([1], quick, groups=news, backend=backend)


async def test_hedge_is_refused_on_dask_before_any_work() -> None:
    """A hedge would run beside its straggler on the same worker: refused at the call."""
    backend = DaskBackend(_AsyncClientStandIn())
    read: list[int] = []

    def items() -> Iterator[int]:
        read.append(1)
        yield 1

    hedge = batchkit.Hedge(after=1.0)
    with pytest.raises(InvalidArgument, match="hedge= is not supported with the Dask backend"):
        await batchkit.batch_process(items(), quick, hedge=hedge, key=str, backend=backend)
    with pytest.raises(InvalidArgument, match="hedge= is not supported with the Dask backend"):
        batchkit.stream(items(), quick, hedge=hedge, key=str, backend=backend)
    assert read == []


def test_worker_resources_are_only_for_code_running_in_a_dask_run() -> None:
    res: WorkerResource[dict[str, int]] = per_worker(dict)
    with pytest.raises(RuntimeError, match="inside a batchkit Dask run"):
        res.get()


@pytest.mark.parametrize(
    ("concurrency", "per_worker", "workers", "threads", "expected"),
    [
        (64, 16, 2, 2, (16, 4)),  # a chunk queued behind each running one
        (32, 16, 2, 2, (16, 2)),  # the global limit leaves no room to queue
        (6, 16, 2, 2, (3, 2)),  # the global limit splits among the threads
        (1, 16, 2, 2, (1, 1)),
        (100, 4, 3, 6, (4, 9)),
    ],
)
def test_chunk_plan_never_exceeds_the_global_limit(
    concurrency: int, per_worker: int, workers: int, threads: int, expected: tuple[int, int]
) -> None:
    per_chunk, in_flight = plan_chunks(concurrency, per_worker, workers, threads)
    assert (per_chunk, in_flight) == expected
    assert per_chunk * in_flight <= concurrency
    assert per_chunk <= per_worker


def test_chunk_sizes_follow_worker_time_and_shrink_toward_the_end() -> None:
    sizer = ChunkSizer(None, per_chunk=16, threads=2, total=10_000)
    assert sizer.next_size(0) == 64  # nothing observed yet
    sizer.observe(64, 0.08)  # 1.25 ms per item: 0.5 s is 400 items
    assert sizer.next_size(64) == 400
    assert sizer.next_size(9_800) == 160  # 0.2 s of work at least
    assert sizer.next_size(9_990) == 160
    assert ChunkSizer(250, per_chunk=16, threads=2, total=None).next_size(0) == 250


@pytest.mark.looptime
async def test_the_worker_gate_paces_real_starts_after_a_stalled_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's share of a cluster-wide rate, as the local RateMeter: a loop stalled from
    t=1.0 to t=1.5 does not release the turns that fell due meanwhile all at once (a CI run
    saw 44 starts in one second under a limit of 40 + 2 before this)."""
    loop = asyncio.get_running_loop()
    run = _run_state("gate-test")
    run.spec = cast("RunSpec", SimpleNamespace(rate=10.0))  # the gate reads .rate only
    run.sem = asyncio.Semaphore(20)
    set_share("gate-test", 10.0, 1)
    real_sleep = asyncio.sleep

    async def stalled_sleep(delay: float, result: Any = None) -> Any:
        due = loop.time() + delay
        if 1.0 <= due < 1.5:
            delay = 1.5 - loop.time()
        return await real_sleep(delay, result)

    monkeypatch.setattr(asyncio, "sleep", stalled_sleep)
    starts: list[float] = []

    async def attempt() -> None:
        async with _Gate(run):
            starts.append(loop.time())

    try:
        await asyncio.gather(*(attempt() for _ in range(20)))
    finally:
        del _RUNS["gate-test"]
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.1 - 1e-9
    assert not [t for t in starts if 1.0 + 1e-6 < t < 1.5]
    after = [t for t in starts if t >= 1.5]
    assert after == pytest.approx([1.5 + 0.1 * k for k in range(len(after))])


async def test_an_fn_that_cannot_be_pickled_is_refused_with_where_to_put_it() -> None:
    """The hint says what works for a script: a module the workers import, not "module level"
    (a script's functions are at module level and are still sent by value)."""
    lock = threading.Lock()

    async def holds_a_lock(x: int) -> int:
        with lock:
            return x

    backend = DaskBackend(_AsyncClientStandIn())
    with pytest.raises(InvalidArgument, match="cannot be pickled") as caught:
        await batchkit.batch_process([1], holds_a_lock, backend=backend)
    assert "a module the workers can import" in str(caught.value)
    assert "client.upload_file" in str(caught.value)

    def by_host(x: int) -> str:
        with lock:
            return str(x)

    groups = [batchkit.LimitGroup(by=by_host, concurrency=4)]
    with pytest.raises(InvalidArgument, match=r"LimitGroup\.by '.*by_host' cannot be pickled"):
        await batchkit.batch_process([1], quick, groups=groups, backend=backend)
    weighted = batchkit.RateLimit(per_second=5, burst=4, weight=by_host)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"RateLimit\.weight '.*by_host' cannot be pickled"):
        await batchkit.batch_process([1], quick, rate_limit=weighted, backend=backend)
