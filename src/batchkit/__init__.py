"""batchkit: run many small async jobs against slow, flaky systems, and get a truthful report.

The whole public API is re-exported here; everything else is private.
"""

from typing import TYPE_CHECKING

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
from ._progress import ProgressObserver as ProgressObserver
from ._stream import Stream as Stream
from ._transient import transient as transient

if TYPE_CHECKING:
    __version__: str
    """The installed version of the ``aio-batchkit`` distribution (e.g. ``"0.1.0"``)."""
else:

    def __getattr__(name: str) -> str:
        # `__version__` is looked up on first use, not at import: importlib.metadata and its
        # scan of sys.path would add tens of milliseconds to `import batchkit`.
        if name == "__version__":
            global __version__
            from importlib.metadata import PackageNotFoundError, version

            try:
                __version__ = version("aio-batchkit")  # the distribution, not the import name
            except PackageNotFoundError:  # pragma: no cover - a source tree, not installed
                __version__ = "0.0.0"
            return __version__
        raise AttributeError(f"module 'batchkit' has no attribute {name!r}")


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
