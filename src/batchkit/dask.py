"""Run ``batch_process`` and ``stream`` on a Dask cluster: ``backend=DaskBackend(client)``.

Needs the ``dask`` extra (``pip install 'aio-batchkit[dask]'``); ``distributed`` is imported only
when a backend is used. The same call, the same envelopes, one :class:`~batchkit.BatchReport`::

    from batchkit.dask import DaskBackend

    async with Client("tcp://scheduler:8786", asynchronous=True) as client:
        report = await batch_process(items, fetch, concurrency=64, timeout=10,
                                     backend=DaskBackend(client, per_worker=16))

See docs/how-to/dask.md for deploying, per-worker resources and what differs from one process.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast, final

from ._dask.events import ChunkRerun as ChunkRerun
from ._dask.events import WorkerLost as WorkerLost
from ._dask.spec import refuse_unsupported
from ._dask.worker import current_run
from ._model.errors import InvalidArgument, MissingExtra
from ._model.errors import RemoteError as RemoteError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from ._model.options import Options
    from ._model.outcomes import Outcome
    from ._model.report import BatchReport
    from ._model.seams import Stream

__all__ = ["ChunkRerun", "DaskBackend", "RemoteError", "WorkerLost", "WorkerResource", "per_worker"]

V = TypeVar("V")
T = TypeVar("T")
R = TypeVar("R")


def _require_distributed() -> Any:
    try:
        import distributed
    except ImportError as e:
        raise MissingExtra("batchkit.dask.DaskBackend", "dask", "distributed") from e
    return distributed


async def _close(client: Any) -> None:
    """Close a client this backend opened, within half of ``DaskBackend.SLACK`` (the driver
    keeps the other half for its last messages): a client whose scheduler is gone would
    otherwise wait out Dask's own timeouts."""
    import asyncio
    import logging

    try:
        async with asyncio.timeout(DaskBackend.SLACK / 2):
            await client.close()
    except TimeoutError:
        logging.getLogger("batchkit.dask").debug("closing the Dask client timed out")


