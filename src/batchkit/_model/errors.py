"""The errors batchkit raises or records.

Item failures are values (see :class:`batchkit.Failure`); misuse of the library is an
exception raised before any item runs. Everything batchkit itself creates fits one tree::

    BatchkitError
    ├── InvalidArgument            (also a TypeError and a ValueError) bad arguments, raised at once
    ├── MissingExtra               (also an ImportError) an optional integration is not installed
    ├── InputFailed                the input itself raised; ``.report`` is the partial report
    │                              (in ``report.py``, beside the report it carries)
    └── ItemError                  recorded on a Failure envelope, never raised by batchkit itself
        ├── ItemTimeout            (also a TimeoutError) an attempt ran past its ``timeout``
        ├── ItemCancelled          the run stopped (deadline, threshold) with the item in flight
        ├── ItemSkipped            the run stopped (or the deadline left no room) before the
        │                          item, or its next attempt, started
        └── RemoteError            a worker's exception that could not be pickled back as itself

Every error here pickles and unpickles with its message, attributes, notes and ``__cause__``
(so envelopes cross process boundaries intact, e.g. from a Dask worker).
``raise_for_failures()`` raises a plain :class:`ExceptionGroup` of the recorded errors.
``asyncio.CancelledError``, ``KeyboardInterrupt`` and ``SystemExit`` are never caught.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

__all__ = [
    "BatchkitError",
    "InvalidArgument",
    "ItemCancelled",
    "ItemError",
    "ItemSkipped",
    "ItemTimeout",
    "MissingExtra",
    "RemoteError",
    "SkipReason",
    "StopReason",
    "add_note",
    "describe",
    "safe_repr",
]

StopReason = Literal[
    "deadline", "fail_fast", "max_failures", "max_failure_ratio", "out_of_time", "cancelled"
]
"""Why a run stopped starting items before its input was done. ``out_of_time``: before the
deadline, nothing more could finish in time (see :class:`~batchkit.Deadline`); ``cancelled``:
the caller cancelled the call (or left a ``stream`` block early)."""

SkipReason = StopReason | Literal["circuit_open"]
"""Why an item was skipped: the run stopped (a :data:`StopReason`), or, for that item alone,
its circuit breaker was open (``circuit_open``; see :class:`~batchkit.Breaker`)."""


# -- user objects that misbehave: text about them never raises ------------------------------
def safe_repr(obj: object) -> str:
    """``repr(obj)``, or a stand-in naming its type when its ``__repr__`` raises."""
    try:
        return repr(obj)
    except Exception:
        return f"<{type(obj).__name__} object (repr() raised)>"


def describe(error: BaseException) -> str:
    """``"TypeName: message"`` for logs and reports; an error whose ``__str__`` raises is
    described by its type alone, so one odd exception cannot break a log line or a report."""
    try:
        text = str(error)
    except Exception:
        text = "<str() raised>"
    return f"{type(error).__name__}: {text}"


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``, unless the error cannot take notes (a broken ``__notes__``)."""
    with contextlib.suppress(Exception):  # __notes__ replaced by something that is not a list
        error.add_note(note)


def _rebuild(
    cls: type[BatchkitError],
    args: tuple[Any, ...],
    state: dict[str, Any],
    cause: BaseException | None,
    suppress_context: bool = False,
) -> BatchkitError:
    """Unpickle a :class:`BatchkitError` without calling its ``__init__`` again."""
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    error.__cause__ = cause
    error.__suppress_context__ = suppress_context
    return error


class BatchkitError(Exception):
    """Base class of every error batchkit creates."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle the message, the attributes (notes included) and the cause as they are:
        # the default passes the formatted message back to __init__, and drops __cause__.
        return (
            _rebuild,
            (type(self), self.args, dict(self.__dict__), self.__cause__, self.__suppress_context__),
        )


class InvalidArgument(BatchkitError, TypeError, ValueError):
    """An argument is of the wrong type or out of range. Raised before any item runs."""


class MissingExtra(BatchkitError, ImportError):
    """An optional integration was used without its extra installed."""

    def __init__(self, feature: str, extra: str, package: str) -> None:
        super().__init__(
            f"{feature} needs the optional package {package!r}.\n"
            f"HINT: pip install 'aio-batchkit[{extra}]'"
        )
        self.extra = extra


class ItemError(BatchkitError):
    """An error batchkit records on an item's :class:`~batchkit.Failure`."""


class ItemTimeout(ItemError, TimeoutError):
    """An attempt did not finish within the per-item ``timeout`` — or, with ``budget`` true,
    the item's ``item_budget`` (seconds across all its attempts) ran out: ``timeout`` is then
    the budget."""

    def __init__(self, timeout: float, *, budget: bool = False) -> None:
        if budget:
            message = f"the item's time budget ran out: item_budget={timeout:g} s, all attempts"
        else:
            message = f"attempt timed out after {timeout:g} s"
        super().__init__(message)
        self.timeout = timeout
        self.budget = budget


def _why(reason: StopReason) -> str:
    return (
        "the caller cancelled the run" if reason == "cancelled" else f"the run stopped ({reason})"
    )


class ItemCancelled(ItemError):
    """The run stopped while this item was in flight (or waiting to retry)."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(f"cancelled: {_why(reason)}")
        self.reason: StopReason = reason


class ItemSkipped(ItemError):
    """The run stopped, or the deadline left no room, before this item started — or before
    its next attempt started (``attempts`` made before, their errors in the envelope's
    ``errors``; ``__cause__`` is the last one): a retry dropped for the deadline is
    ``ItemSkipped("out_of_time", attempts=n)``."""

    def __init__(self, reason: SkipReason, attempts: int = 0) -> None:
        if reason == "out_of_time":
            why = "it could not finish before the deadline (out_of_time)"
        elif reason == "circuit_open":
            why = "its circuit breaker is open (circuit_open)"
        else:
            why = _why(reason)
        what = f"attempt {attempts + 1} of this item" if attempts else "this item"
        super().__init__(f"skipped: {what} did not start: {why}")
        self.reason: SkipReason = reason
        self.attempts = attempts


class RemoteError(ItemError):
    """An exception raised on a remote worker that could not be pickled back as itself.

    ``type_name`` is its qualified type name, ``message`` its ``str()``, ``traceback`` the
    formatted traceback text from the worker.
    """

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
