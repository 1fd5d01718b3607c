"""The reference cannot drift from the code: the options table matches the signatures, every
public name has a docstring, and every list of failure kinds, stop reasons, ``counts`` keys,
errors and extras on a page is the code's list."""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import re
import tomllib
from typing import Any, get_args

import pytest

import batchkit
from batchkit._model.options import Options, StreamOptions
from batchkit._model.outcomes import KINDS
from tests import options_table
from tests.docs_examples import ROOT, pages
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


def _table_rows() -> dict[str, tuple[str, str]]:
    """Each row's default and meaning, as written."""
    rows: dict[str, tuple[str, str]] = {}
    for line in OPTIONS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `(\w+)` \| (.*?) \| (.*) \|$", line)
        if m is not None:
            rows[m[1]] = (m[2], m[3])
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


def _as_docstring(markdown: str) -> str:
    """A table cell as the docstring says it: links dropped, code in reST's double ticks."""
    text = re.sub(r"\[(`[^`]+`)\]\[[\w.]+\]", r"\1", markdown)
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    return text.replace("`", "``")


def test_every_keyword_is_documented_on_its_typeddict_key_as_in_the_table() -> None:
    """What an IDE shows on hover (the key's docstring) is the reference's row."""
    docs = options_table.key_docstrings()
    assert set(docs) == set(StreamOptions.__annotations__), "a keyword without a docstring"
    for name, (default, meaning) in _table_rows().items():
        if name in ("items", "fn", "context"):
            continue  # parameters of the functions themselves, not TypedDict keys
        expected = f"{_as_docstring(meaning)} Default: {_as_docstring(default)}."
        assert docs[name] == expected, f"{name}: the docstring and options.md differ"


def test_the_options_table_is_generated_from_the_typeddict_docstrings() -> None:
    page = OPTIONS.read_text(encoding="utf-8")
    assert options_table.render_table() in page, (
        "docs/reference/options.md's table is not what the keywords' docstrings make: edit the "
        "docstring in src/batchkit/_model/options.py, then run `python -m tests.options_table`"
    )


def test_a_changed_docstring_changes_the_generated_table(monkeypatch: pytest.MonkeyPatch) -> None:
    before = options_table.render_table()
    real = options_table.key_docstrings

    def changed() -> dict[str, str]:
        docs = real()
        docs["retry"] = docs["retry"].replace("one attempt", "two attempts")
        return docs

    monkeypatch.setattr(options_table, "key_docstrings", changed)
    after = options_table.render_table()
    assert after != before
    assert "`None`: two attempts per item." in after


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


# -- lists of names: kinds, stop reasons, counts keys, extras ------------------------------
FAILURE_KINDS = frozenset(get_args(batchkit.FailureKind))
STOP_REASONS = frozenset(get_args(batchkit.StopReason))
# Subsets a page may list on purpose instead of the whole set (each named where it is used).
THRESHOLDS = frozenset({"fail_fast", "max_failures", "max_failure_ratio"})  # the failure stops
STARTED_FAILURES = FAILURE_KINDS - {"skipped"}  # what LoggingObserver logs at WARNING
LISTS: dict[str, tuple[frozenset[str], frozenset[str], tuple[frozenset[str], ...]]] = {
    # name: (the code's set, names a list of it may add, deliberate subsets)
    "failure kinds": (FAILURE_KINDS, frozenset({"success"}), (STARTED_FAILURES,)),
    "stop reasons": (STOP_REASONS, frozenset({"none", "None"}), (THRESHOLDS,)),
}

# A list is a run of names separated by commas, "or", "and", "/" or spaces. A name is a code
# span (`name`, `"name"`; any other code span is a token that is no name), "name" inside code,
# or name= (a log line's fields, also inside a code span).
_TOKEN = r'(?:`[^`\n]+`|"\w+"|\b\w+=)'
_SEP = r"(?:[ \t]*(?:,|/)?[ \t]*\n?[ \t]*(?:(?:or|and)[ \t]+)?)"
_ENUMERATION = re.compile(rf"{_TOKEN}(?:{_SEP}{_TOKEN})+")
_ONE = re.compile(_TOKEN)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")


def _name(token: str) -> str:
    inner = token.strip("`").strip('"') if token[0] in '`"' else token.removesuffix("=")
    return inner if re.fullmatch(r"\w+", inner) else token  # `deadline=` is an option


