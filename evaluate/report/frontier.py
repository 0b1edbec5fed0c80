"""The frontier: each headline figure against L0 (log axis), one line per run with its 95% band, one panel per layer.

    <out>/frontier.png                                   figures x layers, the first thing report.md shows
    <out>/plots/frontier/<run>_layer_<L>.csv             a row per sweep point: point, l0 and every headline figure
                                                         with <name>_lo, <name>_hi (DVC plots: x l0)
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from csae.evaluate.inputs import Layout
from csae.evaluate.report.columns import HEADLINE
from csae.evaluate.report.plots import save_figure
from csae.evaluate.stats import Summary

#: The figures drawn against L0 (every headline figure is in the CSVs).
FRONTIER = ("explained_variance", "ce_score", "heldout_infonce", "topic_excess", "dec_max_cos", "dead_fraction")
TITLES = {c.name: c.title for c in HEADLINE}


def curve(summary: Summary, lay: Layout, run: str, layer: int) -> list[dict[str, float | str]]:
    """The run's points at a layer, in order of L0: point, l0 and each headline figure with its interval."""
    rows: list[dict[str, float | str]] = []
    for point in lay.points:
        pooled = summary.pooled.get((lay.series(run, point), layer))
        if not pooled or "l0" not in pooled:
            continue
        row: dict[str, float | str] = {"point": point or "-", "l0": pooled["l0"].value}
        for col in HEADLINE:
            if col.name in pooled:
                iv = pooled[col.name]
                row.update({col.name: iv.value, f"{col.name}_lo": iv.lo, f"{col.name}_hi": iv.hi})
        rows.append(row)
    return sorted(rows, key=lambda r: float(r["l0"]))


def write_frontier(out: Path, summary: Summary, lay: Layout) -> list[Path]:
    """frontier.png and the CSVs; [] when no run has an L0 (no store families)."""
    curves = {(r, layer): rows for r in lay.runs for layer in lay.layers if (rows := curve(summary, lay, r, layer))}
    if not curves:
        return []
    folder = out / "plots" / "frontier"
    folder.mkdir(parents=True, exist_ok=True)
    for (run, layer), rows in curves.items():
        names = list(dict.fromkeys(k for r in rows for k in r))
        with open(folder / f"{run}_layer_{layer}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=names)
            w.writeheader()
            w.writerows(rows)
    return [_draw(out / "frontier.png", curves, lay)]


def _ends(rows: list[dict[str, float | str]], y: list[float], name: str) -> list[float]:
    """An interval's ends, the value itself where it has none."""
    return [float(r[name]) if math.isfinite(float(r[name])) else v for r, v in zip(rows, y, strict=True)]


def _draw(path: Path, curves: dict[tuple[str, int], list[dict[str, float | str]]], lay: Layout) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in FRONTIER if any(n in r for rows in curves.values() for r in rows)]
    fig, axes = plt.subplots(len(names), len(lay.layers), figsize=(3.4 * len(lay.layers), 2.4 * len(names)),
                             squeeze=False)
    for i, name in enumerate(names):
        for j, layer in enumerate(lay.layers):
            ax = axes[i][j]
            for k, run in enumerate(lay.runs):  # a run's colour is the same in every panel, missing or not
                rows = [r for r in curves.get((run, layer), []) if name in r and math.isfinite(float(r[name]))]
                if not rows:
                    continue
                x = [float(r["l0"]) for r in rows]
                y = [float(r[name]) for r in rows]
                lo, hi = (_ends(rows, y, f"{name}_{end}") for end in ("lo", "hi"))
                line = ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, label=run, color=f"C{k}")[0]
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
                if len(x) == 1:
                    ax.errorbar(x, y, yerr=[[y[0] - lo[0]], [hi[0] - y[0]]], color=line.get_color(), capsize=3)
            ax.set_xscale("log")
            if i == 0:
                ax.set_title(f"layer {layer}")
            if j == 0:
                ax.set_ylabel(TITLES.get(name, name), fontsize=8)
            if i == len(names) - 1:
                ax.set_xlabel("L0 (held-out)")
            ax.tick_params(labelsize=7)
    fig.legend(*max((ax.get_legend_handles_labels() for ax in axes.flat), key=lambda hl: len(hl[1])), fontsize=7,
               loc="upper right")
    return save_figure(fig, path)
