"""The upstream APIs a prediction needs, over HTTP (httpx), and the errors they raise.

Three signals per market, fetched concurrently: price history, the order book, and news
sentiment. Errors form a small tree so batchkit's ``Retry`` can tell transient from final::

    UpstreamError
    ├── Transient            worth retrying
    │   ├── RateLimited      HTTP 429; ``retry_after`` seconds from the Retry-After header
    │   └── Unavailable      HTTP 5xx, connection refused/reset, a broken response
    └── Rejected             HTTP 4xx other than 429: retrying cannot help

    SignalsUnavailable       an ExceptionGroup of the UpstreamErrors of one market's fetches

When several concurrent fetches fail, every error is kept (``SignalsUnavailable`` is an
``ExceptionGroup``, never collapsed to its first member); it exposes ``retry_after`` (the
largest of its members') so batchkit waits as long as the strictest server asked.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self, cast, final

import httpx

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator
    from types import TracebackType

__all__ = [
    "MarketSignals",
    "OrderBook",
    "RateLimited",
    "Rejected",
    "SignalsUnavailable",
    "Transient",
    "Unavailable",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamURLs",
    "is_retryable",
    "parse_retry_after",
]


class UpstreamError(Exception):
    """An upstream API did not give us what we asked for."""

    def __init__(self, message: str, *, url: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.reason = reason or message
        """A short label for tables: ``429``, ``503``, ``ConnectError``..."""


class Transient(UpstreamError):
    """Worth retrying: the same request may well succeed later."""


class RateLimited(Transient):
    """HTTP 429. ``retry_after`` is the server's wait in seconds, or ``None`` if it gave none."""

    def __init__(self, message: str, *, url: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, url=url, reason="429")
        self.retry_after = retry_after


class Unavailable(Transient):
    """HTTP 5xx or a transport failure."""


class Rejected(UpstreamError):
    """HTTP 4xx other than 429: our request is wrong; retrying cannot help."""


class SignalsUnavailable(ExceptionGroup[UpstreamError]):
    """Some of one market's concurrent fetches failed; holds every one of their errors."""

    @property
    def retry_after(self) -> float | None:
        hints = [
            e.retry_after
            for e in self.exceptions
            if isinstance(e, RateLimited) and e.retry_after is not None
        ]
        return max(hints, default=None)

    @property
    def transient(self) -> bool:
        return all(isinstance(e, Transient) for e in self.exceptions)


def is_retryable(error: Exception) -> bool:
    """For ``batchkit.Retry(retry_on=...)``: transient upstream errors, alone or grouped."""
    if isinstance(error, SignalsUnavailable):
        return error.transient
    return isinstance(error, Transient)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date.

    Decimal seconds are accepted too (our simulator scales time down). Unusable values
    give ``None``, so the caller falls back to its own backoff.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
        return max(seconds, 0.0)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        return None
    return seconds


