"""The seam a run's outcomes come through: :class:`Stream`, which both backends implement.

``stream()`` returns one; the local engine's is ``batchkit._engine.stream.LocalStream`` and a
cluster backend's (e.g. ``batchkit.dask.DaskBackend``) is its own. The other seams live beside
the values they take: :class:`~batchkit._model.options.Backend` beside the options it receives,
:class:`~batchkit.Observer` beside the events, :class:`~batchkit.AsyncLimiter` beside the
policies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from types import TracebackType

    from .outcomes import Outcome
    from .report import BatchReport

__all__ = ["Stream"]

T = TypeVar("T")
R = TypeVar("R")


class Stream(Protocol[T, R]):
    """An async context manager; entering it starts the run and gives an async iterator of
    outcomes. Leaving the block (normally, by ``break`` or by an error) cancels what is still
    running, exits every open context and waits for that cleanup — at most the deadline's
    ``grace`` (1 s by default) before abandoning work that does not stop."""

    async def __aenter__(self) -> Stream[T, R]: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> Stream[T, R]: ...

    async def __anext__(self) -> Outcome[T, R]: ...

    @property
    def report(self) -> BatchReport[T, R]:
        """Counts and timings of every outcome produced so far (a stream keeps no outcomes,
        so ``outcomes`` is empty; ``counts``, ``total`` and ``ok`` count them all)."""
        ...

    @property
    def consumed(self) -> int:
        """How many outcomes the consumer has taken."""
        ...
