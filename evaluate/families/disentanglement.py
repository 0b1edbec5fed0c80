"""Disentanglement of a dictionary: decoder geometry and feature co-activation (part of the contrastive family's
figures; the decoder figures depend on the weights only, so only the seeds vary them).

Shape suffixes: N tokens, F features, D model width, S sampled features, T topics.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse
import torch

from csae.evaluate.stats import Figure


def mean_abs_correlation(sum_S: torch.Tensor, prod_SS: torch.Tensor, n: int) -> float:
    """Mean |corr(f_i, f_j)| over distinct pairs i != j, from sums over n tokens: sum_S = sum_t f_t and
    prod_SS = sum_t f_t f_t^T. Features with zero variance are left out."""
    mean_S = sum_S / n
    cov_SS = prod_SS / n - torch.outer(mean_S, mean_S)
    std_S = cov_SS.diagonal().clamp_min(0).sqrt()
    keep = std_S > 1e-12
    cov_SS, std_S = cov_SS[keep][:, keep], std_S[keep]
    k = len(std_S)
    if k < 2:
        return math.nan
    corr_SS = cov_SS / torch.outer(std_S, std_S)
    off = ~torch.eye(k, dtype=torch.bool)
    return float(corr_SS[off].abs().mean())


def coactivation(codes_NF: scipy.sparse.csr_matrix, sample_S: torch.Tensor) -> float:
    """Mean |Pearson correlation| between the activations of the sampled features over the rows of codes_NF
    (sums in float64, on the non-zero entries only)."""
    if len(sample_S) < 2:
        return math.nan
    f_NS = codes_NF[:, sample_S.numpy()].astype(np.float64)
    sum_S = torch.from_numpy(np.asarray(f_NS.sum(axis=0)).ravel())
    prod_SS = torch.from_numpy((f_NS.T @ f_NS).toarray())
    return mean_abs_correlation(sum_S, prod_SS, codes_NF.shape[0])


@torch.no_grad()
def decoder_geometry(W_dec_FD: torch.Tensor, block: int = 2048) -> dict[str, float]:
    """Cosine similarity between distinct decoder vectors (rows of W_dec): mean |cos|, max cos, and the
    share of distinct pairs with cos > 0.5. Computed in row blocks, so memory is block x F."""
    w = torch.nn.functional.normalize(W_dec_FD.double(), dim=1)
    n = w.shape[0]
    abs_sum, above, best = 0.0, 0, -math.inf
    for start in range(0, n, block):
        cos_BF = w[start:start + block] @ w.T
        rows = torch.arange(start, min(start + block, n))
        cos_BF[rows - start, rows] = math.nan  # a vector with itself is not a pair
        valid = ~cos_BF.isnan()
        abs_sum += float(cos_BF[valid].abs().sum())
        above += int((cos_BF[valid] > 0.5).sum())
        best = max(best, float(cos_BF[valid].max())) if valid.any() else best
    pairs = n * (n - 1)
    return {"dec_mean_abs_cos": abs_sum / pairs if pairs else math.nan,
            "dec_max_cos": best if pairs else math.nan,
            "dec_frac_cos_above_0.5": above / pairs if pairs else math.nan}


def disentanglement_figures(sae: torch.nn.Module, codes_NF: scipy.sparse.csr_matrix, live_F: torch.Tensor, sample: int,
                            generator: torch.Generator) -> dict[str, Figure]:
    """Decoder geometry (no document dependence) and co-activation of a random sample of live features
    (reported without an interval: its per-document sums would be S x S per document)."""
    figs = {k: Figure(v) for k, v in decoder_geometry(sae.W_dec.detach()).items()}
    pick = live_F[torch.randperm(len(live_F), generator=generator)[:sample]].sort().values
    figs["coactivation_mean_abs_corr"] = Figure(coactivation(codes_NF, pick), interval=False)
    return figs
