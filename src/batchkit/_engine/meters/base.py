"""The one seam every admission policy implements (after aiometer's meters).

Before an attempt starts, the runner asks each meter in turn ``wait_task_can_start``: it may
wait (a rate limit's turn, a free place under the adaptive limit, an external limiter), then
says yes (``None``) or why not (a :data:`~batchkit.StopReason`, e.g. ``"out_of_time"``). Every
meter that said yes hears ``notify_task_started`` when the attempt starts and
``notify_task_finished`` when it ends (with its result; ``None`` if it never started because a
later meter refused or the run stopped). Adding a policy adds a meter; no loop changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..._model.attempt import AttemptResult, Job, Slot
    from ..._model.errors import SkipReason

__all__ = ["Meter"]


class Meter(Protocol):
    async def wait_task_can_start(self, slot: Slot, job: Job) -> SkipReason | None: ...

    def notify_task_started(self, slot: Slot, job: Job, now: float) -> None: ...

    async def notify_task_finished(
        self, slot: Slot, job: Job, result: AttemptResult | None
    ) -> None: ...
