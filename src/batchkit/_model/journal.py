"""The run journal's policy, :class:`Journal` (``journal=Journal(store, "nightly")``), and the
seam a transactional journal writes through, :class:`SessionWriter`.

A journal records each item's final outcome by its ``key=`` in a
:class:`~batchkit.StateStore`, so that a later call with the same journal *resumes*: items
whose success is recorded are not run again. Where and when the rows are written is the
engine's (``batchkit._engine.journal``); this module holds the values only.
"""

from __future__ import annotations

import math
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, final, runtime_checkable

from .errors import InvalidArgument
from .state import MAX_KEY_LENGTH

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .state import JsonValue, StateStore

__all__ = ["PREFIX", "Journal", "JournalMode", "SessionWriter", "check_unique_keys"]

JournalMode: TypeAlias = Literal["batched", "transactional"]
"""``"batched"``: rows written in groups, after the items end; ``"transactional"``: a
success's row written in the item's own database session, before it commits."""

PREFIX = "batchkit/journal/"
"""Every journal's rows are under ``batchkit/journal/<name>/<item key>``."""


@runtime_checkable
class SessionWriter(Protocol):
    """A :class:`~batchkit.StateStore` that can also write rows inside a caller's open
    database session, without committing it: what ``Journal(mode="transactional")`` needs.
    ``batchkit.sqlalchemy.SQLAlchemyStateStore`` is one (the session: an ``AsyncSession``
    from ``batchkit.sqlalchemy.sessions(...)``, on the database that holds the store's
    table)."""

    async def set_in_session(self, session: Any, values: Mapping[str, JsonValue]) -> None:
        """Write ``values`` as :meth:`~batchkit.StateStore.set_many` does, in ``session``'s
        transaction: they are committed (or rolled back) with it."""
        ...


