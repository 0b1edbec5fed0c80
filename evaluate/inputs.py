"""Find and check the trained layers of a checkpoint directory (what `train fit --out DIR` wrote)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from csae.shared.errors import UserError
from csae.shared.sae.autoencoder import SAE, WEIGHTS_FILE
from csae.shared.sae.checkpoint import LayerInfo, layer_problem, trained_layers
from csae.shared.sae.head import HEAD_FILE, ContrastiveHead
from csae.shared.store.schema import ActivationStore

#: Identity fields that must agree between the checkpoint's store and the evaluated store.
_IDENTITY_KEYS = ("name", "revision", "version", "sha256", "gguf_sha256")


@dataclass
class LayerCheckpoint:
    run: str
    """The run's name: its checkpoint directory's name (e.g. csae, baseline)."""
    seed: int
    layer: int
    path: Path
    sae: SAE
    head: torch.nn.Module | None
    """The contrastive head, or None when the directory has none."""
    info: LayerInfo
    """train_config.json: the training config plus store, seed, layer, scale."""

    @property
    def key(self) -> str:
        return f"{self.run}/seed_{self.seed}/layer_{self.layer}"


def layer_of(key: str) -> int:
    """The layer of a figure key that ends in `layer_<L>` (-1 for any other key)."""
    match = re.search(r"layer_(\d+)$", key)
    return int(match.group(1)) if match else -1


def layer_dirs(directory: Path) -> list[tuple[int, int, Path]]:
    """(seed, layer, dir) of each trained SAE (seed_<s>/layer_<L>/ with weights) of a `train fit --out` run."""
    if not directory.is_dir():
        raise UserError(f"checkpoint directory {directory} does not exist; train with `train fit --out {directory}`")
    found = [(seed, layer, p) for seed, layer, p in trained_layers(directory) if (p / WEIGHTS_FILE).exists()]
    if not found:
        raise UserError(f"{directory} holds no trained layers (no seed_<s>/layer_<L>/{WEIGHTS_FILE}); pass the "
                        f"directory `train fit --out` wrote")
    return found


def run_name(directory: Path) -> str:
    """A run is named by its directory."""
    return directory.resolve().name


def _model_mismatch(want: dict[str, Any], got: dict[str, Any]) -> str | None:
    for key in _IDENTITY_KEYS:
        if want.get(key) is not None and got.get(key) is not None and want[key] != got[key]:
            return f"{key} {got[key]!r} vs {want[key]!r}"
    return None


def check_model(info: LayerInfo, store: ActivationStore, store_path: str, where: Path) -> None:
    """The checkpoint must come from activations of the store's model (identity recorded by harvest)."""
    want = store.attrs.get("model") or {}
    theirs = info.model
    if not theirs and info.store and info.store != str(store_path):  # only the store was recorded: ask it
        try:
            theirs = ActivationStore.open(info.store, require_complete=False).attrs.get("model") or {}
        except UserError:
            theirs = {}
    diff = _model_mismatch(want, theirs)
    if diff:
        raise UserError(f"{where} was trained on activations of model {theirs.get('name')!r}, but store "
                        f"{store_path} holds model {want.get('name')!r} ({diff}); evaluate it on a store of "
                        f"its own model")


def load_run(directory: Path, store: ActivationStore, store_path: str) -> list[LayerCheckpoint]:
    """Every trained layer of a run, checked against the store (layer, d_in, model)."""
    out = []
    name = run_name(directory)
    for seed, layer, path in layer_dirs(directory):
        info = LayerInfo.read(path)
        problem = layer_problem(path)
        if problem:
            raise UserError(f"checkpoint {path} is not whole ({problem}); re-train it: `train fit --out {directory} "
                            f"--layers {layer} --overwrite` with the run's other settings")
        sae = SAE.load(path).eval().requires_grad_(False)
        head = ContrastiveHead.load(path).eval().requires_grad_(False) if (path / HEAD_FILE).exists() else None
        if layer not in store.layers:
            raise UserError(f"{path} is an SAE for layer {layer}, but store {store_path} has layers {store.layers}")
        if sae.d_in != store.d_model:
            raise UserError(f"{path} takes inputs of width d_in={sae.d_in}, but store {store_path} has "
                            f"d_model={store.d_model}: the checkpoint is for another model")
        if (info.seed, info.layer) != (seed, layer):
            raise UserError(f"{path} says it was trained with seed {info.seed} on layer {info.layer}, not seed "
                            f"{seed}, layer {layer}; move it back to seed_{info.seed}/layer_{info.layer}")
        check_model(info, store, store_path, path)
        out.append(LayerCheckpoint(name, seed, layer, path, sae, head, info))
    return out


@dataclass(frozen=True)
class Layout:
    """What is compared: runs in the order given (the last is the reference), their common seeds and layers."""

    runs: list[str]
    seeds: list[int]
    layers: list[int]

    @property
    def reference(self) -> str | None:
        return self.runs[-1] if len(self.runs) > 1 else None

    def key(self, run: str, seed: int, layer: int) -> str:
        return f"{run}/seed_{seed}/layer_{layer}"


def layout(ckpts: list[LayerCheckpoint]) -> Layout:
    """Every run must hold the same (seed, layer) SAEs, else comparisons would pair unlike things: one-line error
    naming what is missing where."""
    runs = list(dict.fromkeys(c.run for c in ckpts))
    have = {r: {(c.seed, c.layer) for c in ckpts if c.run == r} for r in runs}
    union = set().union(*have.values())
    missing = {r: sorted(union - h) for r, h in have.items() if union - h}
    if missing:
        def lacks(m: list[tuple[int, int]]) -> str:
            seeds = sorted({s for s, _ in m})
            return ", ".join(f"seed {s} (layers {' '.join(str(lay) for t, lay in m if t == s)})" for s in seeds)

        where = "; ".join(f"run {r} lacks {lacks(m)}" for r, m in missing.items())
        raise UserError(f"the runs do not hold the same seeds and layers ({where}); train the missing ones "
                        f"(`train fit --resume` with the same seeds) or evaluate runs trained alike")
    return Layout(runs, sorted({s for s, _ in union}), sorted({lay for _, lay in union}))
