"""Frozen dataclass configs, one module per stage, and the machinery they share."""
