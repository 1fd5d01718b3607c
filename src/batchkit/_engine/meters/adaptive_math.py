"""AIMD concurrency-limit math, pure: a state plus events in, a new state out."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..._model.policies import Adaptive

__all__ = ["AimdState", "blend", "is_stuck", "on_overload", "on_success", "recalled", "resumed"]

# Near the limit where the upstream last broke down, grow this many times slower: probing
# past a known cliff costs every request launched above it (32 measured best against a
# simulated cliff: >= 0.82 of the best fixed limit's throughput for K = 5..30).
_PROBE_SLOWDOWN = 32.0


@dataclass(frozen=True, slots=True)
class AimdState:
    limit: float
    """The limit as a real number; the effective limit is ``int(limit)``."""
    baseline: float | None = None
    """The fastest recent latency: what "not overloaded" looks like."""
    last_decrease: float = float("-inf")
    """When the limit was last cut; signals from attempts started before it are stale."""
    ceiling: float | None = None
    """The limit at the last overload: growth slows down as it gets close."""


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
    ceiling = state.ceiling
    # Slow start: until the first overload, +1 per success doubles the limit per round.
    step = 1.0 if ceiling is None else 1.0 / max(state.limit, 1.0)
    if ceiling is not None and state.limit + 1.0 >= ceiling:
        step /= _PROBE_SLOWDOWN
        # The ceiling is a memory, not a wall: it rises as the limit probes past it.
        if state.limit >= ceiling:
            ceiling = state.limit
    grown = min(float(policy.max), state.limit + step)
    return replace(state, limit=grown, ceiling=ceiling), None


def on_overload(state: AimdState, policy: Adaptive, started: float, now: float) -> AimdState:
    """An overload signal from an attempt that started at ``started``."""
    if started < state.last_decrease:
        # That attempt was launched under the old, higher limit: already accounted for.
        return state
    cut = max(float(policy.min), state.limit * policy.decrease)
    return replace(state, limit=cut, last_decrease=now, ceiling=state.limit - 1.0)


def is_stuck(state: AimdState, policy: Adaptive, started: float, now: float) -> bool:
    """Whether an attempt still running since ``started`` is already an overload signal:
    it has run ``latency_factor`` times the baseline and was launched after the last cut."""
    baseline = state.baseline
    return (
        baseline is not None
        and baseline > 0
        and started >= state.last_decrease
        and now - started > policy.latency_factor * baseline
    )


def recalled(value: object) -> float | None:
    """The limit in a remembered value (``{"limit": 8.5}``), or ``None`` if it holds none."""
    limit = value.get("limit") if isinstance(value, dict) else None
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0:
        return None
    return float(limit) if limit < float("inf") else None


def resumed(policy: Adaptive, remembered: float) -> AimdState:
    """The state a run starts in from a remembered limit: within ``[min, max]``, and past
    slow start (an infinite ceiling: +1 per round trip, no known cliff yet)."""
    limit = min(float(policy.max), max(float(policy.min), remembered))
    return AimdState(limit=limit, ceiling=float("inf"))


def blend(remembered: float | None, final: float, weight: float) -> float:
    """What to remember after a run that ended at ``final``: ``weight`` of the way from the
    remembered limit, so one bad run moves the next start only part of the way."""
    if remembered is None:
        return final
    return remembered + weight * (final - remembered)
