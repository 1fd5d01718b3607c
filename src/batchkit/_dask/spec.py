"""What a Dask run may be asked, and what every worker gets to run its chunks.

:func:`refuse_unsupported` (at the call, from the options) and :func:`check_options` (from the
plan, with what cannot be sent to a worker) are the one place that refuses what the Dask
backend does not support; a new refusal goes there. :func:`plan_run`
turns the plan and the cluster's size into the chunks in flight and the :class:`RunSpec`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .._model.errors import InvalidArgument
from .chunks import ChunkSizer, plan_chunks
from .groups import check_shares, share_table, shared
from .wire import RunSpec, check_picklable, dumps

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._engine.plan import Plan
    from .._model.options import Options
    from .._model.policies import Adaptive
    from .state import RunState

__all__ = ["check_options", "plan_run", "refuse_unsupported"]


def refuse_unsupported(options: Options) -> None:
    """Options the cluster does not honour, refused at the call before a client is opened:
    ``hedge=`` would hedge within one worker's chunk only, where its budget and latencies
    mean little (the driver re-runs what a lost worker held instead). ``item_budget=`` is
    per item, so a chunk's engine keeps it on the worker (see :func:`plan_run`); ``groups=``
    is split among the workers (``groups.py``), refused by :func:`plan_run` only when a share
    would be 0. Call-level groups (``batchkit.limit()`` in ``fn``) are refused: each chunk
    engine would hold its own copy of the group."""
    if options.hedge is not None:
        raise InvalidArgument(
            "hedge= is not supported with the Dask backend: a hedge would run beside its "
            "item on the same worker, which is what makes it slow\nHINT: run the call "
            "without backend= to hedge stragglers, or use timeout= with Retry(...)"
        )
    groups = options.groups  # not checked yet: a wrong value is refused by the checks later
    if isinstance(groups, list | tuple) and any(getattr(g, "by", 0) is None for g in groups):
        raise InvalidArgument(
            "call-level limit groups (LimitGroup(name=...) without by=, taken with "
            "batchkit.limit() in fn) are not supported with the Dask backend: each worker "
            "would hold its own copy of the group, not one for the cluster\nHINT: run the "
            "call without backend= (call-level groups hold in this process)"
        )


def check_options(o: Plan, fn: Callable[..., Any]) -> None:
    """Refuse what the Dask backend does not support, at the call (``InvalidArgument`` with a
    HINT), and what cannot be pickled to send it to the workers."""
    if o.limiter is not None:
        raise InvalidArgument(
            "rate_limit on a Dask cluster must be batchkit.RateLimit(...): a limiter "
            f"object ({o.limiter!r}) would be copied to every worker and limit each "
            "alone\nHINT: pass RateLimit(per_second=...); batchkit splits it among workers"
        )
    if o.adaptive is not None and o.adaptive.remember is not None:
        raise InvalidArgument(
            "Adaptive(remember=...) is not supported with the Dask backend: each chunk adapts "
            "its own limit on a worker, so there is no one limit to remember\nHINT: drop "
            "remember= on Dask, or run the job with the local engine"
        )
    if o.journal is not None and o.breaker is not None:
        raise InvalidArgument(
            "journal= and breaker= together are not supported with the Dask backend yet: the "
            "driver would have to hold a half-open circuit's items behind a probe the journal "
            "may end without sending\nHINT: use one of them on Dask, or run the job with the "
            "local engine (no backend=), where both work together"
        )
    if o.journal is not None and o.journal.mode == "transactional":
        raise InvalidArgument(
            "Journal(mode='transactional') is not supported with the Dask backend: a "
            "success's row would be written in the item's session, which lives on a worker, "
            "while the journal is read and written by the driver\nHINT: use "
            "Journal(mode='batched') on Dask (rows written by the driver as results come "
            "back), or run the job with the local engine"
        )
    if o.cost is not None:
        raise InvalidArgument(
            "cost= is not supported with the Dask backend yet\nHINT: sort the input by "
            "cost yourself, most expensive first"
        )
    check_picklable("fn", fn)
    if o.context is not None:
        check_picklable("the context factory", o.context)
    if o.retry is not None:
        check_picklable("retry", o.retry)
    if o.key is not None:
        check_picklable("key", o.key)
    for g in o.groups:
        check_picklable("LimitGroup.by", g.by)
        if g.rate_limit is not None and g.rate_limit.weight is not None:
            check_picklable("LimitGroup's RateLimit.weight", g.rate_limit.weight)
    if o.rate_limit is not None and o.rate_limit.weight is not None:
        check_picklable("RateLimit.weight", o.rate_limit.weight)


def plan_run(s: RunState[Any, Any], addresses: list[str], threads: int) -> int:
    """Reads the deadline and the grace, sizes chunks and pickles the run's spec into
    ``s``; returns how many chunks may be in flight. With ``groups=`` or a weighted
    ``RateLimit``, refuses a share of 0 and keeps the run to ``addresses`` (``groups.py``)."""
    o = s.plan
    n_workers = len(addresses)
    table = None
    if shared(o):
        check_shares(o, n_workers)
        table = share_table(o, addresses)
        s.kept = sorted(addresses)
    s.grace = o.grace
    if o.deadline_seconds is not None:
        s.deadline_at = s.start + o.deadline_seconds
    else:
        s.deadline_at = o.deadline_at
    per_worker = s.backend.per_worker
    cap = o.slots
    per_chunk, in_flight = plan_chunks(cap, per_worker, n_workers, threads)
    s.effective = min(cap, per_chunk * threads)
    s.sizer = ChunkSizer(s.backend.chunk_size, per_chunk, threads, s.intake.total)
    chunk_concurrency: int | Adaptive = per_chunk
    if o.adaptive is not None:
        a = o.adaptive
        chunk_concurrency = dataclasses.replace(
            a, max=per_chunk, initial=min(a.initial, per_chunk), min=min(a.min, per_chunk)
        )
    rate = o.rate_limit
    dl = s.deadline_at
    spec = RunSpec(
        run_id=s.run_id,
        name=o.name,
        fn=s.fn,
        context=o.context,
        concurrency=chunk_concurrency,
        per_worker=per_worker,
        timeout=o.timeout,
        retry=o.retry,
        rate=rate.per_second if rate and rate.weight is None else None,
        burst=rate.burst if rate else 1,
        deadline_wall=dl + s.wall_offset if dl is not None else None,
        key=o.key,
        fit_timeout=o.fit_timeout,
        grace=s.grace,
        fail_fast=o.fail_fast,
        max_failures=o.max_failures,
        events=bool(s.observers),
        logs=s.backend.forward_logs,
        alerts=o.max_failures is not None or o.max_failure_ratio is not None,
        topic=s.topic,
        item_budget=o.item_budget,
        groups=table,
    )
    s.spec_blob = dumps(spec)
    return in_flight
