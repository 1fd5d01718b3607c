"""The backend seam as the Dask branch needs it.

Stand-in for CORE's ``batchkit._backend.Backend`` and ``batchkit._options.Options`` until the
branches merge: the field names are the keyword names of ``batch_process``/``stream``, so a
backend written against :class:`BackendOptions` reads ``Options`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._events import Observer
    from ._outcomes import BatchReport
    from ._policies import Adaptive, AsyncLimiter, Deadline, FailureRatio, RateLimit, Retry
    from ._stream import Stream

__all__ = ["Backend", "BackendOptions"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendOptions:
    """Every keyword of ``batch_process``/``stream``, already validated by ``_api``."""

    concurrency: int | Adaptive
    timeout: float | None
    context: Callable[[], Any] | None
    key: Callable[[Any], object] | None
    batch_size: int | None
    fail_fast: bool
    retry: Retry | None
    rate_limit: RateLimit | AsyncLimiter | None
    deadline: float | Deadline | None
    max_failures: int | None
    max_failure_ratio: float | FailureRatio | None
    cost: Callable[[Any], float] | None
    observers: Sequence[Observer]
    progress: bool
    name: str | None
    ordered: bool = False
    buffer: int | None = None


class Backend(Protocol):
    """Where a run executes. ``None`` (the default) is the in-process engine."""

    async def run_batch(
        self, items: Any, fn: Callable[..., Any], options: BackendOptions
    ) -> BatchReport[Any, Any]: ...

    def open_stream(
        self, items: Any, fn: Callable[..., Any], options: BackendOptions
    ) -> Stream[Any, Any]: ...