def _is_seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@final
class DaskBackend:
    """Run a batch on a Dask cluster.

    ``client_or_address``: a ``distributed.Client`` created with ``asynchronous=True`` (it is
    used as is and left open), or a scheduler address such as ``"tcp://10.0.0.5:8786"`` (a
    client is opened for each call and closed after it).

    ``per_worker``: the most attempts at once on one worker. The run's ``concurrency`` stays
    the cluster-wide limit: the effective concurrency is ``min(concurrency, worker threads *
    per_worker)``.

    ``chunk_size``: items per Dask task. ``None`` (the default) sizes chunks from the observed
    throughput, aiming at about half a second of work per chunk, smaller toward the end of a
    sized input so the workers finish together.

    ``forward_logs``: forward log records emitted on workers while the run's items execute to
    the driver's loggers of the same names (the worker's logging levels apply).

    ``lost_after``: seconds without any worker (or without the scheduler) after which the
    items still out, and the rest of a sized input, end as ``Failure(kind="lost")``; ``None``
    waits for workers to come back for as long as the run's deadline allows (forever
    without one). A run with ``groups=`` or a weighted ``RateLimit`` counts only the workers
    it started with (they hold its shares; a worker its nanny restarts comes back under a new
    address, as one that joined).

    ``SLACK``: the seconds a call may take past ``deadline + grace`` (or a stop + grace) for the
    cluster round trip, also when the scheduler is gone.
    """

    SLACK: ClassVar[float] = 1.0

    def __init__(
        self,
        client_or_address: Any,
        *,
        per_worker: int = 16,
        chunk_size: int | None = None,
        forward_logs: bool = True,
        lost_after: float | None = 30.0,
    ) -> None:
        _require_distributed()
        if lost_after is not None and not _is_seconds(lost_after):
            raise InvalidArgument(
                f"lost_after must be a number of seconds > 0 or None, got {lost_after!r}\n"
                "HINT: lost_after=30.0 ends the items out as lost after 30 s without a worker; "
                "None waits for workers to come back"
            )
        if not _is_count(per_worker):
            raise InvalidArgument(f"per_worker must be an int >= 1, got {per_worker!r}")
        if chunk_size is not None and not _is_count(chunk_size):
            raise InvalidArgument(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
        if isinstance(client_or_address, str):
            self._address: str | None = client_or_address
            self._client: Any = None
        else:
            if not getattr(client_or_address, "asynchronous", False):
                raise InvalidArgument(
                    f"DaskBackend needs an asynchronous client, got {client_or_address!r}\n"
                    "HINT: Client(address, asynchronous=True), or pass the address itself"
                )
            self._address = None
            self._client = client_or_address
        self.per_worker = per_worker
        self.chunk_size = chunk_size
        self.forward_logs = forward_logs
        self.lost_after = lost_after

    def __repr__(self) -> str:
        target = self._address if self._address is not None else self._client
        return (
            f"DaskBackend({target!r}, per_worker={self.per_worker}, chunk_size={self.chunk_size})"
        )

    async def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        distributed = _require_distributed()
        client = await distributed.Client(self._address, asynchronous=True)
        return client

    async def _release(self, client: Any) -> None:
        if self._client is None:
            await _close(client)

    async def run_batch(
        self, items: Any, fn: Callable[..., Any], options: Options
    ) -> BatchReport[Any, Any]:
        from ._dask.driver import run_batch
        from ._engine.plan import make_plan

        refuse_unsupported(options)
        if self._client is not None:
            return await run_batch(self, items, fn, options)
        make_plan(items, fn, options)  # bad arguments raise before a client is opened
        client = await self._connect()
        try:
            return await run_batch(_Bound(self, client), items, fn, options)
        finally:
            await _close(client)

    def open_stream(self, items: Any, fn: Callable[..., Any], options: Options) -> Stream[Any, Any]:
        """A :class:`~batchkit.Stream` of the run on the cluster (``stream(backend=...)``)."""
        refuse_unsupported(options)
        return _AddressStream(self, items, fn, options)


class _Bound:
    """A backend given as an address, bound to the client opened for one call."""

    def __init__(self, backend: DaskBackend, client: Any) -> None:
        self.per_worker = backend.per_worker
        self.chunk_size = backend.chunk_size
        self.forward_logs = backend.forward_logs
        self.lost_after = backend.lost_after
        self._client = client

    async def _connect(self) -> Any:
        return self._client


class _AddressStream(Generic[T, R]):
    """``open_stream``'s result, a :class:`~batchkit.Stream`: a DaskRun (itself one), with a
    client opened and closed around it when the backend was given an address."""

    def __init__(
        self, backend: DaskBackend, items: Any, fn: Callable[..., Any], options: Options
    ) -> None:
        from ._dask.driver import DaskRun

        self._backend = backend
        self._client: Any = None
        bound: Any = backend
        if backend._client is None:
            bound = _Lazy(backend, self)
        self._run: DaskRun[T, R] = DaskRun(bound, items, fn, options, keep=False)

    async def __aenter__(self) -> Stream[T, R]:
        try:
            await self._run.__aenter__()
        except BaseException:
            await self._close_client()
            raise
        return self._run

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._run.aclose()
        finally:
            await self._close_client()

    async def _close_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await _close(client)

    def __aiter__(self) -> Stream[T, R]:
        return self._run

    async def __anext__(self) -> Outcome[T, R]:
        return await self._run.__anext__()

    @property
    def report(self) -> BatchReport[T, R]:
        return self._run.report

    @property
    def consumed(self) -> int:
        return self._run.consumed


class _Lazy:
    def __init__(self, backend: DaskBackend, owner: _AddressStream[Any, Any]) -> None:
        self.per_worker = backend.per_worker
        self.chunk_size = backend.chunk_size
        self.forward_logs = backend.forward_logs
        self.lost_after = backend.lost_after
        self._backend = backend
        self._owner = owner

    async def _connect(self) -> Any:
        client = await self._backend._connect()
        self._owner._client = client
        return client


# ------------------------------------------------------------------ per-worker resources
@final
class WorkerResource(Generic[V]):
    """One value per worker and run, created on first use there and disposed when the run
    ends (see :func:`per_worker`). Pickles as its recipe, never as the value."""

    __slots__ = ("_create", "_dispose", "_token")

    def __init__(
        self,
        create: Callable[[], V],
        dispose: Callable[[V], Awaitable[object] | object] | None = None,
    ) -> None:
        self._create = create
        self._dispose = dispose
        self._token = uuid.uuid4().hex

    def get(self) -> V:
        """The value for the run executing here (created now if this is its first use)."""
        run = current_run()
        if run is None:
            raise RuntimeError(
                "WorkerResource.get() is for code that runs inside a batchkit Dask run "
                "(fn or its context factory, on a worker)"
            )
        entry = run.resources.get(self._token)
        if entry is None:
            entry = run.resources[self._token] = (self._create(), self._dispose)
        return cast("V", entry[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_resource, (self._create, self._dispose, self._token))


def _rebuild_resource(
    create: Callable[[], Any], dispose: Callable[[Any], Any] | None, token: str
) -> WorkerResource[Any]:
    res: WorkerResource[Any] = WorkerResource(create, dispose)
    res._token = token
    return res


def per_worker(
    create: Callable[[], V],
    *,
    dispose: Callable[[V], Awaitable[object] | object] | None = None,
) -> WorkerResource[V]:
    """Declare a resource that each worker creates once per run, on its own event loop.

    ``create()`` runs on the worker the first time ``.get()`` is called there during a run;
    ``dispose(value)`` (sync or async) runs on that worker when the run ends, on every path.
    The typical use is one SQLAlchemy ``AsyncEngine`` per worker with a fresh session per item::

        engine = per_worker(lambda: create_async_engine(URL), dispose=lambda e: e.dispose())

        def session() -> AsyncSession:  # the context factory: one session per item
            return AsyncSession(engine.get())

        await batch_process(rows, save, context=session, backend=DaskBackend(client))
    """
    return WorkerResource(create, dispose)
