"""The built distribution: wheel and sdist install and import in fresh venvs, the `testing`
extra runs the testing how-to's example as written in a fresh project (pytest-asyncio strict
mode), the `otel` extra (the API only, plus the SDK) prints the OpenTelemetry how-to's trace,
and the pytest plugin is harmless without the extra.

Slow (fresh venvs, pip): marked ``packaging``; nox's runs on other Pythons leave it out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.docs_examples import ROOT, blocks
from tests.docs_examples import no_implicit_loop as no_implicit_loop

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
NAME = PYPROJECT["project"]["name"]
VERSION = PYPROJECT["project"]["version"]


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _venv(where: Path) -> Path:
    _run(sys.executable, "-m", "venv", where)
    return where / "bin" / "python"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT)
    wheel = next(out.glob("*.whl"))
    sdist = next(out.glob("*.tar.gz"))
    return {"wheel": wheel, "sdist": sdist}


def test_the_distribution_is_ours() -> None:
    # `batchkit` on PyPI is an unrelated project; ours is aio-batchkit, imported as batchkit.
    assert NAME == "aio-batchkit"
    error = __import__("batchkit").MissingExtra("x", "testing", "looptime")
    assert "pip install 'aio-batchkit[testing]'" in str(error)


def test_classifiers_match_the_pythons_nox_tests() -> None:
    nox_pythons = re.search(
        r"^PYTHONS = \[(.*)\]$", (ROOT / "noxfile.py").read_text(encoding="utf-8"), re.M
    )
    assert nox_pythons is not None
    tested = re.findall(r'"(3\.\d+)"', nox_pythons[1])
    claimed = [
        c.rsplit(" :: ", 1)[1]
        for c in PYPROJECT["project"]["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    assert claimed == tested
    assert PYPROJECT["project"]["requires-python"] == f">={tested[0]}"


def test_wheel_and_sdist_contents(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = wheel.namelist()
        assert "batchkit/py.typed" in names
        assert "batchkit/_pytest_plugin.py" in names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "batchkit = batchkit._pytest_plugin" in wheel.read(entry_points).decode()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        assert f"Name: {NAME}" in metadata.decode()
    with tarfile.open(dist["sdist"]) as sdist:
        members = {Path(m).as_posix().split("/", 1)[-1] for m in sdist.getnames()}
    assert {"pyproject.toml", "README.md", "src/batchkit/py.typed"} <= members


def _testing_example() -> str:
    """The first test file of docs/how-to/testing.md, exactly as the page shows it."""
    page = ROOT / "docs" / "how-to" / "testing.md"
    return next(b.code for b in blocks(page) if b.code.startswith("# test_limits.py"))


def test_wheel_with_testing_extra_runs_the_how_to_example(
    dist: dict[str, Path], tmp_path: Path
) -> None:
    python = _venv(tmp_path / "venv")
    _run(python, "-m", "pip", "install", "--quiet", f"{dist['wheel']}[testing]")
    version = _run(python, "-c", "import batchkit; print(batchkit.__version__)").strip()
    assert version == VERSION
    project = tmp_path / "project"  # a fresh project: no pytest configuration at all
    project.mkdir()
    (project / "test_limits.py").write_text(_testing_example(), encoding="utf-8")
    out = _run(python, "-m", "pytest", "-p", "no:cacheprovider", "-q", cwd=project)
    assert "1 passed" in out


def test_sdist_without_extras_plugin_is_harmless(dist: dict[str, Path], tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv")
    _run(python, "-m", "pip", "install", "--quiet", dist["sdist"], "pytest")
    version = _run(python, "-c", "import batchkit; print(batchkit.__version__)").strip()
    assert version == VERSION
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_plain.py").write_text(
        "import asyncio\n"
        "from batchkit import batch_process\n\n"
        "def test_sync() -> None:\n"
        "    report = asyncio.run(batch_process([1, 2], lambda x: x))\n"
        "    assert report.ok\n",
        encoding="utf-8",
    )
    out = _run(python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-W", "error", cwd=project)
    assert "1 passed" in out
    # A looptime-marked async test cannot run without the extra: the failure says what to do.
    (project / "test_marked.py").write_text(
        "import pytest\n\n@pytest.mark.looptime\nasync def test_virtual() -> None:\n    pass\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_marked.py"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout
    assert "pip install 'aio-batchkit[testing]'" in done.stdout


def test_wheel_with_otel_extra_prints_the_how_to_trace(
    dist: dict[str, Path], tmp_path: Path
) -> None:
    """The ``otel`` extra brings the API only; with the SDK the application adds, the
    how-to's example prints the trace the page shows (on a real event loop here)."""
    python = _venv(tmp_path / "venv")
    _run(python, "-m", "pip", "install", "--quiet", f"{dist['wheel']}[otel]")
    installed = _run(python, "-m", "pip", "list", "--format=freeze")
    assert "opentelemetry-api==" in installed
    assert "opentelemetry-sdk" not in installed
    _run(python, "-m", "pip", "install", "--quiet", "opentelemetry-sdk")
    page = blocks(ROOT / "docs" / "how-to" / "opentelemetry.md")
    at = next(i for i, b in enumerate(page) if "InMemorySpanExporter()" in b.code)
    expected = next(b.code for b in page[at + 1 :] if b.language == "text")
    script = tmp_path / "howto.py"
    script.write_text(
        "import ast, asyncio\n"
        f"CODE = {page[at].code!r}\n"
        "async def main():\n"
        "    code = compile(CODE, 'howto', 'exec', flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)\n"
        "    pending = eval(code, {'__name__': '__main__'})\n"
        "    if pending is not None:\n"
        "        await pending\n"
        "asyncio.run(main())\n",
        encoding="utf-8",
    )
    assert _run(python, script, cwd=tmp_path) == expected
