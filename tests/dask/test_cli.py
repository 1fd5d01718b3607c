"""The way users deploy: a `dask scheduler` and two `dask worker` processes from their CLIs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import batchkit
from batchkit.dask import DaskBackend

from . import _work

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.timeout(120)

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[2]
DASK = Path(sys.executable).with_name("dask")
NO_UI = ("--no-dashboard",)
WORKER = ("--nthreads", "1", "--death-timeout", "60", *NO_UI)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Deployment:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """``kill -9`` of a process and its children (a worker's nanny and its process)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A scheduler and two single-threaded workers on 127.0.0.1; every process killed after."""
    if not DASK.exists():
        pytest.skip("the dask CLI is not installed next to this Python")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    common: dict[str, Any] = {
        "cwd": ROOT,
        "env": env,
        "start_new_session": True,  # its own process group: nanny and worker die together
        "stdout": subprocess.DEVNULL,
        "stderr": (tmp_path / "dask.log").open("w"),
    }
    procs = [
        subprocess.Popen(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port), *NO_UI],
            **common,
        )
    ]
    deployment = Deployment(address, procs[0])
    try:
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [str(DASK), "worker", address, "--host", "127.0.0.1", *WORKER],
                    **common,
                )
            )
            deployment.workers.append(procs[-1])
        yield deployment
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=30)
        common["stderr"].close()


@pytest.fixture
def deployed(deployment: Deployment) -> str:
    return deployment.address


async def test_a_cluster_started_from_the_cli(deployed: str) -> None:
    async with distributed.Client(deployed, asynchronous=True, timeout=60) as client:
        await client.wait_for_workers(2, timeout=60)
    # The backend given an address opens its own client for each call.
    backend = DaskBackend(deployed, per_worker=4, chunk_size=20)
    report = await batchkit.batch_process(range(200), _work.timed, concurrency=8, backend=backend)
    assert report.ok
    assert [o.index for o in report] == list(range(200))
    assert len({pid for pid, _, _ in report.values()}) == 2
    async with batchkit.stream(
        range(100), _work.quick, concurrency=8, ordered=True, backend=backend
    ) as outcomes:
        seen = [o.index async for o in outcomes]
    assert seen == list(range(100))


async def _started(client: Any, n: int) -> None:
    """Wait until ``n`` items started on the workers (worker-side counters)."""
    while True:
        states: dict[str, dict[str, int]] = await client.run(_work.get_state)
        if sum(s.get("started", 0) for s in states.values()) >= n:
            return
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("deadline", [None, 3.0], ids=["no-deadline", "deadline"])
async def test_kill_9_of_every_worker_mid_run_ends_every_item_in_one_envelope(
    deployment: Deployment, deadline: float | None
) -> None:
    """Issue 21 case 1: every worker (nanny and process) killed mid-run. Items whose results
    came back keep them; the rest end ``lost`` after ``lost_after`` (no deadline) or at the
    deadline's grace, and the call returns in time."""
    loop = asyncio.get_running_loop()
    async with distributed.Client(deployment.address, asynchronous=True, timeout=60) as client:
        await client.wait_for_workers(2, timeout=60)
        backend = DaskBackend(client, per_worker=4, chunk_size=5, lost_after=2.0)
        start = loop.time()
        task = asyncio.ensure_future(
            batchkit.batch_process(
                range(40),
                _work.slow,
                concurrency=8,
                deadline=batchkit.Deadline(seconds=deadline, grace=0.5) if deadline else None,
                backend=backend,
            )
        )
        await _started(client, 8)
        for worker in deployment.workers:
            deployment.kill(worker)
        report = await task
        returned = loop.time() - start
    assert sorted(o.index for o in report) == list(range(40))
    kinds = {o.kind for o in report}
    assert kinds <= {"success", "lost", "cancelled", "skipped"}, kinds
    assert report.counts["lost"] + report.counts["cancelled"] > 0
    for o in report:
        if o.kind == "success":
            assert o.value == o.index
    if deadline is not None:
        assert returned <= deadline + 0.5 + DaskBackend.SLACK


@pytest.mark.parametrize("given", ["client", "address"])
async def test_kill_9_of_the_scheduler_mid_run_returns_on_time_with_every_envelope(
    deployment: Deployment, given: str
) -> None:
    """Issue 21 case 8: the scheduler killed mid-run: the call returns within
    ``deadline + grace + SLACK`` (no waiting on broadcasts to a scheduler that is gone, nor
    on closing the client the backend opened for an address), and every item has its
    envelope."""
    loop = asyncio.get_running_loop()
    client = await distributed.Client(deployment.address, asynchronous=True, timeout=60)
    try:
        await client.wait_for_workers(2, timeout=60)
        target = client if given == "client" else deployment.address
        backend = DaskBackend(target, per_worker=4, chunk_size=5)
        start = loop.time()
        task = asyncio.ensure_future(
            batchkit.batch_process(
                range(40),
                _work.slow,
                concurrency=8,
                deadline=batchkit.Deadline(seconds=3.0, grace=0.5),
                backend=backend,
            )
        )
        await _started(client, 8)
        deployment.kill(deployment.scheduler)
        report = await task
        returned = loop.time() - start
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(timeout=2), 5)
    assert sorted(o.index for o in report) == list(range(40))
    assert report.counts["lost"] + report.counts["cancelled"] + report.counts["skipped"] > 0
    assert returned <= 3.0 + 0.5 + DaskBackend.SLACK


async def test_without_a_deadline_a_lost_scheduler_ends_the_items_lost(
    deployment: Deployment,
) -> None:
    client = await distributed.Client(deployment.address, asynchronous=True, timeout=60)
    try:
        await client.wait_for_workers(2, timeout=60)
        task = asyncio.ensure_future(
            batchkit.batch_process(
                range(40),
                _work.slow,
                concurrency=8,
                backend=DaskBackend(client, per_worker=4, chunk_size=5, lost_after=1.0),
            )
        )
        await _started(client, 8)
        deployment.kill(deployment.scheduler)
        report = await task
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(timeout=2), 5)
    assert sorted(o.index for o in report) == list(range(40))
    lost = [o for o in report if o.kind == "lost"]
    assert lost
    # Dask's own error when it cancelled the future, or batchkit's after lost_after.
    for o in lost:
        assert isinstance(o, batchkit.Failure)
        assert "scheduler" in str(o.error), o.error
