"""Pure backoff math: the wait before a retry, from the policy, the attempt and a random draw."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._policies import Backoff

__all__ = ["backoff_ceiling", "retry_after_hint", "retry_delay"]

# Set by batchkit.testing.instant(): retries happen at once. A module global, not a
# per-run option, so a test can switch it on around code it does not own.
INSTANT = False


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
    return math.exp(log_wait)


def retry_after_hint(error: BaseException) -> float | None:
    """A server's hint in seconds (``error.retry_after``), if it is a usable number."""
    hint = getattr(error, "retry_after", None)
    if isinstance(hint, bool) or not isinstance(hint, int | float):
        return None
    if math.isnan(hint) or hint < 0:
        return None
    return float(hint)


def retry_delay(backoff: Backoff, retry: int, draw: float, error: BaseException) -> float:
    """Seconds to wait before retry ``retry``; ``draw`` is uniform in ``[0, 1)``.

    Full jitter (``draw * ceiling``) unless ``backoff.jitter`` is off; never less than the
    error's ``retry_after`` hint. Zero in instant mode.
    """
    if INSTANT:
        return 0.0
    ceiling = backoff_ceiling(backoff, retry)
    delay = ceiling * draw if backoff.jitter else ceiling
    hint = retry_after_hint(error)
    if hint is not None and hint > delay:
        delay = hint
    return delay
