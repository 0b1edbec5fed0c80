"""`train fit`: check everything up front, then train one CSAE per layer.

All checks (store, layers, output directory, resume compatibility) run before the first step of the
first layer, so bad input fails fast and overwrites nothing.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from csae.shared.checkpoint import LayerInfo, is_complete, layer_dir
from csae.shared.config.base import to_dict
from csae.shared.config.train import TrainConfig
from csae.shared.errors import UserError
from csae.shared.models import resolve_device, resolve_dtype
from csae.shared.schema import ActivationStore
from csae.train.checkpoint import STATE_FILE, load_state
from csae.train.loader import ChunkLoader, NonFiniteActivations
from csae.train.trainer import DATA, CSAETrainer, Runtime, derive_seed, train_layer

log = logging.getLogger(__name__)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """The config with `auto` device and dtype replaced by what they mean on this machine (saved so)."""
    device = str(resolve_device(cfg.device))
    return replace(cfg, device=device, dtype=resolve_dtype(cfg.dtype, device))


def runtime(cfg: TrainConfig, rank: int = 0, world: int = 1) -> Runtime:
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    return Runtime(device=dev, autocast_dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else None,
                   rank=rank, world=world)


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"cannot write to output directory {out} ({err.strerror or err}); choose another --out") \
            from None


def plan(cfg: TrainConfig, store: ActivationStore, store_path: str | Path, layers: Sequence[int], out: Path, *,
         resume: bool, overwrite: bool) -> list[tuple[int, int, dict[str, Any] | None]]:
    """(seed, layer, saved state or None) per SAE still to train; raises UserError for any bad input."""
    for layer in layers:
        store.acts(layer)  # UserError naming the store's layers
    train_rows = store.heldout_start(cfg.heldout_tail_fraction)
    if train_rows < cfg.batch_size:
        raise UserError(f"store {store_path} has {train_rows} training rows (after holding out "
                        f"{cfg.heldout_tail_fraction:.0%}), fewer than batch_size {cfg.batch_size}")
    check_writable(out)
    todo = []
    for seed, layer in itertools.product(cfg.seeds, layers):
        d = layer_dir(out, seed, layer)
        existing = d.exists() and any(d.iterdir())
        if existing and not (resume or overwrite):
            raise UserError(f"{d} already holds a run; pass --resume to continue it or --overwrite to replace it")
        if overwrite and not resume:
            todo.append((seed, layer, None))
            continue
        if resume and is_complete(d):
            continue
        state = load_state(d) if resume else None
        if state is not None:
            if state["d_in"] != store.d_model:
                raise UserError(f"cannot resume {d / STATE_FILE}: it was trained on d_in={state['d_in']} but "
                                f"layer {layer} of {store_path} has d_model={store.d_model}")
            # the list of seeds may grow between runs; everything else must be what the state was trained with
            changed = sorted(k for k, v in to_dict(cfg).items() if k != "seeds" and state["config"].get(k) != v)
            if changed:
                raise UserError(f"cannot resume {d}: settings differ from the checkpoint's in {changed}; "
                                f"resume with the original settings")
        todo.append((seed, layer, state))
    return todo


def fit(cfg: TrainConfig, store_path: str | Path, out: Path, *, layers: Sequence[int] = (), resume: bool = False,
        overwrite: bool = False, rank: int = 0, world: int = 1, progress: bool = True,
        stop_at: int | None = None, on_resample: Any = None) -> dict[tuple[int, int], dict[str, float]]:
    """Train one SAE per seed and layer (all the store's layers when `layers` is empty) into
    out/seed_<s>/layer_<L>; returns each one's last training metrics, keyed (seed, layer).

    `auto` device and dtype are resolved here (see `resolve`), so a config built in Python works as is."""
    cfg = resolve(cfg)
    if rank == 0:
        for warning in cfg.warnings():
            log.warning(warning)
        log.info("training %d steps per seed and layer, seeds %s, dtype %s, device %s, %d rank(s)", cfg.steps,
                 list(cfg.seeds), cfg.dtype, cfg.device, world)
    store = ActivationStore.open(store_path)
    layers = list(layers) or store.layers
    todo = plan(cfg, store, store_path, layers, out, resume=resume, overwrite=overwrite)
    rt = runtime(cfg, rank, world)
    results = {}
    for seed, layer, state in todo:
        d = layer_dir(out, seed, layer)
        if overwrite and state is None and rank == 0 and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        results[seed, layer] = _fit_one(cfg, store, str(store_path), d, seed, layer, state, rt, progress=progress,
                                        stop_at=stop_at, on_resample=on_resample)
    return results


def _fit_one(cfg: TrainConfig, store: ActivationStore, store_path: str, d: Path, seed: int, layer: int,
             state: dict[str, Any] | None, rt: Runtime, **loop: Any) -> dict[str, float]:
    """Train (or resume) the SAE of one seed and layer in directory `d`."""
    scale = math.sqrt(store.d_model) / store.mean_norm(layer)
    start = int(state["step"]) if state else 0
    trainer = CSAETrainer(cfg, store.d_model, rt, seed)
    loader = ChunkLoader(store, layer, batch_size=cfg.batch_size, train_rows=store.heldout_start(
        cfg.heldout_tail_fraction), scale=scale, seed=derive_seed(seed, DATA, layer), shuffle_rows=cfg.shuffle_rows,
        in_memory_max_bytes=cfg.in_memory_max_mb << 20,
        rank=rt.rank, world=rt.world, start_step=start, device=rt.device)
    if state:
        trainer.load_state_dict(state)
    else:
        try:
            trainer.init_b_dec_(loader.sample(4096))
        except NonFiniteActivations as err:
            raise UserError(f"layer {layer}, step 0: {err}; re-harvest the store") from None
    info = LayerInfo(config=cfg, seed=seed, layer=layer, store=store_path, model=store.attrs.get("model") or {},
                     scale=scale, d_in=store.d_model, d_sae=trainer.sae.d_sae, train_rows=loader.train_rows)
    return train_layer(cfg, trainer, loader, d, info, start_step=start, **loop)
