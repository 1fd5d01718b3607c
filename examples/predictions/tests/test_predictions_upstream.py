"""The upstream client's error mapping, and the simulator (over real loopback HTTP too)."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import httpx
import pytest

import batchkit
from predictions.forecast import forecast
from predictions.simulator import SimulatorConfig, serve_simulator
from predictions.upstream import (
    MarketSignals,
    OrderBook,
    RateLimited,
    Rejected,
    SignalsUnavailable,
    Unavailable,
    UpstreamClient,
    UpstreamURLs,
    is_retryable,
    parse_retry_after,
)

OK = {
    "prices": {"prices": [0.4, 0.5, 0.6]},
    "orderbook": {"bid_volume": 300, "ask_volume": 100, "spread": 0.02},
    "news": {"sentiment": 0.5, "articles": 12},
}


def client_for(handler: httpx.MockTransport) -> UpstreamClient:
    return UpstreamClient(UpstreamURLs.single("http://api.test"), transport=handler)


def answering(**by_endpoint: httpx.Response) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        endpoint = request.url.path.split("/")[1]
        return by_endpoint.get(endpoint) or httpx.Response(200, json=OK[endpoint])

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("2", 2.0),
        ("0.25", 0.25),
        (" 7 ", 7.0),
        ("Sun, 29 Nov 2026 12:00:10 GMT", 10.0),
        ("Sun, 29 Nov 2026 11:59:00 GMT", 0.0),  # in the past: go now
        ("-1", None),
        ("nan", None),
        ("soon", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == expected


async def test_signals_parsed() -> None:
    async with client_for(answering()) as client:
        signals = await client.signals("ABC")
    assert signals == MarketSignals(
        symbol="ABC",
        prices=(0.4, 0.5, 0.6),
        book=OrderBook(bid_volume=300, ask_volume=100, spread=0.02),
        sentiment=0.5,
        articles=12,
    )


async def test_429_carries_retry_after_and_is_retryable() -> None:
    transport = answering(news=httpx.Response(429, headers={"Retry-After": "3"}))
    async with client_for(transport) as client:
        with pytest.raises(SignalsUnavailable) as info:
            await client.signals("ABC")
    group = info.value
    [error] = group.exceptions
    assert isinstance(error, RateLimited)
    assert error.retry_after == 3.0
    # batchkit reads ``retry_after`` off the error it is given: the group exposes it.
    assert group.retry_after == 3.0
    assert is_retryable(group)


def test_a_group_waits_as_long_as_its_strictest_server_asked() -> None:
    group = SignalsUnavailable(
        "3 of 3 upstream calls failed",
        [
            RateLimited("a", retry_after=1.0),
            RateLimited("b", retry_after=4.0),
            RateLimited("c", retry_after=None),
            Unavailable("d"),
        ],
    )
    assert group.retry_after == 4.0
    assert is_retryable(group)
    assert SignalsUnavailable("x", [Unavailable("d")]).retry_after is None
    assert not is_retryable(SignalsUnavailable("x", [Unavailable("d"), Rejected("e")]))


async def test_every_call_that_failed_before_the_others_were_stopped_is_kept() -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        endpoint = request.url.path.split("/")[1]
        if endpoint == "prices":
            return httpx.Response(503)
        await asyncio.sleep(0)  # the others fail a moment later, in the same loop turn
        return httpx.Response(429, headers={"Retry-After": "1"})

    async with client_for(httpx.MockTransport(handle)) as client:
        with pytest.raises(SignalsUnavailable) as info:
            await client.signals("ABC")
    kinds = sorted(type(e).__name__ for e in info.value.exceptions)
    assert kinds.count("Unavailable") == 1
    assert set(kinds) <= {"Unavailable", "RateLimited"}
    assert info.value.message.startswith(f"{len(kinds)} of 3 upstream calls failed: ")


@pytest.mark.parametrize(
    ("response", "error_type", "retryable"),
    [
        (httpx.Response(503), Unavailable, True),
        (httpx.Response(500), Unavailable, True),
        (httpx.Response(200, text="<html>"), Unavailable, True),
        (httpx.Response(200, json={"unexpected": 1}), Unavailable, True),
        (httpx.Response(404), Rejected, False),
        (httpx.Response(401), Rejected, False),
    ],
)
async def test_error_mapping(
    response: httpx.Response, error_type: type[Exception], retryable: bool
) -> None:
    async with client_for(answering(prices=response)) as client:
        with pytest.raises(error_type) as info:
            await client.prices("ABC")
    assert is_retryable(info.value) is retryable
    async with client_for(answering(prices=response)) as client:
        with pytest.raises(SignalsUnavailable) as group:
            await client.signals("ABC")
    assert is_retryable(group.value) is retryable


async def test_transport_failure_is_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with client_for(httpx.MockTransport(refuse)) as client:
        with pytest.raises(Unavailable, match="ConnectError"):
            await client.prices("ABC")


async def test_a_failing_call_cancels_the_others_and_leaves_no_task_behind() -> None:
    started: list[str] = []
    cancelled: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        endpoint = request.url.path.split("/")[1]
        started.append(endpoint)
        if endpoint == "news":
            return httpx.Response(503)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(endpoint)
            raise
        return httpx.Response(200, json=OK[endpoint])

    before = asyncio.all_tasks()
    async with client_for(httpx.MockTransport(handle)) as client:
        with pytest.raises(SignalsUnavailable):
            await client.signals("ABC")
    assert sorted(started) == ["news", "orderbook", "prices"]
    assert sorted(cancelled) == ["orderbook", "prices"]
    assert asyncio.all_tasks() == before
    # The calling task carries no stray cancellation request (see upstream._all_or_nothing).
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_batchkit_timeout_after_a_failed_fetch_is_still_a_timeout() -> None:
    """Regression: on Python 3.11 a TaskGroup here made a later timeout escape the run."""
    calls = 0

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 3:  # the first attempt: one call fails, the others are cancelled
            if request.url.path.startswith("/news"):
                return httpx.Response(503)
            await asyncio.sleep(10)
        await asyncio.sleep(10)  # the second attempt hangs until the timeout
        return httpx.Response(200, json={})

    async with client_for(httpx.MockTransport(handle)) as client:
        report = await batchkit.batch_process(
            ["ABC"],
            client.signals,
            timeout=0.05,
            retry=batchkit.Retry(
                attempts=2, backoff=batchkit.Backoff(initial=0.0), retry_on=Exception
            ),
        )
    [outcome] = report
    assert isinstance(outcome, batchkit.Failure)
    assert outcome.kind == "timeout"
    assert outcome.attempts == 2


def test_simulator_draws_are_deterministic_per_seed() -> None:
    a = SimulatorConfig(error_rate=0.2, rate_limit_rate=0.2, hang_rate=0.2, seed=5)
    b = SimulatorConfig(error_rate=0.2, rate_limit_rate=0.2, hang_rate=0.2, seed=5)
    c = SimulatorConfig(error_rate=0.2, rate_limit_rate=0.2, hang_rate=0.2, seed=6)
    keys = [(ep, f"S{i}", n) for ep in ("prices", "news") for i in range(20) for n in range(3)]
    draws_a = [a.draw(*k) for k in keys]
    assert draws_a == [b.draw(*k) for k in keys]
    assert draws_a != [c.draw(*k) for k in keys]
    fates = {fate for fate, _ in draws_a}
    assert fates == {"ok", "error", "429", "hang"}
    assert all(10.0 <= latency <= 15.0 for _, latency in draws_a)


def test_simulator_scripted_fates_come_first() -> None:
    config = SimulatorConfig(script={"X": ("hang", "429")}, time_factor=0.5)
    assert config.draw("prices", "X", 0)[0] == "hang"
    assert config.draw("prices", "X", 1)[0] == "429"
    assert config.draw("prices", "X", 2)[0] == "ok"
    assert 5.0 <= config.draw("prices", "X", 2)[1] <= 7.5  # scaled by the time factor


@pytest.mark.parametrize(
    "kwargs",
    [
        {"latency": (2.0, 1.0)},
        {"error_rate": 1.5},
        {"error_rate": 0.6, "hang_rate": 0.6},
        {"time_factor": 0.0},
    ],
)
def test_simulator_config_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"latency|rate|time_factor"):
        SimulatorConfig(**kwargs)  # type: ignore[arg-type]


async def test_simulator_over_real_loopback_http() -> None:
    config = SimulatorConfig(
        time_factor=0.001,
        retry_after=100.0,
        script={"RL": ("429",), "BAD": ("error",), "HANG": ("hang",)},
    )
    async with serve_simulator(config) as (url, app):
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=url) as http:
            limited = await http.get("/prices/RL")
            assert limited.status_code == 429
            assert limited.headers["retry-after"] == "0.1"  # 100 s x 0.001
            assert (await http.get("/prices/BAD")).status_code == 503
            ok = await http.get("/orderbook/RL")  # scripts are per endpoint: first call of it
            assert ok.status_code == 429
            ok = await http.get("/news/OK")
            assert ok.status_code == 200
            assert set(ok.json()) == {"symbol", "sentiment", "articles"}
            with pytest.raises(httpx.ReadTimeout):
                await http.get("/news/HANG", timeout=0.05)
        async with UpstreamClient(UpstreamURLs.single(url)) as client:
            signals = await client.signals("OK")
            assert signals.symbol == "OK"
            assert len(signals.prices) == 30
    assert app.state.upstream.fates == {"429": 2, "error": 1, "ok": 4, "hang": 1}


def test_forecast_is_deterministic_and_documented() -> None:
    rising = MarketSignals(
        symbol="X",
        prices=(0.4, 0.5, 0.6),
        book=OrderBook(bid_volume=300, ask_volume=100, spread=0.0),
        sentiment=0.5,
        articles=10,
    )
    up = forecast(rising)
    # score = 8 * (0.6/0.5 - 1) + 1.5 * 0.5 + 0.5 = 2.85; p = 1 / (1 + e^-2.85)
    p = 1 / (1 + math.exp(-2.85))
    assert up.probability == pytest.approx(p, abs=1e-6)
    assert up.confidence == 1.0  # all three agree, no spread, enough news
    assert forecast(rising) == up
    smoothed = forecast(rising, prior=0.2)
    assert smoothed.probability == pytest.approx(0.8 * p + 0.2 * 0.2, abs=1e-6)
    falling = MarketSignals(
        symbol="X",
        prices=(0.6, 0.5, 0.4),
        book=OrderBook(bid_volume=100, ask_volume=300, spread=0.5),
        sentiment=0.5,
        articles=5,
    )
    down = forecast(falling)
    assert down.probability < 0.5
    # two of three signals agree with the score; spread 0.5; 5 of 10 articles
    assert down.confidence == pytest.approx(2 / 3 * 0.5 * 0.5, abs=1e-6)
