"""The rooms of ``src/batchkit`` (docs/design.md, "The map"), enforced.

Each private folder may import only the rooms below it, so data flows one way:
``_api`` → ``_engine`` → ``_model``; ``_dask`` and ``_observe`` use ``_engine`` and
``_model``, never the other way; and no module imports one that imports it back, not even
for type checking. Imports are read from the source (every ``import``, also inside
functions and under ``TYPE_CHECKING``), so a lazy import cannot hide a wrong direction.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# room -> the rooms its modules may import (besides themselves and the standard library)
MAY_IMPORT: dict[str, frozenset[str]] = {
    "_model": frozenset(),
    "_observe": frozenset({"_model"}),
    "_engine": frozenset({"_model", "_observe"}),
    "_dask": frozenset({"_model", "_engine", "_observe", "_api"}),
    "_api": frozenset({"_model", "_engine"}),
    # Old module paths that pickles from before the move name: aliases of _model, no more.
    "_errors": frozenset({"_model"}),
    "_outcomes": frozenset({"_model"}),
    "_store": frozenset({"_model"}),
}
"""The public modules (``batchkit``, ``batchkit.dask``, ``.testing``, ...) and the pytest
plugin are the front and side doors: they may import any room."""

MAX_CLASS_LINES = 300
"""A class a reader can hold: past this, split it into parts (as ``Engine`` and ``DaskRun``)."""

RUNTIME_FREE_OF = {"_model": frozenset({"asyncio"})}
"""Modules a room must not import at run time (type checking may name them)."""


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, src: Path = SRC) -> list[tuple[int, str, bool]]:
    """``(line, module, at_run_time)`` for every import in ``path``, made absolute; an
    import under ``if TYPE_CHECKING:`` is not at run time."""
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for b in node.body for n in ast.walk(b))
    found: list[tuple[int, str, bool]] = []
    for node in ast.walk(tree):
        runtime = id(node) not in typing_only
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, runtime) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` imports the module x when there is one.
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = _exists(sub, src)
                found.append((node.lineno, sub if is_module else target, runtime))
    return found


def _exists(module: str, src: Path) -> bool:
    path = src.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def room(module: str) -> str | None:
    """The private room of ``batchkit._x.y`` (``_x``), or None for a public module."""
    parts = module.split(".")
    if parts[0] != "batchkit" or len(parts) < 2 or not parts[1].startswith("_"):
        return None
    return None if parts[1] == "_pytest_plugin" else parts[1]


def wrong_imports(src: Path = SRC) -> list[str]:
    """Every import that crosses a room the wrong way, as ``file:line: a -> b``."""
    wrong = []
    for path in sorted((src / "batchkit").rglob("*.py")):
        here = module_name(path, src)
        mine = room(here)
        if mine is None:
            continue
        allowed = MAY_IMPORT.get(mine)
        if allowed is None:
            wrong.append(f"{path.relative_to(src)}: room {mine} is not on the map")
            continue
        for line, target, runtime in imports(path, src):
            where = f"{path.relative_to(src)}:{line}: {here} -> {target}"
            top = target.split(".")[0]
            if runtime and top in RUNTIME_FREE_OF.get(mine, ()):
                wrong.append(where + f" ({mine} must not import {top} at run time)")
            if top != "batchkit":
                continue
            theirs = room(target)
            if theirs is None:
                wrong.append(where + " (a room never imports a public module)")
            elif theirs != mine and theirs not in allowed:
                wrong.append(where + f" ({mine} may import {sorted(allowed)})")
    return wrong


def import_circles(src: Path = SRC) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a circle (any import)."""
    graph = {
        module_name(p, src): {t for _, t, _ in imports(p, src) if t.startswith("batchkit.")}
        for p in (src / "batchkit").rglob("*.py")
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v] & graph.keys():
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def long_classes(src: Path = SRC, limit: int = MAX_CLASS_LINES) -> list[str]:
    """Every class in ``src/batchkit`` longer than ``limit`` lines (from its ``class`` line to
    the last line of its body), as ``file:line: Name (n lines)``."""
    found = []
    for path in sorted((src / "batchkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(src)}:{node.lineno}: {node.name} ({n} lines)")
    return found


def test_every_import_follows_the_map() -> None:
    wrong = wrong_imports()
    assert not wrong, "imports that cross a room the wrong way:\n" + "\n".join(wrong)


def test_no_import_circle_not_even_for_type_checking() -> None:
    circles = import_circles()
    assert not circles, f"modules that import each other: {circles}"


def test_at_most_a_dozen_modules_at_the_top() -> None:
    top = sorted(p.name for p in (SRC / "batchkit").glob("*.py"))
    assert len(top) <= 12, top


def test_no_class_over_300_lines() -> None:
    long = long_classes()
    assert not long, "classes to split into parts:\n" + "\n".join(long)


def test_the_map_in_design_md_names_every_room() -> None:
    text = (SRC.parent / "docs" / "design.md").read_text(encoding="utf-8")
    the_map = text[: text.index("## The flow")]
    for folder in ("_model", "_engine", "_dask", "_observe"):
        assert f"`{folder}/`" in the_map, folder


def test_the_map_in_design_md_names_every_module_of_the_dask_room() -> None:
    text = (SRC.parent / "docs" / "design.md").read_text(encoding="utf-8")
    the_map = text[: text.index("## The flow")]
    for path in sorted((SRC / "batchkit" / "_dask").glob("[!_]*.py")):
        assert f"`{path.name}`" in the_map, path.name


def test_the_map_in_design_md_names_every_module_of_the_engine_room() -> None:
    text = (SRC.parent / "docs" / "design.md").read_text(encoding="utf-8")
    the_map = text[: text.index("## The flow")]
    for path in sorted((SRC / "batchkit" / "_engine").rglob("[!_]*.py")):
        assert f"`{path.name}`" in the_map, path.name


# -- the checks themselves fail on a wrong import (a tree made for the purpose) -------------
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name, text in {
        "batchkit/__init__.py": "",
        "batchkit/_model/__init__.py": "",
        "batchkit/_model/values.py": "from typing import TYPE_CHECKING\n",
        "batchkit/_engine/__init__.py": "",
        "batchkit/_engine/engine.py": "from .._model import values\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_a_tree_that_follows_the_map_passes(tree: Path) -> None:
    assert wrong_imports(tree) == []
    assert import_circles(tree) == []


def test_a_value_that_imports_the_engine_fails_even_for_type_checking(tree: Path) -> None:
    (tree / "batchkit/_model/values.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .._engine.engine import X\n"
    )
    assert wrong_imports(tree) == [
        "batchkit/_model/values.py:3: batchkit._model.values -> batchkit._engine.engine "
        "(_model may import [])"
    ]
    assert import_circles(tree) == [["batchkit._engine.engine", "batchkit._model.values"]]


def test_a_value_that_imports_asyncio_at_run_time_fails(tree: Path) -> None:
    (tree / "batchkit/_model/values.py").write_text("def f():\n    import asyncio\n")
    assert wrong_imports(tree) == [
        "batchkit/_model/values.py:2: batchkit._model.values -> asyncio "
        "(_model must not import asyncio at run time)"
    ]


def _class_of(lines: int) -> str:
    """A class of exactly ``lines`` lines, its ``class`` line included."""
    return "class Big:\n" + "".join(f"    a{i} = {i}\n" for i in range(lines - 1))


def test_the_class_size_check_passes_300_lines_and_fails_301(tree: Path) -> None:
    values = tree / "batchkit/_model/values.py"
    values.write_text(_class_of(300))
    assert long_classes(tree) == []
    values.write_text("import os\n\n" + _class_of(301))
    assert long_classes(tree) == ["batchkit/_model/values.py:3: Big (301 lines)"]
