"""Find the code blocks of README.md and docs/**.md, and run the Python ones.

The rules a page follows (docs/contributing-docs.md tells writers):

- Every fenced block whose info string starts with ``python`` is executed, in page order, in
  one namespace per page: a block may use what an earlier block on the same page defined.
- A block that defines ``test_...`` functions without parameters also runs them (an async
  one in the virtual-time loop), as pytest would.
- Top-level ``await`` works. Everything runs in virtual time (looptime): a block can sleep for
  an hour and the test takes milliseconds; ``asyncio.run()`` in a block gets a virtual-time
  loop too. A page that says ``<!-- examples: real-time -->`` runs on a normal event loop
  (for examples that wait on threads, such as aiosqlite's).
- A block's output is checked when the next block is a ``text`` block preceded by
  ``<!-- example: output -->``: what the Python block printed must equal it (trailing spaces
  ignored).
- ``<!-- example: partial REASON -->`` before a block marks it deliberately partial: it is not
  run, and the test suite reports it as skipped with the reason.
- Names a block uses without defining, such as ``items``, ``fn`` or ``markets``, come from the
  stand-ins in tests/docs_stand_ins.py, unless the page says ``<!-- examples: self-contained -->``
  (then every block must define what it uses, as a reader copying it would).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*example:\s*(?P<kind>\w+)\s*(?P<arg>.*?)\s*-->\s*$")
_SELF_CONTAINED = re.compile(r"<!--\s*examples:\s*self-contained\s*-->")
_REAL_TIME = re.compile(r"<!--\s*examples:\s*real-time\s*-->")


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    directive: str | None = None  # "partial", "output", ...
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True, slots=True)
class Example:
    """A Python block to run, with the output the page shows for it (if any)."""

    block: Block
    expected_output: str | None
    earlier: tuple[Block, ...]  # the page's earlier runnable blocks, run first
    self_contained: bool
    real_time: bool = False


def pages() -> list[Path]:
    """README.md and every page under docs/, in a stable order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, with the directive comment just before it (if any)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        language = (m["info"].split() or [""])[0].strip("{}.").lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            closing = lines[i].strip()
            if closing.startswith(fence[0] * len(fence)) and set(closing) <= {fence[0]}:
                break
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        directive, reason = _directive_before(lines, start)
        found.append(
            Block(
                page=page,
                line=start + 1,
                language=language,
                code="\n".join(body) + "\n",
                directive=directive,
                reason=reason,
            )
        )
    return found


def _directive_before(lines: list[str], fence_index: int) -> tuple[str | None, str]:
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j >= 0 and (m := _DIRECTIVE.match(lines[j])) is not None:
        return m["kind"], m["arg"]
    return None, ""


def examples() -> Iterator[Example]:
    """Every Python block of every page, in order."""
    for page in pages():
        text = page.read_text(encoding="utf-8")
        self_contained = _SELF_CONTAINED.search(text) is not None
        real_time = _REAL_TIME.search(text) is not None
        page_blocks = blocks(page)
        earlier: list[Block] = []
        for n, block in enumerate(page_blocks):
            if not block.language.startswith("python"):
                continue
            following = page_blocks[n + 1] if n + 1 < len(page_blocks) else None
            expected = None
            if following is not None and following.directive == "output":
                expected = following.code
            yield Example(block, expected, tuple(earlier), self_contained, real_time)
            if block.directive != "partial":
                earlier.append(block)


# -- running ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_implicit_loop() -> None:
    """looptime's pytest hook asks the policy for the current loop before every test; on
    Python 3.12+ that warns (an error under ``filterwarnings = error``) when no loop was ever
    set, as in a process whose first test is a sync one. Setting "no loop" makes it a quiet
    RuntimeError. Import it into a test module to use it there."""
    asyncio.get_event_loop_policy().set_event_loop(None)


class _VirtualTimePolicy(asyncio.DefaultEventLoopPolicy):
    """``asyncio.run()`` inside an example gets a looptime loop (virtual time) too."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        import looptime

        loop = super().new_event_loop()
        assert isinstance(loop, asyncio.BaseEventLoop)
        patched: asyncio.AbstractEventLoop = looptime.patch_event_loop(loop, start=0)
        return patched


def run_blocks(run: list[Block], namespace: dict[str, Any], *, real_time: bool = False) -> str:
    """Run ``run`` in order in ``namespace``; return what the last block printed.

    In virtual time, unless ``real_time`` (for pages whose examples wait on threads, such as
    aiosqlite's: a virtual clock would jump ahead to the next timer while a thread works).
    """
    import looptime

    saved_policy = asyncio.get_event_loop_policy()
    if not real_time:
        asyncio.set_event_loop_policy(_VirtualTimePolicy())
    try:
        factory = asyncio.new_event_loop if real_time else looptime.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            output = ""
            for block in run:
                output = _run_one(block, namespace, runner)
            return output
    finally:
        asyncio.set_event_loop_policy(saved_policy)


def _run_one(block: Block, namespace: dict[str, Any], runner: asyncio.Runner) -> str:
    code = compile(
        _numbered(block),
        str(block.page),
        "exec",
        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        dont_inherit=True,
    )
    before = set(namespace)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = eval(code, namespace)  # exec with top-level await: may return a coroutine
        if inspect.iscoroutine(result):
            runner.run(result)
        # A block that shows a test (``def test_...``) is run as that test would be.
        for name in [n for n in namespace if n not in before and n.startswith("test_")]:
            test = namespace[name]
            if callable(test) and not inspect.signature(test).parameters:
                outcome = test()
                if inspect.iscoroutine(outcome):
                    runner.run(outcome)
    return out.getvalue()


def _numbered(block: Block) -> str:
    # Pad with blank lines so tracebacks point at the page's own line numbers.
    return "\n" * block.line + block.code


def same_output(printed: str, expected: str) -> bool:
    def norm(text: str) -> list[str]:
        return [line.rstrip() for line in text.strip("\n").splitlines()]

    return norm(printed) == norm(expected)
