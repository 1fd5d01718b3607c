"""Observers batchkit ships: log lines and progress bars."""