@final
@dataclass(frozen=True, slots=True)
class Journal:
    """A run journal kept in a state store: ``journal=Journal(store, "nightly")`` with ``key=``.

    The journal records each item's final outcome under its key. A later call with the same
    journal **resumes**: before the first item starts it reads the journal (one
    :meth:`~batchkit.StateStore.scan`), and every item whose key has a recorded success is
    not run: its envelope is a :class:`~batchkit.Success` with ``resumed=True`` (the report
    counts them in ``resumed``). Failures and items with no row (never started, cancelled,
    skipped, or whose row was lost) run again.

    Rows are JSON: ``{"kind": ..., "attempts": ..., "time": ..., "value": ...}``; only a
    success's and a failure's (``error`` or ``timeout``) final outcome is recorded.

    **Values.** With ``values=True`` a success's value is stored when it is JSON (or
    ``dump`` makes it JSON) and its JSON text is at most ``max_value_bytes`` long; a resumed
    success's ``value`` is then the stored one (through ``load`` when given). A value not
    stored (``values=False``, not JSON, too long) comes back as ``None``; the first such
    value of a call is logged at WARNING.

    **Retention.** At the start of a call, the journal's rows older than ``retain`` seconds
    are deleted (not resumed). A call in which every item succeeded (resumed or run) clears
    the journal when it ends: the next call with the same name runs every item. Name a
    journal per unit of work (``f"prices-{day}"``) to resume within it.

    Attributes:
        store: Any :class:`~batchkit.StateStore`; for ``mode="transactional"`` one that is a
            :class:`SessionWriter` (``batchkit.sqlalchemy.SQLAlchemyStateStore``).
        name: The journal's name (no ``/``); its rows are kept under
            ``"batchkit/journal/<name>/<item key>"`` (an item key too long for the store is
            kept as its SHA-256).
        mode: ``"batched"`` (default): rows are written in groups of ``flush_every``
            outcomes or every ``flush_after`` seconds, and on every way out of the call
            (completed, stopped, cancelled, ``fn`` raising a ``BaseException``). A process
            killed at once loses at most the rows not yet written: those items run again on
            resume (make ``fn`` idempotent). ``"transactional"``: a success's row is written
            in the item's own session (``context=batchkit.sqlalchemy.sessions(...)``),
            before it commits, so the item's writes and its row commit together or not at
            all. Failures are then written in groups, as in batched mode.
            On the Dask backend the journal is the driver's, in batched mode only: it is read
            before any chunk is sent and written as chunk results come back.
        flush_every: Batched rows are written once this many are waiting (``>= 1``).
        flush_after: ... or once the oldest has waited this many seconds (``> 0``).
        values: Store successes' values (see above), or not (``False``).
        dump: Turns a value into JSON before it is stored (``None``: stored as is).
        load: Turns a stored value back (``None``: the JSON as stored).
        max_value_bytes: The longest value stored, in bytes of JSON text.
        retain: Seconds a row is kept (``None``: until the journal is cleared).
        clock: Seconds since the epoch (``time.time``): the rows' times, compared with
            ``retain`` by the store's clock on pruning.
    """

    store: StateStore
    name: str
    _: KW_ONLY
    mode: JournalMode = "batched"
    flush_every: int = 100
    flush_after: float = 1.0
    values: bool = True
    dump: Callable[[Any], JsonValue] | None = field(default=None, repr=False)
    load: Callable[[JsonValue], Any] | None = field(default=None, repr=False)
    max_value_bytes: int = 4096
    retain: float | None = 7 * 86400.0
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def __post_init__(self) -> None:
        store = self.store
        wanted = ("get", "compare_and_set", "set_many", "scan", "prune")
        missing = [m for m in wanted if not callable(getattr(store, m, None))]
        if missing:
            raise InvalidArgument(
                f"Journal.store must be a StateStore, got {store!r} (no {', '.join(missing)})\n"
                "HINT: pass MemoryStateStore() or batchkit.sqlalchemy.SQLAlchemyStateStore(engine)"
            )
        name: object = self.name
        if not isinstance(name, str) or not name or "/" in name:
            raise InvalidArgument(
                f"Journal.name must be a non-empty str without '/', got {name!r}\n"
                "HINT: name the job's unit of work, e.g. Journal(store, 'prices-2026-12-05')"
            )
        if len(self.prefix) + 64 > MAX_KEY_LENGTH:
            raise InvalidArgument(f"Journal.name is too long ({len(name)} characters)")
        if self.mode not in ("batched", "transactional"):
            raise InvalidArgument(
                f"Journal.mode must be 'batched' or 'transactional', got {self.mode!r}"
            )
        if self.mode == "transactional" and not isinstance(store, SessionWriter):
            raise InvalidArgument(
                f"Journal(mode='transactional') needs a store that writes in a session, got "
                f"{store!r}\nHINT: store=batchkit.sqlalchemy.SQLAlchemyStateStore(engine), "
                "with context=batchkit.sqlalchemy.sessions(...) on the same database"
            )
        _check_int("Journal.flush_every", self.flush_every, 1)
        _check_int("Journal.max_value_bytes", self.max_value_bytes, 0)
        f: object = self.flush_after
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f < math.inf:
            raise InvalidArgument(f"Journal.flush_after must be seconds > 0, got {f!r}")
        r: object = self.retain
        if r is not None and (
            isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r < math.inf
        ):
            raise InvalidArgument(f"Journal.retain must be seconds > 0 or None, got {r!r}")
        if not isinstance(self.values, bool):
            raise InvalidArgument(f"Journal.values must be a bool, got {self.values!r}")
        for what in ("dump", "load", "clock"):
            fn = getattr(self, what)
            if fn is not None and not callable(fn):
                raise InvalidArgument(f"Journal.{what} must be a callable, got {fn!r}")

    @property
    def prefix(self) -> str:
        """The store keys of this journal's rows start with this."""
        return f"{PREFIX}{self.name}/"

    async def kinds(self) -> dict[str, str]:
        """What the journal holds now: each item key with a row, and its final kind
        (``"success"``, ``"error"`` or ``"timeout"``); one scan. For the "failures first"
        recipe: sort the input so the keys that failed last time start first."""
        n = len(self.prefix)
        out: dict[str, str] = {}
        for entry in await self.store.scan(self.prefix):
            row = entry.value
            if isinstance(row, dict) and isinstance(kind := row.get("kind"), str):
                out[entry.key[n:]] = kind
        return out


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{name} must be an int >= {minimum}, got {value!r}")


def check_unique_keys(items: Any, key: Callable[[Any], object]) -> bool:
    """Before any work, for an input that can be read twice (a ``Sequence``): raise
    :class:`InvalidArgument` at its first duplicate key. False when the input cannot be read
    twice: duplicates are then refused as they come (the item fails)."""
    from collections.abc import Sequence

    if not isinstance(items, Sequence) or isinstance(items, str | bytes):
        return False
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        try:
            k = str(key(item))
        except Exception:
            k = f"#{i}"  # as the intake does
        first = seen.setdefault(k, i)
        if first != i:
            raise InvalidArgument(
                f"duplicate key {k!r} (items #{first} and #{i}): a journal records one outcome "
                "per key\nHINT: make key= unique per item, e.g. key=lambda m: m.id"
            )
    return True
