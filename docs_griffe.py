"""A griffe extension for the API reference: the docstrings use Sphinx roles
(``:class:`Probe```, ``:func:`~batchkit.stream```), which Markdown would show verbatim; render
them as code. Loaded by mkdocs.yml (mkdocstrings' ``extensions`` option)."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|data|attr|exc|mod|obj):`~?(?:[\w.]*\.)?(?P<name>[^`]+)`")


class SphinxRoles(griffe.Extension):
    """Turn ``:role:`target``` into ``target`` in code font."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\g<name>`", obj.docstring.value)
