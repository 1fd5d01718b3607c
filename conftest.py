"""A throwaway PostgreSQL server for the tests that need one (``@pytest.mark.postgres``).

``postgres_server`` (session scope) starts a server from the PostgreSQL binaries on this
machine — ``initdb``/``pg_ctl`` on ``PATH`` or under ``/usr/lib/postgresql/*/bin`` — listening
only on a unix socket in a temporary directory, with durability off for speed, and removes it
at the end. ``postgres_url`` (function scope) creates an empty database per test and drops it
afterwards. Without the binaries the tests skip, unless ``BATCHKIT_REQUIRE_POSTGRES=1`` (set by
``.ci/run``) makes that a failure; a server that does not start is always a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import inspect
import itertools
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator

_SERVER_USER = "postgres"  # the server refuses to run as root; it runs as this user then
_db_numbers = itertools.count()
_ADMIN_TIMEOUT = 120.0  # seconds an admin statement may take before the run fails: a hang guard


@dataclass(frozen=True, slots=True)
class PostgresServer:
    """A running server: ``url`` is the base async URL, with the ``postgres`` database."""

    socket_dir: Path
    port: int
    user: str

    def url(self, database: str = "postgres", driver: str = "asyncpg") -> str:
        return (
            f"postgresql+{driver}://{self.user}@/{database}?host={self.socket_dir}&port={self.port}"
        )

    def __str__(self) -> str:
        return self.url()


def _find_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb is not None:
        # /usr/local/bin/initdb may be a symlink into the versioned directory.
        return Path(os.path.realpath(initdb)).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


def _run_in_thread(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to completion on a loop of its own, whatever loop the caller has."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(make())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def _admin(server: PostgresServer, sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(
            host=str(server.socket_dir),
            port=server.port,
            user=server.user,
            database="postgres",
            timeout=_ADMIN_TIMEOUT,
        )
        try:
            await conn.execute(sql, timeout=_ADMIN_TIMEOUT)
        finally:
            await conn.close()

    _run_in_thread(run)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for this test session, on a unix socket in a temporary directory."""
    required = os.environ.get("BATCHKIT_REQUIRE_POSTGRES") == "1"
    bindir = _find_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found"
        if required:
            pytest.fail(f"{message}, and BATCHKIT_REQUIRE_POSTGRES=1", pytrace=False)
        pytest.skip(message)
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        runuser = shutil.which("runuser")
        prefix = [runuser, "-u", _SERVER_USER, "--"] if runuser else []
        if not prefix:
            pytest.fail("running as root and no runuser to drop to the postgres user")
    base = Path(tempfile.mkdtemp(prefix="batchkit-pg-"))
    data = base / "data"
    log = base / "server.log"
    if as_root:
        shutil.chown(base, user=_SERVER_USER)
    port = 5432  # only a unix socket in a private directory: no clash with other servers
    user = "postgres"

    def run(*args: str) -> None:
        subprocess.run(
            [*prefix, *args], cwd=base, check=True, capture_output=True, text=True, timeout=60
        )

    try:
        run(
            str(bindir / "initdb"), "-D", str(data), "-U", user, "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{base}' -p {port} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", "") or ""
        with contextlib.suppress(OSError):
            detail += "\n" + log.read_text()
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL from {bindir}: {e}\n{detail}", pytrace=False)
    server = PostgresServer(socket_dir=base, port=port, user=user)
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


class _Databases:
    """Creates test databases one step ahead, on a thread of its own.

    ``CREATE DATABASE`` copies a template and takes most of a second; made while the previous
    test runs, it costs a test nothing.
    """

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-createdb")
        self._ahead: deque[Future[str]] = deque()

    def _create(self) -> str:
        name = f"test_{os.getpid()}_{next(_db_numbers)}"
        _admin(self.server, f'CREATE DATABASE "{name}"')
        return name

    def take(self) -> str:
        if not self._ahead:
            self._ahead.append(self._executor.submit(self._create))
        try:
            # A hang guard, not a margin: CREATE DATABASE takes about a second.
            name = self._ahead.popleft().result(timeout=_ADMIN_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"hang: CREATE DATABASE took over {_ADMIN_TIMEOUT:g} s", pytrace=False)
        self._ahead.append(self._executor.submit(self._create))
        return name

    def drop(self, name: str) -> None:
        # FORCE: a test that failed may have left connections open.
        _admin(self.server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        while self._ahead:
            with contextlib.suppress(Exception):
                self.drop(self._ahead.popleft().result())
        self._executor.shutdown()


@pytest.fixture(scope="session")
def _postgres_databases(postgres_server: PostgresServer) -> Iterator[_Databases]:
    databases = _Databases(postgres_server)
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture
def postgres_url(_postgres_databases: _Databases) -> Iterator[str]:
    """The async URL of a fresh, empty database for this test, dropped afterwards."""
    name = _postgres_databases.take()
    try:
        yield _postgres_databases.server.url(name)
    finally:
        _postgres_databases.drop(name)


@pytest.fixture(autouse=True)
def _close_implicit_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the event loop a plugin creates implicitly for a synchronous test.

    looptime's pytest hook calls ``policy.get_event_loop()`` before every test; for a sync
    test with no loop set, that creates one nobody closes, and its ResourceWarning surfaces
    (as an error) in whatever test runs when it is garbage collected.
    """
    yield
    if inspect.iscoroutinefunction(request.function):
        return  # pytest-asyncio owns that test's loop
    policy = asyncio.get_event_loop_policy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loop = policy.get_event_loop()
    except RuntimeError:
        return  # no loop set: nothing leaked
    if not loop.is_running() and not loop.is_closed():
        loop.close()
        policy.set_event_loop(None)
