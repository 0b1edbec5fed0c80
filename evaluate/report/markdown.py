"""The human-readable report.md, which opens with the verdict table."""

from __future__ import annotations

import math
from pathlib import Path

from csae.evaluate.frontier import L0_AGREEMENT, Matched, l0_gaps
from csae.evaluate.inputs import Layout, layer_of
from csae.evaluate.report.columns import HEADLINE, SECONDARY, Column
from csae.evaluate.stats import Interval, Summary, verdict
from csae.shared.config.evaluate import EvalConfig


def _signed(fmt: str, value: float) -> str:
    return ("+" if value >= 0 else "") + fmt.format(value)


def _cell(iv: Interval | None, fmt: str) -> str:
    if iv is None or not math.isfinite(iv.value):
        return "-"
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return fmt.format(iv.value)
    return f"{fmt.format(iv.value)} [{fmt.format(iv.lo)}, {fmt.format(iv.hi)}]"


def verdict_table(summary: Summary, match: Matched, lay: Layout) -> list[str]:
    """Markdown, one table per pair (A, B): per headline figure and (point, layer), the verdict at matched L0 and
    the paired difference A - B with its interval."""
    lines = []
    cols = [(p, layer) for p in lay.points for layer in lay.point_layers[p]]
    gaps_all = l0_gaps(summary, lay)
    for run, ref in lay.comparisons:
        heads = [f"{p + ' ' if p else ''}L{layer} (L0 {_l0(match, (run, ref), p, layer)})" for p, layer in cols]
        lines += [f"## {run} vs {ref} at matched L0: verdicts", "",
                  f"Difference {run} - {ref} with its paired interval, compared {match.method}; a verdict "
                  "is better/worse when the interval excludes 0." + ("" if match.matched else
                  " **These runs have one sparsity point each: L0 is not matched, so a difference may be density "
                  "alone; sweep the sparsity (params.yaml `sweep`) to compare at matched L0.**"), "",
                  "| figure | better | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(cols)]
        for col in HEADLINE:
            cells = []
            for point, layer in cols:
                d = match.diffs.get((run, ref, point, layer), {}).get(col.name)
                if d is None:
                    cells.append("-")
                    continue
                if not math.isfinite(d.value):
                    cells.append("not comparable")
                    continue
                v = verdict(d, bool(col.higher_is_better))
                shown = f"**{v}**" if v != "no detectable difference" else v
                fmt = "{:.3g}"
                cells.append(f"{shown} {_signed(fmt, d.value)} [{_signed(fmt, d.lo)}, {_signed(fmt, d.hi)}]")
            better = "higher" if col.higher_is_better else "lower"
            lines.append(f"| {col.title} | {better} | " + " | ".join(cells) + " |")
        gaps = [f"{p} L{layer}: {g:+.1%}" for (a, b, p, layer), g in gaps_all.items()
                if (a, b) == (run, ref) and abs(g) > L0_AGREEMENT]
        if lay.fixed_l0:
            lines += ["", f"Held-out L0 of the two runs agree within {L0_AGREEMENT:.0%} at every point." if not gaps
                      else f"Held-out L0 differ by more than {L0_AGREEMENT:.0%} at: {', '.join(gaps)}."]
        lines.append("")
    return lines


def _l0(match: Matched, pair: tuple[str, str], point: str, layer: int) -> str:
    l0 = match.l0.get((*pair, point, layer))
    return "-" if l0 is None else f"{l0[1]:.0f}"


def figure_table(summary: Summary, lay: Layout, columns: tuple[Column, ...]) -> list[str]:
    keys = [k for p in lay.points for layer in lay.point_layers[p] for r in lay.runs
            if (k := (lay.series(r, p), layer)) in summary.pooled]  # a run kept to some layers: those
    lines = ["| figure | " + " | ".join(f"{s} L{layer}" for s, layer in keys) + " |", "|---|" + "---|" * len(keys)]
    for col in columns:
        if any(col.name in summary.pooled[k] for k in keys):
            lines.append(f"| {col.title} | " + " | ".join(_cell(summary.pooled[k].get(col.name), col.fmt)
                                                          for k in keys) + " |")
    return lines


def _counts(summary: Summary, lay: Layout, cfg: EvalConfig) -> list[str]:
    c = summary.counts[lay.series(lay.runs[0], lay.main_points[0] if lay.main_points else lay.points[0]),
                       lay.layers[0]]

    def get(name: str) -> str:
        return f"{c[name]:,.0f}" if name in c else "-"

    return [
        "## What each figure rests on", "",
        f"- {len(lay.seeds)} training seeds per run and point ({', '.join(map(str, lay.seeds))}); sparsity points "
        f"{', '.join(lay.points) or '-'} (main: {', '.join(lay.main_points) or '-'}); intervals: "
        f"{cfg.confidence:.0%} percentile bootstrap, {cfg.bootstrap_resamples} replicates, documents and seeds "
        "resampled, runs paired. Figures without document dependence (decoder geometry, topic-significant) vary "
        "by seed only; co-activation and U_rand sd have no interval.",
        f"- reconstruction, sparsity, topic, co-activation: {get('eval_rows')} held-out store rows from "
        f"{get('eval_docs')} documents per layer (`recon_tokens` = {cfg.recon_tokens}); topic: "
        f"{get('topic_features')} features firing >= {cfg.topic_min_fires} times, {cfg.topic_permutations} "
        f"permutations of the documents' topics",
        f"- held-out InfoNCE: {get('contrastive_pairs')} pairs in batches of {get('contrastive_batch_used')} distinct "
        f"sequences (chance {c.get('heldout_infonce_chance', math.nan):.3f}); fresh head: {cfg.head_steps} Adam "
        f"steps on {cfg.head_rows} training rows",
        f"- sparse probing, TPP: {get('probe_train_docs')} training and {get('probe_test_docs')} test documents of the "
        f"store (split by topic; only test documents resampled), {get('probe_topics')} topics averaged, "
        f"{get('probe_thin_topics')} left out with fewer than {cfg.probe_min_test_docs} test documents (counts per "
        "topic: metrics_all.json)",
        *([f"- high-level block (T-SAE): {get('block_features')} features per SAE, a T-SAE's prefix and, in the other "
           "runs, as many of their features matched on firing rate to it (same point and seed); smoothness over "
           f"{get('smoothness_pairs')} adjacent held-out row pairs, sparse probing within the block as over the "
           "dictionary"] if "block_features" in c else []),
        f"- downstream CE/KL: {get('ce_predictions')} predictions from {get('ce_docs')} held-out documents "
        f"(at most {cfg.ce_doc_predictions} each)",
        f"- unlearning, test split: {get('unlearn_forget_known')} known forget tokens ({get('unlearn_forget_docs')} "
        f"documents), {get('unlearn_retain_known')} known retain tokens ({get('unlearn_retain_docs')} documents); "
        f"selection split: {cfg.select_tokens} tokens and {cfg.sweep_predictions} sweep predictions per side; "
        f"retain rule A_retain >= {cfg.retain_accuracy}; control: {cfg.random_draws} matched draws; at "
        + ("every point" if cfg.unlearn_points == "all" else "the main point(s) only (unlearn_points: main)")
        + (f", layer(s) {', '.join(map(str, cfg.unlearn_layers))} only (unlearn_layers)" if cfg.unlearn_layers else ""),
        ""]


def _unlearning_choices(summary: Summary, lay: Layout) -> list[str]:
    rows = []
    for key, v in sorted(summary.per_seed.items(), key=lambda kv: (layer_of(kv[0]), kv[0])):
        if "unlearn_U" in v:
            setting = (f"tau {v['unlearn_tau']:g}, n {v['unlearn_n']:.0f}, c {v['unlearn_c']:g}"
                       if "unlearn_tau" in v else "none qualified (U = 0)")
            rows.append(f"| {key} | {setting} | {v.get('unlearn_sweep_A_forget', math.nan):.3f} / "
                        f"{v.get('unlearn_sweep_A_retain', math.nan):.3f} | {v['unlearn_U']:.3f} | "
                        f"{v.get('unlearn_A_retain', math.nan):.3f} |")
    if not rows:
        return []
    return ["## Unlearning: chosen settings", "", "| SAE | chosen on selection split | A_forget / A_retain there | "
            "U (test) | A_retain (test) |", "|---|---|---|---|---|", *rows, ""]


def write_report(path: Path, summary: Summary, match: Matched, lay: Layout, cfg: EvalConfig, plots: list[Path],
                 timings: dict[str, float], store: str | Path) -> None:
    """report.md: the frontier, the verdict table at matched L0, then every figure with its interval, what it rests
    on, time, plots."""
    compared = ", ".join(f"{a} - {b}" for a, b in lay.comparisons) or "-"
    lines = ["# Evaluation report", "", f"Store: `{store}`. Runs: {', '.join(lay.runs)} (reference: "
             f"{lay.reference or '-'}); compared: {compared}. Formulas: docs/metrics.md.", ""]
    if any(p.name == "frontier.png" for p in plots):
        lines += ["## The frontier: each figure against L0", "", "![frontier](frontier.png)", "",
                  "Seed means with their 95% bands; data: plots/frontier/*.csv.", ""]
    lines += verdict_table(summary, match, lay)
    lines += [f"## Headline figures (seed mean [{cfg.confidence:.0%} interval])", "",
              *figure_table(summary, lay, HEADLINE), "", "## Further figures", "",
              *figure_table(summary, lay, SECONDARY), ""]
    lines += _counts(summary, lay, cfg) + _unlearning_choices(summary, lay)
    if timings:
        lines += ["## Time", "", ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots if p.name != "frontier.png"] + [""]
    path.write_text("\n".join(lines))