@contextmanager
def _shape(url: str) -> Iterator[None]:
    """A response of the wrong shape is a broken response, like a 5xx: transient."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as e:
        raise Unavailable(f"GET {url}: unexpected response shape ({e!r})", url=url) from e


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamURLs:
    """Where each API lives. Real deployments point these at three different providers."""

    prices: str
    orderbook: str
    news: str

    @classmethod
    def single(cls, base: str) -> UpstreamURLs:
        """All three on one host, as the bundled simulator serves them."""
        base = base.rstrip("/")
        return cls(prices=f"{base}/prices", orderbook=f"{base}/orderbook", news=f"{base}/news")


@final
@dataclass(frozen=True, slots=True)
class OrderBook:
    bid_volume: float
    ask_volume: float
    spread: float


@final
@dataclass(frozen=True, slots=True)
class MarketSignals:
    """Everything the forecast model needs about one market."""

    symbol: str
    prices: tuple[float, ...]
    book: OrderBook
    sentiment: float
    """News sentiment in [-1, 1]."""
    articles: int


@final
class UpstreamClient:
    """An ``httpx.AsyncClient`` over the three APIs. Use as ``async with``.

    No request timeout by default: the per-market ``timeout`` of the batchkit run is the one
    clock that matters (a second, shorter clock here would turn slow-but-fine calls into
    failures). Pass ``request_timeout`` to add one anyway.

    One connection pool per API (as three providers would have anyway), with no connection
    cap: the run's ``concurrency`` bounds the connections already. With one shared client and
    httpx's defaults (100 connections, 20 kept alive), a run at concurrency 50 queued requests
    in the client and reconnected constantly, and httpcore's pool, which rescans its
    connections against each other on every request start and end (cost ~ idle x all), took
    40 % of the service's event loop and stalled ``/health`` for up to seconds. Three pools of
    ~50 cost about a ninth of one of ~150.
    """

    def __init__(
        self,
        urls: UpstreamURLs,
        *,
        request_timeout: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.urls = urls

        def client() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                timeout=httpx.Timeout(request_timeout),
                transport=transport,
                limits=httpx.Limits(
                    max_connections=max_connections,
                    max_keepalive_connections=max_connections,
                ),
                headers={"user-agent": "predictions/0.1 (batchkit example)"},
            )

        self._prices, self._orderbook, self._news = client(), client(), client()
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            for http in (self._prices, self._orderbook, self._news):
                await stack.enter_async_context(http)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        for http in (self._prices, self._orderbook, self._news):
            await http.aclose()

    async def _get_json(self, http: httpx.AsyncClient, url: str) -> dict[str, Any]:
        try:
            response = await http.get(url)
        except httpx.TransportError as e:  # refused, reset, protocol errors
            raise Unavailable(
                f"GET {url}: {type(e).__name__}: {e}", url=url, reason=type(e).__name__
            ) from e
        status = response.status_code
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise RateLimited(
                f"GET {url}: 429 Too Many Requests (Retry-After: {retry_after})",
                url=url,
                retry_after=retry_after,
            )
        if status >= 500:
            raise Unavailable(
                f"GET {url}: {status} {response.reason_phrase}", url=url, reason=str(status)
            )
        if status >= 400:
            raise Rejected(
                f"GET {url}: {status} {response.reason_phrase}", url=url, reason=str(status)
            )
        try:
            data = response.json()
        except ValueError as e:
            raise Unavailable(f"GET {url}: response is not JSON", url=url) from e
        if not isinstance(data, dict):
            raise Unavailable(f"GET {url}: expected a JSON object", url=url)
        return data

    async def prices(self, symbol: str) -> tuple[float, ...]:
        url = f"{self.urls.prices}/{symbol}"
        data = await self._get_json(self._prices, url)
        with _shape(url):
            return tuple(float(p) for p in data["prices"])

    async def order_book(self, symbol: str) -> OrderBook:
        url = f"{self.urls.orderbook}/{symbol}"
        data = await self._get_json(self._orderbook, url)
        with _shape(url):
            return OrderBook(
                bid_volume=float(data["bid_volume"]),
                ask_volume=float(data["ask_volume"]),
                spread=float(data["spread"]),
            )

    async def news(self, symbol: str) -> tuple[float, int]:
        url = f"{self.urls.news}/{symbol}"
        data = await self._get_json(self._news, url)
        with _shape(url):
            return float(data["sentiment"]), int(data["articles"])

    async def signals(self, symbol: str) -> MarketSignals:
        """All three signals, fetched concurrently; when one fails the others are cancelled."""
        results = await _all_or_nothing(
            symbol, self.prices(symbol), self.order_book(symbol), self.news(symbol)
        )
        prices = cast("tuple[float, ...]", results[0])
        book = cast("OrderBook", results[1])
        sentiment, articles = cast("tuple[float, int]", results[2])
        return MarketSignals(
            symbol=symbol, prices=prices, book=book, sentiment=sentiment, articles=articles
        )


async def _all_or_nothing(symbol: str, *coros: Coroutine[Any, Any, object]) -> list[object]:
    """Run ``coros`` concurrently: all their results, or every error once one fails.

    What ``asyncio.TaskGroup`` does, written out because on Python 3.11 a TaskGroup whose child
    fails while it waits for the others leaves a cancellation request counted on the calling
    task (a CPython 3.11 bug; newer versions uncancel it), which later makes batchkit mistake its
    own timeout for the caller's cancellation. No task outlives this call on any path.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # After a failure, or when we are cancelled: stop the rest and wait until they stopped.
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
    errors = [e for t in tasks if not t.cancelled() and (e := t.exception()) is not None]
    if not errors:
        return [t.result() for t in tasks]
    if all(isinstance(e, UpstreamError) for e in errors):
        raise SignalsUnavailable(
            f"{len(errors)} of {len(tasks)} upstream calls failed: "
            + ", ".join(e.reason for e in errors if isinstance(e, UpstreamError)),
            [e for e in errors if isinstance(e, UpstreamError)],
        )
    raise ExceptionGroup(
        f"{symbol}: fetching signals failed",
        [e if isinstance(e, Exception) else RuntimeError(repr(e)) for e in errors],
    )
