"""Griffe extensions for the API reference, loaded by mkdocs.yml (mkdocstrings' ``extensions``
option): the docstrings use Sphinx roles (``:class:`Probe```, ``:func:`~batchkit.stream```),
which Markdown would show verbatim, so render them as code; and no public signature shows an
internal type (tests/test_docs_reference.py checks it)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|data|attr|exc|mod|obj):`~?(?:[\w.]*\.)?(?P<name>[^`]+)`")


class SphinxRoles(griffe.Extension):
    """Turn ``:role:`target``` into ``target`` in code font."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\g<name>`", obj.docstring.value)


# -- signatures show public types only ----------------------------------------------------
PUBLIC_MODULES = (
    "batchkit",
    "batchkit.testing",
    "batchkit.sqlalchemy",
    "batchkit.prometheus",
    "batchkit.dask",
)
# Callables of public classes that users never call: batchkit does, with internal types.
NOT_FOR_USERS = {
    "batchkit.dask.DaskBackend.run_batch": "batchkit calls it for backend=",
    "batchkit.dask.DaskBackend.open_stream": "batchkit calls it for backend=",
}
# Return types that are private classes: the docstring says what the value does.
HIDDEN_RETURNS = {"batchkit.testing.instant": "a context manager and decorator"}


def public_paths(pkg: griffe.Module) -> set[str]:
    """The canonical paths of every object exported by a public module."""
    paths: set[str] = set()
    for name in PUBLIC_MODULES:
        module = pkg if name == "batchkit" else pkg.get_member(name.removeprefix("batchkit."))
        for export in module.exports or ():
            if isinstance(export, str) and export in module.members:
                member = module.members[export]
                try:
                    target = member.final_target if isinstance(member, griffe.Alias) else member
                except griffe.AliasResolutionError:
                    target = member
                paths.add(target.path)
    return paths


def _target(expr: griffe.ExprName) -> griffe.Object | griffe.Alias | None:
    """What a name in an annotation refers to, if griffe knows it."""
    try:
        obj = expr.parent.modules_collection.get_member(expr.canonical_path)  # type: ignore[union-attr]
        return obj.final_target if isinstance(obj, griffe.Alias) else obj
    except Exception:  # an external or unresolvable name: not batchkit's
        return None


def _is_type_var(obj: griffe.Object | griffe.Alias) -> bool:
    value = str(getattr(obj, "value", "") or "")
    return value.startswith(("TypeVar(", "ParamSpec(", "TypeVarTuple("))


def _is_type_alias(obj: griffe.Object | griffe.Alias) -> bool:
    annotation = str(getattr(obj, "annotation", ""))
    return obj.is_attribute and annotation in ("TypeAlias", "typing.TypeAlias")


def internal_names(expr: object, public: set[str]) -> list[str]:
    """The batchkit names in an annotation that are neither public nor type variables."""
    found: list[str] = []
    if not isinstance(expr, griffe.Expr):
        return found
    for e in [expr, *expr.iterate(flat=True)]:
        if isinstance(e, griffe.ExprName) and e.canonical_path.startswith("batchkit"):
            obj = _target(e)
            path = obj.path if obj is not None else e.canonical_path
            if path not in public and not (obj is not None and _is_type_var(obj)):
                found.append(path)
    return found


def _inline(expr: Any, public: set[str]) -> Any:
    """``Items[T]`` (a private ``TypeAlias``) becomes its value, ``Iterable[T] | ...``,
    wherever it appears in an annotation."""
    if isinstance(expr, list):
        return [_inline(e, public) for e in expr]
    if not isinstance(expr, griffe.Expr):
        return expr
    name = expr.left if isinstance(expr, griffe.ExprSubscript) else expr
    if isinstance(name, griffe.ExprName) and name.canonical_path.startswith("batchkit"):
        obj = _target(name)
        if obj is not None and obj.path not in public and _is_type_alias(obj):
            return getattr(obj, "value", expr)
    for field in dataclasses.fields(expr):
        value = getattr(expr, field.name)
        if isinstance(value, griffe.Expr | list):
            object.__setattr__(expr, field.name, _inline(value, public))
    return expr


def _functions(pkg: griffe.Module, public: set[str]) -> list[griffe.Function]:
    """The public functions, and the methods of public classes (``__init__`` included)."""
    found = []
    for path in sorted(public):
        obj = pkg.modules_collection.get_member(path)
        if obj.is_alias:
            obj = obj.final_target
        if obj.is_function:
            found.append(obj)
        elif obj.is_class:
            for name, member in obj.members.items():
                if member.is_alias or not member.is_function:
                    continue
                if not name.startswith("_") or name == "__init__":
                    found.append(member)
    return found


def _unpacked_internal(annotation: object, public: set[str]) -> bool:
    """``Unpack[RunOptions[T]]`` of an internal TypedDict: the options page lists its keys."""
    return (
        isinstance(annotation, griffe.ExprSubscript)
        and str(annotation.left) == "Unpack"
        and bool(internal_names(annotation, public))
    )


def _clean(function: griffe.Function, public: set[str]) -> None:
    if function.path in HIDDEN_RETURNS:
        function.returns = None
    for parameter in function.parameters:
        if parameter.kind is griffe.ParameterKind.var_keyword and _unpacked_internal(
            parameter.annotation, public
        ):
            parameter.annotation = None
        parameter.annotation = _inline(parameter.annotation, public)
    function.returns = _inline(function.returns, public)


def signatures(function: griffe.Function) -> list[griffe.Function]:
    """The function and its ``@overload`` signatures (the API reference shows them all)."""
    return [function, *(function.overloads or ())]


def public_signatures(pkg: griffe.Module) -> list[griffe.Function]:
    """Make every public signature show public types only, as the API reference renders it;
    return the functions (and methods) that it shows."""
    public = public_paths(pkg)
    shown = []
    for function in _functions(pkg, public):
        parent = function.parent
        assert isinstance(parent, griffe.Module | griffe.Class)
        if function.path in NOT_FOR_USERS:
            parent.del_member(function.name)
            if function.name == "__init__" and parent.docstring is not None:
                parent.docstring.value += (
                    f"\n\nNot constructed directly: {NOT_FOR_USERS[function.path]}."
                )
            continue
        for signature in signatures(function):
            _clean(signature, public)
        shown.append(function)
    return shown


class PublicSignatures(griffe.Extension):
    """No public signature shows an internal type (``Stream(plan: Plan, ...)``): private type
    aliases are shown as their value, and callables users never call are not shown."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name == "batchkit":
            loader.resolve_aliases(external=False)  # what is public is known through them
            public_signatures(pkg)
