"""Plots (matplotlib, Agg backend) and the human-readable report.md."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from csae.shared.config.evaluate import EvalConfig

#: (metric key, column title, format) of the report's main table.
COLUMNS = [
    ("explained_variance", "expl. var", "{:.3f}"), ("fvu", "FVU", "{:.3f}"), ("cosine", "cos", "{:.3f}"),
    ("relative_bias", "rel. bias", "{:.3f}"), ("l2_ratio", "l2 ratio", "{:.3f}"), ("ce_score", "CE score", "{:.3f}"),
    ("kl_score", "KL score", "{:.3f}"), ("ce_loss_increase", "dCE (nats)", "{:.3f}"), ("l0", "L0", "{:.1f}"),
    ("dead_fraction", "dead", "{:.3f}"), ("dense_fraction_0.01", "dense>1%", "{:.3f}"),
    ("heldout_infonce", "InfoNCE", "{:.3f}"), ("heldout_sim_gap", "sim gap", "{:.3f}"),
    ("dec_mean_abs_cos", "dec mean|cos|", "{:.3f}"), ("dec_max_cos", "dec max cos", "{:.3f}"),
    ("coactivation_mean_abs_corr", "coact |corr|", "{:.3f}"), ("topic_entropy_ratio", "topic H ratio", "{:.3f}"),
    ("topic_specific_fraction", "topic-specific", "{:.3f}"),
    ("unlearn_U", "U", "{:.3f}"), ("unlearn_U_minus_random", "U - U_rand", "{:.3f}"),
    ("unlearn_U_CE", "U_CE", "{:.3f}"), ("unlearn_U_CE_minus_random", "U_CE - rand", "{:.3f}"),
]


def _layer_of(key: str) -> int:
    match = re.search(r"layer_(\d+)$", key)
    return int(match.group(1)) if match else -1


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out: Path, densities: dict[str, np.ndarray], points: dict[str, Any]) -> list[Path]:
    """One log-density histogram and one unlearning sweep plot per layer, runs overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_layer: dict[int, list[str]] = defaultdict(list)
    for key in densities:
        by_layer[_layer_of(key)].append(key)
    for layer, keys in sorted(by_layer.items()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.linspace(-7, 0, 57)
        for key in keys:
            d = densities[key]
            live = d[d > 0]
            ax.hist(np.log10(live), bins=bins, histtype="step", linewidth=1.5,
                    label=f"{key.rsplit('/', 1)[0]} ({(d == 0).sum()} dead of {len(d)})")
        ax.set_xlabel("log10 firing density (held-out tokens)")
        ax.set_ylabel("features")
        ax.set_title(f"Feature density, layer {layer}")
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out / f"density_layer_{layer}.png"))

        sweeps = [(k, points[k]) for k in keys if k in points]
        if not sweeps:
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        for (key, pts), color in zip(sweeps, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
            run = key.rsplit("/", 1)[0]
            for kind, marker, fill in (("selected", "o", color), ("random", "x", color)):
                p = pts.get(kind) or []
                if p:
                    ax.scatter([q["A_retain"] for q in p], [q["A_forget"] for q in p], marker=marker, s=22,
                               color=fill, alpha=0.75, label=f"{run} {kind}")
        ax.axvline(0.99, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("A_retain (known retain tokens kept)")
        ax.set_ylabel("A_forget (known forget tokens kept)")
        ax.set_title(f"Unlearning sweep, layer {layer}")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / f"unlearning_layer_{layer}.png"))
    return written


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value) if isinstance(value, (int, float)) else str(value)


def write_report(path: Path, metrics: dict[str, dict[str, Any]], cfg: EvalConfig, plots: list[Path],
                 timings: dict[str, float], store: Path) -> None:
    """A markdown report: main metrics side by side per layer, token counts, plots."""
    keys = sorted(metrics, key=lambda k: (_layer_of(k), k))
    cols = [c for c in COLUMNS if any(c[0] in metrics[k] for k in keys)]
    lines = ["# Evaluation report", "", f"Store: `{store}`. Formulas: the Metrics section of the README.", ""]
    lines += ["| run/layer | " + " | ".join(c[1] for c in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_cell(metrics[k].get(c[0]), c[2]) for c in cols) + " |")
    first = metrics[keys[0]] if keys else {}
    lines += ["", "## Tokens per metric", "",
              f"- reconstruction, sparsity, co-activation, topic purity: {first.get('eval_rows', '-')} held-out "
              f"store rows per layer (`recon_tokens` = {cfg.recon_tokens})",
              f"- held-out InfoNCE: {first.get('contrastive_pairs', '-')} context pairs in batches of "
              f"{cfg.contrastive_batch}",
              f"- downstream CE/KL: {first.get('ce_predictions', '-')} next-token predictions of held-out corpus text "
              f"(`ce_tokens` = {cfg.ce_tokens})",
              f"- unlearning: {cfg.select_tokens} selection tokens each of forget and retain text; "
              f"{first.get('unlearn_forget_predictions', '-')} forget and "
              f"{first.get('unlearn_retain_predictions', '-')} retain predictions for the sweep "
              f"({first.get('unlearn_forget_known', '-')} / {first.get('unlearn_retain_known', '-')} known tokens); "
              f"{len(cfg.retain_thresholds) * len(cfg.ns) * len(cfg.cs)} sweep points"
              f"{' plus as many for the random control' if cfg.random_control else ''}", ""]
    if timings:
        lines += ["## Time", "", ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path.write_text("\n".join(lines))
