"""``batchkit.limit(name)``: a place in a call-level limit group, inside ``fn``.

The run is found through the attempt's slot (``_SLOT``, set in each worker's context and
copied into the tasks ``fn`` starts, so calls gathered in ``fn`` find it too); the groups
themselves are ``RunInfo.limits`` (``meters/call_groups.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._model.attempt import _SLOT

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from .meters.call_groups import CallGroups

__all__ = ["limit"]


def limit(name: str, *, weight: float = 1) -> AbstractAsyncContextManager[None]:
    """A place in the call-level group ``name`` for one block inside ``fn``::

        async with batchkit.limit("news"):
            response = await client.get(url)

    Waits until the group has room — its ``concurrency`` (or ``Adaptive`` limit) and its
    ``rate_limit``'s turn, taking ``weight`` tokens from the bucket — in arrival order, holds
    the place for the block and gives it back on every path (an error, the item's timeout,
    the deadline). The wait happens inside ``fn``, so the item keeps its slot of
    ``concurrency`` meanwhile (item-level groups, taken before ``fn``, do not).

    Declare the group in the call: ``groups=[LimitGroup(name="news", concurrency=8)]`` (a
    ``LimitGroup`` with ``name=`` and no ``by=``). Raises ``RuntimeError`` outside ``fn`` of
    a running ``batch_process``/``stream``; ``InvalidArgument`` (the item's error) for a name
    that is no call-level group of the run, or a ``weight`` that is no number > 0 or above the
    group's ``burst``.
    """
    slot = _SLOT.get()
    if slot is None or slot.job is None or not slot.in_attempt:
        raise RuntimeError(
            f"batchkit.limit({name!r}) works only inside fn while batch_process() or "
            "stream() runs it\nHINT: call it in fn, around the upstream call it limits"
        )
    limits: CallGroups | None = slot.run.limits
    if limits is None:
        from .meters.call_groups import unknown

        unknown(name, [])
    return limits.group(name).hold(weight)
