"""predictions: the batchkit reference app.

A fresh prediction for each active market from three slow, flaky upstream APIs, within a cron
deadline, with one database session per market and an honest record of every run.
"""

from .pipeline import MarketRef, RunConfig, RunResult, generate_predictions, run_job

__all__ = ["MarketRef", "RunConfig", "RunResult", "generate_predictions", "run_job"]