def _enumerations(text: str) -> list[list[str]]:
    """Every run of two or more tokens, in the text and inside its code spans."""
    found = []
    for source in [text, *(m[1] for m in _CODE_SPAN.finditer(text) if " " in m[1])]:
        for m in _ENUMERATION.finditer(source):
            found.append([_name(t) for t in _ONE.findall(m.group(0))])
    return found


def _runs(names: list[str], members: frozenset[str]) -> list[list[str]]:
    """The maximal runs of consecutive names that are all ``members``."""
    runs: list[list[str]] = [[]]
    for name in names:
        if name in members:
            runs[-1].append(name)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _list_problems(page_text: str) -> list[str]:
    """Three or more names of a set in a row are a list of that set: it must name all of them
    (or be a deliberate subset). A run that mostly names one set must name nothing else."""
    problems = []
    for names in _enumerations(page_text):
        for what, (full, extra, subsets) in LISTS.items():
            for run in _runs(names, full | extra):
                named = set(run) & full
                if len(named) >= 3 and named != full and named not in subsets:
                    problems.append(f"{run}: lacks {what} {sorted(full - named)}")
            named = set(names) & full
            if len(named) >= 3 and len(set(names) & (full | extra)) >= 0.6 * len(set(names)):
                unknown = sorted(set(names) - full - extra)
                if unknown:
                    problems.append(f"{names}: names {what} the code lacks: {unknown}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=[str(p.relative_to(ROOT)) for p in pages()])
def test_every_list_of_kinds_and_stop_reasons_is_complete(page: Any) -> None:
    problems = _list_problems(page.read_text(encoding="utf-8"))
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_list_check_catches_a_missing_and_an_unknown_name() -> None:
    """The scanner itself: a list that forgets a kind, or names one that does not exist."""
    everything = ", ".join(f"`{k}`" for k in sorted(FAILURE_KINDS))
    assert not _list_problems(f"kinds: {everything}.")
    assert _list_problems("kinds: `error`, `timeout`, `cancelled` or `skipped`.")
    assert _list_problems(f"kinds: {everything}, `vanished`.")
    reasons = sorted(STOP_REASONS)
    assert _list_problems("Literal[" + ", ".join(f'"{r}"' for r in reasons[1:]) + "]")
    assert not _list_problems("(`fail_fast`, `max_failures`, `max_failure_ratio`)")  # subset
    assert _list_problems("`batch finished name= success= error= timeout= cancelled= wall=`")
    assert not _list_problems("`deadline=`, `fail_fast`, `max_failures`, `observers`")  # options


def _reference(page: str) -> str:
    return (ROOT / "docs" / "reference" / page).read_text(encoding="utf-8")


def _quoted_after(text: str, anchor: str) -> list[str]:
    """The quoted names of the first enumeration after ``anchor`` in ``text``."""
    assert anchor in text, f"the page no longer has {anchor!r}"
    return _enumerations(text[text.index(anchor) + len(anchor) :])[0]


def test_the_reference_lists_every_kind_stop_reason_and_counts_key() -> None:
    """The lists a reader looks up are there, whole; kinds and counts keys in the code's order."""
    index = _reference("index.md")
    assert _quoted_after(index, "FailureKind = Literal[") == list(get_args(batchkit.FailureKind))
    assert _quoted_after(index, "| `counts` |") == list(KINDS)
    # Stop reasons in any order (a page may group them by cause); each exactly once.
    reasons = _quoted_after(index, "| `stop_reason`, `deadline_hit` |")
    assert sorted(reasons) == sorted(STOP_REASONS), reasons
    reasons = _quoted_after(_reference("errors.md"), "`ItemSkipped.reason` say why")
    assert sorted(reasons) == sorted(STOP_REASONS), reasons


def test_report_counts_has_exactly_the_kinds() -> None:
    """``counts`` is keyed by every kind, in the order the reference lists them."""
    report: batchkit.BatchReport[int, int] = batchkit.BatchReport(
        outcomes=[], wall_time=0.0, concurrency=1, peak_concurrency=0
    )
    assert list(report.counts) == list(KINDS)


_TREE_LINE = re.compile(r"^(?P<indent>[│ ]*)[├└]── (?P<name>\w+)\s*(?:\(also (?P<also>[^)]+)\))?")


def _error_tree() -> dict[str, tuple[str, list[str]]]:
    """errors.md's tree: name -> (parent, the "also" bases)."""
    text = _reference("errors.md")
    block = text[text.index("```\nBatchkitError") + 4 :]
    block = block[: block.index("```")]
    tree: dict[str, tuple[str, list[str]]] = {}
    stack = ["BatchkitError"]
    for line in block.splitlines()[1:]:
        m = _TREE_LINE.match(line)
        assert m is not None, f"errors.md: not a line of the tree: {line!r}"
        depth = len(m["indent"]) // 4
        del stack[depth + 1 :]
        also = [a.strip() for a in (m["also"] or "").split(",") if a.strip()]
        tree[m["name"]] = (stack[depth], also)
        stack.append(m["name"])
    return tree


def test_the_error_tree_is_the_code_s() -> None:
    tree = _error_tree()
    for name, (parent, also) in tree.items():
        cls = getattr(batchkit, name, None)
        assert inspect.isclass(cls), f"errors.md draws {name}, which batchkit does not export"
        assert cls.__bases__[0] is getattr(batchkit, parent), f"{name} is not under {parent}"
        for base in also:
            assert issubclass(cls, getattr(builtins, base)), f"{name} is not a {base}"
    public_errors = {
        n
        for n in batchkit.__all__
        if inspect.isclass(getattr(batchkit, n))
        and issubclass(getattr(batchkit, n), batchkit.BatchkitError)
    }
    assert public_errors - {"BatchkitError"} == set(tree), "errors.md's tree lacks or adds errors"


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
FOR_CONTRIBUTORS = {"dev", "bench", "docs"}  # what working on batchkit itself needs


def test_the_install_page_has_a_row_per_extra() -> None:
    text = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    table = text[text.index("## Extras") :]
    rows = {m[1] for m in re.finditer(r"^\| `([\w-]+)` \|", table, re.MULTILINE)}
    assert rows == EXTRAS, (
        f"docs/install.md's extras table: missing {sorted(EXTRAS - rows)}, "
        f"unknown {sorted(rows - EXTRAS)}"
    )


def test_the_readme_names_every_extra_for_users() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"extras: ([\w, ]+)", readme)
    assert m is not None, "README.md's install line no longer lists the extras"
    listed = {e.strip() for e in m[1].split(",")}
    assert listed == EXTRAS - FOR_CONTRIBUTORS, f"README.md's extras line: {sorted(listed)}"


