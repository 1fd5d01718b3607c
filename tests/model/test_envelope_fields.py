"""Every envelope field is placed once, and reaches every path: ``to_dict()`` rows (through
``ROW_FIELDS``, or left out on purpose in ``NOT_IN_ROWS``), pickling, and the report's column
store. A field added to ``Success`` or ``Failure`` fails here until each path carries it."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest

from batchkit import BatchReport, Failure, Success
from batchkit._model.outcomes import (
    NOT_IN_ROWS,
    ROW_FIELDS,
    make_failure,
    set_hedged,
    set_reruns,
    set_resumed,
)
from batchkit._model.store import OutcomeStore

FIELDS = {f.name for cls in (Success, Failure) for f in dataclasses.fields(cls)}


def _envelopes() -> list[Success[str, int] | Failure[str]]:
    """One of each, every field away from its default."""
    err = ValueError("boom")
    s = Success("a", 7, 0, attempts=3, elapsed=1.5)
    f = make_failure("b", err, "timeout", 1, 2, 2.5, (KeyError("k"), err))
    set_reruns(s, 2)
    set_reruns(f, 1)
    set_resumed(s)
    set_hedged(s, "hedge", both=True)
    set_hedged(f, "neither")
    return [s, f]


def _report() -> BatchReport[str, int]:
    return BatchReport(outcomes=_envelopes(), wall_time=1.0, concurrency=2, peak_concurrency=2)


def _values(o: object) -> dict[str, Any]:
    return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}  # type: ignore[arg-type]


def test_every_field_has_a_place_in_rows_or_is_left_out_on_purpose() -> None:
    placed = {name for name, _ in ROW_FIELDS}
    assert placed.isdisjoint(NOT_IN_ROWS)
    assert placed | NOT_IN_ROWS == FIELDS, "a field of Success/Failure is not placed"


def test_a_row_carries_every_placed_field() -> None:
    rows = _report().to_dict()["items"]
    assert rows == [
        {"index": 0, "key": "#0", "ok": True, "kind": "success", "attempts": 3, "elapsed": 1.5,
         "reruns": 2, "resumed": True, "hedged": "hedge", "both_committed": True},
        {"index": 1, "key": "#1", "ok": False, "kind": "timeout", "attempts": 2, "elapsed": 2.5,
         "reruns": 1, "hedged": "neither", "error": "ValueError: boom"},
    ]  # fmt: skip


@pytest.mark.parametrize("which", [0, 1])
def test_every_field_survives_pickling(which: int) -> None:
    o = _envelopes()[which]
    back = pickle.loads(pickle.dumps(o))
    assert repr(_values(back)) == repr(_values(o))


def test_every_field_survives_the_reports_column_store() -> None:
    given = _envelopes()
    store = OutcomeStore[str, int].from_outcomes(given)
    for o in given:
        assert repr(_values(store.outcome(o.index))) == repr(_values(o))


def test_every_field_survives_a_pickled_report() -> None:
    report = pickle.loads(pickle.dumps(_report()))
    for o, back in zip(_envelopes(), report, strict=True):
        assert repr(_values(back)) == repr(_values(o))
