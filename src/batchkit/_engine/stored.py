"""What a run reads from state stores before its first item and writes back on every way out:
``Adaptive(remember=...)``'s limit, ``breaker=``'s circuits and ``journal=``'s rows. Each is
read once, before any item starts (no store round trip per item), and written once at the end;
a store that fails is logged by its part and never fails the run."""

from __future__ import annotations

from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from .journal import RunJournal
    from .meters.adaptive import AdaptiveMeter
    from .meters.breaker import BreakerMeter, Circuits
    from .plan import Plan

__all__ = ["Stored"]


@final
class Stored:
    """A run's state from its stores; :meth:`load` before the run, :meth:`save` after."""

    __slots__ = ("circuits", "journal", "remembered")

    def __init__(self) -> None:
        self.remembered: float | None = None
        """The limit ``Adaptive(remember=...)`` starts from (``None``: none remembered)."""
        self.circuits: Circuits | None = None
        self.journal: RunJournal | None = None

    async def load(self, p: Plan) -> None:
        if p.adaptive is not None and p.adaptive.remember is not None:
            from .meters.adaptive import recall  # lazy: start-up time

            self.remembered = await recall(p.adaptive.remember)
        if p.breaker is not None:
            from .meters.breaker import Circuits  # lazy: start-up time

            self.circuits = Circuits(p.breaker)
            await self.circuits.load()
        if p.journal is not None:
            from .journal import RunJournal  # lazy: start-up time

            self.journal = RunJournal(p.journal, check_duplicates=not p.keys_checked)
            await self.journal.load()

    async def save(
        self, p: Plan, adaptive: AdaptiveMeter | None, breaker: BreakerMeter | None, whole: bool
    ) -> None:
        """On every way out (a caller's cancel goes on after it). ``whole``: every item of
        the whole input ended and the run did not stop, so a journal may be cleared (if all
        succeeded)."""
        if p.adaptive is not None and p.adaptive.remember is not None and adaptive is not None:
            from .meters.adaptive import remember  # lazy: start-up time

            await remember(p.adaptive.remember, adaptive.state.limit)
        if breaker is not None:
            await breaker.close()
        if self.journal is not None:
            await self.journal.close(whole)
