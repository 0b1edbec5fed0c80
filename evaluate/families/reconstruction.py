"""Reconstruction/sparsity family: how well an SAE reconstructs the held-out rows and how sparsely it fires.

`reconstruction_figures` turns one SAE pass's per-document sums (evaluate/families/heldout.py) into figures the
bootstrap can recompute on resampled documents; the pure functions below are the same formulas on
tensors (the definitions, and what the tests check the figures against). Inputs are promoted to float64
so sums over many tokens stay exact enough.
Shape suffixes: N tokens, D model width (documents: the figures' resampling unit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from csae.evaluate.families.heldout import SaePass
from csae.evaluate.stats import Figure, additive, per_replicate, ratio


def _f64(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.double() for x in xs]


def fvu_pooled(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """Fraction of variance unexplained, pooled over tokens.

    FVU = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - x_bar||^2, x_bar the mean of x over the N tokens.
    """
    x, x_hat = _f64(x_ND, x_hat_ND)
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return float(residual / total)


def mse(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """Mean squared error per element: mean over tokens and dimensions of (x - x_hat)^2."""
    x, x_hat = _f64(x_ND, x_hat_ND)
    return float((x - x_hat).pow(2).mean())


def mean_cosine(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """Mean over tokens of cos(x_t, x_hat_t) (a zero reconstruction counts as cosine 0)."""
    x, x_hat = _f64(x_ND, x_hat_ND)
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1, eps=1e-12).mean())


def relative_bias(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """Relative reconstruction bias E||x_hat||^2 / E[x . x_hat]: 1 is unbiased, below 1 shrinkage.

    It is the gamma minimising E||x_hat / gamma - x||^2: an SAE whose output is k x has bias k.
    """
    x, x_hat = _f64(x_ND, x_hat_ND)
    return float(x_hat.pow(2).sum() / (x * x_hat).sum())


def l2_ratio(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """Mean over tokens of ||x_hat_t|| / ||x_t|| (tokens with x_t = 0 are skipped)."""
    x, x_hat = _f64(x_ND, x_hat_ND)
    norm = x.norm(dim=1)
    keep = norm > 0
    return float((x_hat.norm(dim=1)[keep] / norm[keep]).mean())


def reconstruction_metrics(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> dict[str, float]:
    """All reconstruction metrics above, plus explained variance = 1 - FVU."""
    fvu = fvu_pooled(x_ND, x_hat_ND)
    return {"fvu": fvu, "explained_variance": 1.0 - fvu, "mse": mse(x_ND, x_hat_ND),
            "cosine": mean_cosine(x_ND, x_hat_ND), "relative_bias": relative_bias(x_ND, x_hat_ND),
            "l2_ratio": l2_ratio(x_ND, x_hat_ND)}


def ce_score(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """Share of the loss increase from zero-ablating the layer that the SAE recovers:
    (CE_zero - CE_sae) / (CE_zero - CE_clean). 1: as good as the clean model; 0: as bad as zero-ablation."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def kl_score(kl_sae: float, kl_zero: float) -> float:
    """(KL_zero - KL_sae) / KL_zero, each KL the mean over tokens of KL(p_clean || p_intervened)."""
    return (kl_zero - kl_sae) / kl_zero


def reconstruction_figures(p: SaePass, dense_thresholds: Sequence[float]) -> dict[str, Figure]:
    """FVU, explained variance, MSE, cosine, relative bias, l2 ratio, L0, L1, dead and dense shares."""
    d_model = p.x_DM.shape[1]
    sums = np.concatenate([np.stack([p.err_D, p.xx_D, p.n_D], axis=1), p.x_DM], axis=1)

    def fvu(t: np.ndarray) -> np.ndarray:  # sum ||x - x_bar||^2 = sum ||x||^2 - ||sum x||^2 / N
        return t[:, 0] / (t[:, 1] - (t[:, 3:] ** 2).sum(axis=1) / t[:, 2])

    fires = p.fires_DF.astype(np.float64)
    # firing counts per feature on the resampled documents, shared by the dead and dense figures; a feature
    # is dead on them exactly when its count is 0 (counts and weights are non-negative)
    counts = per_replicate(lambda w: w @ fires)

    def dense(threshold: float) -> Figure:
        value = float(((fires.sum(axis=0) / p.n_D.sum()) > threshold).mean())
        return Figure(value, lambda w: (counts(w) / (w @ p.n_D)[:, None] > threshold).mean(axis=1))

    figs = {"fvu": additive(sums, fvu), "explained_variance": additive(sums, lambda t: 1 - fvu(t)),
            "mse": ratio(p.err_D, p.n_D * d_model), "cosine": ratio(p.cos_D, p.n_D),
            "relative_bias": ratio(p.hh_D, p.xh_D), "l2_ratio": ratio(p.l2r_D, p.nonzero_D),
            "l0": ratio(p.l0_D, p.n_D), "l1": ratio(p.l1_D, p.n_D),
            "dead_fraction": Figure(float((fires.sum(axis=0) == 0).mean()), lambda w: (counts(w) == 0).mean(axis=1))}
    figs.update({f"dense_fraction_{t:g}": dense(t) for t in dense_thresholds})
    return figs
