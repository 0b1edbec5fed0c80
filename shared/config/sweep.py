"""The sparsity sweep (params.yaml's `sweep` section): which values of the sparsity setting each run is trained at,
so that evaluate compares runs along the sparsity-fidelity frontier and at matched L0 (SAEBench's practice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from csae.shared.config.base import ConfigError


@dataclass(frozen=True)
class SweepConfig:
    knob: Literal["k", "l1"] = "k"
    """The setting swept: k (architecture topk or batchtopk) or l1 (relu)."""

    points: tuple[float, ...] = (16, 32, 64, 128)
    """Its values. Each run is trained at each, into checkpoints/<run>/<knob>_<point>/ (dvc.yaml's matrix)."""

    main: float = 64
    """The point trained at every layer; the others are trained at `layers` only."""

    layers: tuple[int, ...] = (8,)
    """Layers of the points other than `main` (empty: every layer of the store)."""

    frontier_only: tuple[str, ...] = ()
    """Runs trained at `layers` only, at every point (`main` too): a run kept to the middle layer's frontier, as
    the default pipeline keeps the T-SAE for its time budget."""

    def __post_init__(self) -> None:
        if not self.points or len(set(self.points)) != len(self.points) or min(self.points) <= 0:
            raise ConfigError(f"sweep points must be distinct positive values, at least one, got {list(self.points)}")
        if self.main not in self.points:
            raise ConfigError(f"sweep main {self.main} is not one of the points {list(self.points)}; add it")
        if self.knob == "k" and any(p != int(p) for p in self.points):
            raise ConfigError(f"k points must be whole numbers, got {list(self.points)}")

    def overrides(self, point: float) -> dict[str, float | int]:
        """The train settings of one point."""
        if point not in self.points:
            raise ConfigError(f"point {point:g} is not in the sweep's points {[f'{p:g}' for p in self.points]}")
        return {self.knob: int(point) if self.knob == "k" else float(point)}

    def layers_of(self, point: float, run: str | None = None) -> tuple[int, ...]:
        """The layers a run is trained at at a point (empty: every layer of the store)."""
        return () if point == self.main and run not in self.frontier_only else self.layers
