"""Which errors are worth retrying, and the one matcher every policy uses for ``retry_on=``
and ``overload_on=``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

__all__ = ["RetryOn", "http_status", "matches", "transient"]

RetryOn: TypeAlias = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
"""Which errors are retried: exception types, or a predicate over the exception."""


def http_status(error: BaseException) -> int | None:
    """The HTTP status an error carries, found by attributes: ``status_code`` or ``status``
    on the error, or ``error.response.status_code`` (httpx's and requests' errors)."""
    for holder in (error, getattr(error, "response", None)):
        if holder is None:
            continue
        for name in ("status_code", "status"):
            status = getattr(holder, name, None)
            if isinstance(status, int) and not isinstance(status, bool):
                return status
    return None


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks transient: worth another attempt. The default of ``Retry(retry_on=)``.

    True for timeouts (``TimeoutError``, which :class:`~batchkit.ItemTimeout` is), ``OSError``
    (``ConnectionError`` and the other network errors), errors made to carry a server's retry
    hint (a ``retry_after`` attribute, even ``None``: a 429 without a ``Retry-After`` header
    backs off normally), and errors carrying an HTTP status 429 or 5xx (recognised by
    attributes, so httpx's and requests' errors match without importing them). False for
    everything else: a ``TypeError`` from a bug is not retried. An exception group is
    transient when every exception in it is.
    """
    if isinstance(exc, BaseExceptionGroup):
        # Concurrent calls failed together (a TaskGroup): transient if each of them is.
        return all(transient(e) for e in exc.exceptions)
    if isinstance(exc, TimeoutError | OSError):
        return True
    if hasattr(exc, "retry_after"):
        return True
    status = http_status(exc)
    return status is not None and (status == 429 or 500 <= status <= 599)


def matches(on: RetryOn, error: BaseException) -> bool:
    """Whether ``error`` matches ``on``: exception types, or a predicate over the exception."""
    if isinstance(on, type | tuple):
        return isinstance(error, on)
    return bool(on(error))  # type: ignore[arg-type]
