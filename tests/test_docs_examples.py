"""Every code block in README.md and docs/ runs (see tests/docs_examples.py for the rules).

One test per Python block: ``test_example[docs/how-to/testing.md:31]``. A block marked
``<!-- example: partial ... -->`` is reported as skipped with its reason.
"""

from __future__ import annotations

import ast
import builtins
import logging
import re
import sys
import warnings
from typing import Any

import pytest

from tests import docs_stand_ins
from tests.docs_examples import (
    ROOT,
    Example,
    blocks,
    examples,
    pages,
    run_blocks,
    same_output,
)
from tests.docs_examples import no_implicit_loop as no_implicit_loop

EXAMPLES = list(examples())


def _stand_ins() -> dict[str, Any]:
    return {k: v for k, v in vars(docs_stand_ins).items() if not k.startswith("_")}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.block.where for e in EXAMPLES])
def test_example(example: Example, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    block = example.block
    if block.directive == "partial":
        pytest.skip(f"partial example: {block.reason or 'marked partial'}")
    monkeypatch.chdir(tmp_path)  # files an example writes land in a fresh directory
    namespace: dict[str, Any] = {"__name__": "__docs_example__"}
    if not example.self_contained:
        namespace.update(_stand_ins())
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # an example may show a warning on purpose
            printed = run_blocks([*example.earlier, block], namespace, real_time=example.real_time)
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    _no_broken_items(example, namespace)
    if example.expected_output is not None:
        assert same_output(printed, example.expected_output), (
            f"{block.where} printed:\n{printed}\nbut the page shows:\n{example.expected_output}"
        )


def test_examples_are_found() -> None:
    """The extractor sees the blocks (a broken fence regex would make every page 'pass')."""
    assert len(EXAMPLES) >= 30
    assert any(e.expected_output is not None for e in EXAMPLES)


def test_every_fence_is_closed() -> None:
    for page in pages():
        fences = [
            line for line in page.read_text(encoding="utf-8").splitlines()
            if re.match(r"^\s*(```|~~~)", line)
        ]  # fmt: skip
        assert len(fences) % 2 == 0, f"{page.relative_to(ROOT)}: an unclosed code fence"


_INSTALL = re.compile(r"pip install[^\n`]*")


def test_install_lines_install_us() -> None:
    """No page tells anyone to install the unrelated `batchkit` distribution from PyPI."""
    for page in pages():
        text = "\n".join(
            line for line in page.read_text(encoding="utf-8").splitlines()
            if "someone else" not in line  # the warning that names the wrong package
        )  # fmt: skip
        for line in _INSTALL.findall(text):
            assert not re.search(r"(?<![-\w./])batchkit(\[|\s|'|$)", line), (
                f"{page.relative_to(ROOT)}: {line!r} installs someone else's package; "
                "use aio-batchkit (or a path to a clone)"
            )


def _no_broken_items(example: Example, namespace: dict[str, Any]) -> None:
    """Item failures are values, so a fragment whose ``fn`` hits a ``NameError`` would still
    "run": fail on reports holding errors that only a broken example raises."""
    from batchkit import BatchReport

    broken = (NameError, AttributeError, ImportError, TypeError)
    for name, value in namespace.items():
        if isinstance(value, BatchReport):
            for failure in value.failures:
                assert not isinstance(failure.error, broken), (
                    f"{example.block.where}: {name} holds a failure from a broken example: "
                    f"{failure.error!r}"
                )


# -- every example imports what it uses ---------------------------------------------------
_LIBRARIES = (
    "batchkit",
    "batchkit.testing",
    "batchkit.sqlalchemy",
    "batchkit.prometheus",
    "batchkit.dask",
    "sqlalchemy",
    "sqlalchemy.ext.asyncio",
)
_MODULES = {"batchkit", "sqlalchemy", "distributed", "httpx", "aiolimiter", "pytest", "looptime"}


def _library_names() -> set[str]:
    """Names a reader gets only by importing them: the public names of batchkit and its
    integrations, of SQLAlchemy's asyncio API, and module names."""
    import importlib

    names = set(_MODULES) | set(sys.stdlib_module_names)
    for module in _LIBRARIES:
        mod = importlib.import_module(module)
        public = getattr(mod, "__all__", dir(mod))
        names |= {n for n in public if not n.startswith("_") and not _is_module(mod, n)}
    return names


def _is_module(mod: Any, name: str) -> bool:
    import inspect

    return inspect.ismodule(getattr(mod, name, None))  # sqlalchemy.engine: not `engine`


def _bound_and_used(code: str) -> tuple[set[str], set[str]]:
    """The names a block binds (anywhere in it) and the names it reads."""
    tree = ast.parse(code)
    bound: set[str] = set()
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) and node.name:
            bound.add(node.name)
    return bound, used


def test_every_example_imports_what_it_uses() -> None:
    """A block (partial ones too: readers copy them) uses a library name or a module only
    after an import on its page brings it: no `Retry` that the page never imported."""
    library = _library_names() - set(dir(builtins))
    problems = []
    for page in pages():
        bound: set[str] = set()
        for block in blocks(page):
            if not block.language.startswith("python"):
                continue
            try:
                here, used = _bound_and_used(block.code)
            except SyntaxError:
                continue  # a shape, not code (the reference's "item: T; value: R")
            bound |= here
            missing = sorted((used - bound) & library)
            if missing:
                problems.append(f"{block.where} uses {missing} without importing them")
    assert not problems, "\n".join(problems)


# -- pages that say "paste into python -m asyncio" ----------------------------------------
def _repl_errors(code: str) -> list[str]:
    """Feed ``code`` line by line to a console as Python's asyncio REPL does (a blank line
    ends a compound statement there), and return the syntax errors a reader would see."""
    import codeop

    compiler = codeop.CommandCompiler()
    compiler.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    errors: list[str] = []
    buffer: list[str] = []
    for n, line in enumerate([*code.splitlines(), ""], 1):
        buffer.append(line)
        try:
            if compiler("\n".join(buffer), "<console>", "single") is None:
                continue  # the statement goes on
        except SyntaxError as e:
            errors.append(f"line {n}: {e.msg}: {line.strip()!r}")
        buffer = []
    return errors


def test_blocks_of_repl_pages_paste_into_the_repl() -> None:
    """The tutorial says to paste its blocks into ``python -m asyncio``: a blank line inside
    a function there ends the function, and the rest fails with IndentationError."""
    assert _repl_errors("def f():\n    x = 1\n\n    return x\n")  # the check can fail
    problems = []
    for page in pages():
        if "python -m asyncio" not in page.read_text(encoding="utf-8"):
            continue
        for block in blocks(page):
            if block.language.startswith("python") and block.directive != "partial":
                problems += [f"{block.where}: {e}" for e in _repl_errors(block.code)]
    assert not problems, "\n".join(problems)
