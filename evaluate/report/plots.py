"""Plots (matplotlib, Agg backend): PNGs for offline viewing and plot data for DVC.

    <out>/density_layer_<L>.png                          firing-density histograms, runs and seeds overlaid
    <out>/unlearning_layer_<L>.png                       the unlearning sweep and the chosen settings

DVC renders every file of a plots directory, so each kind of curve gets a directory of CSVs only:

    <out>/plots/training/<run>[_<point>]_seed_<s>_layer_<L>.csv    step, loss terms, fvu, l0, dead_frac, lr
    <out>/plots/unlearning/<run>[_<point>]_seed_<s>_layer_<L>.csv  a row per unlearning setting (selection
                                                                     split): tau, n, c, A
    <out>/training_layer_<L>.png                         loss and FVU against step, runs and seeds overlaid
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from csae.evaluate.inputs import LayerCheckpoint, layer_of
from csae.shared.sae.checkpoint import read_metrics

TRAINING_COLUMNS = ("step", "loss", "recon_loss", "l1", "info_nce", "diversity", "fvu", "l0", "dead_frac", "lr")
SWEEP_COLUMNS = ("retain_threshold", "n", "c", "A_forget", "A_retain")


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out: Path, densities: dict[str, np.ndarray], points: dict[str, Any],
                retain_accuracy: float) -> list[Path]:
    """One log-density histogram and one unlearning sweep plot per layer, runs and seeds overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_layer: dict[int, list[str]] = defaultdict(list)
    for key in densities:
        by_layer[layer_of(key)].append(key)
    for layer, keys in sorted(by_layer.items()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.linspace(-7, 0, 57)
        for key in keys:
            d = densities[key]
            ax.hist(np.log10(d[d > 0]), bins=bins, histtype="step", linewidth=1.2,
                    label=f"{key.rsplit('/', 1)[0]} ({(d == 0).sum()} dead of {len(d)})")
        ax.set_xlabel("log10 firing density (held-out tokens)")
        ax.set_ylabel("features")
        ax.set_title(f"Feature density, layer {layer}")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / f"density_layer_{layer}.png"))

        sweeps = [(k, points[k]) for k in keys if k in points]
        if not sweeps:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for (key, pts), color in zip(sweeps, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, strict=False):
            name = key.rsplit("/", 1)[0]
            done = [q for q in pts["sweep"] if q["A_forget"] is not None]  # the others failed the retain rule
            ax.scatter([q["A_retain"] for q in done], [q["A_forget"] for q in done], s=14, color=color, alpha=0.5,
                       label=f"{name} sweep (selection)")
            if pts.get("chosen"):
                ax.scatter([pts["test"]["A_retain"]], [pts["test"]["A_forget"]], marker="*", s=120, color=color,
                           edgecolor="black", label=f"{name} chosen, test split")
        ax.axvline(retain_accuracy, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("A_retain (known retain tokens kept)")
        ax.set_ylabel("A_forget (known forget tokens kept)")
        ax.set_title(f"Unlearning, layer {layer}")
        ax.legend(fontsize=6)
        written.append(save_figure(fig, out / f"unlearning_layer_{layer}.png"))
    return written


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_curves(out: Path, ckpts: list[LayerCheckpoint], points: dict[str, Any]) -> list[Path]:
    """Write the CSV directories and one training-curve PNG per layer; returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind in ("training", "unlearning"):  # declared DVC outputs: present even when a sweep was skipped
        (out / "plots" / kind).mkdir(parents=True, exist_ok=True)
    logs: dict[int, list[tuple[str, list[dict[str, float]]]]] = defaultdict(list)
    for ckpt in ckpts:
        name = f"{ckpt.series.replace('/', '_')}_seed_{ckpt.seed}_layer_{ckpt.layer}.csv"
        log = read_metrics(ckpt.path)
        _write_csv(out / "plots" / "training" / name, TRAINING_COLUMNS, log)
        logs[ckpt.layer].append((f"{ckpt.series} seed {ckpt.seed}", log))
        rows = (points.get(ckpt.key) or {}).get("sweep") or []
        if rows:
            _write_csv(out / "plots" / "unlearning" / name, SWEEP_COLUMNS, rows)
    written = []
    for layer, runs in sorted(logs.items()):
        fig, (ax_loss, ax_fvu) = plt.subplots(1, 2, figsize=(9, 3.5))
        for run, log in runs:
            steps = [r["step"] for r in log]
            ax_loss.plot(steps, [r["loss"] for r in log], linewidth=0.8, label=run)
            ax_fvu.plot(steps, [r["fvu"] for r in log], linewidth=0.8, label=run)
        ax_loss.set_yscale("log")
        ax_fvu.set_ylim(0, 1)
        for ax, title in ((ax_loss, "training loss"), (ax_fvu, "FVU (training batch)")):
            ax.set_xlabel("step")
            ax.set_title(f"{title}, layer {layer}")
            ax.legend(fontsize=8)
        written.append(save_figure(fig, out / f"training_layer_{layer}.png"))
    return written
