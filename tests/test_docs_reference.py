"""The reference cannot drift from the code: the options table matches the signatures, and
every public name has a docstring."""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import pytest

import batchkit
from batchkit._options import Options
from tests.docs_examples import ROOT
from tests.docs_examples import no_implicit_loop as no_implicit_loop

OPTIONS = ROOT / "docs" / "reference" / "options.md"
_ROW = re.compile(r"^\|\s*`(?P<name>\w+)`\s*\|\s*(?P<default>[^|]+?)\s*\|")


def _table() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in OPTIONS.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line)
        if m is not None:
            rows[m["name"]] = m["default"]
    return rows


def _shown(default: Any) -> str:
    return "(required)" if default is inspect.Parameter.empty else f"`{default!r}`"


def _signature_defaults() -> dict[str, str]:
    """The positional parameters, then every keyword in the order ``Options`` declares them
    (the entry points take them as ``**options: Unpack[...]``, declared once there)."""
    params: dict[str, str] = {}
    for entry_point in (batchkit.batch_process, batchkit.stream):
        for name, p in inspect.signature(entry_point).parameters.items():
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                params.setdefault(name, _shown(p.default))
    for f in dataclasses.fields(Options):
        params.setdefault(f.name, _shown(f.default))
    return params


def test_options_table_lists_every_keyword_with_its_default() -> None:
    table, signature = _table(), _signature_defaults()
    missing = sorted(signature.keys() - table.keys())
    extra = sorted(table.keys() - signature.keys())
    assert not missing, f"docs/reference/options.md lacks a row for {missing}"
    assert not extra, f"docs/reference/options.md documents keywords that do not exist: {extra}"
    wrong = {k: (table[k], v) for k, v in signature.items() if table[k] != v}
    assert not wrong, f"defaults in docs/reference/options.md differ (table, code): {wrong}"


def test_options_table_follows_the_signature_order() -> None:
    assert list(_table()) == list(_signature_defaults())


def test_stream_takes_every_keyword_of_batch_process() -> None:
    batch = inspect.signature(batchkit.batch_process).parameters
    streamed = inspect.signature(batchkit.stream).parameters
    assert batch.keys() <= streamed.keys()
    for name, p in batch.items():
        assert streamed[name].default == p.default, name


def _public_objects() -> list[tuple[str, Any]]:
    import batchkit.testing

    found = [(f"batchkit.{n}", getattr(batchkit, n)) for n in batchkit.__all__ if n[0] != "_"]
    found += [
        (f"batchkit.testing.{n}", getattr(batchkit.testing, n)) for n in batchkit.testing.__all__
    ]
    return found


def _documented(obj: Any) -> bool:
    doc = inspect.getdoc(obj)
    if doc is None or not doc.strip():
        return False
    # A dataclass without a docstring gets its signature as __doc__: that is not documentation.
    return not doc.startswith(f"{getattr(obj, '__name__', '')}(")


_PUBLIC = _public_objects()


@pytest.mark.parametrize(("name", "obj"), _PUBLIC, ids=[n for n, _ in _PUBLIC])
def test_every_public_name_has_a_docstring(name: str, obj: Any) -> None:
    if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj)):
        pytest.skip(f"{name} is a type alias or constant; documented where it is defined")
    assert _documented(obj), f"{name} has no docstring"


_CLASSES = [(n, o) for n, o in _public_objects() if inspect.isclass(o)]


@pytest.mark.parametrize(("name", "obj"), _CLASSES, ids=[n for n, _ in _CLASSES])
def test_every_public_method_has_a_docstring(name: str, obj: Any) -> None:
    undocumented = [
        attr
        for attr, member in vars(obj).items()
        if not attr.startswith("_")
        and (inspect.isfunction(member) or isinstance(member, property | staticmethod))
        and not inspect.getdoc(member.fget if isinstance(member, property) else member)
    ]
    assert not undocumented, f"{name}: no docstring on {undocumented}"


def _rows(text: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3:
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_comparison_figures_match_the_performance_page() -> None:
    """docs/comparison.md copies measured figures; they must be those of the full comparison
    (every contender) on docs/performance.md."""
    comparison = (ROOT / "docs" / "comparison.md").read_text(encoding="utf-8")
    measured = comparison[comparison.index("## Measured cost per item") :]
    performance = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    full = "## The full comparison"
    assert full in performance, f"docs/performance.md has no section {full!r}"
    performance = performance[performance.index(full) :]
    heading = "#### overhead, fn returns at once"
    assert heading in performance, f"docs/performance.md's full comparison has no {heading!r}"
    section = performance[performance.index(heading) :]
    section = section[: section.find("\n#### ", 1)]
    source = _rows(section)  # contender -> items, µs/item, x pool, ...
    for contender, (per_item, ratio) in (
        (k, v[:2]) for k, v in _rows(measured).items() if k not in ("contender", "---")
    ):
        if set(contender) <= {"-", ":"}:
            continue
        assert contender in source, f"{contender!r} is not in docs/performance.md's table"
        assert [per_item, ratio] == source[contender][1:3], (
            f"docs/comparison.md shows {contender}: {per_item} µs/item, {ratio}x; "
            f"docs/performance.md now says {source[contender][1:3]}: copy the new figures"
        )
