"""Plot data for DVC and PNGs for offline viewing: training curves and unlearning sweeps.

DVC renders every file of a plots directory, so each kind of curve gets a directory of CSVs only:

    <out>/plots/training/<run>_seed_<s>_layer_<L>.csv    step, loss terms, fvu, l0, dead_frac, lr (training)
    <out>/plots/unlearning/<run>_seed_<s>_layer_<L>.csv  a row per sweep point (selection split): tau, n, c, A
    <out>/training_layer_<L>.png                         loss and FVU against step, runs and seeds overlaid
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from csae.evaluate.checkpoints import LayerCheckpoint
from csae.evaluate.report import save_figure
from csae.shared.checkpoint import read_metrics

TRAINING_COLUMNS = ("step", "loss", "recon_loss", "l1", "info_nce", "diversity", "fvu", "l0", "dead_frac", "lr")
SWEEP_COLUMNS = ("retain_threshold", "n", "c", "A_forget", "A_retain")


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
        name = f"{ckpt.run}_seed_{ckpt.seed}_layer_{ckpt.layer}.csv"
        log = read_metrics(ckpt.path)
        _write_csv(out / "plots" / "training" / name, TRAINING_COLUMNS, log)
        logs[ckpt.layer].append((f"{ckpt.run} seed {ckpt.seed}", log))
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
