"""`evaluate run`: every metric family for every trained SAE of one or more runs, their intervals and the paired
comparisons of runs at matched L0 (each pair A, B of `Layout.comparisons`: by default every run against the
reference, the last run given, then every pair of the other runs), written to an output directory.

    <out>/metrics.json      headline figures per run and layer (seed mean, <name>_lo, <name>_hi) and the
                            verdicts "<A>_vs_<B>/layer_<L>" of each pair (DVC metrics)
    <out>/comparison.json   per pair, layer and headline figure: both runs' values, A - B with its paired
                            interval, direction of "better", verdict; the pairs; and how the intervals were formed
    <out>/metrics_all.json  every figure: per run and layer with intervals, and per seed (point values, counts)
    <out>/probing.json      per SAE and topic, the features sparse probing chose at the largest k (the browser's)
    <out>/unlearning.json   the unlearning sweep, chosen setting and test results per SAE
    <out>/report.md         the verdict table first, then the figures with intervals, counts, time, plots
    <out>/*.png, <out>/plots/{training,unlearning}/*.csv   plots (evaluate/report/markdown.py, evaluate/report/plots.py)
    <out>/eval_config.json  the EvalConfig used, the store and the checkpoint directories, timings

`evaluate_to` builds these beside an existing `<out>` and swaps them in whole when all are written (under
the directory's writer lock); what else `<out>` holds (a feature browser in eval/browser) stays. JSON keys
are sorted, so identical runs give identical bytes (but for eval_config.json's timings).

Families (one module each, each takes its inputs and returns figures): reconstruction/sparsity
(reconstruction.py), contrastive with decoder geometry (contrastive.py, features.py), topic (topic.py) --
composed over the store's held-out rows in store_metrics.py --, sparse probing and TPP over the store's
documents (probing.py, tpp.py; probing.json: the features the probes chose per topic), downstream
(downstream.py), unlearning (unlearning.py), statistics (stats.py).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csae.evaluate.families.downstream import downstream
from csae.evaluate.families.probing import probing_family
from csae.evaluate.families.store import store_families
from csae.evaluate.families.temporal import blocks_of
from csae.evaluate.families.unlearning.protocol import unlearning
from csae.evaluate.frontier import Matched, matched, summarize_points
from csae.evaluate.inputs import LayerCheckpoint, Layout, layout, load_run
from csae.evaluate.lm.passes import load_lm
from csae.evaluate.lm.text import TextSource
from csae.evaluate.report.columns import BOUNDS, DIRECTION, HEADLINE
from csae.evaluate.report.frontier import write_frontier
from csae.evaluate.report.markdown import write_report
from csae.evaluate.report.plots import write_curves, write_plots
from csae.evaluate.stats import FamilyResult, Interval, Summary, verdict
from csae.shared.config.base import to_dict
from csae.shared.config.evaluate import EvalConfig
from csae.shared.device import resolve_dtype
from csae.shared.errors import UserError
from csae.shared.files import dump_json, staged_outputs
from csae.shared.lm.corpora import check_local
from csae.shared.lm.models import LoadedModel
from csae.shared.store.schema import ActivationStore

log = logging.getLogger(__name__)


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


#: What `evaluate run` writes into its --out (name patterns); everything else there is left as it is.
OUTPUTS = ("metrics.json", "comparison.json", "metrics_all.json", "unlearning.json", "eval_config.json", "report.md",
           "*.png", "plots")


def evaluate_to(cfg: EvalConfig, store_path: str | Path, checkpoint_dirs: list[Path], out: Path,
                **kw: Any) -> dict[str, dict[str, Any]]:
    """`evaluate`, holding `out`'s lock, into a new directory that replaces the old results only when complete."""
    with staged_outputs(Path(out), OUTPUTS, command="evaluate run") as new:
        return evaluate(cfg, store_path, checkpoint_dirs, new, **kw)


