"""What follows a failed attempt: retry (after how long) or end the item. A pure function."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._backoff import retry_delay
from ._watchdog import SLACK

if TYPE_CHECKING:
    from ._policies import Retry

__all__ = ["retry_in"]


def retry_in(
    retry: Retry | None,
    *,
    attempt: int,
    kind: str,
    error: BaseException,
    draw: float,
    now: float,
    deadline_at: float | None,
    expected: float,
) -> float | None:
    """Seconds until attempt ``attempt + 1`` of an item whose attempt ``attempt`` failed with
    ``error`` (``kind`` ``"error"`` or ``"timeout"``) at ``now``; ``None`` when the item ends
    with this error: no retry policy, attempts used up, an error it does not retry, or a retry
    that could not start and finish (``expected`` seconds) before the deadline."""
    if retry is None or attempt >= retry.attempts:
        return None
    if kind == "timeout":
        if not retry.timeouts:
            return None
    elif not (isinstance(error, Exception) and retry.should_retry(error)):
        return None
    delay = retry_delay(retry.backoff, attempt, draw, error, max_retry_after=retry.max_retry_after)
    if deadline_at is not None and now + delay + expected > deadline_at + SLACK:
        return None
    return delay
