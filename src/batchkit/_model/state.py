"""State that outlives a run: the :class:`StateStore` seam, its value :class:`StateEntry`, and
the in-memory store :class:`MemoryStateStore` (the default). The SQLAlchemy store, for state
shared between runs and processes, is ``batchkit.sqlalchemy.SQLAlchemyStateStore``.

A store maps string keys to JSON values, each with a version that every write raises by one,
so a read-modify-write is safe without locks: read the entry, then
``compare_and_set(key, new, expected=entry.version)``, and read again if someone else wrote in
between (``None`` back). Values are JSON, not bytes or pickles: a row stays readable by any
process (any Python, any version of your code) and in the database's own console.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias, final

from .errors import InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "MAX_KEY_LENGTH",
    "JsonValue",
    "MemoryStateStore",
    "StateEntry",
    "StateStore",
    "check_expected",
    "check_key",
    "check_prefix",
    "check_time",
    "decode",
    "encode",
]

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
"""What a store holds: anything :func:`json.dumps` writes, without NaN or infinities. It is
stored as JSON text, so a tuple comes back as a list and a dict's keys come back as strings."""

MAX_KEY_LENGTH = 512
"""The longest key a store takes (the SQL column is ``VARCHAR(512)``)."""


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One key's state as a store last saw it.

    Attributes:
        key: The key (1 to 512 characters).
        value: The JSON value, decoded afresh on every read (changing it changes nothing in
            the store).
        version: 1 when the key was first written, one more on every write since; the
            ``expected`` of the next :meth:`StateStore.compare_and_set`.
        updated_at: When it was last written, in seconds since the epoch by the store's
            clock (``time.time`` unless given), what :meth:`StateStore.prune` compares.
    """

    key: str
    value: JsonValue
    version: int
    updated_at: float


class StateStore(Protocol):
    """Keys to JSON values with versions, shared by whatever uses the same store.

    :class:`MemoryStateStore` lives as long as the object (one process, one event loop);
    ``batchkit.sqlalchemy.SQLAlchemyStateStore`` keeps it in a table of your database, safe
    for several processes at once. Every method is one atomic step: a
    :meth:`compare_and_set` never loses a concurrent write, and :meth:`set_many` writes all of
    its keys or none.
    """

    async def get(self, key: str) -> StateEntry | None:
        """The key's entry, or ``None`` if it has none."""
        ...

    async def compare_and_set(
        self, key: str, value: JsonValue, *, expected: int
    ) -> StateEntry | None:
        """Write ``value`` if the key's version is still ``expected`` (``0``: the key has no
        entry), and return the new entry; return ``None`` and write nothing otherwise."""
        ...

    async def set_many(self, values: Mapping[str, JsonValue]) -> None:
        """Write every key's value, whatever its version (each version goes up by one), in
        one transaction. Keys are written in sorted order, so two writers never deadlock."""
        ...

    async def scan(self, prefix: str) -> list[StateEntry]:
        """Every entry whose key starts with ``prefix`` (``""``: all), sorted by key."""
        ...

    async def prune(self, older_than: float, *, prefix: str = "") -> int:
        """Delete every entry whose key starts with ``prefix`` (``""``: all) last written
        before ``older_than`` (seconds since the epoch, the store's clock); return how many
        were deleted."""
        ...


# ---------------------------------------------------------------------------------- checks
def check_key(key: object) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidArgument(
            f"a state key must be a str of 1 to {MAX_KEY_LENGTH} characters, got {key!r}\n"
            "HINT: name keys by what they hold, e.g. 'journal/nightly/item-42'"
        )
    return key


def check_expected(expected: object) -> int:
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidArgument(
            f"expected must be an int >= 0 (0: the key has no entry), got {expected!r}\n"
            "HINT: pass the version of the entry you read: expected=entry.version"
        )
    return expected


def encode(value: object) -> str:
    """``value`` as compact JSON text, or :class:`InvalidArgument` saying why it is not JSON."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise InvalidArgument(
            f"a state value must be JSON (None, bool, int, float, str, list, dict with str "
            f"keys; no NaN or infinity), got {value!r}: {e}\n"
            "HINT: store plain data, e.g. an object's id or a dict of its fields"
        ) from None


def decode(text: str) -> JsonValue:
    value: JsonValue = json.loads(text)
    return value


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise InvalidArgument(f"prefix must be a str, got {prefix!r}")
    return prefix


def check_time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number of seconds, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------- memory
@final
class MemoryStateStore:
    """A :class:`StateStore` in this process's memory: the default, gone with the object.

    For one event loop (its methods never await, so each is atomic on the loop). Values are
    kept as JSON text, exactly as the SQL store keeps them, so what you read back is the same
    on both.

    Args:
        clock: Seconds since the epoch, for ``updated_at`` and :meth:`prune`
            (``time.time`` by default; a test can pass its own).
    """

    __slots__ = ("_clock", "_entries")

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        if not callable(clock):
            raise InvalidArgument(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock = clock
        # key -> (JSON text, version, updated_at)
        self._entries: dict[str, tuple[str, int, float]] = {}

    def __repr__(self) -> str:
        return f"MemoryStateStore(<{len(self._entries)} keys>)"

    def _entry(self, key: str, row: tuple[str, int, float]) -> StateEntry:
        text, version, updated_at = row
        return StateEntry(key, decode(text), version, updated_at)

    async def get(self, key: str) -> StateEntry | None:
        """See :meth:`StateStore.get`."""
        row = self._entries.get(check_key(key))
        return None if row is None else self._entry(key, row)

    async def compare_and_set(
        self, key: str, value: JsonValue, *, expected: int
    ) -> StateEntry | None:
        """See :meth:`StateStore.compare_and_set`."""
        check_key(key)
        check_expected(expected)
        text = encode(value)
        row = self._entries.get(key)
        if (0 if row is None else row[1]) != expected:
            return None
        new = (text, expected + 1, float(self._clock()))
        self._entries[key] = new
        return self._entry(key, new)

    async def set_many(self, values: Mapping[str, JsonValue]) -> None:
        """See :meth:`StateStore.set_many`."""
        # Every key and value is checked before the first write: all or nothing.
        texts = {check_key(k): encode(v) for k, v in values.items()}
        now = float(self._clock())
        for key in sorted(texts):
            row = self._entries.get(key)
            self._entries[key] = (texts[key], 1 if row is None else row[1] + 1, now)

    async def scan(self, prefix: str) -> list[StateEntry]:
        """See :meth:`StateStore.scan`."""
        check_prefix(prefix)
        return [
            self._entry(k, self._entries[k])
            for k in sorted(k for k in self._entries if k.startswith(prefix))
        ]

    async def prune(self, older_than: float, *, prefix: str = "") -> int:
        """See :meth:`StateStore.prune`."""
        cutoff = check_time("older_than", older_than)
        check_prefix(prefix)
        old = [k for k, (_, _, at) in self._entries.items() if at < cutoff and k.startswith(prefix)]
        for k in old:
            del self._entries[k]
        return len(old)
