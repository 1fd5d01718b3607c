"""Pure backoff math: the wait before a retry, from the policy, the attempt and a random draw."""

from __future__ import annotations

import math
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._model.policies import Backoff

__all__ = ["INSTANT", "backoff_ceiling", "retry_after_hint", "retry_delay"]

# Set by batchkit.testing.instant(): retries happen at once. A context variable, not a
# per-run option, so a test can switch it on around code it does not own, and only there:
# runs started in other tasks (another test, another request) keep their backoff.
INSTANT: ContextVar[bool] = ContextVar("batchkit_instant", default=False)


def backoff_ceiling(backoff: Backoff, retry: int) -> float:
    """The largest wait before retry number ``retry`` (1 = the first retry)."""
    if retry < 1:
        raise ValueError("retry counts from 1")
    exponent = retry - 1
    if backoff.initial == 0 or exponent == 0 or backoff.multiplier == 1:
        return min(backoff.initial, backoff.maximum)
    # In log space: multiplier ** 1000 overflows a float.
    log_wait = math.log(backoff.initial) + exponent * math.log(backoff.multiplier)
    if log_wait >= math.log(backoff.maximum):
        return backoff.maximum
    # exp(log(initial)) may round a hair below initial: never below the first retry's wait.
    return max(backoff.initial, math.exp(log_wait))


def _parse_hint(hint: str, now: float | None) -> float | None:
    """HTTP sends ``Retry-After`` as a string: seconds (``"120"``) or an HTTP date."""
    text = hint.strip()
    try:
        return float(text)
    except ValueError:
        pass
    import email.utils  # lazy: ~2 ms of `import batchkit` for a rare hint format

    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp() - (time.time() if now is None else now)


def retry_after_hint(error: BaseException, *, now: float | None = None) -> float | None:
    """A server's hint in seconds (``error.retry_after``): a number, a string of seconds or an
    HTTP date (``now`` is the wall-clock time to measure it from); ``None`` if unusable."""
    hint = getattr(error, "retry_after", None)
    if isinstance(hint, str):
        hint = _parse_hint(hint, now)
    if isinstance(hint, bool) or not isinstance(hint, int | float):
        return None
    try:
        seconds = float(hint)
    except OverflowError:  # an int beyond a float (10**400): "a very long time"
        seconds = math.inf if hint > 0 else 0.0
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def retry_delay(
    backoff: Backoff,
    retry: int,
    draw: float,
    error: BaseException,
    *,
    max_retry_after: float = math.inf,
) -> float:
    """Seconds to wait before retry ``retry``; ``draw`` is uniform in ``[0, 1)``.

    Full jitter (``draw * ceiling``) unless ``backoff.jitter`` is off; never less than the
    error's ``retry_after`` hint, which is capped at ``max_retry_after``. Zero in instant mode.
    """
    if INSTANT.get():
        return 0.0
    ceiling = backoff_ceiling(backoff, retry)
    delay = ceiling * draw if backoff.jitter else ceiling
    hint = retry_after_hint(error)
    if hint is not None:
        hint = min(hint, max_retry_after)
        if hint > delay:
            delay = hint
    return delay
