"""Runs on an event loop of their own, in a thread, so the HTTP loop stays responsive.

A run at concurrency 50 starts 150 upstream requests in a burst at the start of each wave,
and parses as many answers when they come back: tens to hundreds of milliseconds of Python on
whatever loop runs them. On the service's loop that is the time a ``GET /health`` waits.
On a loop of its own, the run shares the CPU with the HTTP loop at the interpreter's thread
switch interval (a few ms) instead of holding it for whole bursts.

Everything a run touches — the engine and its connections, the upstream client (and the
simulator when it is embedded) — is created on the worker loop and closed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING, Any, final

from .pipeline import RunConfig, RunResult, Stop, run_job

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

    from batchkit import Observer

    from .upstream import UpstreamClient

    Resources = tuple[AsyncEngine, async_sessionmaker[AsyncSession], UpstreamClient]

__all__ = ["RunThread"]


@final
class RunThread:
    """``async with RunThread(resources) as runs: await runs.run(config, ...)``.

    ``resources`` is called on the worker loop and must give an async context manager of
    ``(engine, session_factory, client)``; it is exited there when the block ends.
    """

    def __init__(self, resources: Callable[[], AbstractAsyncContextManager[Resources]]) -> None:
        self._resources = resources
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="predictions-runs")
        self._stack = contextlib.AsyncExitStack()
        self.engine: AsyncEngine | None = None
        self._session_factory: async_sessionmaker[AsyncSession] | None = None
        self._client: UpstreamClient | None = None

    async def _on_worker(self, coro: Any) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def __aenter__(self) -> RunThread:
        self._thread.start()

        async def open_() -> None:
            resources = await self._stack.enter_async_context(self._resources())
            self.engine, self._session_factory, self._client = resources

        try:
            await self._on_worker(open_())
        except BaseException:
            await self._stop_thread()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._on_worker(self._stack.aclose())
        finally:
            await self._stop_thread()

    async def _stop_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)
        self._loop.close()

    async def run(
        self,
        config: RunConfig,
        *,
        stop: Stop,
        holder: str,
        lease_seconds: float,
        observers: Sequence[Observer] = (),
    ) -> RunResult:
        """``run_job`` on the worker loop; ``stop.set`` may be called from any thread.
        ``observers`` are called on the worker loop (a logging handler or a counter is fine)."""
        assert self._session_factory is not None
        assert self._client is not None
        result: RunResult = await self._on_worker(
            run_job(
                self._session_factory,
                self._client,
                config,
                stop=stop,
                holder=holder,
                lease_seconds=lease_seconds,
                observers=observers,
            )
        )
        return result
