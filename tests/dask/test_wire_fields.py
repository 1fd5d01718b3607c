"""Every envelope field crosses the Dask wire: the worker's record, the compact records' blob,
the driver's decoding and its envelope. A field added to ``Success`` or ``Failure`` fails here
until the wire carries it (``wire.RECORD_PLACES``) or the driver fills it in on purpose
(``wire.NOT_IN_RECORDS``). No cluster: the worker's and the driver's functions are called
directly."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from batchkit import Failure, Success
from batchkit._dask import worker as worker_side
from batchkit._dask.alerts import Alerts
from batchkit._dask.chunks import Chunk
from batchkit._dask.envelopes import Envelopes
from batchkit._dask.state import RunState
from batchkit._dask.stopping import Stopper
from batchkit._dask.wire import NEVER_SET, NOT_IN_RECORDS, RECORD_PLACES
from batchkit._model.options import Options
from batchkit._model.outcomes import make_failure, set_reruns

FIELDS = {f.name for cls in (Success, Failure) for f in dataclasses.fields(cls)}
OFFSET = 10
RERUNS = 2


def _values(o: object) -> dict[str, Any]:
    return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}  # type: ignore[arg-type]


def _sent() -> list[Success[str, int] | Failure[str]]:
    """What a worker's run ended in: one of each, every field away from its default."""
    err = ValueError("boom")
    s = Success("a", 7, OFFSET, attempts=3, elapsed=1.5)
    f = make_failure("b", err, "timeout", OFFSET + 1, 2, 2.5, (KeyError("k"), err))
    for o in (s, f):
        set_reruns(o, RERUNS)
    return [s, f]


def _across_the_wire(sent: list[Success[str, int] | Failure[str]]) -> list[Any]:
    # The worker: one record per outcome, encoded as the chunk's result.
    records = [worker_side._record(o, o.index - OFFSET, 1e9) for o in sent]
    collector = worker_side._Collector(keep_events=False, loop_to_wall=0.0)
    blob = worker_side._encode(OFFSET, records, collector, [], "w1", None, token="t3")
    # The driver: decoded, then made envelopes for a chunk that ran three times (two re-runs).
    state: RunState[str, int] = RunState(None, [o.item for o in sent], str, Options())
    envelopes = Envelopes(state, Alerts(state, Stopper(state)))
    chunk = Chunk(OFFSET, [o.item for o in sent], starts={"t1": "w0", "t2": "w0", "t3": "w1"})
    envelopes.emit_chunk(chunk, worker_side.decode(blob))
    return list(envelopes.ready)


def test_every_field_is_on_the_wire_or_filled_in_by_the_driver() -> None:
    assert set(RECORD_PLACES).isdisjoint(NOT_IN_RECORDS)
    assert set(RECORD_PLACES) | set(NOT_IN_RECORDS) == FIELDS, "a field has no way across"
    assert set(NEVER_SET) <= set(NOT_IN_RECORDS)


def test_fields_of_refused_options_come_back_as_their_defaults() -> None:
    back = _across_the_wire(_sent())
    for o in back:
        for f in dataclasses.fields(o):
            if f.name in NEVER_SET:
                assert getattr(o, f.name) == f.default


def test_the_sent_envelopes_set_every_field_away_from_its_default() -> None:
    # Else a forgotten field would cross as its default and the round trip could not tell.
    for o in _sent():
        for f in dataclasses.fields(o):
            if f.default is not dataclasses.MISSING and f.name not in NEVER_SET:
                assert getattr(o, f.name) != f.default, f"set {type(o).__name__}.{f.name}"


@pytest.mark.parametrize("which", [0, 1], ids=["success", "failure"])
def test_every_field_survives_the_round_trip(which: int) -> None:
    sent = _sent()
    back = _across_the_wire(sent)
    assert type(back[which]) is type(sent[which])
    assert repr(_values(back[which])) == repr(_values(sent[which]))
