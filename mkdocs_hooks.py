"""MkDocs hooks: pages of the repository outside docs/ become pages of the site.

The Markdown in docs/ links to files such as ``../examples/predictions/README.md`` so that it
reads well on a code host; on the site those links point at the page that shows the file.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent

# repository file -> the site page that shows it (docs/-relative)
SHOWN_AS = {
    "examples/predictions/README.md": "example-app.md",
    "CHANGELOG.md": "changelog.md",
    "README.md": "index.md",
}
_INCLUDE = re.compile(r"^<!-- include: (?P<path>\S+) -->$", re.MULTILINE)
_LINK = re.compile(r"\]\((?P<target>[^)\s#]+\.md)(?P<anchor>#[^)\s]*)?\)")


def _relink(markdown: str, source: str, page_path: str) -> str:
    """Rewrite links of ``markdown`` (written as if it lived at repository path ``source``)
    for the site page at docs/-relative ``page_path``."""
    source_dir = posixpath.dirname(source)
    page_dir = posixpath.dirname(page_path)

    def fix(m: re.Match[str]) -> str:
        target = m["target"]
        if "://" in target:
            return m.group(0)
        in_repo = posixpath.normpath(posixpath.join(source_dir, target))
        if in_repo in SHOWN_AS:
            doc = SHOWN_AS[in_repo]
        elif in_repo.startswith("docs/"):
            doc = in_repo.removeprefix("docs/")
        else:
            return m.group(0)
        relative = posixpath.relpath(doc, page_dir or ".")
        return f"]({relative}{m['anchor'] or ''})"

    return _LINK.sub(fix, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Inline ``<!-- include: path -->`` files and point links outside docs/ at site pages."""
    page_path: str = page.file.src_uri

    def include(m: re.Match[str]) -> str:
        path = m["path"]
        return _relink((ROOT / path).read_text(encoding="utf-8"), path, page_path)

    markdown = _INCLUDE.sub(include, markdown)
    return _relink(markdown, f"docs/{page_path}", page_path)


# Pages that join the nav when they exist: (section, title, docs/-relative path).
OPTIONAL_PAGES = [("How-to guides", "Scaling out with Dask", "how-to/dask.md")]


def on_config(config: Any) -> Any:
    """Add an optional page (e.g. the Dask how-to, written in parallel) to its nav section
    once its file exists; until then the nav has no slot pointing at a missing page."""
    docs = Path(config["docs_dir"])
    for section_title, title, path in OPTIONAL_PAGES:
        if not (docs / path).exists():
            continue
        for section in config["nav"] or []:
            if isinstance(section, dict) and section_title in section:
                pages = section[section_title]
                if not any(path in entry.values() for entry in pages if isinstance(entry, dict)):
                    pages.append({title: path})
    return config
