"""``groups=`` and a weighted ``RateLimit`` on the Dask backend: each worker holds a share.

No worker sees every attempt of a group, so the limits are split, as the run's ``RateLimit``
is: every worker the run started with gets a share of each group, and the shares add up to at
most the group's limit, so **every limit holds across the cluster at every instant**.

- a group's ``concurrency=c``: ``c // n`` per worker, one more for the first ``c % n``
  workers in sorted address order (``Adaptive``: its ``max`` split so; each worker's group
  adapts within its share, ``initial`` and ``min`` clamped to it);
- a group's ``RateLimit``: ``per_second / n`` and ``burst // n`` per worker;
- the run's weighted ``RateLimit(weight=...)``: the same, as one more group holding every
  item (its bucket shared by the chunks on that worker, each start taking the item's weight).

A share of zero would never start an item, so :func:`check_shares` refuses it at the call
(``concurrency`` or ``Adaptive.max`` below ``n``, a ``burst`` below ``n``). An item whose
weight is above a worker's share of the burst fails with ``InvalidArgument`` naming the share,
on the worker, when its group keys are computed (at its admission: ``fn`` is never called; its
envelope is the local one's, kind ``error`` after one attempt). The driver does not weigh items
itself: ``weight`` and ``by`` are called once per item, where the item runs.

A run with these limits keeps to the workers it started with (chunks are submitted with
``workers=`` and ``allow_other_workers=False``): a worker that joins later has no share. When
a worker leaves, the others' shares are split again among those left (shares only grow), and
when none of them is left for ``DaskBackend(lost_after=...)``, what is out ends as ``lost``.

On a worker, one :class:`~batchkit._engine.meters.groups.Groups` per run holds that worker's
share; every chunk engine of the run there is handed it (the ``SHARED`` seam), so two chunks
running at once share one share instead of taking one each.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, cast

from .._model.errors import InvalidArgument
from .._model.policies import Adaptive, LimitGroup, RateLimit

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._engine.plan import Plan

__all__ = ["ShareTable", "check_shares", "share_table", "shared"]

ShareTable = dict[str, tuple[LimitGroup, ...]]
"""Each worker's (by address) share of every group, ``by`` and ``weight`` taking the chunk's
``(index, item)`` pairs; the run's weighted ``RateLimit``, if any, last."""


def shared(plan: Plan) -> bool:
    """Whether the run has limits split into per-worker groups."""
    rate = plan.rate_limit
    return bool(plan.groups) or (rate is not None and rate.weight is not None)


def check_shares(plan: Plan, n: int) -> None:
    """Refuse, at the call (before any work), a limit that would give a worker a share of 0."""
    for g in plan.groups:
        c = g.concurrency
        most = c.max if isinstance(c, Adaptive) else c
        if most is not None and most < n:
            what = "Adaptive.max" if isinstance(c, Adaptive) else "concurrency"
            raise InvalidArgument(
                f"LimitGroup {what}={most} cannot be split among the {n} Dask workers: each "
                f"worker holds a share ({most} // {n}), and a worker holding 0 could never start "
                f"that group's items\nHINT: give the group {what} >= {n} (the number of "
                "workers), or run the call without backend= (limit groups hold in this process)"
            )
        if g.rate_limit is not None:
            _check_burst(g.rate_limit, n, "LimitGroup's RateLimit")
    if plan.rate_limit is not None and plan.rate_limit.weight is not None:
        _check_burst(plan.rate_limit, n, "RateLimit")


def _check_burst(rate: RateLimit, n: int, whose: str) -> None:
    if rate.burst < n:
        raise InvalidArgument(
            f"{whose}(burst={rate.burst}) cannot be split among the {n} Dask workers: each "
            f"worker's bucket holds burst // {n} = 0\nHINT: give burst >= {n} (the number of "
            "workers); with weight=, at least that many times the heaviest weight"
        )


def share_table(plan: Plan, addresses: list[str]) -> ShareTable:
    """Each of ``addresses``' share of every group (sorted: the first ``c % n`` get one
    more place)."""
    ordered = sorted(addresses)
    n = len(ordered)
    table: ShareTable = {}
    for k, address in enumerate(ordered):
        shares = [
            LimitGroup(
                by=OnItem(_item_level(g)),
                concurrency=_concurrency(g.concurrency, k, n),
                rate_limit=_rate(g.rate_limit, n, "LimitGroup's RateLimit"),
            )
            for g in plan.groups
        ]
        rate = plan.rate_limit
        if rate is not None and rate.weight is not None:
            shares.append(LimitGroup(by=_every_item, rate_limit=_rate(rate, n, "RateLimit")))
        table[address] = tuple(shares)
    return table


def _item_level(g: LimitGroup) -> Callable[[Any], object]:
    # Plan.groups holds the item-level groups only; call-level ones are refused on Dask.
    assert g.by is not None
    return g.by


def _concurrency(c: int | Adaptive | None, k: int, n: int) -> int | Adaptive | None:
    if c is None:
        return None
    most = c.max if isinstance(c, Adaptive) else c
    share = most // n + (1 if k < most % n else 0)
    if not isinstance(c, Adaptive):
        return share
    return dataclasses.replace(c, max=share, initial=min(c.initial, share), min=min(c.min, share))


def _rate(rate: RateLimit | None, n: int, whose: str) -> RateLimit | None:
    if rate is None:
        return None
    weight = rate.weight
    return dataclasses.replace(
        rate,
        per_second=rate.per_second / n,
        burst=rate.burst // n,
        weight=ShareWeight(weight, rate.burst, n, whose) if weight is not None else None,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class OnItem:
    """A group's ``by``, given the chunk engine's ``(index, item)`` pair."""

    by: Callable[[Any], object]

    def __call__(self, pair: tuple[int, Any]) -> object:
        return self.by(pair[1])


def _every_item(pair: tuple[int, Any]) -> object:
    """The run's weighted ``RateLimit`` as a group: every item in it."""
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class ShareWeight:
    """A ``weight=``, given the pair, that refuses an item heavier than a worker's share of
    the burst with a message naming the share (a lighter one is checked as locally)."""

    weight: Callable[[Any], float]
    burst: int
    workers: int
    whose: str

    def __call__(self, pair: tuple[int, Any]) -> float:
        w: object = self.weight(pair[1])
        share = self.burst // self.workers
        if (
            isinstance(w, (int, float))
            and not isinstance(w, bool)
            and math.isfinite(w)
            and w > share
        ):
            n = self.workers
            raise InvalidArgument(
                f"{self.whose}.weight {w!r} of this item is larger than a Dask worker's share "
                f"of the burst: burst={self.burst} // {n} workers = {share}; each worker's "
                "bucket never holds more, so it could never start\nHINT: raise burst= to at "
                f"least {n} x the heaviest weight ({n} x {w!r} here), or split the item"
            )
        return cast("float", w)  # anything else is refused as locally (checked_weight)
