"""The Python API: the three stages and a loader, with the defaults the command line uses.

    from csae.api import harvest, train, evaluate, load_sae

    store = harvest("acts.zarr", tokens=20_000, layers=(8,))             # any HarvestConfig field
    train("acts.zarr", "checkpoints/csae")                               # any TrainConfig field
    train("acts.zarr", "checkpoints/baseline", alpha=0.0, beta=0.0)      # the plain-SAE baseline
    metrics = evaluate("acts.zarr", ["checkpoints/csae", "checkpoints/baseline"], "eval")
    sae, head, info = load_sae("checkpoints/csae/seed_0/layer_8")
    features = sae.encode(store.read(8, 0, 1024).float())

Each function takes a config (or builds one from the defaults) and keyword overrides of its fields; `auto`
device and dtype resolve to this machine, converted models are cached where the CLI caches them
($CSAE_CACHE_DIR, else $XDG_CACHE_HOME/csae, else ~/.cache/csae). Progress bars show by default; log
messages go to the `csae` logger (call `logging.basicConfig(level=logging.INFO)` to see them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from csae.shared.config.base import from_dict, to_dict
from csae.shared.config.evaluate import EvalConfig
from csae.shared.config.harvest import HarvestConfig
from csae.shared.config.train import TrainConfig, preset
from csae.shared.entry import cache_dir
from csae.shared.sae.autoencoder import SAE
from csae.shared.sae.checkpoint import LayerInfo, load_layer
from csae.shared.sae.head import ContrastiveHead
from csae.shared.store.schema import ActivationStore

__all__ = ["EvalConfig", "HarvestConfig", "TrainConfig", "evaluate", "harvest", "load_sae", "train"]

C = TypeVar("C")


def _config(cls: type[C], cfg: C | None, overrides: dict[str, Any]) -> C:
    """`cfg` (or the defaults) with `overrides` applied, validated and with lists made tuples."""
    base = to_dict(cfg) if cfg is not None else {}
    return from_dict(cls, {**base, **overrides})


def harvest(store: str | Path, cfg: HarvestConfig | None = None, *, overwrite: bool = False, progress: bool = True,
            **overrides: Any) -> ActivationStore:
    """Run the model over the corpus and write (or resume, or keep) the activation store; returns it opened."""
    from csae.harvest.run import harvest as run

    return run(_config(HarvestConfig, cfg, overrides), store, cache_dir=cache_dir(), overwrite=overwrite,
               progress=progress)


def train(store: str | Path, out: str | Path, cfg: TrainConfig | None = None, *, preset_name: str = "default",
          layers: Sequence[int] = (), resume: bool = False, overwrite: bool = False, progress: bool = True,
          **overrides: Any) -> dict[tuple[int, int], dict[str, float]]:
    """Train one CSAE per seed and layer (all the store's layers by default) into `out`/seed_<s>/layer_<L>;
    returns each one's last training metrics, keyed (seed, layer). Without `cfg`, settings start from the
    preset `preset_name` (default or paper)."""
    from csae.train.run import fit

    config = _config(TrainConfig, cfg, overrides) if cfg is not None else preset(preset_name, **overrides)
    return fit(config, store, Path(out), layers=layers, resume=resume, overwrite=overwrite, progress=progress)


def evaluate(store: str | Path, checkpoints: Sequence[str | Path], out: str | Path = "eval",
             cfg: EvalConfig | None = None, *, progress: bool = True, **overrides: Any) -> dict[str, dict[str, Any]]:
    """Evaluate every trained SAE of each checkpoint directory (a run each; the last is the reference: by default
    every run is compared with it, then every pair of the others, `pairs` chooses) and write `out`; returns
    metrics_all.json: {"<run>/layer_<L>": {figure: seed mean,
    figure_lo, figure_hi}, "<run>/seed_<s>/layer_<L>": {figure: value}}."""
    from csae.evaluate.run import evaluate_to as run

    return run(_config(EvalConfig, cfg, overrides), store, [Path(c) for c in checkpoints], Path(out),
               cache_dir=cache_dir(), progress=progress)


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> tuple[SAE, ContrastiveHead, LayerInfo]:
    """A trained layer: the SAE (taking raw activations), its contrastive head, and how it was trained."""
    return load_layer(directory, device=device)
