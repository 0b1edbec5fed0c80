"""What a layer's output directory holds, and reading it back.

    layer_<L>/cfg.json, sae_weights.safetensors   the SAE in SAELens' layout, taking RAW activations
    layer_<L>/head.safetensors                    the contrastive head, taking that SAE's (raw-unit) features
    layer_<L>/train_config.json                   the resolved TrainConfig + store, layer, scale; written last
    layer_<L>/metrics.csv                         one row per step (DVC plots it)
    layer_<L>/state.pt                            resumable training state (scaled units, optimiser, step)

Every file is written through a temporary file and a rename, so a crash leaves the previous version.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from train.head import ContrastiveHead
from train.sae import SAE, _atomic

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.csv"
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
    """Append-only CSV, one row per step (DVC plots it directly). On resume, rows of steps not covered
    by the checkpoint are dropped first, so the log matches the weights."""

    def __init__(self, directory: Path, *, start_step: int, enabled: bool) -> None:
        self.path = directory / METRICS_FILE
        self._fh: Any = None
        self._writer: csv.DictWriter | None = None
        if not enabled:
            return
        kept = [r for r in read_metrics(directory) if r["step"] < start_step] if start_step > 0 else []
        buffer = io.StringIO()
        if kept:
            self._writer = csv.DictWriter(buffer, fieldnames=list(kept[0]))
            self._writer.writeheader()
            self._writer.writerows({k: _fmt(v) for k, v in r.items()} for r in kept)
        _atomic(self.path, lambda p: Path(p).write_text(buffer.getvalue()))
        self._fh = open(self.path, "a", newline="")  # kept open for the whole run
        if self._writer is not None:
            self._writer = csv.DictWriter(self._fh, fieldnames=list(kept[0]))

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        if self._writer is None:  # a fresh log: the first record's keys are the columns
            self._writer = csv.DictWriter(self._fh, fieldnames=list(record))
            self._writer.writeheader()
        self._writer.writerow({k: _fmt(v) for k, v in record.items()})

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _fmt(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value  # repr: exact round trip


def read_metrics(directory: Path) -> list[dict[str, float]]:
    """The per-step metrics log of a layer directory, as numbers ('step' as int)."""
    path = Path(directory) / METRICS_FILE
    if not path.exists() or not path.stat().st_size:
        return []
    with open(path, newline="") as fh:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()} for row in csv.DictReader(fh)]
