"""``docs/reference/options.md``'s table, generated from the keywords' docstrings.

Each keyword of ``batch_process``/``stream`` is documented once, on its ``TypedDict`` key in
``src/batchkit/_model/options.py`` (what an IDE shows); the table's rows are made from those
docstrings (``python -m tests.options_table`` rewrites them), and
``tests/test_docs_reference.py`` fails while the page differs from what this makes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re

import batchkit
from batchkit._model.options import Options
from tests.docs_examples import ROOT

__all__ = ["OPTIONS", "key_docstrings", "render_table", "rows"]

OPTIONS = ROOT / "docs" / "reference" / "options.md"
SOURCE = ROOT / "src" / "batchkit" / "_model" / "options.py"

# The parameters of the functions themselves (not TypedDict keys): (keyword, default, meaning).
PARAMETERS = (
    (
        "items",
        "(required)",
        "Any iterable or async iterable, pulled on demand: at most `concurrency` items (plus "
        "retries waiting and `cost=` read-ahead) are held beyond the outcomes. A `str` is "
        "rejected.",
    ),
    (
        "fn",
        "(required)",
        "`async def fn(item)`; with `context=`, `async def fn(item, ctx)`. A plain function "
        "runs in a worker thread under the same limit; if it returns an awaitable, that is "
        "awaited.",
    ),
)
CONTEXT = (
    "context",
    "`None`",
    "A zero-argument callable returning an async context manager (`async_sessionmaker(engine)` "
    "fits). A fresh one per attempt, passed to `fn`, exited on every path.",
)
# Words of a docstring that link to a page rather than to a public class.
PAGE_LINKS = {"receiving events": "receiving [events](index.md#events)"}
_CODE = re.compile(r"``(?P<code>[^`]+)``")
_DEFAULT = re.compile(r"^(?P<meaning>.*) Default: (?P<default>.+)\.$")


def key_docstrings() -> dict[str, str]:
    """Each ``RunOptions``/``StreamOptions`` key's docstring (the string after it), read from
    the source as an IDE reads it."""
    docs: dict[str, str] = {}
    for node in ast.parse(SOURCE.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and node.name in ("RunOptions", "StreamOptions"):
            for field, doc in itertools.pairwise(node.body):
                if (
                    isinstance(field, ast.AnnAssign)
                    and isinstance(field.target, ast.Name)
                    and isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant)
                ):
                    docs[field.target.id] = " ".join(str(doc.value.value).split())
    return docs


def _markdown(text: str) -> str:
    """reST's double ticks as Markdown code; a public class's name, in code, as a link to it."""

    def code(m: re.Match[str]) -> str:
        name = re.match(r"\w+", m["code"])
        obj = getattr(batchkit, name[0], None) if name else None
        if name and name[0] in batchkit.__all__ and inspect.isclass(obj):
            return f"[`{m['code']}`][batchkit.{name[0]}]"
        return f"`{m['code']}`"

    text = _CODE.sub(code, text)
    for words, linked in PAGE_LINKS.items():
        text = text.replace(words, linked)
    return text


def rows() -> list[tuple[str, str, str]]:
    """``(keyword, default, meaning)``: the positional parameters, then every keyword in the
    order ``Options`` declares them (the order of the entry points' signatures)."""
    made = {name: (name, default, meaning) for name, default, meaning in (*PARAMETERS, CONTEXT)}
    for name, doc in key_docstrings().items():
        m = _DEFAULT.match(doc)
        if m is None:
            raise ValueError(f"{name}: its docstring does not end with 'Default: ...'.")
        made[name] = (name, _markdown(m["default"]), _markdown(m["meaning"]))
    order = [name for name, _, _ in PARAMETERS] + [f.name for f in dataclasses.fields(Options)]
    return [made[name] for name in order]


def render_table() -> str:
    lines = ["| keyword | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {default} | {meaning} |" for name, default, meaning in rows()]
    return "\n".join(lines)


def _page_table(page: str) -> tuple[int, int]:
    """Where the table is in ``page``: (start, end) character offsets."""
    start = page.index("| keyword | default | meaning |")
    end = page.find("\n\n", start)
    return start, len(page) if end == -1 else end


def main() -> None:
    page = OPTIONS.read_text(encoding="utf-8")
    start, end = _page_table(page)
    OPTIONS.write_text(page[:start] + render_table() + page[end:], encoding="utf-8")


if __name__ == "__main__":
    main()