def evaluate(cfg: EvalConfig, store_path: str | Path, checkpoint_dirs: list[Path], out: Path, *, cache_dir: Path,
             progress: bool = True, lm: LoadedModel | None = None) -> dict[str, dict[str, Any]]:
    """Compute every family, the intervals and the comparison, write the output directory; returns what
    metrics_all.json holds."""
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, cfg.device))  # recorded as resolved in eval_config.json
    store = ActivationStore.open(store_path)
    ckpts = load_checkpoints(store, store_path, checkpoint_dirs)
    lay = layout(ckpts, cfg.pairs)
    if cfg.ce_tokens or cfg.unlearn_known:
        check_local(text_source(store, cfg).dataset)  # before the model loads
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    results, densities = store_families(store, ckpts, cfg, progress)
    timings["store_families_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probing, chosen = probing_family(store, ckpts, cfg, progress, blocks_of(ckpts, densities))
    results += probing
    dump_json(out / "probing.json", chosen, indent=1)
    timings["probing_s"] = time.perf_counter() - t0
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
            at = [c for c in ckpts if (cfg.unlearn_points == "all" or c.point in lay.main_points)
                  and (not cfg.unlearn_layers or c.layer in cfg.unlearn_layers)]
            if not at:
                log.warning("unlearning skipped: no checkpoint at unlearn_layers %s (the layers evaluated: %s)",
                            list(cfg.unlearn_layers), lay.layers)
            found = unlearning(lm, at, src, cfg, progress, timings) if at else None
            if found is not None:
                results.append(found[0])
                points = found[1]
            timings["unlearning_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stat = {"n_resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence, "seed": cfg.seed, "bounds": BOUNDS}
    summary = summarize_points(results, lay, **stat)  # type: ignore[arg-type]
    match = matched(results, lay, summary, **stat)  # type: ignore[arg-type]
    timings["statistics_s"] = time.perf_counter() - t0
    everything = write_json(out, summary, match, lay, cfg, results)
    dump_json(out / "unlearning.json", points, indent=1)
    dump_json(out / "eval_config.json", {"config": to_dict(cfg), "store": str(store_path),
                                          "checkpoints": [str(d) for d in checkpoint_dirs], "timings": timings})
    plots = write_plots(out, densities, points, cfg.retain_accuracy) + write_curves(out, ckpts, points)
    plots = write_frontier(out, summary, lay) + plots
    write_report(out / "report.md", summary, match, lay, cfg, plots, timings, store_path)
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


def write_json(out: Path, summary: Summary, match: Matched, lay: Layout, cfg: EvalConfig,
               results: list[FamilyResult]) -> dict[str, dict[str, Any]]:
    """metrics.json (headline + matched verdicts), comparison.json and metrics_all.json; returns metrics_all."""
    headline = [c.name for c in HEADLINE]
    metrics: dict[str, Any] = {}
    everything: dict[str, Any] = {}
    for (series, layer), pooled in summary.pooled.items():
        metrics[f"{series}/layer_{layer}"] = _with_interval(pooled, headline)
        everything[f"{series}/layer_{layer}"] = {**_with_interval(pooled), **_finite(summary.counts[series, layer])}
    comparison: dict[str, Any] = {"reference": lay.reference, "pairs": [list(p) for p in lay.comparisons],
                                  "method": method(cfg, lay, match)}
    for (a, b, point, layer), diffs in match.diffs.items():
        cells = _cells(summary, match, lay, (a, b), point, layer, diffs, headline)
        where = f"{point}/layer_{layer}" if point else f"layer_{layer}"
        comparison.setdefault(f"{a}_vs_{b}", {})[where] = cells
        metrics[f"{a}_vs_{b}/{where}"] = {k: v["verdict"] for k, v in cells.items() if k != "at_l0"}
    for key, values in summary.per_seed.items():
        everything[key] = _finite(values)
    dump_json(out / "metrics.json", metrics)
    dump_json(out / "comparison.json", comparison)
    dump_json(out / "metrics_all.json", everything)
    return everything


def _cells(summary: Summary, match: Matched, lay: Layout, pair: tuple[str, str], point: str, layer: int,
           diffs: dict[str, Interval], headline: list[str]) -> dict[str, Any]:
    """comparison.json's cells of one pair (run A, run B) at (point, layer): the L0 compared at, then per headline
    figure both runs' values (A's only where it was measured there, not interpolated), A - B and the verdict."""
    run, ref = pair
    l0_run, l0_ref = match.l0[run, ref, point, layer]
    cells: dict[str, Any] = {"at_l0": _finite({run: l0_run, ref: l0_ref})}
    for name in (n for n in headline if n in diffs):
        d, ours = diffs[name], summary.pooled.get((lay.series(run, point), layer), {}).get(name)
        cells[name] = _finite({
            "higher_is_better": DIRECTION[name], "diff": d.value, "diff_lo": d.lo, "diff_hi": d.hi,
            ref: summary.pooled[lay.series(ref, point), layer][name].value,
            run: ours.value if ours is not None and not match.method.startswith("interp") else None,
            "verdict": verdict(d, bool(DIRECTION[name])) if math.isfinite(d.value) else "not comparable"})
    return cells


def method(cfg: EvalConfig, lay: Layout, match: Matched) -> dict[str, Any]:
    """How the intervals and verdicts were formed (written next to them)."""
    return {"interval": f"{cfg.confidence:.0%} percentile bootstrap, {cfg.bootstrap_resamples} replicates; figures "
                        "with a bounded range (cosines, fractions, accuracies) resampled on the logit of their "
                        "position in it, so intervals stay inside the range",
            "resampled": "documents (clusters; forget and retain documents separately) and training seeds, with "
                         "replacement; runs paired (same documents and seeds in every run and point)",
            "seeds": lay.seeds, "points": lay.points,
            "comparison": "each pair A_vs_B: A minus B at matched L0 (pairs: evaluate's `pairs`; by default each "
                          "run minus the reference, the last --checkpoints, then each pair of the other runs): "
                          + match.method,
            "verdict": "better/worse when the paired interval excludes 0 (direction per figure), else no detectable "
                       "difference; 'not comparable' where B's L0 lies outside A's swept range"}