_EXTRA_IN_INSTALL = re.compile(r"(?:aio-batchkit|batchkit|\.|/batchkit)\[(?P<extras>[\w,-]+)\]")


def test_every_extra_a_page_installs_exists() -> None:
    for page in [*pages(), ROOT / "examples" / "predictions" / "README.md"]:
        for m in _EXTRA_IN_INSTALL.finditer(page.read_text(encoding="utf-8")):
            for extra in m["extras"].split(","):
                assert extra in EXTRAS, f"{page.relative_to(ROOT)}: no extra {extra!r}"


# -- signatures in the API reference ------------------------------------------------------
def _internal_types_shown(*, extension: bool) -> list[str]:
    """What the API reference's signatures would show of batchkit's internal types, loaded
    as mkdocstrings loads them (with docs_griffe.py's extension, or without it)."""
    griffe = pytest.importorskip("griffe")
    import docs_griffe

    loader = griffe.GriffeLoader(search_paths=[str(ROOT / "src")])
    pkg = loader.load("batchkit")
    loader.resolve_aliases(external=False)
    public = docs_griffe.public_paths(pkg)
    if extension:
        functions = docs_griffe.public_signatures(pkg)
    else:
        functions = docs_griffe._functions(pkg, public)
    shown = []
    for function in functions:
        for signature in docs_griffe.signatures(function):
            for p in signature.parameters:
                for name in docs_griffe.internal_names(p.annotation, public):
                    shown.append(f"{function.path}({p.name}: {name})")
            for name in docs_griffe.internal_names(signature.returns, public):
                shown.append(f"{function.path}() -> {name}")
    return shown


def test_no_public_signature_shows_an_internal_type() -> None:
    """``run_batch(options: Options)`` and ``items: Items[T]`` named types a reader cannot
    look up; the reference shows public types (or the alias's value) only."""
    assert "batchkit.dask.DaskBackend.run_batch(options: batchkit._model.options.Options)" in (
        _internal_types_shown(extension=False)
    )  # what the check finds without the extension
    shown = _internal_types_shown(extension=True)
    assert not shown, "the API reference would show internal types:\n" + "\n".join(shown)
