"""What follows a failed attempt: retry (after how long) or end the item. A pure function."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backoff import retry_delay
from .watchdog import SLACK

if TYPE_CHECKING:
    from .._model.policies import Retry

__all__ = ["next_retry", "retry_in", "too_late"]


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
    delay = next_retry(retry, attempt=attempt, kind=kind, error=error, draw=draw)
    if delay is None or too_late(delay, now=now, deadline_at=deadline_at, expected=expected):
        return None
    return delay


def next_retry(
    retry: Retry | None, *, attempt: int, kind: str, error: BaseException, draw: float
) -> float | None:
    """:func:`retry_in` without the deadline: what the policy asks for. It calls user code
    (``retry_on``, the error's ``retry_after``), which may raise: the caller decides."""
    if retry is None or attempt >= retry.attempts:
        return None
    if kind == "timeout":
        if not retry.timeouts:
            return None
    elif not (isinstance(error, Exception) and retry.should_retry(error)):
        return None
    return retry_delay(retry.backoff, attempt, draw, error, max_retry_after=retry.max_retry_after)


def too_late(delay: float, *, now: float, deadline_at: float | None, expected: float) -> bool:
    """Whether a retry in ``delay`` seconds could not finish (``expected``) by the deadline."""
    return deadline_at is not None and now + delay + expected > deadline_at + SLACK
