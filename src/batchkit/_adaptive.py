"""AIMD concurrency-limit math, pure: a state plus events in, a new state out."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._policies import Adaptive

__all__ = ["AimdState", "on_overload", "on_success"]


@dataclass(frozen=True, slots=True)
class AimdState:
    limit: float
    """The limit as a real number; the effective limit is ``int(limit)``."""
    baseline: float | None = None
    """The fastest recent latency: what "not overloaded" looks like."""
    last_decrease: float = float("-inf")
    """When the limit was last cut; signals from attempts started before it are stale."""


def on_success(
    state: AimdState, policy: Adaptive, latency: float, started: float, now: float
) -> tuple[AimdState, str | None]:
    """A success of ``latency`` seconds. Returns the new state and, if it is an overload
    signal (too slow against the baseline), the reason to pass to :func:`on_overload`."""
    baseline = state.baseline
    if baseline is None or latency < baseline:
        baseline = latency
    else:
        # Drift slowly towards what we see, so a permanently slower upstream becomes normal.
        baseline += (latency - baseline) * 0.01
    state = replace(state, baseline=baseline)
    if baseline > 0 and latency > policy.latency_factor * baseline:
        return state, "latency"
    grown = min(float(policy.max), state.limit + 1.0 / max(state.limit, 1.0))
    return replace(state, limit=grown), None


def on_overload(state: AimdState, policy: Adaptive, started: float, now: float) -> AimdState:
    """An overload signal from an attempt that started at ``started``."""
    if started < state.last_decrease:
        # That attempt was launched under the old, higher limit: already accounted for.
        return state
    cut = max(float(policy.min), state.limit * policy.decrease)
    return replace(state, limit=cut, last_decrease=now)
