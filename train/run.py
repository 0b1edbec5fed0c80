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
from typing import Any, Literal

import torch

from csae.shared.config.base import check_distinct, to_dict
from csae.shared.config.train import TrainConfig
from csae.shared.device import resolve_device, resolve_dtype
from csae.shared.errors import UserError
from csae.shared.files import disk_full_as_error, replace_dir, sweep_temp
from csae.shared.locks import Lock
from csae.shared.ranks import Ranks
from csae.shared.sae.checkpoint import LayerInfo, is_complete, layer_dir, layer_problem
from csae.shared.store.schema import ActivationStore
from csae.train.loader import ChunkLoader, NonFiniteActivations
from csae.train.runtime import Runtime
from csae.train.seeds import DATA, derive_seed
from csae.train.state import STATE_FILE, load_state
from csae.train.trainer import CSAETrainer, train_layer

log = logging.getLogger(__name__)

Distribute = Literal["data", "layers"]


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
    """(seed, layer, saved state or None) per SAE still to train; raises UserError for any bad input. With
    `resume`, a finished layer that is not whole (a file missing, damaged or of the wrong shape) is re-trained."""
    check_distinct("--layers", list(layers))
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
            problem = layer_problem(d)
            if problem is None:
                continue
            log.warning("finished layer %s is not whole (%s); re-training it from the start", d, problem)
            todo.append((seed, layer, None))
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


#: Where `--overwrite` trains the replacements, inside the run directory (evaluate ignores hidden directories).
STAGING = ".overwrite"


def fit(cfg: TrainConfig, store_path: str | Path, out: Path, *, layers: Sequence[int] = (), resume: bool = False,
        overwrite: bool = False, rank: int = 0, world: int = 1, progress: bool = True,
        stop_at: int | None = None, on_resample: Any = None, distribute: Distribute = "data",
        launcher_pid: int | None = None) -> dict[tuple[int, int], dict[str, float]]:
    """Train one SAE per seed and layer (all the store's layers when `layers` is empty) into
    out/seed_<s>/layer_<L>; returns each one's last training metrics, keyed (seed, layer).

    Under torchrun (`world` > 1), `distribute` picks what the ranks share: "data" (every SAE is trained by all
    ranks on disjoint chunks, gradients averaged) or "layers" (each rank trains whole SAEs of its own, exactly
    as a single process would). Rank 0 holds the run directory's lock for all of them. With `overwrite`, new
    SAEs are trained beside the old ones and swapped in only when all are finished.

    `auto` device and dtype are resolved here (see `resolve`), so a config built in Python works as is."""
    cfg = resolve(cfg)
    ranks = Ranks(rank=rank, world=world, launcher_pid=launcher_pid)
    lock = Lock(out, command="train fit", pid=launcher_pid, ranks=world, what="output directory", option="--out")
    ranks.first(lambda: bool(lock.acquire()))
    try:
        return _fit_locked(cfg, store_path, out, layers, resume, overwrite, ranks, distribute, progress=progress,
                           stop_at=stop_at, on_resample=on_resample)
    except KeyboardInterrupt:
        if overwrite and not resume:
            raise UserError(f"interrupted; the previous results in {out} are untouched: run the same command again "
                            f"to start the replacement over") from None
        raise UserError(f"interrupted; finished layers and the last checkpoint of each unfinished one (every "
                        f"{cfg.checkpoint_every} steps) are kept in {out}: continue with the same command plus "
                        f"--resume") from None
    finally:
        lock.release()


