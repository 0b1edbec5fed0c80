"""Offline unlearning protocol (SAEBench's feature selection and clamping, scored by next-token accuracy
and CE on held-out text of a forget topic and of retain topics). Formulas in the README, section Metrics.

Only predictions at or after the first position where the intervention changes the residual are
recomputed (causal attention leaves earlier ones exactly clean); sequences without a change are skipped.

Shape suffixes: N tokens, F features, K selected features, B sequences, T positions, D model width.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from csae.evaluate.lm import Restart, clean_pass, token_stats
from csae.evaluate.text import TextBatch

#: x (N, D) at text positions -> (intervened x (N, D), changed (N,) bool)
Intervention = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Selection:
    nu_forget_F: torch.Tensor
    """Share of forget-selection tokens on which each feature fires."""
    nu_retain_F: torch.Tensor
    """Share of retain-selection tokens on which each feature fires."""
    mean_act_F: torch.Tensor
    """a_j: mean activation of feature j over the forget-selection tokens where it fires (0 if never)."""


@torch.inference_mode()
def selection_stats(sae: Any, forget_x_ND: torch.Tensor, retain_x_ND: torch.Tensor, batch: int = 4096) -> Selection:
    """Firing rates on forget and retain selection text, and mean positive activations on forget text."""

    def stats(x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fires = torch.zeros(sae.d_sae, dtype=torch.float64)
        total = torch.zeros(sae.d_sae, dtype=torch.float64)
        for s in range(0, len(x_ND), batch):
            f = sae.encode(x_ND[s:s + batch].to(sae.W_enc.dtype)).double()
            fires += (f > 0).sum(dim=0)
            total += f.sum(dim=0)
        return fires, total

    fires_f, total_f = stats(forget_x_ND)
    fires_r, _ = stats(retain_x_ND)
    return Selection(nu_forget_F=fires_f / max(len(forget_x_ND), 1), nu_retain_F=fires_r / max(len(retain_x_ND), 1),
                     mean_act_F=torch.where(fires_f > 0, total_f / fires_f.clamp_min(1), torch.zeros_like(total_f)))


def select_features(nu_forget_F: torch.Tensor, nu_retain_F: torch.Tensor, tau: float, n: int) -> torch.Tensor:
    """Indices of the n features with the highest nu_forget among those with nu_retain < tau (fewer if
    fewer qualify); ties broken by feature index."""
    candidates = torch.nonzero(nu_retain_F < tau).squeeze(1)
    order = torch.argsort(-nu_forget_F[candidates].double(), stable=True)
    return candidates[order[:n]]


def random_features(nu_retain_F: torch.Tensor, tau: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """n features drawn uniformly without replacement from those with nu_retain < tau (sorted)."""
    candidates = torch.nonzero(nu_retain_F < tau).squeeze(1)
    pick = torch.randperm(len(candidates), generator=generator)[:n]
    return candidates[pick].sort().values


@torch.inference_mode()
def clamp_intervention(x_ND: torch.Tensor, sae: Any, feats_K: torch.Tensor, a_K: torch.Tensor,
                       c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SAEBench's clamp: f = encode(x), err = x - decode(f); f'_j = -c a_j where j is selected and
    f_j > 0, else f'_j = f_j; output err + decode(f'). Returns (output, changed) with changed[t] true when
    any selected feature fires at t. Where none fires the formula gives x, and x is returned exactly."""
    x = x_ND.to(sae.W_enc.dtype)
    f_NF = sae.encode(x)
    fires_NK = f_NF[:, feats_K] > 0
    changed_N = fires_NK.any(dim=1)
    f_new = f_NF.clone()
    f_new[:, feats_K] = torch.where(fires_NK, -c * a_K.to(f_NF.dtype), f_NF[:, feats_K])
    out = (x - sae.decode(f_NF)) + sae.decode(f_new)
    return torch.where(changed_N.unsqueeze(1), out, x).to(x_ND.dtype), changed_N


@dataclass
class _CleanBatch:
    batch: TextBatch
    resid: dict[int, torch.Tensor]
    logp_BT: torch.Tensor
    correct_BT: torch.Tensor


