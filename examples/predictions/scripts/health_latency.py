"""Measure ``GET /health`` latency while the service runs a big batch, as deployed.

    python examples/predictions/scripts/health_latency.py [--markets 200] [--concurrency 50]
        [--time-factor 1] [--interval 0.1] [--embedded] [--python-path DIR ...]

Three processes, like a deployment: the simulated upstream (``predictions simulator``), the
service (``predictions serve`` on a fresh SQLite file seeded with ``--markets`` markets), and
this script, which sends ``GET /health`` every ``--interval`` seconds over one keep-alive
connection from before to after one ``POST /predictions/generate?limit=<markets>``, and prints
the latency percentiles of the health checks made while the run was going.

``--embedded`` runs the simulator inside the service process instead (as ``serve`` does without
``--upstream-url``). ``--python-path`` puts directories first on the service's ``PYTHONPATH``,
to measure another checkout's service against this one's simulator process, e.g. the code
before the fix:
``git archive 9e48366 src examples/predictions/src | tar -x -C /tmp/old`` then
``--python-path /tmp/old/src /tmp/old/examples/predictions/src``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

PYTHON = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for(url: str, what: str, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers at all; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            if time.monotonic() > end:
                raise SystemExit(f"{what} did not start within {timeout} s") from None
            time.sleep(0.05)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markets", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--time-factor", type=float, default=1.0)
    p.add_argument("--interval", type=float, default=0.1, help="seconds between health checks")
    p.add_argument("--embedded", action="store_true", help="simulator inside the service")
    p.add_argument("--python-path", nargs="*", default=[], help="prepended to PYTHONPATH")
    args = p.parse_args()

    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.pop("PREDICTIONS_TOKEN", None)
    serve_env = dict(env)
    if args.python_path:
        serve_env["PYTHONPATH"] = os.pathsep.join([*args.python_path, env.get("PYTHONPATH", "")])
    sim_args = ["--time-factor", str(args.time_factor), "--seed", "1"]
    with tempfile.TemporaryDirectory(prefix="health-latency-") as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'p.db'}"
        cli = [PYTHON, "-m", "predictions", "--database-url", url]
        subprocess.run([*cli, "seed", "--markets", str(args.markets)], env=env, check=True)
        processes: list[subprocess.Popen[bytes]] = []
        try:
            upstream: list[str] = []
            if not args.embedded:
                sim_port = _free_port()
                processes.append(
                    subprocess.Popen(
                        [
                            PYTHON,
                            "-m",
                            "predictions",
                            "simulator",
                            "--port",
                            str(sim_port),
                            *sim_args,
                        ],
                        env=env,
                        stderr=subprocess.DEVNULL,
                    )
                )
                sim_url = f"http://127.0.0.1:{sim_port}"
                _wait_for(f"{sim_url}/", "the simulator")  # 404 at once
                upstream = ["--upstream-url", sim_url]
            port = _free_port()
            processes.append(
                subprocess.Popen(
                    [
                        *cli,
                        "serve",
                        "--port",
                        str(port),
                        "--concurrency",
                        str(args.concurrency),
                        *sim_args,
                        *upstream,
                    ],
                    env=serve_env,
                    stderr=subprocess.DEVNULL,
                )
            )
            base = f"http://127.0.0.1:{port}"
            _wait_for(f"{base}/health", "the service")
            return _measure(base, args)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=60)


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in seconds]
    return {
        "p50": round(statistics.median(ms), 1),
        "p90": round(_percentile(ms, 0.90), 1),
        "p99": round(_percentile(ms, 0.99), 1),
        "max": round(max(ms), 1),
    }


def _idle(base: str, args: argparse.Namespace, n: int = 100) -> list[float]:
    """The same health checks with the service idle: what this machine costs by itself."""
    out = []
    with httpx.Client(base_url=base, timeout=10.0) as client:
        client.get("/health")
        for _ in range(n):
            start = time.perf_counter()
            client.get("/health")
            took = time.perf_counter() - start
            out.append(took)
            time.sleep(max(0.0, args.interval - took))
    return out


def _measure(base: str, args: argparse.Namespace) -> int:
    idle = _idle(base, args)
    latencies: list[float] = []
    failures: list[str] = []
    running = threading.Event()
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=base, timeout=10.0) as client:
            client.get("/health")  # connect once, outside the figures
            while not done.is_set():
                start = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                except httpx.HTTPError as e:
                    failures.append(type(e).__name__)
                    continue
                took = time.perf_counter() - start
                if running.is_set():
                    latencies.append(took)
                    if status != 200:
                        failures.append(str(status))
                time.sleep(max(0.0, args.interval - took))

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        running.set()
        t0 = time.perf_counter()
        response = httpx.post(
            f"{base}/predictions/generate", params={"limit": args.markets}, timeout=600
        )
        wall = time.perf_counter() - t0
        running.clear()
    finally:
        done.set()
        prober.join()
    body = response.json()
    print(
        json.dumps(
            {
                "markets": args.markets,
                "concurrency": args.concurrency,
                "time_factor": args.time_factor,
                "simulator": "embedded" if args.embedded else "own process",
                "run": {
                    "http": response.status_code,
                    "status": body.get("status"),
                    "counts": body.get("counts"),
                    "seconds": round(wall, 1),
                },
                "health_checks": len(latencies),
                "health_failures": failures,
                "health_ms_during_the_run": _summary(latencies),
                "health_ms_idle_before": _summary(idle),
                "load_average": os.getloadavg(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
