"""The seam between the two entry points and what runs the items.

``backend=None`` (the default) is the in-process engine; any other backend (e.g.
``batchkit.dask.DaskBackend``) implements :class:`Backend` and receives the call's items,
``fn`` and :class:`~batchkit._options.Options` unchanged, and returns the same report types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Callable, Iterable

    from ._options import Options
    from ._outcomes import BatchReport
    from ._stream import Stream

__all__ = ["Backend"]

T = TypeVar("T")
R = TypeVar("R")


class Backend(Protocol):
    """Runs a whole call somewhere else, with the same options and the same envelopes."""

    async def run_batch(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        fn: Callable[..., Any],
        options: Options,
    ) -> BatchReport[Any, Any]: ...

    def open_stream(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        fn: Callable[..., Any],
        options: Options,
    ) -> Stream[Any, Any]: ...