def _fit_locked(cfg: TrainConfig, store_path: str | Path, out: Path, layers: Sequence[int], resume: bool,
                overwrite: bool, ranks: Ranks, distribute: Distribute, **loop: Any) -> dict[tuple[int, int],
                                                                                              dict[str, float]]:
    store = ActivationStore.open(store_path)
    layers = list(layers) or store.layers
    ranks.first(lambda: _sweep(out))
    todo = plan(cfg, store, store_path, layers, out, resume=resume, overwrite=overwrite)  # errors before plans
    if ranks.main:
        for warning in cfg.warnings():
            log.warning(warning)
        log.info("training %d steps per seed and layer, seeds %s, dtype %s, device %s, %d rank(s)%s", cfg.steps,
                 list(cfg.seeds), cfg.dtype, cfg.device, ranks.world,
                 f" ({distribute}-parallel)" if ranks.distributed else "")
    staged = overwrite and not resume
    by_layer = distribute == "layers" and ranks.distributed
    rt = runtime(cfg, 0, 1) if by_layer else runtime(cfg, ranks.rank, ranks.world)
    if by_layer and rt.device.type == "cuda":
        rt = replace(rt, device=torch.device("cuda", ranks.rank % torch.cuda.device_count()))
    untouched = f"the previous results in {out} are untouched"
    results = {}
    try:
        for seed, layer, state in (todo[ranks.rank::ranks.world] if by_layer else todo):
            d = layer_dir(out / STAGING if staged else out, seed, layer)
            d.mkdir(parents=True, exist_ok=True)
            with disk_full_as_error(d, fix="then continue with the same command plus --resume"):
                results[seed, layer] = _fit_one(cfg, store, str(store_path), d, seed, layer, state, rt, **loop)
        if by_layer:
            results = {k: v for part in ranks.gather(results) for k, v in part.items()}
        ranks.barrier()
        if staged:
            ranks.first(lambda: _swap_in(out, [(seed, layer) for seed, layer, _ in todo]))
    except UserError as err:
        raise UserError(f"{err}; {untouched}" if staged else str(err)) from None
    return results


def _sweep(out: Path) -> None:
    """Rank 0, holding the lock: what killed runs left (temporary files, an unfinished --overwrite)."""
    sweep_temp(out, ("seed_*/layer_*/.*",))
    if (out / STAGING).exists():
        log.info("removing %s, left by an interrupted --overwrite", out / STAGING)
        shutil.rmtree(out / STAGING)


def _swap_in(out: Path, keys: list[tuple[int, int]]) -> None:
    """Rank 0, once every SAE of an --overwrite run is finished: each replaces its old directory."""
    if not all(is_complete(layer_dir(out / STAGING, seed, layer)) for seed, layer in keys):
        log.warning("not every replacement in %s finished (stop_at?); the previous results stay", out / STAGING)
        return
    for seed, layer in keys:
        final = layer_dir(out, seed, layer)
        final.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(layer_dir(out / STAGING, seed, layer), final)
    shutil.rmtree(out / STAGING)


def _fit_one(cfg: TrainConfig, store: ActivationStore, store_path: str, d: Path, seed: int, layer: int,
             state: dict[str, Any] | None, rt: Runtime, **loop: Any) -> dict[str, float]:
    """Train (or resume) the SAE of one seed and layer in directory `d`."""
    scale = math.sqrt(store.d_model) / store.mean_norm(layer)
    start = int(state["step"]) if state else 0
    trainer = CSAETrainer(cfg, store.d_model, rt, seed)
    loader = ChunkLoader(store, layer, batch_size=cfg.batch_size, train_rows=store.heldout_start(
        cfg.heldout_tail_fraction), scale=scale, seed=derive_seed(seed, DATA, layer), shuffle_rows=cfg.shuffle_rows,
        in_memory_max_bytes=cfg.in_memory_max_mb << 20,
        rank=rt.rank, world=rt.world, start_step=start, device=rt.device, adjacent=cfg.positives == "adjacent")
    if state:
        trainer.load_state_dict(state)
    else:
        try:
            trainer.model.init_b_dec_(loader.sample(4096))
        except NonFiniteActivations as err:
            raise UserError(f"layer {layer}, step 0: {err}; re-harvest the store") from None
    info = LayerInfo(config=cfg, seed=seed, layer=layer, store=store_path, model=store.attrs.get("model") or {},
                     scale=scale, d_in=store.d_model, d_sae=trainer.sae.d_sae, train_rows=loader.train_rows)
    return train_layer(cfg, trainer, loader, d, info, start_step=start, **loop)
