"""The way users deploy: a `dask scheduler` and two `dask worker` processes from their CLIs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[str]:
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
    try:
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [str(DASK), "worker", address, "--host", "127.0.0.1", *WORKER],
                    **common,
                )
            )
        yield address
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=30)
        common["stderr"].close()


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
