"""A Dask ``LocalCluster`` of two worker processes for the Dask backend's tests.

One cluster for the whole tests/dask package (starting one takes seconds), on loopback,
dashboard off; every test opens its own asynchronous client on it. Tests that kill a worker
wait for the nanny to bring it back before the next test runs.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import Phase, settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

distributed = pytest.importorskip("distributed")

N_WORKERS = 2

# `pytest tests/dask --hypothesis-profile=chaos`: the chaos suite (test_chaos.py) with 200
# examples instead of its default few. Registered here: the profile is loaded before test
# modules are imported.
settings.register_profile(
    "chaos",
    max_examples=200,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


@pytest.fixture(scope="package")
def cluster() -> Iterator[Any]:
    with warnings.catch_warnings():
        # distributed's own start-up noise (ports, deprecations in its dependencies).
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(
            n_workers=N_WORKERS,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            host="127.0.0.1",
            silence_logs=40,
        )
    try:
        yield cluster
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cluster.close()


def heal(cluster: Any) -> list[str]:
    """Start again the workers whose nanny gave up restarting them (Dask's nanny does not
    restart a worker that died while it was starting). Returns their names."""
    gone = [
        name
        for name, nanny in list(cluster.workers.items())
        if str(getattr(nanny, "status", "")).rsplit(".", 1)[-1] in ("closed", "failed")
    ]
    for name in gone:
        del cluster.workers[name]
    cluster.scale(N_WORKERS)
    return [str(name) for name in gone]


async def wait_for_two(client: Any, cluster: Any) -> None:
    """Wait for both workers; if a nanny gave up on its worker, start it again (said on stderr
    so that it is seen) and wait once more."""
    import asyncio
    import sys

    try:
        await client.wait_for_workers(N_WORKERS, timeout=30)
    except TimeoutError:
        healed = await asyncio.to_thread(heal, cluster)
        print(
            f"tests/dask: {N_WORKERS} workers not back within 30 s; nannies that gave up: "
            f"{healed}; scaled the cluster to {N_WORKERS} again",
            file=sys.stderr,
        )
        await client.wait_for_workers(N_WORKERS, timeout=60)


@pytest.fixture
async def client(cluster: Any) -> AsyncIterator[Any]:
    async with distributed.Client(cluster.scheduler_address, asynchronous=True) as c:
        await c.wait_for_workers(N_WORKERS)
        yield c
