"""Where and how this process trains, resolved by the caller (never read from the environment here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains (resolved by the caller, never read from the environment here)."""
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain float32
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the products run in: autocast's, else float32."""
        return self.autocast_dtype or torch.float32
