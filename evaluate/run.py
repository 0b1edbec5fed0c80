"""`evaluate run`: every metric family for every trained SAE of one or more runs, their intervals and the paired
comparison of each run with the reference (the last run given), written to an output directory.

    <out>/metrics.json      headline figures per run and layer (seed mean, <name>_lo, <name>_hi) and the
                            verdicts "<run>_vs_<reference>/layer_<L>" (DVC metrics)
    <out>/comparison.json   per layer and headline figure: run, reference, difference with its paired interval,
                            direction of "better", verdict; and how the intervals were formed
    <out>/metrics_all.json  every figure: per run and layer with intervals, and per seed (point values, counts)
    <out>/unlearning.json   the unlearning sweep, chosen setting and test results per SAE
    <out>/report.md         the verdict table first, then the figures with intervals, counts, time, plots
    <out>/*.png, <out>/plots/{training,unlearning}/*.csv   plots (evaluate/report/markdown.py, evaluate/report/plots.py)
    <out>/eval_config.json  the EvalConfig used, the store and the checkpoint directories, timings

Families (one module each, each takes its inputs and returns figures): reconstruction/sparsity
(reconstruction.py), contrastive with decoder geometry (contrastive.py, features.py), topic (topic.py) --
composed over the store's held-out rows in store_metrics.py --, downstream (downstream.py), unlearning
(unlearning.py), statistics (stats.py).
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

from csae.evaluate.families.downstream import downstream
from csae.evaluate.families.store import store_families
from csae.evaluate.families.unlearning.protocol import unlearning
from csae.evaluate.inputs import LayerCheckpoint, Layout, layout, load_run
from csae.evaluate.lm.passes import load_lm
from csae.evaluate.lm.text import TextSource
from csae.evaluate.report.columns import DIRECTION, HEADLINE
from csae.evaluate.report.markdown import write_report
from csae.evaluate.report.plots import write_curves, write_plots
from csae.evaluate.stats import FamilyResult, Summary, summarize, verdict
from csae.shared.config.base import to_dict
from csae.shared.config.evaluate import EvalConfig
from csae.shared.device import resolve_dtype
from csae.shared.errors import UserError
from csae.shared.lm.models import LoadedModel
from csae.shared.store.schema import ActivationStore


def load_checkpoints(store: ActivationStore, store_path: str | Path, dirs: list[Path]) -> list[LayerCheckpoint]:
    ckpts: list[LayerCheckpoint] = []
    for directory in dirs:
        ckpts += load_run(Path(directory), store, str(store_path))
    names = [c.key for c in ckpts]
    dup = sorted({k for k in names if names.count(k) > 1})
    if dup:
        raise UserError(f"two checkpoint directories give the same run/seed/layer {dup}; runs are named by their "
                        f"directory, so give them different directory names")
    return ckpts


def text_source(store: ActivationStore, cfg: EvalConfig) -> TextSource:
    """Held-out text of the store's corpus (or --dataset), cut with the store's context length."""
    hcfg = store.harvest_config
    return TextSource(dataset=cfg.dataset or hcfg.dataset, heldout_doc_fraction=hcfg.heldout_doc_fraction,
                      context=hcfg.context)


def evaluate(cfg: EvalConfig, store_path: str | Path, checkpoint_dirs: list[Path], out: Path, *, cache_dir: Path,
             progress: bool = True, lm: LoadedModel | None = None) -> dict[str, dict[str, Any]]:
    """Compute every family, the intervals and the comparison, write the output directory; returns what
    metrics_all.json holds."""
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, cfg.device))  # recorded as resolved in eval_config.json
    store = ActivationStore.open(store_path)
    ckpts = load_checkpoints(store, store_path, checkpoint_dirs)
    lay = layout(ckpts)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    results, densities = store_families(store, ckpts, cfg, progress)
    timings["store_families_s"] = time.perf_counter() - t0
    points: dict[str, Any] = {}
    if cfg.ce_tokens or cfg.unlearn_known:  # only then is the language model loaded
        src = text_source(store, cfg)
        t0 = time.perf_counter()
        lm = lm or load_lm(store, cache_dir, model=cfg.model, dtype=resolve_dtype(cfg.dtype, cfg.device),
                           device=cfg.device)
        timings["load_model_s"] = time.perf_counter() - t0
        if cfg.ce_tokens:
            t0 = time.perf_counter()
            results += [r for r in [downstream(lm, ckpts, src, cfg, progress, timings)] if r is not None]
            timings["downstream_s"] = time.perf_counter() - t0
        if cfg.unlearn_known:
            t0 = time.perf_counter()
            found = unlearning(lm, ckpts, src, cfg, progress, timings)
            if found is not None:
                results.append(found[0])
                points = found[1]
            timings["unlearning_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = summarize(results, lay.runs, lay.seeds, lay.layers, lay.reference,
                        n_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=cfg.seed)
    timings["statistics_s"] = time.perf_counter() - t0
    everything = write_json(out, summary, lay, cfg, results)
    (out / "unlearning.json").write_text(json.dumps(points, indent=1) + "\n")
    (out / "eval_config.json").write_text(json.dumps(
        {"config": to_dict(cfg), "store": str(store_path), "checkpoints": [str(d) for d in checkpoint_dirs],
         "timings": timings}, indent=2) + "\n")
    plots = write_plots(out, densities, points, cfg.retain_accuracy) + write_curves(out, ckpts, points)
    write_report(out / "report.md", summary, lay, cfg, plots, timings, store_path)
    return everything


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """Drop what JSON/DVC cannot hold (NaN, inf), convert numpy scalars."""
    out = {}
    for k, v in values.items():
        v = v.item() if isinstance(v, np.generic) else v
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return out


def _with_interval(values: dict[str, Any], names: list[str] | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, iv in values.items():
        if names is None or name in names:
            out.update({name: iv.value, f"{name}_lo": iv.lo, f"{name}_hi": iv.hi})
    return _finite(out)


def write_json(out: Path, summary: Summary, lay: Layout, cfg: EvalConfig,
               results: list[FamilyResult]) -> dict[str, dict[str, Any]]:
    """metrics.json (headline + verdicts), comparison.json and metrics_all.json; returns metrics_all."""
    headline = [c.name for c in HEADLINE]
    metrics: dict[str, Any] = {}
    everything: dict[str, Any] = {}
    for layer in lay.layers:
        for run in lay.runs:
            metrics[f"{run}/layer_{layer}"] = _with_interval(summary.pooled[run, layer], headline)
            everything[f"{run}/layer_{layer}"] = {**_with_interval(summary.pooled[run, layer]),
                                                  **_finite(summary.counts[run, layer])}
    comparison: dict[str, Any] = {"reference": lay.reference, "method": method(cfg, lay)}
    for (run, layer), diffs in summary.diffs.items():
        cells = {}
        for name in headline:
            if name not in diffs:
                continue
            d = diffs[name]
            cells[name] = _finite({"higher_is_better": DIRECTION[name], run: summary.pooled[run, layer][name].value,
                                   lay.reference: summary.pooled[lay.reference, layer][name].value,  # type: ignore
                                   "diff": d.value, "diff_lo": d.lo, "diff_hi": d.hi,
                                   "verdict": verdict(d, DIRECTION[name])})  # type: ignore[arg-type]
        comparison.setdefault(f"{run}_vs_{lay.reference}", {})[f"layer_{layer}"] = cells
        metrics[f"{run}_vs_{lay.reference}/layer_{layer}"] = {k: v["verdict"] for k, v in cells.items()}
    for key, values in summary.per_seed.items():
        everything[key] = _finite(values)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (out / "metrics_all.json").write_text(json.dumps(everything, indent=2) + "\n")
    return everything


def method(cfg: EvalConfig, lay: Layout) -> dict[str, Any]:
    """How the intervals and verdicts were formed (written next to them)."""
    return {"interval": f"{cfg.confidence:.0%} percentile bootstrap, {cfg.bootstrap_resamples} replicates",
            "resampled": "documents (clusters; forget and retain documents separately) and training seeds, with "
                         "replacement; runs paired (same documents and seeds in every run)",
            "seeds": lay.seeds, "comparison": "each run minus the reference run (the last --checkpoints)",
            "verdict": "better/worse when the paired interval excludes 0 (direction per figure), else no detectable "
                       "difference"}
