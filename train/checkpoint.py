"""What a layer's output directory holds, and reading it back.

    layer_<L>/cfg.json, sae_weights.safetensors   the SAE in SAELens' layout, taking RAW activations
    layer_<L>/head.safetensors                    the contrastive head, taking that SAE's (raw-unit) features
    layer_<L>/train_config.json                   the resolved TrainConfig + store, layer, scale; written last
    layer_<L>/metrics.jsonl                       one JSON object per step
    layer_<L>/state.pt                            resumable training state (scaled units, optimiser, step)

Every file is written through a temporary file and a rename, so a crash leaves the previous version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from train.head import ContrastiveHead
from train.sae import SAE, _atomic

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"


def layer_dir(out: Path, layer: int) -> Path:
    return Path(out) / f"layer_{layer}"


def all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def save_state(directory: Path, state: dict[str, Any]) -> None:
    _atomic(directory / STATE_FILE, lambda p: torch.save(state, p))


def load_state(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def write_final(directory: Path, sae: SAE, head: ContrastiveHead, *, scale: float, info: dict[str, Any]) -> None:
    """The deliverables: SAE and head with the input scale folded in, then train_config.json (last, so
    its presence with complete=true means the rest is there)."""
    meta = {"csae_" + k: v for k, v in info.items() if k in ("layer", "store", "scale")}
    sae.fold_input_scale(scale).save(directory, metadata={"hook_name": f"blocks.{info['layer']}.hook_resid_post",
                                                           **meta})
    head.fold_input_scale(scale).save(directory)
    text = json.dumps({**info, "complete": True}, indent=2)
    _atomic(directory / TRAIN_CONFIG_FILE, lambda p: Path(p).write_text(text))


def is_complete(directory: Path) -> bool:
    path = directory / TRAIN_CONFIG_FILE
    return path.exists() and bool(json.loads(path.read_text()).get("complete"))


def load_layer(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[SAE, ContrastiveHead,
                                                                                     dict[str, Any]]:
    """(SAE taking raw activations, head taking its features, the train_config.json dict)."""
    directory = Path(directory)
    info = json.loads((directory / TRAIN_CONFIG_FILE).read_text())
    return SAE.load(directory, device=device), ContrastiveHead.load(directory).to(device), info


class MetricsLog:
    """Append-only JSONL, one object per step. On resume, lines of steps not covered by the checkpoint
    are dropped first, so the log matches the weights."""

    def __init__(self, directory: Path, *, start_step: int, enabled: bool) -> None:
        self.path = directory / METRICS_FILE
        self.enabled = enabled
        self._fh = None
        if not enabled:
            return
        kept = []
        if start_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < start_step]
        text = "".join(line + "\n" for line in kept)
        _atomic(self.path, lambda p: Path(p).write_text(text))
        self._fh = open(self.path, "a")  # kept open for the whole run

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
            self._fh.write(json.dumps(clean) + "\n")

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
