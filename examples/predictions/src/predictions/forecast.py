"""The forecast: a small, deterministic model from three signals to a probability.

It is deliberately simple — the example is about running the job, not about the model —
but it is a real function of the fetched data, documented so its output can be checked:

- momentum ``m``: the last price over the mean of the series, minus 1;
- order-book imbalance ``b``: ``(bids - asks) / (bids + asks)``, in [-1, 1];
- news sentiment ``s``: in [-1, 1].

``score = 8 m + 1.5 b + 1.0 s``; ``p = 1 / (1 + e^-score)``. With a previous prediction
``prior``, the result is smoothed: ``0.8 p + 0.2 prior``.

Confidence is how much the three signals agree, damped by a wide spread and thin news:
``agreement * (1 - min(spread, 0.5)) * min(1, articles / 10)``, where ``agreement`` is the
fraction of the signals (by sign) that point the same way as the score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from .upstream import MarketSignals

__all__ = ["Forecast", "forecast"]


@final
@dataclass(frozen=True, slots=True)
class Forecast:
    probability: float
    confidence: float


def forecast(signals: MarketSignals, prior: float | None = None) -> Forecast:
    prices = signals.prices
    mean = math.fsum(prices) / len(prices) if prices else 0.0
    momentum = (prices[-1] / mean - 1.0) if prices and mean > 0 else 0.0
    book = signals.book
    depth = book.bid_volume + book.ask_volume
    imbalance = (book.bid_volume - book.ask_volume) / depth if depth > 0 else 0.0
    sentiment = max(-1.0, min(1.0, signals.sentiment))

    score = 8.0 * momentum + 1.5 * imbalance + 1.0 * sentiment
    p = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, score))))
    if prior is not None:
        p = 0.8 * p + 0.2 * prior

    direction = 1.0 if score >= 0 else -1.0
    agreement = sum(1 for x in (momentum, imbalance, sentiment) if x * direction > 0) / 3
    confidence = agreement * (1.0 - min(book.spread, 0.5)) * min(1.0, signals.articles / 10)
    return Forecast(probability=round(p, 6), confidence=round(confidence, 6))
