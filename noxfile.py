"""The pytest suite on every Python the package claims besides the one `make test` uses.

`make pythons` (and `.ci/run`) runs it: ``python -m nox``. Each session makes a venv with that
Python, installs the package with its `dev` extra and the reference app, and runs pytest
(ruff, mypy and the docs build run once, on 3.11, in `make test`). A version this machine
lacks is skipped with a message saying so; keep PYTHONS in step with pyproject's classifiers
(tests/test_packaging.py checks).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

PYTHONS = ["3.11", "3.12", "3.13"]
OTHER_PYTHONS = PYTHONS[1:]  # 3.11 is the `make test` venv's Python

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False


def _interpreter(version: str) -> str | None:
    """The newest pyenv build of ``version``, else ``pythonX.Y`` on PATH, if it runs (a pyenv
    shim for a version that is not activated is on PATH but does not)."""
    builds = sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")),
        key=lambda p: [int(x) for x in p.split("/")[-3].split(".") if x.isdigit()],
    )
    for candidate in [*reversed(builds), shutil.which(f"python{version}")]:
        if candidate and subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


@nox.session(python=False)
@nox.parametrize("version", OTHER_PYTHONS)
def tests(session: nox.Session, version: str) -> None:
    """The pytest suite on Python ``version`` (no coverage, no packaging tests)."""
    python = _interpreter(version)
    if python is None:
        session.skip(
            f"Python {version} is not on this machine (no python{version} on PATH or under "
            f"~/.pyenv/versions/{version}.*): its tests did not run"
        )
    venv = os.path.join(".nox", f"tests-{version}")
    bin_dir = os.path.join(venv, "bin")
    if not os.path.exists(os.path.join(bin_dir, "python")):
        session.run(python, "-m", "venv", venv, external=True)
    py = os.path.join(bin_dir, "python")
    stamp = os.path.join(venv, ".installed")
    if not _fresh(stamp, "pyproject.toml", "examples/predictions/pyproject.toml"):
        session.run(py, "-m", "pip", "install", "--quiet", "--upgrade", "pip", external=True)
        session.run(
            py, "-m", "pip", "install", "--quiet",
            "-e", ".[dev]", "-e", "examples/predictions",
            external=True,
        )  # fmt: skip
        with open(stamp, "w"):
            pass
    session.run(py, "-c", "import sys; print(sys.version)", external=True)
    session.run(
        py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not packaging",
        *session.posargs,
        external=True,
    )  # fmt: skip


def _fresh(stamp: str, *sources: str) -> bool:
    if not os.path.exists(stamp):
        return False
    made = os.path.getmtime(stamp)
    return all(os.path.getmtime(s) <= made for s in sources)
