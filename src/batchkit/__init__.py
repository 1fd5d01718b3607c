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
from ._engine.calls import limit as limit
from ._model.attempt import Attempt as Attempt
from ._model.attempt import current_attempt as current_attempt
from ._model.errors import BatchkitError as BatchkitError
from ._model.errors import InvalidArgument as InvalidArgument
from ._model.errors import ItemCancelled as ItemCancelled
from ._model.errors import ItemError as ItemError
from ._model.errors import ItemSkipped as ItemSkipped
from ._model.errors import ItemTimeout as ItemTimeout
from ._model.errors import MissingExtra as MissingExtra
from ._model.errors import RemoteError as RemoteError
from ._model.errors import SkipReason as SkipReason
from ._model.errors import StopReason as StopReason
from ._model.journal import Journal as Journal
from ._model.outcomes import Failure as Failure
from ._model.outcomes import FailureKind as FailureKind
from ._model.outcomes import Outcome as Outcome
from ._model.outcomes import OutcomeKind as OutcomeKind
from ._model.outcomes import Success as Success
from ._model.policies import Adaptive as Adaptive
from ._model.policies import AsyncLimiter as AsyncLimiter
from ._model.policies import Backoff as Backoff
from ._model.policies import Breaker as Breaker
from ._model.policies import Deadline as Deadline
from ._model.policies import FailureRatio as FailureRatio
from ._model.policies import Hedge as Hedge
from ._model.policies import LimitGroup as LimitGroup
from ._model.policies import RateLimit as RateLimit
from ._model.policies import Remembered as Remembered
from ._model.policies import Retry as Retry
from ._model.report import BatchReport as BatchReport
from ._model.report import InputFailed as InputFailed
from ._model.report import LimitChange as LimitChange
from ._model.seams import Stream as Stream
from ._model.state import JsonValue as JsonValue
from ._model.state import MemoryStateStore as MemoryStateStore
from ._model.state import StateEntry as StateEntry
from ._model.state import StateStore as StateStore
from ._model.transient import RetryOn as RetryOn
from ._model.transient import transient as transient

if TYPE_CHECKING:
    from ._model.events import AttemptFailed as AttemptFailed
    from ._model.events import DeadlineHit as DeadlineHit
    from ._model.events import Event as Event
    from ._model.events import ItemFinished as ItemFinished
    from ._model.events import ItemsSkipped as ItemsSkipped
    from ._model.events import ItemStarted as ItemStarted
    from ._model.events import LimitChanged as LimitChanged
    from ._model.events import Observer as Observer
    from ._model.events import RunFinished as RunFinished
    from ._model.events import RunStarted as RunStarted
    from ._model.events import RunStopping as RunStopping
    from ._observe.log import LoggingObserver as LoggingObserver
    from ._observe.progress import ProgressObserver as ProgressObserver

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
            from ._model import events as _events

            value = getattr(_events, name)
        elif name == "LoggingObserver":
            from ._observe.log import LoggingObserver as value
        elif name == "ProgressObserver":
            from ._observe.progress import ProgressObserver as value
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

from ._model.public import publish as _publish

_publish(globals(), __all__)
del _publish
