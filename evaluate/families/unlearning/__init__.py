"""Unlearning family: the protocol (splits, sweep, choice, test; protocol.py) and its intervention (feature
selection, the matched random control, the clamp and its scoring; intervention.py)."""
