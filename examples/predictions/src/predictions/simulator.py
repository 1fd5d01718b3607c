"""A simulated upstream: the three APIs, slow and flaky on purpose, served on loopback.

Every request draws its fate — ``ok``, ``error`` (HTTP 503), ``429`` (with ``Retry-After``) or
``hang`` (no answer until the client gives up) — and a latency, from a random generator seeded
by ``(seed, endpoint, symbol, n)`` where ``n`` counts that endpoint's requests for that symbol.
So a run's upstream behaviour depends on the seed and on how often each market asked, never on
the order in which concurrent requests happened to arrive.

All durations are given in *real-world* seconds (calls take 10-15 s, like the APIs the original
job called) and multiplied by ``time_factor`` when served: ``time_factor=0.1`` makes the demo ten
times faster and keeps every ratio (latency / timeout / deadline / Retry-After) intact.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections import Counter
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, final

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence

    from starlette.requests import Request

__all__ = ["Fate", "SimulatorConfig", "create_simulator", "serve_simulator"]

Fate = Literal["ok", "error", "429", "hang"]
_ENDPOINTS = ("prices", "orderbook", "news")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorConfig:
    """How the simulated upstream behaves. Durations in real-world seconds (see ``time_factor``).

    - ``latency``: each call takes ``uniform(latency[0], latency[1])`` seconds.
    - ``error_rate``, ``rate_limit_rate``, ``hang_rate``: the chance that a call answers 503,
      answers 429 with ``Retry-After: retry_after``, or hangs for ``hang_seconds``
      (until the client disconnects, if sooner). The rest succeed.
    - ``script``: forced fates for a symbol's first calls, per endpoint, e.g.
      ``{"BTC-100K-DEC": ("429", "ok")}``: the first call of each endpoint for that symbol is
      rate-limited, the second succeeds; later calls draw at random again.
    - ``down``: symbols whose every call answers 503 (an outage for those markets; the demo
      uses it to show a market that failed in one run predicted by the next).
    - ``time_factor``: multiplies every duration served (latency, hang, Retry-After).
    - ``seed``: the random generator's seed. The CLI draws a new one per process unless
      ``--seed`` is given, so the markets that fail differ from run to run.
    """

    latency: tuple[float, float] = (10.0, 15.0)
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after: float = 2.0
    hang_rate: float = 0.0
    hang_seconds: float = 300.0
    time_factor: float = 1.0
    seed: int = 0
    script: Mapping[str, Sequence[Fate]] = field(default_factory=dict)
    down: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        lo, hi = self.latency
        if not 0 <= lo <= hi:
            raise ValueError(
                f"latency must be (low, high) with 0 <= low <= high, got {self.latency}"
            )
        for name in ("error_rate", "rate_limit_rate", "hang_rate"):
            rate = getattr(self, name)
            if not 0 <= rate <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if self.error_rate + self.rate_limit_rate + self.hang_rate > 1:
            raise ValueError("error_rate + rate_limit_rate + hang_rate must be <= 1")
        if self.time_factor <= 0:
            raise ValueError(f"time_factor must be > 0, got {self.time_factor}")

    def draw(self, endpoint: str, symbol: str, n: int) -> tuple[Fate, float]:
        """The fate and the scaled latency of call ``n`` (from 0) of ``endpoint`` for ``symbol``."""
        digest = hashlib.blake2b(f"{self.seed}:{endpoint}:{symbol}:{n}".encode(), digest_size=8)
        rng = random.Random(int.from_bytes(digest.digest(), "big"))
        latency = rng.uniform(*self.latency) * self.time_factor
        roll = rng.random()
        scripted = self.script.get(symbol, ())
        fate: Fate
        if symbol in self.down:
            fate = "error"
        elif n < len(scripted):
            fate = scripted[n]
        elif roll < self.error_rate:
            fate = "error"
        elif roll < self.error_rate + self.rate_limit_rate:
            fate = "429"
        elif roll < self.error_rate + self.rate_limit_rate + self.hang_rate:
            fate = "hang"
        else:
            fate = "ok"
        return fate, latency


def _payload(endpoint: str, symbol: str, seed: int) -> dict[str, object]:
    """Stable data per symbol, so a forecast is reproducible."""
    digest = hashlib.blake2b(f"{seed}:data:{symbol}".encode(), digest_size=8)
    rng = random.Random(int.from_bytes(digest.digest(), "big"))
    prices = [0.5]
    drift = rng.uniform(-0.01, 0.01)
    for _ in range(29):
        prices.append(min(0.99, max(0.01, prices[-1] * (1 + drift + rng.gauss(0, 0.02)))))
    bids, asks = rng.uniform(1e3, 5e4), rng.uniform(1e3, 5e4)
    if endpoint == "prices":
        return {"symbol": symbol, "prices": [round(p, 5) for p in prices]}
    if endpoint == "orderbook":
        spread = round(rng.uniform(0.005, 0.08), 4)
        return {
            "symbol": symbol,
            "bid_volume": round(bids),
            "ask_volume": round(asks),
            "spread": spread,
        }
    return {
        "symbol": symbol,
        "sentiment": round(rng.uniform(-1, 1), 3),
        "articles": rng.randint(0, 40),
    }


async def _wait_or_disconnect(request: Request, seconds: float) -> bool:
    """Sleep ``seconds``; return early (False) if the client went away meanwhile.

    A client that gave up (its timeout, or the run's deadline) closes the connection; a real
    server would stop working for it, and so do we, which also lets the server shut down at once.
    """
    try:
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return True
    return False


@final
class _Upstream:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.calls: Counter[tuple[str, str]] = Counter()
        self.fates: Counter[Fate] = Counter()

    async def handle(self, request: Request) -> Response:
        endpoint = request.url.path.strip("/").split("/")[0]
        symbol = request.path_params["symbol"]
        n = self.calls[endpoint, symbol]
        self.calls[endpoint, symbol] += 1
        fate, latency = self.config.draw(endpoint, symbol, n)
        self.fates[fate] += 1
        f = self.config.time_factor
        if fate == "hang":
            await _wait_or_disconnect(request, self.config.hang_seconds * f)
            return Response(status_code=504)
        if not await _wait_or_disconnect(request, latency):
            return Response(status_code=499)  # nobody is listening any more
        if fate == "error":
            return JSONResponse({"error": "upstream overloaded"}, status_code=503)
        if fate == "429":
            return JSONResponse(
                {"error": "rate limited"},
                status_code=429,
                headers={"retry-after": f"{self.config.retry_after * f:.6g}"},
            )
        return JSONResponse(_payload(endpoint, symbol, self.config.seed))


def create_simulator(config: SimulatorConfig = SimulatorConfig()) -> Starlette:
    """The simulated upstream as an ASGI app: ``GET /{prices,orderbook,news}/{symbol}``.

    ``app.state.upstream.calls`` / ``.fates`` count what it served (for tests and the demo).
    """
    upstream = _Upstream(config)
    app = Starlette(
        routes=[Route(f"/{ep}/{{symbol}}", upstream.handle, methods=["GET"]) for ep in _ENDPOINTS]
    )
    app.state.upstream = upstream
    return app


@final
class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handling: Ctrl-C belongs to the program embedding it."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@asynccontextmanager
async def serve_app(app: Callable[..., object], *, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve an ASGI app on a free loopback port for the duration of the block; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn:{port}")
    try:
        while not server.started:
            if task.done():  # startup failed: surface its error
                await task
                raise RuntimeError("the server stopped during startup")
            await asyncio.sleep(0.005)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()


@asynccontextmanager
async def serve_simulator(
    config: SimulatorConfig = SimulatorConfig(),
) -> AsyncIterator[tuple[str, Starlette]]:
    """Run the simulated upstream on a free loopback port; yield ``(base_url, app)``."""
    app = create_simulator(config)
    async with serve_app(app) as url:
        yield url, app
