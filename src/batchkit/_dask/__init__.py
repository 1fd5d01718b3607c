"""The Dask backend behind ``batchkit.dask``: driver, wire, worker."""
