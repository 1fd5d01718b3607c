"""Judging concurrency from recorded (start, end) spans, in the Dask tests."""

from __future__ import annotations


def peak(spans: list[tuple[float, float]]) -> int:
    """The most spans that overlapped at once (an end and a start at one instant do not)."""
    marks = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = current = 0
    for _, step in marks:
        current += step
        most = max(most, current)
    return most
