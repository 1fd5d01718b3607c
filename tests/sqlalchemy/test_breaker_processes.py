"""A Breaker's circuits shared by real processes through a SQLAlchemyStateStore: two
processes open one circuit each at the same moment (both kept, merged by compare-and-set),
then a third process's run starts with both open and skips every item ``circuit_open``
without calling the upstream."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

RUN = Path(__file__).with_name("_breaker_run.py")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.communicate()


def start(procs: list[subprocess.Popen[str]], url: str, circuits: str, upstream: str) -> None:
    p = subprocess.Popen(
        [sys.executable, str(RUN), url, circuits, upstream],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line == "ready\n", f"{line!r}, stderr: {p.stderr.read() if p.stderr else ''}"


def finish(procs: list[subprocess.Popen[str]]) -> list[list[list[str | None]]]:
    for p in procs:  # every process has opened the store: all start at once
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    procs.clear()
    return results


@pytest.mark.timeout(180)
def test_circuits_opened_by_two_processes_are_open_in_a_third(
    db_url: str, procs: list[subprocess.Popen[str]]
) -> None:
    start(procs, db_url, "a", "down")
    start(procs, db_url, "b", "down")
    for result in finish(procs):
        # Each opened its circuit after 3 errors and skipped the rest of its items.
        assert [kind for _, kind, _ in result] == ["error"] * 3 + ["skipped"] * 3
    start(procs, db_url, "a,b,c", "up")
    (third,) = finish(procs)
    seen = Counter((circuit, kind, reason) for circuit, kind, reason in third)
    assert seen == {
        ("a", "skipped", "circuit_open"): 6,
        ("b", "skipped", "circuit_open"): 6,
        ("c", "success", None): 6,  # a circuit no process opened
    }
