"""What crosses the wire between the Dask driver and its workers, and how it stays intact.

A run's settings travel once per chunk as one cloudpickled :class:`RunSpec` (workers cache it by
run id); a chunk's items go as one blob the driver pickled (:func:`pack_items`), and its outcomes
come back as one blob of compact records without the items (the driver still holds them).
Everything a worker returns is checked to round-trip through pickle there: an error that would
not is replaced by a :class:`~batchkit.RemoteError` carrying its type name, message and
traceback text, and a value that would not becomes that item's failure.

A payload that fails on the way is its own item's failure, never its chunk mates': the happy
path pickles and unpickles a chunk in one piece; only when that fails does the sender pickle
item by item (:func:`pack_items`, :func:`to_wire_records`) or the receiver unpickle with
:func:`salvage_loads`, which puts a marker where an object could not be rebuilt, so that the
records (or items) holding one can be told apart from the rest.
"""

from __future__ import annotations

import gc
import pickle
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .._model.errors import InvalidArgument, RemoteError

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Collection

    from .._model.errors import StopReason
    from .._model.policies import Adaptive, Retry
    from .groups import ShareTable

__all__ = [
    "NEVER_SET",
    "NOT_IN_RECORDS",
    "RECORD_PLACES",
    "ChunkResult",
    "Record",
    "RunSpec",
    "Broken",
    "check_picklable",
    "dumps",
    "find_broken",
    "load_records",
    "loads",
    "pack_items",
    "safe_error",
    "salvage_loads",
    "to_wire_records",
]


def dumps(obj: object) -> bytes:
    import cloudpickle  # a dependency of distributed

    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


def loads(data: bytes) -> Any:
    return pickle.loads(data)


def _dumps_fast(obj: object) -> bytes:
    """Plain pickle first (C, no reducer hook per object), cloudpickle for what needs it
    (functions and classes defined in ``__main__``, lambdas)."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return dumps(obj)


def pack_items(
    items: list[Any], skip: Collection[int] = ()
) -> tuple[bytes, list[int] | None, dict[int, Exception]]:
    """A chunk's items as one blob: ``(blob, positions, bad)``. If the chunk does not pickle,
    each item is tried alone: ``bad`` maps the position of each that fails to its pickling
    error, the blob holds the rest, and ``positions`` says where each came from (``None``:
    every item, in order). Items at positions in ``skip`` are not sent."""
    if skip:
        at = [i for i in range(len(items)) if i not in skip]
        try:
            return _dumps_fast([items[i] for i in at]), at, {}
        except Exception:
            pass
    else:
        try:
            return _dumps_fast(items), None, {}
        except Exception:
            pass
    good: list[Any] = []
    positions: list[int] = []
    bad: dict[int, Exception] = {}
    for i, item in enumerate(items):
        if i in skip:
            continue
        try:
            _dumps_fast(item)
        except Exception as e:
            bad[i] = e
        else:
            good.append(item)
            positions.append(i)
    return _dumps_fast(good), positions, bad


@dataclass(frozen=True, slots=True, eq=False)
class Broken:
    """Where :func:`salvage_loads` could not rebuild an object: ``error`` says why."""

    error: Exception


class _Missing:
    """A class or function the receiver cannot import: calling it raises why."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, *args: object, **kwargs: object) -> Any:
        raise self.error


