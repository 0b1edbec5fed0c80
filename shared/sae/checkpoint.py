"""The layout of a trained layer's directory, its writer and its readers (train writes, evaluate reads).

    <out>/seed_<s>/layer_<L>/                     one trained SAE: run `out`, seed s, layer L
        cfg.json, sae_weights.safetensors          the SAE in SAELens' layout, taking RAW activations
        head.safetensors                           the contrastive head, taking that SAE's (raw-unit) features
        train_config.json                          `LayerInfo`: the TrainConfig and what it was trained on;
                                                   written last, so its presence means the rest is there
        metrics.csv                                one row per training step (DVC plots it)

Every file is written through a temporary file and a rename, so a crash leaves the previous version.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from csae.shared.config.base import ConfigError, from_dict, to_dict
from csae.shared.config.train import TrainConfig
from csae.shared.errors import UserError
from csae.shared.files import atomic_write
from csae.shared.sae.autoencoder import CFG_FILE, SAE, WEIGHTS_FILE
from csae.shared.sae.head import HEAD_FILE, ContrastiveHead

METRICS_FILE = "metrics.csv"
TRAIN_CONFIG_FILE = "train_config.json"
#: The deliverables `write_final` writes into a finished layer's directory: one missing and the layer is not
#: whole. (metrics.csv, the training log, is not among them: without it only the training-curve plot is missing.)
LAYER_FILES = (CFG_FILE, WEIGHTS_FILE, HEAD_FILE, TRAIN_CONFIG_FILE)


SEED_DIR = re.compile(r"seed_(\d+)$")
LAYER_DIR = re.compile(r"layer_(\d+)$")


def layer_dir(out: str | Path, seed: int, layer: int) -> Path:
    """Where run directory `out` keeps the SAE of one seed and layer."""
    return Path(out) / f"seed_{seed}" / f"layer_{layer}"


def trained_layers(out: str | Path) -> list[tuple[int, int, Path]]:
    """(seed, layer, directory) of every seed_<s>/layer_<L> directory under run directory `out`, sorted."""
    found = []
    for seed_path in Path(out).iterdir() if Path(out).is_dir() else []:
        if seed_path.is_dir() and (seed := SEED_DIR.match(seed_path.name)):
            found += [(int(seed.group(1)), int(layer.group(1)), p) for p in seed_path.iterdir()
                      if p.is_dir() and (layer := LAYER_DIR.match(p.name))]
    return sorted(found)


@dataclass(frozen=True)
class LayerInfo:
    """What train_config.json records: the training config (read back into TrainConfig) and the data."""

    config: TrainConfig
    seed: int
    """The seed this SAE was trained with (one of config.seeds)."""
    layer: int
    store: str
    """The activation store trained on (path or URL)."""
    model: dict[str, Any]
    """The store's model identity (name plus revision / package version / file hash)."""
    scale: float
    """Inputs were multiplied by this in training (folded into the saved weights)."""
    d_in: int
    d_sae: int
    train_rows: int
    """Rows [0, train_rows) of the store were training rows; the tail after them is held out."""
    final_metrics: dict[str, float] = field(default_factory=dict)
    """The last training step's metrics."""
    complete: bool = True

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "config": to_dict(self.config)}, indent=2)

    @classmethod
    def read(cls, directory: Path) -> LayerInfo:
        """Read `directory`/train_config.json; one-line UserError when it is missing or not ours."""
        path = Path(directory) / TRAIN_CONFIG_FILE
        if not path.exists():
            raise UserError(f"{directory} has no {TRAIN_CONFIG_FILE}: its training did not finish; resume it with "
                            f"`train fit --resume`")
        try:
            data = json.loads(path.read_text())
            return cls(**{**data, "config": from_dict(TrainConfig, data["config"])})
        except (ValueError, KeyError, TypeError, ConfigError) as err:
            raise UserError(f"{path} is not a train_config.json of this csae version ({type(err).__name__}: "
                            f"{err}); re-train the layer with `train fit --overwrite`") from None


def write_final(directory: Path, sae: SAE, head: ContrastiveHead, info: LayerInfo) -> None:
    """The deliverables: SAE and head with the input scale folded in, then train_config.json (last, so
    its presence with complete=true means the rest is there)."""
    meta = {"hook_name": f"blocks.{info.layer}.hook_resid_post", "csae_layer": info.layer, "csae_store": info.store,
            "csae_scale": info.scale}
    sae.fold_input_scale(info.scale).save(directory, metadata=meta)
    head.fold_input_scale(info.scale).save(directory)
    text = info.to_json()
    atomic_write(directory / TRAIN_CONFIG_FILE, lambda p: Path(p).write_text(text))


def is_complete(directory: Path) -> bool:
    path = directory / TRAIN_CONFIG_FILE
    return path.exists() and bool(json.loads(path.read_text()).get("complete"))


def layer_problem(directory: Path) -> str | None:
    """Why a finished layer's directory is not whole, or None: a file train writes is missing, a file does not
    load, or the weights' shapes disagree with cfg.json or train_config.json (evaluate refuses such a layer,
    `train fit --resume` re-trains it)."""
    missing = [name for name in LAYER_FILES if not (directory / name).is_file()]
    if missing:
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    try:
        cfg = json.loads((directory / CFG_FILE).read_text())
        info = LayerInfo.read(directory)
        sae, head = SAE.load(directory), ContrastiveHead.load(directory)
    except UserError as err:
        return str(err).split("; ")[0]
    except (ValueError, KeyError, RuntimeError, AttributeError) as err:  # unparsable JSON, unexpected tensors
        return f"{directory} does not load ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    shapes = {"sae_weights.safetensors": (sae.d_in, sae.d_sae), "cfg.json": (cfg.get("d_in"), cfg.get("d_sae")),
              "train_config.json": (info.d_in, info.d_sae)}
    if len(set(shapes.values())) > 1 or head.d_sae != sae.d_sae:
        return (f"its shapes disagree (d_in, d_sae): {', '.join(f'{k} {v}' for k, v in shapes.items())}, "
                f"head.safetensors d_sae {head.d_sae}")
    return None


def load_layer(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[SAE, ContrastiveHead,
                                                                                     LayerInfo]:
    """(SAE taking raw activations, head taking its features, the LayerInfo) of a trained layer."""
    directory = Path(directory)
    info = LayerInfo.read(directory)
    return SAE.load(directory, device=device), ContrastiveHead.load(directory).to(device), info


def read_metrics(directory: Path) -> list[dict[str, float]]:
    """The per-step metrics log of a layer directory, as numbers ('step' as int)."""
    path = Path(directory) / METRICS_FILE
    if not path.exists() or not path.stat().st_size:
        return []
    with open(path, newline="") as fh:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()} for row in csv.DictReader(fh)]
