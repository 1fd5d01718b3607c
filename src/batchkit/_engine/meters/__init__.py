"""The meters: one file per policy, its math beside it."""
