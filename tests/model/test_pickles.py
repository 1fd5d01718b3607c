"""Pickles made before the move to rooms still load, as the same public classes.

``fixtures/before_rooms.pickle`` was made by the old layout (``fixtures/make_before_rooms.py``
says how): its classes are named ``batchkit._outcomes.Success``, ``batchkit._errors._rebuild``,
``batchkit._store.OutcomeStore``... Pickles made now name the public module instead.
"""

from __future__ import annotations

import inspect
import io
import pickle
from pathlib import Path
from typing import Any

import batchkit
from batchkit import (
    BatchReport,
    Failure,
    InputFailed,
    InvalidArgument,
    ItemCancelled,
    ItemSkipped,
    ItemTimeout,
    MissingExtra,
    RemoteError,
    Success,
)

FIXTURE = Path(__file__).parent / "fixtures" / "before_rooms.pickle"


def _old() -> dict[str, Any]:
    with FIXTURE.open("rb") as f:
        loaded: dict[str, Any] = pickle.load(f)
    return loaded


class _Recorder(pickle.Unpickler):
    """Loads a pickle and records the module of every class or function it names."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.modules: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.modules.add(module)
        return super().find_class(module, name)


def _globals(data: bytes) -> set[str]:
    recorder = _Recorder(data)
    recorder.load()
    return recorder.modules


def test_the_fixture_was_made_by_the_old_layout() -> None:
    modules = _globals(FIXTURE.read_bytes())
    assert {"batchkit._outcomes", "batchkit._errors", "batchkit._store"} <= modules


def test_a_report_from_before_loads_with_its_outcomes() -> None:
    report = _old()["report"]
    assert type(report) is BatchReport
    assert report.counts == {
        "success": 4, "error": 3, "timeout": 1, "cancelled": 0, "skipped": 0, "lost": 0
    }  # fmt: skip
    assert [o.kind for o in report] == [
        "success", "error", "success", "success", "error", "timeout", "success", "error"
    ]  # fmt: skip
    assert sorted(report.values()) == [0, 20, 30, 60]
    first = report[1]
    assert type(first) is Failure
    assert isinstance(first.error, ValueError)
    assert first.attempts == 2
    timed_out = report[5]
    assert isinstance(timed_out, Failure)
    assert isinstance(timed_out.error, ItemTimeout)


def test_a_stopped_report_from_before_loads_with_its_skipped_tail() -> None:
    report = _old()["stopped_report"]
    assert report.stop_reason == "fail_fast"
    skipped = [o for o in report if o.kind == "skipped"]
    assert len(skipped) == 8
    assert all(isinstance(o.error, ItemSkipped) for o in skipped)


def test_envelopes_from_before_load_as_the_public_classes() -> None:
    old = _old()
    assert type(old["success"]) is Success
    assert old["success"].value == 0
    assert type(old["failure"]) is Failure
    assert str(old["failure"].error) == "bad 1"


def test_errors_from_before_load_with_their_messages_and_attributes() -> None:
    errors = _old()["errors"]
    assert [type(e) for e in errors] == [
        InvalidArgument, MissingExtra, InputFailed, ItemTimeout, ItemCancelled, ItemSkipped,
        RemoteError,
    ]  # fmt: skip
    assert errors[1].extra == "dask"
    assert errors[2].report.total == 8
    assert "the run stopped (deadline)" in str(errors[4])


def test_pickles_made_now_name_only_public_modules_for_public_classes() -> None:
    data = pickle.dumps(_old())
    private = {m for m in _globals(data) if m.startswith("batchkit")} - {"batchkit"}
    # The report's columns and the errors' rebuild function are private helpers.
    assert private == {"batchkit._model.errors", "batchkit._model.report", "batchkit._model.store"}
    assert pickle.loads(data)["report"].counts == _old()["report"].counts


def test_public_classes_and_functions_say_batchkit() -> None:
    for name in batchkit.__all__:
        obj = getattr(batchkit, name)
        if isinstance(obj, type) or inspect.isfunction(obj):
            assert obj.__module__ == "batchkit", name


def test_the_public_classes_of_batchkit_dask_say_batchkit_dask() -> None:
    import batchkit.dask

    for name in batchkit.dask.__all__:
        obj = getattr(batchkit.dask, name)
        if (isinstance(obj, type) or inspect.isfunction(obj)) and name != "RemoteError":
            assert obj.__module__ == "batchkit.dask", name
