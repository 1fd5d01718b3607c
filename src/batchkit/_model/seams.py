"""The seam a run's outcomes come through: :class:`Stream`, which both backends implement.

``stream()`` returns one; the local engine's is ``batchkit._engine.stream.LocalStream`` and a
cluster backend's (e.g. ``batchkit.dask.DaskBackend``) is its own. The other seams live beside
the values they take: :class:`~batchkit._model.options.Backend` beside the options it receives,
:class:`~batchkit.Observer` beside the events, :class:`~batchkit.AsyncLimiter` beside the
policies.

:class:`AttemptHook` is the one seam that runs *inside* an attempt: an observer that also
implements it (``batchkit.otel.OpenTelemetry``) is asked once per run for a :class:`RunHook`,
which hears that run's events and is entered around each attempt in the attempt's own task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from .attempt import AttemptResult, Job
    from .events import Event
    from .outcomes import Outcome
    from .report import BatchReport

__all__ = ["AttemptHook", "RunHook", "Stream"]

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


class RunHook(Protocol):
    """One run's side of an :class:`AttemptHook`: the observer of that run's events, and code
    run in each attempt's task around the attempt (the local engine only)."""

    def __call__(self, event: Event, /) -> None: ...

    def enter_attempt(self, job: Job) -> object:
        """Before the attempt, in its task: may set context variables (a current span), which
        the runner then treats as the attempt's starting context, not as pollution. Returns
        a token for :meth:`exit_attempt`."""
        ...

    def exit_attempt(self, token: object, result: AttemptResult | None) -> None:
        """After the attempt, in the same task: undo what ``enter_attempt`` set. ``result``
        is ``None`` when the attempt raised (the caller's cancel, a ``BaseException``)."""
        ...


class AttemptHook(Protocol):
    """An observer that also wants a hook inside every attempt (see the module docstring)."""

    def __call__(self, event: Event, /) -> None: ...

    def start_run(self, name: str | None, settings: Mapping[str, object]) -> RunHook | None:
        """A new run's hook, or ``None`` to sit this run out (then it hears no event of it
        and costs nothing). ``settings``: the options that matter, for the record."""
        ...