class _Salvager(pickle._Unpickler):
    """The pure-Python unpickler, with object-building opcodes that leave a :class:`Broken`
    where they fail. Slow: only used after a fast ``pickle.loads`` failed."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.broken: list[Broken] = []

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except Exception as e:
            return _Missing(e)


def _wrap_opcodes() -> None:
    table = _Salvager.dispatch
    # REDUCE: args, func -> func(*args) in func's place. BUILD: state, inst -> inst.
    # NEWOBJ: cls, args -> obj. NEWOBJ_EX: cls, args, kwargs -> obj.
    for code, take, keep_top in (
        (pickle.REDUCE, 2, True),
        (pickle.BUILD, 2, True),
        (pickle.NEWOBJ, 2, False),
        (pickle.NEWOBJ_EX, 3, False),
    ):
        table[code[0]] = _guard_op(table[code[0]], take, keep_top)


def _guard_op(op: Callable[[Any], None], take: int, keep_top: bool) -> Callable[[Any], None]:
    """``op`` that leaves a :class:`Broken` where its object should be when building it
    raises. ``take``: stack entries the opcode reads; ``keep_top``: its result replaces the
    lowest of them (REDUCE, BUILD), else they are all consumed and the result pushed."""

    def run(self: Any) -> None:
        stack = self.stack
        base = len(stack) - take
        inputs = stack[base:]
        try:
            op(self)
        except Exception as e:
            cause = next((x.error for x in inputs if isinstance(x, _Missing)), e)
            broken = Broken(cause)
            self.broken.append(broken)
            del stack[base:]
            stack.append(broken)

    return run


_wrap_opcodes()


def salvage_loads(data: bytes) -> tuple[Any, list[Broken]]:
    """Unpickle what can be: each object that cannot be rebuilt becomes a :class:`Broken`
    (listed too). Raises only if the stream itself is unreadable."""
    salvager = _Salvager(data)
    return salvager.load(), salvager.broken


def find_broken(obj: object) -> Broken | None:
    """The first :class:`Broken` inside ``obj`` (containers and instances, not classes,
    functions or modules), if any."""
    seen: set[int] = set()
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, Broken):
            return x
        if id(x) in seen or isinstance(x, _OPAQUE):
            continue
        seen.add(id(x))
        todo.extend(gc.get_referents(x))
    return None


_OPAQUE = (type, type(gc), type(find_broken), str, bytes, int, float)


def check_picklable(what: str, obj: object) -> None:
    """Fail before anything is sent, naming the culprit, if ``obj`` cannot be shipped."""
    try:
        dumps(obj)
    except Exception as e:
        name = getattr(obj, "__qualname__", None) or repr(obj)
        raise InvalidArgument(
            f"{what} {name!r} cannot be pickled to send it to the Dask workers: "
            f"{type(e).__name__}: {e}\nHINT: put it, and the classes it uses (e.g. "
            "SQLAlchemy models), in a module the workers can import (a script's own "
            "functions are sent by value with all they refer to; client.upload_file(...) "
            "ships a module), and let it create unpicklable resources (locks, clients, "
            "engines) on the worker, e.g. with batchkit.dask.per_worker(...)"
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
    """The run's ``RateLimit.per_second``; each worker gets a share (see ``worker.py``)."""
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
    item_budget: float | None = None
    """``item_budget=``: kept by the chunk's engine on the worker, from the item's first
    attempt there (a chunk re-run after its worker was lost starts its items' budgets
    again)."""
    groups: ShareTable | None = None
    """``groups=`` and a weighted ``RateLimit``: each worker's share (``_dask/groups.py``),
    by address, as the run started; ``rate`` is then ``None`` for a weighted one."""


# One outcome: (local index, kind, value or error, attempts, elapsed, errors, finished at).
Record = tuple[int, str, Any, int, float, tuple[BaseException, ...], float]
RECORD_PLACES: dict[str, int] = {
    "index": 0,  # the item's place in its chunk (the driver adds the chunk's offset)
    "kind": 1,
    "value": 2,  # a success's
    "error": 2,  # a failure's
    "attempts": 3,
    "elapsed": 4,
    "errors": 5,
}
"""Where a :data:`Record` carries each envelope field (place 6 is when it finished, for the
events). The worker writes records (``worker._record``), the driver reads them
(``envelopes.Envelopes``); ``tests/dask/test_wire_fields.py`` fails on a field of ``Success``
or ``Failure`` that is neither here nor in :data:`NOT_IN_RECORDS`, or that does not survive
the round trip."""
NOT_IN_RECORDS: dict[str, str] = {
    "item": "the driver holds the chunk's items; they are not sent back",
    "reruns": "the driver counts a chunk's starts on workers (Alerts)",
    "resumed": "a success read from a run journal never runs on a worker: the driver ends "
    "it (_dask/journal.py)",
    "hedged": "hedge= is refused with the Dask backend (spec.check_options): never set",
    "both_committed": "hedge= is refused with the Dask backend (spec.check_options): never set",
}
"""Envelope fields the driver fills in itself, and why."""
NEVER_SET: frozenset[str] = frozenset({"hedged", "both_committed", "resumed"})
"""Of :data:`NOT_IN_RECORDS`: fields no worker record ever sets, so they cross as their
defaults: those of an option the Dask backend refuses (``hedge=``), and ``resumed``, which
only the driver sets on the items its journal ends without sending them."""


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
    """Each attempt's (start of ``fn``, end) in wall-clock time, taken around ``fn`` itself on
    the worker: what ``report.peak_concurrency`` counts."""
    token: str = ""
    """Names this run of the chunk (a chunk re-run after a worker died gets a new one)."""


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


def load_records(body: bytes) -> list[Record]:
    """On the driver: a chunk's records. If the blob does not load as a whole, each record
    holding an object that cannot be rebuilt here becomes that item's ``error`` (the
    unpickling error is its ``error``); the others keep what they carry."""
    try:
        records: list[Record] = loads(body)
        return records
    except Exception:
        pass
    salvaged, broken = salvage_loads(body)
    if not broken:  # pragma: no cover - the fast path failed but nothing is broken
        return list(salvaged)
    fixed: list[Record] = []
    for rec in salvaged:
        bad = find_broken(rec)
        if bad is None:
            fixed.append(rec)
            continue
        index, _, _, attempts, elapsed, errors, at = rec
        err = _unloadable(bad.error)
        kept = tuple(e if isinstance(e, BaseException) else err for e in errors)
        fixed.append((index, "error", err, attempts, elapsed, (*kept, err), at))
    return fixed


def _unloadable(error: Exception) -> Exception:
    """The error an item gets when what its worker sent cannot be unpickled here."""
    error.add_note("batchkit: what the worker sent for this item cannot be unpickled here")
    return error
