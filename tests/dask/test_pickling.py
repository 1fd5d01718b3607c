"""Every batchkit error and envelope crosses a process boundary intact (no cluster needed)."""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest

import batchkit
from batchkit import (
    BatchkitError,
    BatchReport,
    Failure,
    InputFailed,
    InvalidArgument,
    ItemCancelled,
    ItemError,
    ItemSkipped,
    ItemTimeout,
    MissingExtra,
    Success,
)
from batchkit._dask.wire import safe_error, to_wire_records
from batchkit._model import errors as _errors
from batchkit._model.errors import RemoteError


def _report() -> BatchReport[int, int]:
    return BatchReport(
        outcomes=[Success(1, 2, 0, 1, 0.5)], wall_time=1.0, concurrency=2, peak_concurrency=1
    )


ERRORS: list[BaseException] = [
    BatchkitError("base"),
    InvalidArgument("bad argument\nHINT: fix it"),
    MissingExtra("feature", "dask", "distributed"),
    InputFailed(_report()),
    ItemError("item"),
    ItemTimeout(2.5),
    ItemCancelled("deadline"),
    ItemSkipped("max_failures"),
    RemoteError("mod.Thing", "it broke", "Traceback ...\n"),
]


def test_the_list_covers_every_error_batchkit_defines() -> None:
    defined = {
        getattr(_errors, name)
        for name in _errors.__all__
        if isinstance(getattr(_errors, name), type)
    }
    assert {type(e) for e in ERRORS} == defined | {InputFailed}


def _roundtrip(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_round_trip_with_message_attributes_and_cause(error: BaseException) -> None:
    cause = OSError("the cause")
    error.__cause__ = cause
    error.add_note("a note")
    back = _roundtrip(error)
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.args == error.args
    attrs = {k: v for k, v in vars(error).items() if k != "report"}
    assert {k: v for k, v in vars(back).items() if k != "report"} == attrs
    assert isinstance(back.__cause__, OSError)
    assert str(back.__cause__) == "the cause"
    assert getattr(back, "__notes__", None) == ["a note"]


def test_specific_attributes_survive() -> None:
    back = _roundtrip(ItemTimeout(2.5))
    assert isinstance(back, ItemTimeout)
    assert back.timeout == 2.5
    assert str(back) == "attempt timed out after 2.5 s"
    cancelled = _roundtrip(ItemCancelled("deadline"))
    assert isinstance(cancelled, ItemCancelled)
    assert cancelled.reason == "deadline"
    assert str(cancelled) == "cancelled: the run stopped (deadline)"
    failed = _roundtrip(InputFailed(_report()))
    assert isinstance(failed, InputFailed)
    assert str(failed) == "the input raised after 1 items; see __cause__"
    assert failed.report.values() == [2]
    missing = _roundtrip(MissingExtra("feature", "dask", "distributed"))
    assert isinstance(missing, MissingExtra)
    assert missing.extra == "dask"
    remote = _roundtrip(RemoteError("mod.Thing", "it broke", "tb"))
    assert isinstance(remote, RemoteError)
    assert (remote.type_name, remote.message, remote.traceback) == ("mod.Thing", "it broke", "tb")


def test_envelopes_round_trip() -> None:
    timeout = ItemTimeout(1.0)
    timeout.__cause__ = asyncio.CancelledError()
    failure = Failure("x", timeout, "timeout", 4, 2, 1.5, (ValueError("first"), timeout))
    back = _roundtrip(failure)
    assert isinstance(back, Failure)
    assert (back.item, back.kind, back.index, back.attempts, back.elapsed) == (
        "x",
        "timeout",
        4,
        2,
        1.5,
    )
    assert isinstance(back.error, ItemTimeout)
    assert isinstance(back.error.__cause__, asyncio.CancelledError)
    assert [str(e) for e in back.errors] == ["first", "attempt timed out after 1 s"]
    assert _roundtrip(Success("x", [1], 0, 1, 0.1)) == Success("x", [1], 0, 1, 0.1)


class Unpicklable(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"code {code}")  # pickle would call Unpicklable("code 7"): TypeError
        self.code = code


def test_a_user_error_that_does_not_round_trip_becomes_a_remote_error() -> None:
    try:
        raise Unpicklable(7)
    except Unpicklable as e:
        err = safe_error(e)
    assert isinstance(err, RemoteError)
    assert isinstance(err, batchkit.ItemError)
    assert err.type_name.endswith("Unpicklable")
    assert err.message == "code 7"
    assert "raise Unpicklable(7)" in err.traceback
    same = ValueError("fine")
    assert safe_error(same) is same


def test_an_unpicklable_value_is_that_items_failure() -> None:
    lock = threading.Lock()
    body = to_wire_records(
        [(0, "success", 1, 1, 0.1, (), 0.0), (1, "success", lock, 1, 0.1, (), 0.0)]
    )
    records = pickle.loads(body)
    assert records[0] == (0, "success", 1, 1, 0.1, (), 0.0)
    index, kind, error, *_ = records[1]
    assert (index, kind) == (1, "error")
    assert isinstance(error, RemoteError)
    assert "cannot be pickled" in error.message
