"""batchkit's pytest plugin: ``@pytest.mark.looptime`` async tests run in pytest-asyncio's
strict mode, without ``@pytest.mark.asyncio`` and without switching a suite to auto mode.

Registered by the ``aio-batchkit`` distribution (entry point ``pytest11: batchkit``), so it is
loaded in every pytest session of an environment where batchkit is installed. It is harmless
there: it imports nothing but pytest, and it only touches ``async def`` tests that carry the
``looptime`` marker. For those:

- with pytest-asyncio installed, it adds the ``asyncio`` marker the test lacks (strict mode
  needs one; auto mode already runs the test);
- without pytest-asyncio, the test fails with a message naming the extra to install
  (``aio-batchkit[testing]``), instead of pytest's "async def functions are not natively
  supported".

Disable it like any plugin: ``pytest -p no:batchkit``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Generator

__all__ = ["pytest_pycollect_makeitem", "pytest_runtest_setup"]

_HINT = (
    "this async test is marked @pytest.mark.looptime but pytest-asyncio is not installed, "
    "so nothing can run it\nHINT: pip install 'aio-batchkit[testing]'"
)
_NO_RUNNER = pytest.StashKey[bool]()


def _wants_asyncio(item: pytest.Function) -> bool:
    function = getattr(item, "function", None)
    return (
        inspect.iscoroutinefunction(function)
        and item.get_closest_marker("looptime") is not None
        and item.get_closest_marker("asyncio") is None
    )


# trylast: the innermost wrapper, so the marker is there before pytest-asyncio's wrapper looks
# for it when it turns coroutine functions into its own items.
@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, Any, Any]:
    """Mark ``@pytest.mark.looptime`` coroutine tests ``asyncio`` (see the module docstring)."""
    result = yield
    nodes = result if isinstance(result, list) else [result]
    asyncio_plugin = collector.config.pluginmanager.hasplugin("asyncio")
    for node in nodes:
        if isinstance(node, pytest.Function) and _wants_asyncio(node):
            if asyncio_plugin:
                node.add_marker(pytest.mark.asyncio)
            else:
                node.stash[_NO_RUNNER] = True
    return result


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a marked async test that nothing can run, with the install line."""
    if item.stash.get(_NO_RUNNER, False):
        pytest.fail(_HINT, pytrace=False)
