"""The public surface is deliberate: pinned, sorted, and every name really exported."""

from __future__ import annotations

import batchkit

PUBLIC = [
    "Adaptive",
    "AsyncLimiter",
    "Attempt",
    "AttemptFailed",
    "Backoff",
    "BatchReport",
    "BatchkitError",
    "Breaker",
    "ContextFactory",
    "Deadline",
    "DeadlineHit",
    "Event",
    "Failure",
    "FailureKind",
    "FailureRatio",
    "Hedge",
    "InputFailed",
    "InvalidArgument",
    "ItemCancelled",
    "ItemError",
    "ItemFinished",
    "ItemSkipped",
    "ItemStarted",
    "ItemTimeout",
    "ItemsSkipped",
    "Journal",
    "JsonValue",
    "LimitChange",
    "LimitChanged",
    "LimitGroup",
    "LoggingObserver",
    "MemoryStateStore",
    "MissingExtra",
    "Observer",
    "Outcome",
    "OutcomeKind",
    "ProgressObserver",
    "RateLimit",
    "Remembered",
    "RemoteError",
    "Retry",
    "RetryOn",
    "RunFinished",
    "RunStarted",
    "RunStopping",
    "SkipReason",
    "StateEntry",
    "StateStore",
    "StopReason",
    "Stream",
    "Success",
    "__version__",
    "batch_process",
    "current_attempt",
    "limit",
    "stream",
    "transient",
]


def test_all_is_pinned_and_sorted() -> None:
    assert batchkit.__all__ == PUBLIC
    assert sorted(batchkit.__all__) == batchkit.__all__


def test_every_public_name_exists() -> None:
    for name in batchkit.__all__:
        assert hasattr(batchkit, name), name


def test_error_tree() -> None:
    assert issubclass(batchkit.ItemTimeout, batchkit.ItemError)
    assert issubclass(batchkit.ItemTimeout, TimeoutError)
    assert issubclass(batchkit.ItemCancelled, batchkit.ItemError)
    assert issubclass(batchkit.ItemSkipped, batchkit.ItemError)
    assert issubclass(batchkit.ItemError, batchkit.BatchkitError)
    assert issubclass(batchkit.InputFailed, batchkit.BatchkitError)
    assert issubclass(batchkit.MissingExtra, ImportError)
