"""batchkit: run many small async jobs against slow, flaky systems, and get a truthful report.

The whole public API is re-exported here; everything else is private.

Start-up is kept short (a cron job pays it on every run): ``__version__`` (package metadata),
the events (``RunStarted``, ``Observer``...; only a run with observers builds them),
``LoggingObserver`` and ``ProgressObserver`` are loaded on first access, through the module
``__getattr__`` below.
"""

from typing import TYPE_CHECKING, Any

from ._api import ContextFactory as ContextFactory
from ._api import batch_process as batch_process
from ._api import stream as stream
from ._attempt import Attempt as Attempt
from ._attempt import current_attempt as current_attempt
from ._errors import BatchkitError as BatchkitError
from ._errors import InputFailed as InputFailed
from ._errors import InvalidArgument as InvalidArgument
from ._errors import ItemCancelled as ItemCancelled
from ._errors import ItemError as ItemError
from ._errors import ItemSkipped as ItemSkipped
from ._errors import ItemTimeout as ItemTimeout
from ._errors import MissingExtra as MissingExtra
from ._errors import RemoteError as RemoteError
from ._errors import StopReason as StopReason
from ._outcomes import BatchReport as BatchReport
from ._outcomes import Failure as Failure
from ._outcomes import FailureKind as FailureKind
from ._outcomes import LimitChange as LimitChange
from ._outcomes import Outcome as Outcome
from ._outcomes import OutcomeKind as OutcomeKind
from ._outcomes import Success as Success
from ._policies import Adaptive as Adaptive
from ._policies import AsyncLimiter as AsyncLimiter
from ._policies import Backoff as Backoff
from ._policies import Deadline as Deadline
from ._policies import FailureRatio as FailureRatio
from ._policies import RateLimit as RateLimit
from ._policies import Retry as Retry
from ._policies import RetryOn as RetryOn
from ._stream import Stream as Stream
from ._transient import transient as transient

if TYPE_CHECKING:
    from ._events import AttemptFailed as AttemptFailed
    from ._events import DeadlineHit as DeadlineHit
    from ._events import Event as Event
    from ._events import ItemFinished as ItemFinished
    from ._events import ItemsSkipped as ItemsSkipped
    from ._events import ItemStarted as ItemStarted
    from ._events import LimitChanged as LimitChanged
    from ._events import Observer as Observer
    from ._events import RunFinished as RunFinished
    from ._events import RunStarted as RunStarted
    from ._events import RunStopping as RunStopping
    from ._logging import LoggingObserver as LoggingObserver
    from ._progress import ProgressObserver as ProgressObserver

    __version__: str
    """The installed version of the ``aio-batchkit`` distribution (e.g. ``"0.1.0"``)."""
else:
    _EVENT_NAMES = frozenset(
        {
            "AttemptFailed",
            "DeadlineHit",
            "Event",
            "ItemFinished",
            "ItemsSkipped",
            "ItemStarted",
            "LimitChanged",
            "Observer",
            "RunFinished",
            "RunStarted",
            "RunStopping",
        }
    )

    # Hidden from type checkers: a visible module __getattr__ would type any misspelt
    # `batchkit.X` as Any.

    def __getattr__(name: str) -> Any:
        """The public names that are loaded lazily (see the module docstring)."""
        if name == "__version__":
            # importlib.metadata and its scan of sys.path would add tens of milliseconds.
            from importlib.metadata import PackageNotFoundError, version

            try:
                value: Any = version("aio-batchkit")  # the distribution, not the import name
            except PackageNotFoundError:  # pragma: no cover - a source tree, not installed
                value = "0.0.0"
        elif name in _EVENT_NAMES:
            from . import _events

            value = getattr(_events, name)
        elif name == "LoggingObserver":
            from ._logging import LoggingObserver as value
        elif name == "ProgressObserver":
            from ._progress import ProgressObserver as value
        else:
            raise AttributeError(f"module 'batchkit' has no attribute {name!r}")
        globals()[name] = value
        return value


__all__ = [
    "Adaptive",
    "AsyncLimiter",
    "Attempt",
    "AttemptFailed",
    "Backoff",
    "BatchReport",
    "BatchkitError",
    "ContextFactory",
    "Deadline",
    "DeadlineHit",
    "Event",
    "Failure",
    "FailureKind",
    "FailureRatio",
    "InputFailed",
    "InvalidArgument",
    "ItemCancelled",
    "ItemError",
    "ItemFinished",
    "ItemSkipped",
    "ItemStarted",
    "ItemTimeout",
    "ItemsSkipped",
    "LimitChange",
    "LimitChanged",
    "LoggingObserver",
    "MissingExtra",
    "Observer",
    "Outcome",
    "OutcomeKind",
    "ProgressObserver",
    "RateLimit",
    "RemoteError",
    "Retry",
    "RetryOn",
    "RunFinished",
    "RunStarted",
    "RunStopping",
    "StopReason",
    "Stream",
    "Success",
    "__version__",
    "batch_process",
    "current_attempt",
    "stream",
    "transient",
]
