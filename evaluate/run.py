"""`evaluate run`: every metric for every trained layer of one or more runs, written to an output dir.

    <out>/metrics.json      {"<run>/seed_<s>/layer_<L>": {metric: number}}, the HEADLINE metrics (DVC metrics)
    <out>/metrics_all.json  the same with every metric
    <out>/unlearning.json   the unlearning sweep points per run/layer (selected and random features)
    <out>/density_layer_<L>.png, <out>/unlearning_layer_<L>.png, <out>/training_layer_<L>.png
    <out>/plots/{training,unlearning}/<run>_seed_<s>_layer_<L>.csv   plot data for DVC (evaluate/curves.py)
    <out>/report.md         side-by-side tables of the main metrics
    <out>/eval_config.json  the EvalConfig used, the store and the checkpoint directories
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from csae.evaluate.checkpoints import LayerCheckpoint, load_run
from csae.evaluate.curves import write_curves
from csae.evaluate.lm_metrics import TextSource, ce_metrics, unlearning_metrics
from csae.evaluate.report import write_plots, write_report
from csae.evaluate.store_metrics import store_metrics
from csae.shared.config.base import to_dict
from csae.shared.config.evaluate import EvalConfig
from csae.shared.errors import UserError
from csae.shared.models import LoadedModel, load_model, resolve_dtype
from csae.shared.schema import ActivationStore

#: What `dvc metrics show` prints (metrics_all.json and report.md have everything).
HEADLINE = ("explained_variance", "ce_score", "kl_score", "l0", "dead_fraction", "dec_mean_abs_cos", "heldout_infonce",
            "topic_entropy_ratio", "topic_specific_fraction", "unlearn_U", "unlearn_U_minus_random", "unlearn_U_CE",
            "unlearn_U_CE_minus_random")


def load_checkpoints(store: ActivationStore, store_path: str | Path, dirs: list[Path]) -> list[LayerCheckpoint]:
    ckpts: list[LayerCheckpoint] = []
    for directory in dirs:
        ckpts += load_run(Path(directory), store, store_path)
    names = [c.key for c in ckpts]
    dup = sorted({k for k in names if names.count(k) > 1})
    if dup:
        raise UserError(f"two checkpoint directories give the same run/layer {dup}; runs are named by their "
                        f"directory, so give them different directory names")
    return ckpts


def text_source(store: ActivationStore, cfg: EvalConfig) -> TextSource:
    """Held-out text of the store's corpus (or --dataset), cut with the store's context length."""
    hcfg = store.harvest_config
    return TextSource(dataset=cfg.dataset or hcfg.dataset, heldout_doc_fraction=hcfg.heldout_doc_fraction,
                      context=hcfg.context)


def load_lm(store: ActivationStore, cfg: EvalConfig, cache_dir: Path) -> LoadedModel:
    hcfg = store.harvest_config
    name = cfg.model or hcfg.model
    lm = load_model(name, cache_dir=cache_dir, dtype=resolve_dtype(cfg.dtype, cfg.device), device=cfg.device,
                    revision=None if cfg.model else hcfg.revision)
    if lm.d_model != store.d_model:
        raise UserError(f"model {name!r} has width {lm.d_model}, but the store's activations have {store.d_model}: "
                        f"pass the model the store was harvested with (--model)")
    too_deep = [x for x in store.layers if x >= lm.n_layers]
    if too_deep:
        raise UserError(f"model {name!r} has {lm.n_layers} blocks; the store's layers {too_deep} do not exist in it")
    return lm


def finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """Drop values JSON/DVC cannot hold (NaN, inf), convert numpy scalars."""
    out = {}
    for k, v in metrics.items():
        v = v.item() if isinstance(v, np.generic) else v
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return out


def evaluate(cfg: EvalConfig, store_path: str | Path, checkpoint_dirs: list[Path], out: Path, *, cache_dir: Path,
             progress: bool = True, lm: LoadedModel | None = None) -> dict[str, dict[str, Any]]:
    """Compute all metrics and write the output directory; returns the metrics."""
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, cfg.device))  # recorded as resolved in eval_config.json
    store = ActivationStore.open(store_path)
    ckpts = load_checkpoints(store, store_path, checkpoint_dirs)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    metrics: dict[str, dict[str, Any]] = {c.key: {} for c in ckpts}
    densities: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for ckpt in tqdm(ckpts, desc="store metrics", unit="layer", disable=not progress):
        m, densities[ckpt.key] = store_metrics(store, ckpt, cfg)
        metrics[ckpt.key].update(m)
    timings["store_metrics_s"] = time.perf_counter() - t0

    points: dict[str, Any] = {}
    if cfg.ce_tokens or cfg.unlearn_tokens:
        src = text_source(store, cfg)
        t0 = time.perf_counter()
        lm = lm or load_lm(store, cfg, cache_dir)
        timings["load_model_s"] = time.perf_counter() - t0
        if cfg.ce_tokens:
            t0 = time.perf_counter()
            for key, m in ce_metrics(lm, ckpts, src, cfg, progress).items():
                metrics[key].update(m)
            timings["downstream_s"] = time.perf_counter() - t0
        if cfg.unlearn_tokens:
            t0 = time.perf_counter()
            um, points = unlearning_metrics(lm, ckpts, src, cfg, progress)
            for key, m in um.items():
                metrics[key].update(m)
            timings["unlearning_s"] = time.perf_counter() - t0

    metrics = {k: finite(v) for k, v in metrics.items()}
    (out / "metrics_all.json").write_text(json.dumps(metrics, indent=2) + "\n")
    headline = {k: {name: v[name] for name in HEADLINE if name in v} for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(headline, indent=2) + "\n")
    (out / "unlearning.json").write_text(json.dumps(points, indent=1) + "\n")
    (out / "eval_config.json").write_text(json.dumps(
        {"config": to_dict(cfg), "store": str(store_path), "checkpoints": [str(d) for d in checkpoint_dirs],
         "timings": timings}, indent=2) + "\n")
    plots = write_plots(out, densities, points) + write_curves(out, ckpts, points)
    write_report(out / "report.md", metrics, cfg, plots, timings, store_path)
    return metrics
