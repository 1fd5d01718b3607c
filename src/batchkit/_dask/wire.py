"""What crosses the wire between the Dask driver and its workers, and how it stays intact.

A run's settings travel once per chunk as one cloudpickled :class:`RunSpec` (workers cache it by
run id); a chunk's outcomes come back as one blob of compact records without the items (the
driver still holds them). Everything a worker returns is checked to round-trip through pickle
there: an error that would not is replaced by a :class:`~batchkit.RemoteError` carrying its
type name, message and traceback text, and a value that would not becomes that item's failure.
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._model.errors import InvalidArgument, RemoteError

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

    from .._model.errors import StopReason
    from .._model.policies import Adaptive, Retry

__all__ = [
    "ChunkResult",
    "Record",
    "RunSpec",
    "check_picklable",
    "dumps",
    "loads",
    "safe_error",
    "to_wire_records",
]


def dumps(obj: object) -> bytes:
    import cloudpickle  # a dependency of distributed

    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


def loads(data: bytes) -> Any:
    return pickle.loads(data)


def check_picklable(what: str, obj: object) -> None:
    """Fail before anything is sent, naming the culprit, if ``obj`` cannot be shipped."""
    try:
        dumps(obj)
    except Exception as e:
        name = getattr(obj, "__qualname__", None) or repr(obj)
        raise InvalidArgument(
            f"{what} {name!r} cannot be pickled to send it to the Dask workers: "
            f"{type(e).__name__}: {e}\nHINT: define it at module level and let it create "
            "unpicklable resources (locks, clients, engines) on the worker, e.g. with "
            "batchkit.dask.per_worker(...)"
        ) from e


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """Everything a worker needs to run chunks of one run with the local engine."""

    run_id: str
    name: str | None
    fn: Callable[..., Any]
    context: Callable[[], Any] | None
    concurrency: int | Adaptive
    per_worker: int
    timeout: float | None
    retry: Retry | None
    rate: float | None
    """The run's ``RateLimit.per_second``; each worker gets a share (see ``_dask_worker``)."""
    burst: int
    deadline_wall: float | None
    """The whole run's deadline as one wall-clock instant (``time.time()``)."""
    key: Callable[[Any], object] | None = None
    """The run's ``key=``: with it, ``current_attempt().idempotency_key`` is the item's key on
    the worker too; without it, ``"<driver's run id>:<input index>"`` (stable when a lost
    chunk re-runs elsewhere)."""
    fit_timeout: bool
    grace: float
    """``Deadline.grace``: how long cancelled work gets to clean up on the worker."""
    fail_fast: bool
    max_failures: int | None
    events: bool
    """Whether to record events for the driver's observers."""
    logs: bool
    """Whether to forward log records emitted while the chunk runs."""
    alerts: bool = False
    """Whether to tell the driver of every failure at once (``log_event`` on ``topic``)."""
    topic: str = ""


# One outcome: (local index, kind, value or error, attempts, elapsed, errors, finished at).
Record = tuple[int, str, Any, int, float, tuple[BaseException, ...], float]


@dataclass(slots=True, kw_only=True)
class ChunkResult:
    """What a worker returns for one chunk (decoded on the driver)."""

    offset: int
    records: list[Record]
    events: list[tuple[Any, ...]] = field(default_factory=list)
    """``("started", wall, local index, attempt)`` and
    ``("failed", wall, local index, attempt, error, kind, retry_in)``."""
    logs: list[logging.LogRecord] = field(default_factory=list)
    worker: str = ""
    stop_reason: StopReason | None = None
    seconds: float = 0.0
    """How long the chunk ran on its worker."""
    spans: list[tuple[float, float]] = field(default_factory=list)
    """Each item's (first start of ``fn``, last end) in wall-clock time, taken around ``fn``
    itself on the worker: what ``report.peak_concurrency`` counts."""


def safe_error(error: BaseException) -> BaseException:
    """``error`` if it round-trips through pickle with its cause, else a RemoteError."""
    try:
        back = loads(dumps(error))
        if type(back) is type(error) and str(back) == str(error):
            return error
    except Exception:
        pass
    tb = "".join(traceback.format_exception(error))
    remote = RemoteError(f"{type(error).__module__}.{type(error).__qualname__}", str(error), tb)
    return remote


def _unpicklable_value(value: object, error: Exception) -> RemoteError:
    return RemoteError(
        f"{type(error).__module__}.{type(error).__qualname__}",
        f"the value fn returned ({type(value).__qualname__}) cannot be pickled to send it "
        f"back from the worker: {error}",
        "".join(traceback.format_exception(error)),
    )


def to_wire_records(records: list[Record]) -> bytes:
    """Pickle the records; a record that does not pickle becomes that item's failure."""
    try:
        return dumps(records)
    except Exception:
        pass
    fixed: list[Record] = []
    for rec in records:
        try:
            dumps(rec)
            fixed.append(rec)
            continue
        except Exception as e:
            index, kind, payload, attempts, elapsed, errors, at = rec
            if kind == "success":
                err: BaseException = _unpicklable_value(payload, e)
                fixed.append((index, "error", err, attempts, elapsed, (err,), at))
            else:
                errs = tuple(safe_error(x) for x in errors)
                fixed.append((index, kind, safe_error(payload), attempts, elapsed, errs, at))
    return dumps(fixed)
