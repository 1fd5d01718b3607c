"""Public classes and functions say where users import them from.

Everything public is defined in a private module (``batchkit._model.errors``...) and
re-exported by ``batchkit``; :func:`publish` sets each one's ``__module__`` to the public
module (as trio does), so tracebacks, ``repr``, documentation tools and pickles name
``batchkit.ItemTimeout`` rather than the private path, and a later move of the private
module breaks none of them.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["publish"]


def publish(namespace: dict[str, Any], names: list[str], module: str = "batchkit") -> None:
    """Set ``__module__`` of each class and function in ``names`` (looked up in
    ``namespace``) that is defined in a private batchkit module to ``module``."""
    for name in names:
        obj = namespace.get(name)
        if (isinstance(obj, type) or inspect.isfunction(obj)) and obj.__module__.startswith(
            "batchkit._"
        ):
            obj.__module__ = module
