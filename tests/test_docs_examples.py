"""Every code block in README.md and docs/ runs (see tests/docs_examples.py for the rules).

One test per Python block: ``test_example[docs/how-to/testing.md:31]``. A block marked
``<!-- example: partial ... -->`` is reported as skipped with its reason.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import pytest

from tests import docs_stand_ins
from tests.docs_examples import ROOT, Example, examples, pages, run_blocks, same_output
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
