"""The local engine: one process, one event loop."""
