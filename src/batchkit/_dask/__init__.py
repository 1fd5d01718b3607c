"""The Dask backend behind ``batchkit.dask``: the driver (``driver.py``, built from its parts),
the wire, the worker side (docs/design.md, "The map")."""
