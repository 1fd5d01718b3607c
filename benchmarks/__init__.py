"""batchkit's benchmark harness: ``python -m benchmarks [--quick]`` from the repository root.

Every contender applies the same ``async def fn(item)`` to the same items, at most ``C`` in
flight, with a per-item timeout, collecting every outcome, one failure never stopping the
others. Each (scenario, contender, repetition) runs in a fresh subprocess
(``python -m benchmarks.worker``); repetitions are interleaved across contenders, and the
report gives medians and ratios to the hand-written sliding-window worker pool measured in the
same run. Results go to ``benchmarks/results/`` (JSON, markdown, PNG).

Modules: ``_scenarios`` (what is measured, lower bounds), ``_contenders`` (the ways to run a
batch), ``worker`` (one measurement in one process), ``_runner`` (scheduling, medians,
ratios), ``_report`` (targets, markdown, plot).
"""
