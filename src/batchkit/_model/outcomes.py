"""Per-item envelopes: :class:`Success`, :class:`Failure`, and the kinds of outcome."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeAlias, TypeVar, final, get_args

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "KINDS",
    "NOT_IN_ROWS",
    "ROW_FIELDS",
    "Failure",
    "FailureKind",
    "HedgeWinner",
    "Outcome",
    "OutcomeKind",
    "Success",
]

T = TypeVar("T")
R = TypeVar("R")
T_co = TypeVar("T_co", covariant=True)
R_co = TypeVar("R_co", covariant=True)

# The one list of outcome kinds: everything else (counts, tables, events) derives from it.
FailureKind: TypeAlias = Literal["error", "timeout", "cancelled", "skipped", "lost"]
"""``error``: ``fn`` (or the context) raised; ``timeout``: the last attempt ran past ``timeout``;
``cancelled``: the run stopped while the item was in flight; ``skipped``: it never started;
``lost``: the worker process running it died (a cluster backend)."""

OutcomeKind: TypeAlias = Literal["success", FailureKind]
"""The ``kind`` of any outcome: ``"success"`` or a :data:`FailureKind`."""

KINDS: tuple[OutcomeKind, ...] = ("success", *get_args(FailureKind))
"""Every outcome kind, in the order counts list them (the report's store numbers them so)."""

HedgeWinner: TypeAlias = Literal["first", "hedge", "neither"]
"""An envelope's ``hedged``: the item ran a hedge (``hedge=``) and ``"first"`` (its own
attempt) or ``"hedge"`` (the extra attempt) succeeded first, or ``"neither"`` did."""


@final
@dataclass(frozen=True, slots=True)
class Success(Generic[T_co, R_co]):
    """An item whose ``fn`` returned ``value``.

    ``index`` is the item's position in the input, ``attempts`` how many attempts it took
    (1 without retries), ``elapsed`` the seconds from its first attempt's start to its end.
    ``reruns``: how many times a cluster backend sent the item to run again because the
    worker running it was lost (0 on the local engine); see :attr:`BatchReport.reruns`.
    ``resumed``: ``True`` when the item did not run in this call because its run journal
    (``journal=``) holds its committed success from an earlier call; ``attempts`` and
    ``value`` are then the journal's, and ``elapsed`` is ``0.0``.
    ``hedged``: with ``hedge=``, which attempt's success this is (``"first"`` or
    ``"hedge"``), ``None`` if no hedge started; ``both_committed``: the other attempt was
    past the point of no return (its context's shielded commit) and succeeded too.
    """

    item: T_co
    value: R_co
    index: int
    attempts: int = 1
    elapsed: float = 0.0
    reruns: int = field(default=0, repr=False)
    resumed: bool = field(default=False, repr=False)
    hedged: HedgeWinner | None = field(default=None, repr=False)
    both_committed: bool = field(default=False, repr=False)

    @property
    def ok(self) -> Literal[True]:
        """Always ``True``: tells a ``Success`` from a ``Failure`` without ``isinstance``."""
        return True

    @property
    def kind(self) -> Literal["success"]:
        """Always ``"success"`` (a ``Failure``'s ``kind`` says how it failed)."""
        return "success"


@final
@dataclass(frozen=True, slots=True)
class Failure(Generic[T_co]):
    """An item that did not produce a value.

    ``error`` is the original exception of the last attempt (for ``timeout``, ``cancelled``
    and ``skipped``: a :class:`~batchkit.ItemTimeout`, :class:`~batchkit.ItemCancelled` or
    :class:`~batchkit.ItemSkipped`); ``errors`` holds every attempt's error in order, so a
    retried item keeps its whole history. An error raised while exiting the item's context
    is in ``errors`` too (and is ``error`` when ``fn`` itself succeeded).
    """

    item: T_co
    error: BaseException
    kind: FailureKind
    index: int
    attempts: int = 1
    elapsed: float = 0.0
    errors: tuple[BaseException, ...] = ()
    reruns: int = field(default=0, repr=False)
    """How many times a cluster backend sent the item to run again after losing the worker
    running it (0 on the local engine)."""
    hedged: HedgeWinner | None = field(default=None, repr=False)
    """``"neither"`` when a hedge (``hedge=``) ran for the item and no attempt succeeded;
    ``None`` if no hedge started."""
    both_committed: bool = field(default=False, repr=False)
    """Always ``False`` for a failure (see :attr:`Success.both_committed`)."""

    @property
    def ok(self) -> Literal[False]:
        """Always ``False``: tells a ``Failure`` from a ``Success`` without ``isinstance``."""
        return False


Outcome: TypeAlias = Success[T, R] | Failure[T]
"""What every item ends in: exactly one of :class:`Success` or :class:`Failure`."""

# -- the envelopes' fields, and where each goes -------------------------------------------
# The dataclasses above declare the fields; this says how a ``to_dict()`` row carries each
# one (``report.py`` builds rows from it), and ``tests/model/test_envelope_fields.py`` checks
# that every field is here and that each survives pickling and the report's column store.
# A new field fails that test until it is placed.
ROW_FIELDS: tuple[tuple[str, Literal["always", "if_set", "described"]], ...] = (
    ("index", "always"),
    ("kind", "always"),
    ("attempts", "always"),
    ("elapsed", "always"),
    ("reruns", "if_set"),  # only a cluster backend re-runs items: local rows stay as they were
    ("resumed", "if_set"),  # only a journal's resumed successes: other rows stay as they were
    ("hedged", "if_set"),  # only with hedge=, for an item that ran a hedge
    ("both_committed", "if_set"),
    ("error", "described"),  # ``describe(error)``: a failure's only
)
NOT_IN_ROWS: frozenset[str] = frozenset({"item", "value", "errors"})
"""Fields a ``to_dict()`` row leaves out: any objects of the user's, not JSON-safe."""


def _default(cls: type[Any], name: str, default: object, doc: str) -> Callable[[Any, Any], None]:
    """Make the slot ``name`` read ``default`` while unset. The engine builds envelopes with
    their slots set one by one (``make_success``) and never sets ``reruns`` or the hedge's
    fields, so the local hot path pays nothing for fields only some runs fill in."""
    slot = vars(cls)[name]

    def get(self: Any) -> Any:
        try:
            return slot.__get__(self, cls)
        except AttributeError:
            return default

    get.__doc__ = doc
    setattr(cls, name, property(get, slot.__set__))
    setter: Callable[[Any, Any], None] = slot.__set__
    return setter


_RERUNS_DOC = (
    "How many times a cluster backend sent the item to run again because the worker "
    "running it was lost (0 on the local engine)."
)
_HEDGED_DOC = (
    'With ``hedge=``: ``"first"`` or ``"hedge"``, the attempt whose success this is; '
    '``"neither"`` for a failure; ``None`` if no hedge started.'
)
_BOTH_DOC = (
    "With ``hedge=``: the losing attempt was already in its shielded commit when the other "
    "won, finished it and succeeded too (so upstream saw two writes)."
)
_set_reruns: dict[type, Callable[[Any, Any], None]] = {
    cls: _default(cls, "reruns", 0, _RERUNS_DOC) for cls in (Success, Failure)
}
_set_hedged = {cls: _default(cls, "hedged", None, _HEDGED_DOC) for cls in (Success, Failure)}
_set_both = {cls: _default(cls, "both_committed", False, _BOTH_DOC) for cls in (Success, Failure)}
_set_resumed = _default(
    Success, "resumed", False, "Whether the success was read from the run journal, not run."
)


def set_reruns(outcome: Success[Any, Any] | Failure[Any], reruns: int) -> None:
    """Set ``reruns`` on an envelope built by ``make_success`` or ``make_failure``."""
    _set_reruns[type(outcome)](outcome, reruns)


def set_resumed(outcome: Success[Any, Any]) -> None:
    """Mark a success built by ``make_success`` as read from the run journal."""
    _set_resumed(outcome, True)


def set_hedged(
    outcome: Success[Any, Any] | Failure[Any], hedged: HedgeWinner | None, both: bool = False
) -> None:
    """Set ``hedged`` and ``both_committed`` on an envelope built by ``make_success`` or
    ``make_failure`` (or the engine's envelope builders)."""
    _set_hedged[type(outcome)](outcome, hedged)
    _set_both[type(outcome)](outcome, both)


# The engine builds envelopes on its hot path; a frozen dataclass's __init__ goes through
# object.__setattr__ per field (about 1.7 µs). Setting the slots directly costs a third.
_new = object.__new__
_slots = vars(Success)
_set_item = _slots["item"].__set__
_set_value = _slots["value"].__set__
_set_index = _slots["index"].__set__
_set_attempts = _slots["attempts"].__set__
_set_elapsed = _slots["elapsed"].__set__


def make_success(item: T, value: R, index: int, attempts: int, elapsed: float) -> Success[T, R]:
    """Build a :class:`Success` without the frozen-dataclass ``__init__`` overhead."""
    s: Success[T, R] = _new(Success)
    _set_item(s, item)
    _set_value(s, value)
    _set_index(s, index)
    _set_attempts(s, attempts)
    _set_elapsed(s, elapsed)
    return s


_fslots = vars(Failure)
_set_f = tuple(
    _fslots[f.name].__set__
    for f in dataclasses.fields(Failure)
    if f.name not in ("reruns", "hedged", "both_committed")
)  # item, error, kind, index, attempts, elapsed, errors: make_failure's arguments


def make_failure(
    item: T,
    error: BaseException,
    kind: FailureKind,
    index: int,
    attempts: int,
    elapsed: float,
    errors: tuple[BaseException, ...],
) -> Failure[T]:
    """Build a :class:`Failure` the same way (the report builds envelopes as they are read)."""
    f: Failure[T] = _new(Failure)
    si, se, sk, sx, sa, sl, ss = _set_f
    si(f, item)
    se(f, error)
    sk(f, kind)
    sx(f, index)
    sa(f, attempts)
    sl(f, elapsed)
    ss(f, errors)
    return f
