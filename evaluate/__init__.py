"""The evaluate stage: metrics of trained SAEs on held-out data (formulas in the README, section Metrics)."""
