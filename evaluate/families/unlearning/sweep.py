"""The unlearning sweep: every (tau, n, c) setting of every SAE of one layer on the selection split, and the
choice among them. Formulas in docs/metrics.md.

The choice is the setting with the lowest A_forget among those that keep the retain text (A_retain >=
retain_accuracy), so the work is ordered to find it, and only it, exactly:

1. A_retain of every distinct (features, c) on the whole retain sweep text (it is reported for every point).
2. A_forget of the settings that pass, on growing prefixes of the forget sweep text (batches 1, 1, 2, 4, ...
   of it). After each prefix, a setting's final A_forget lies in [kept / K, (kept + K - known) / K] (K: known
   forget tokens of the whole text, kept / known: on the prefix); a setting whose lower bound exceeds another
   passing setting's upper bound of the same SAE cannot be chosen and is dropped (A_forget None, `pruned`).
   The survivors end with their exact A_forget, so the choice is the full sweep's (tested).

Every step scores all SAEs' settings at once (`EvalText.score_many`): their restarted forwards share forwards.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from csae.evaluate.families.unlearning.intervention import (
    EvalText,
    Intervention,
    Selection,
    clamp_intervention,
    select_features,
)
from csae.evaluate.inputs import LayerCheckpoint
from csae.evaluate.lm.passes import Restart
from csae.shared.config.evaluate import EvalConfig


def clamp_of(ckpt: LayerCheckpoint, sel: Selection, feats: torch.Tensor, c: float) -> Intervention:
    """The clamp of `feats` with multiplier c, each set to -c times its mean forget activation."""
    a_K = sel.mean_act_F[feats]

    def clamp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return clamp_intervention(x, ckpt.sae, feats, a_K, c)

    return clamp


@dataclass
class _Unit:
    """A distinct (SAE, features, c) of the sweep."""

    sae: int
    clamp: Intervention
    a_retain: float = 1.0
    kept: float = 0.0
    """Known forget tokens kept on the prefix scored so far."""
    live: bool = True


def sweep_layer(group: list[LayerCheckpoint], sels: list[Selection], forget: EvalText, retain: EvalText,
                restart: Restart, cfg: EvalConfig, bar: Any = None) -> list[list[dict[str, Any]]]:
    """One point per (tau, n, c) for each SAE of one layer: the features select_features(tau, n) clamped with
    multiplier c; A_retain, and A_forget where the setting passes the retain rule and was not dropped by the
    bounds (module docstring). Identical (features, c) of one SAE are scored once."""
    layer = group[0].layer
    units: list[_Unit] = []
    where: list[dict[tuple[tuple[int, ...], float], int]] = [{} for _ in group]
    grid: list[list[tuple[float, int, float, tuple[int, ...]]]] = [[] for _ in group]
    for i, (ckpt, sel) in enumerate(zip(group, sels, strict=True)):
        for tau, n in itertools.product(cfg.retain_thresholds, cfg.ns):
            feats = select_features(sel.nu_forget_F, sel.nu_retain_F, tau, n)
            for c in cfg.cs:
                key = (tuple(feats.tolist()), float(c))
                if key not in where[i] and len(feats):
                    where[i][key] = len(units)
                    units.append(_Unit(i, clamp_of(ckpt, sel, feats, c)))
                grid[i].append((tau, n, c, key[0]))
    for unit, score in zip(units, retain.score_many(restart, layer, [u.clamp for u in units], ce=False),
                           strict=True):
        unit.a_retain = score.accuracy
        unit.live = unit.a_retain >= cfg.retain_accuracy  # the forget side costs most: skip what cannot be chosen
    _forget_accuracies(units, forget, restart, layer)
    total = forget.n_known
    out = []
    for i in range(len(group)):
        pts = []
        for tau, n, c, feats in grid[i]:
            u = units[where[i][(feats, float(c))]] if feats else None
            a_f = (u.kept / max(total, 1) if u.live else None) if u else 1.0
            pts.append({"retain_threshold": tau, "n": n, "c": c, "features": list(feats), "A_forget": a_f,
                        "A_retain": u.a_retain if u else 1.0,
                        **({"pruned": True} if u and not u.live and u.a_retain >= cfg.retain_accuracy else {})})
            if bar is not None:
                bar.update(1)
        out.append(pts)
    return out


def _forget_accuracies(units: list[_Unit], forget: EvalText, restart: Restart, layer: int) -> None:
    """Known forget tokens kept by each live unit, on growing prefixes of the text, dropping the units that
    the bounds rule out after each prefix (module docstring); the survivors end with their whole-text count."""
    total, seen = forget.n_known, 0
    for part in forget.stages():
        live = [u for u in units if u.live]
        if not live:
            return
        for unit, score in zip(live, part.score_many(restart, layer, [u.clamp for u in live], ce=False),
                               strict=True):
            unit.kept += float(score.kept_D.sum())
        seen += part.n_known
        best: dict[int, float] = {}  # per SAE: the lowest upper bound of a live unit
        for u in live:
            best[u.sae] = min(best.get(u.sae, float("inf")), u.kept + total - seen)
        for u in live:
            u.live = u.kept <= best[u.sae]  # lower bound (kept) above another's upper bound: cannot be chosen


def choose(points: list[dict[str, Any]], retain_accuracy: float) -> dict[str, Any] | None:
    """The point with the lowest A_forget among those with A_retain >= retain_accuracy and some features;
    ties go to fewer features, then the smaller multiplier and threshold. None when no point qualifies.
    Points the sweep dropped by its bounds (A_forget None) cannot be the lowest."""
    ok = [p for p in points if p["A_retain"] >= retain_accuracy and p["features"] and p["A_forget"] is not None]
    return min(ok, key=lambda p: (p["A_forget"], len(p["features"]), p["c"], p["retain_threshold"])) if ok else None
