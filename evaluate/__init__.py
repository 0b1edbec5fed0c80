"""The evaluate stage: metrics of trained SAEs on held-out data (formulas in docs/metrics.md)."""