class EvalText:
    """Evaluation text with its clean pass cached: residuals at the layers, clean log p and correctness."""

    def __init__(self, model: Any, text: list[TextBatch], layers: list[int], chunk: int) -> None:
        self.model, self.chunk = model, chunk
        self.items: list[_CleanBatch] = []
        self.tuple_out = False
        for batch in text:
            clean = clean_pass(model, batch, layers)
            self.tuple_out = clean.tuple_out
            pred = batch.pred_BT
            (st,) = token_stats(model, batch.targets_BT[pred], [clean.final_BTD[pred]], chunk)
            logp, correct = torch.zeros(pred.shape), torch.zeros(pred.shape, dtype=torch.bool)
            logp[pred], correct[pred] = st.logp_N, st.correct_N
            self.items.append(_CleanBatch(batch, clean.resid, logp, correct))

    @property
    def n_predictions(self) -> int:
        return sum(it.batch.n_predictions for it in self.items)

    @property
    def n_known(self) -> int:
        return int(sum(int(it.correct_BT.sum()) for it in self.items))

    @property
    def ce_clean(self) -> float:
        return -float(sum(float(it.logp_BT.double().sum()) for it in self.items)) / max(self.n_predictions, 1)

    def residuals(self, layer: int) -> torch.Tensor:
        """All text-position residuals at `layer`, (N, D)."""
        return torch.cat([it.resid[layer][it.batch.text_BT] for it in self.items])

    def evaluate(self, restart: Restart, layer: int, intervention: Intervention) -> tuple[float, float]:
        """(A, CE): share of known tokens (clean argmax correct) still correct, and mean CE, under the
        intervention at `layer`."""
        kept, known, nll, n = 0, 0, 0.0, 0
        for it in self.items:
            text, pred = it.batch.text_BT, it.batch.pred_BT
            logp, correct = it.logp_BT, it.correct_BT
            out, changed = intervention(it.resid[layer][text])
            if changed.any():
                changed_BT = torch.zeros_like(text)
                changed_BT[text] = changed
                rows = torch.nonzero(changed_BT.any(dim=1)).squeeze(1)
                first_B = changed_BT[rows].float().argmax(dim=1)
                t = torch.arange(text.shape[1])
                redo_RT = pred[rows] & (t >= first_B.unsqueeze(1))
                resid = it.resid[layer].clone()
                resid[text] = out.float()
                final = restart(it.batch.ids_BT[rows], layer, resid[rows])
                (st,) = token_stats(self.model, it.batch.targets_BT[rows][redo_RT], [final[redo_RT]], self.chunk)
                logp, correct = logp.clone(), correct.clone()
                sub_lp, sub_c = logp[rows], correct[rows]
                sub_lp[redo_RT], sub_c[redo_RT] = st.logp_N, st.correct_N
                logp[rows], correct[rows] = sub_lp, sub_c
            known_BT = it.correct_BT & pred
            kept += int((correct & known_BT).sum())
            known += int(known_BT.sum())
            nll -= float(logp[pred].double().sum())
            n += int(pred.sum())
        return kept / max(known, 1), nll / max(n, 1)


def zero_intervention(x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros_like(x_ND), torch.ones(len(x_ND), dtype=torch.bool)


def sweep(sae: Any, sel: Selection, forget: EvalText, retain: EvalText, restart: Restart, layer: int,
          thresholds: tuple[float, ...], ns: tuple[int, ...], cs: tuple[float, ...],
          choose: Callable[[float, int], torch.Tensor], progress: Any = None) -> list[dict[str, Any]]:
    """One point per (threshold, n, c): the features `choose(threshold, n)` clamped with multiplier c; A and CE on
    forget and retain text. Identical (features, c) pairs are evaluated once."""
    cache: dict[tuple[tuple[int, ...], float], tuple[float, float, float, float]] = {}
    points = []
    for threshold, n in itertools.product(thresholds, ns):
        feats = choose(threshold, n)
        for c in cs:
            key = (tuple(int(j) for j in feats), float(c))
            if key not in cache:
                a_K = sel.mean_act_F[feats]

                def clamp(x: torch.Tensor, feats: torch.Tensor = feats, a_K: torch.Tensor = a_K,
                          c: float = c) -> tuple[torch.Tensor, torch.Tensor]:
                    return clamp_intervention(x, sae, feats, a_K, c)

                a_f, ce_f = forget.evaluate(restart, layer, clamp)
                a_r, ce_r = retain.evaluate(restart, layer, clamp)
                cache[key] = (a_f, a_r, ce_f, ce_r)
            a_f, a_r, ce_f, ce_r = cache[key]
            points.append({"retain_threshold": threshold, "n": n, "c": c, "features": [int(j) for j in feats],
                           "A_forget": a_f, "A_retain": a_r, "dCE_forget": ce_f - forget.ce_clean,
                           "dCE_retain": ce_r - retain.ce_clean})
            if progress is not None:
                progress.update(1)
    return points


def unlearning_score(points: list[dict[str, Any]], retain_accuracy: float) -> float:
    """U = 1 - min A_forget over points with A_retain >= retain_accuracy; 0 when no point qualifies."""
    ok = [p["A_forget"] for p in points if p["A_retain"] >= retain_accuracy]
    return 1.0 - min(ok) if ok else 0.0


def unlearning_ce_score(points: list[dict[str, Any]], forget_gap: float, retain_gap: float,
                        tolerance: float) -> float:
    """U_CE = max dCE_forget / forget_gap over points with dCE_retain <= tolerance * retain_gap, where
    *_gap = CE_zero - CE_clean on that text; 0 when no point qualifies."""
    ok = [p["dCE_forget"] / forget_gap for p in points if p["dCE_retain"] <= tolerance * retain_gap]
    return max(ok) if ok else 0.0
