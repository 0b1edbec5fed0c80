"""Sparsity, decoder geometry, feature co-activation and topic purity. Pure functions plus one streaming
accumulator (`FeatureStats`) so that feature activations are never all held at once.

Shape suffixes: N tokens, F features, D model width, S sampled features, T topics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def l0_l1_per_token(f_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L0, L1) per token, shapes (N,), (N,): number of firing features (f > 0) and sum of activations."""
    return (f_NF > 0).sum(dim=1), f_NF.abs().sum(dim=1)


class FeatureStats:
    """Counts over batches of feature activations: per-feature firings, L0/L1 sums, topic counts per
    feature, and first and second moments of a sample of features (for co-activation)."""

    def __init__(self, d_sae: int, n_topics: int, sample_F: torch.Tensor | None = None) -> None:
        self.n_tokens = 0
        self.fires_F = torch.zeros(d_sae, dtype=torch.int64)
        self.act_sum_F = torch.zeros(d_sae, dtype=torch.float64)
        self.l0_sum = 0.0
        self.l1_sum = 0.0
        self.topic_fires_FT = torch.zeros(d_sae, max(n_topics, 1), dtype=torch.int64)
        self.topic_tokens_T = torch.zeros(max(n_topics, 1), dtype=torch.int64)
        self.n_topics = n_topics
        self.sample_S = sample_F
        if sample_F is not None:
            self.sum_S = torch.zeros(len(sample_F), dtype=torch.float64)
            self.prod_SS = torch.zeros(len(sample_F), len(sample_F), dtype=torch.float64)

    def update(self, f_NF: torch.Tensor, topic_N: torch.Tensor | None = None) -> None:
        """Add a batch. topic_N: topic index per token (-1: none), or None when there are no topics."""
        fires_NF = f_NF > 0
        l0_N, l1_N = l0_l1_per_token(f_NF)
        self.n_tokens += f_NF.shape[0]
        self.fires_F += fires_NF.sum(dim=0)
        self.act_sum_F += f_NF.double().sum(dim=0)
        self.l0_sum += float(l0_N.double().sum())
        self.l1_sum += float(l1_N.double().sum())
        if topic_N is not None and self.n_topics:
            onehot_NT = torch.nn.functional.one_hot(topic_N.clamp_min(0).long(), self.n_topics)
            onehot_NT = onehot_NT * (topic_N >= 0).unsqueeze(1)
            self.topic_tokens_T += onehot_NT.sum(dim=0)
            self.topic_fires_FT += (fires_NF.T.float() @ onehot_NT.float()).round().long()
        if self.sample_S is not None:
            s_NS = f_NF[:, self.sample_S].double()
            self.sum_S += s_NS.sum(dim=0)
            self.prod_SS += s_NS.T @ s_NS

    def density_F(self) -> torch.Tensor:
        """Per-feature firing density: share of evaluated tokens on which each feature fires, shape (F,)."""
        return self.fires_F.double() / max(self.n_tokens, 1)

    def sparsity(self, dense_thresholds: Sequence[float]) -> dict[str, float]:
        """Mean L0 and L1 per token, dead share (never fired) and dense shares (density > threshold)."""
        density = self.density_F()
        out = {"l0": self.l0_sum / max(self.n_tokens, 1), "l1": self.l1_sum / max(self.n_tokens, 1),
               "dead_fraction": float((self.fires_F == 0).double().mean()),
               "dead_features": int((self.fires_F == 0).sum())}
        for t in dense_thresholds:
            out[f"dense_fraction_{t:g}"] = float((density > t).double().mean())
        return out

    def coactivation(self) -> float:
        """Mean |Pearson correlation| between the sampled features' activations (NaN if < 2 sampled)."""
        if self.sample_S is None or len(self.sample_S) < 2:
            return math.nan
        return mean_abs_correlation(self.sum_S, self.prod_SS, self.n_tokens)


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


def entropy_bits(p_T: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits along the last dimension of a probability tensor (0 log 0 = 0)."""
    p = p_T.double()
    return -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim=-1)


def topic_purity(topic_fires_FT: torch.Tensor, topic_tokens_T: torch.Tensor, min_fires: int,
                 specific_ratio: float) -> dict[str, float]:
    """Topic purity of features. For feature j, p_j = distribution over topics of the tokens it fires on,
    q = topic distribution of all evaluated tokens. r_j = H(p_j) / H(q) (0: one topic only, 1: as mixed
    as the corpus). Over features firing on >= min_fires tokens: mean r_j, share with r_j < specific_ratio
    (topic-specific), and mean KL(p_j || q) in bits."""
    q_T = topic_tokens_T.double() / topic_tokens_T.sum().clamp_min(1)
    fires_F = topic_fires_FT.sum(dim=1)
    keep = fires_F >= max(min_fires, 1)
    h_q = float(entropy_bits(q_T))
    if not keep.any() or h_q <= 0:
        return {"topic_entropy_ratio": math.nan, "topic_specific_fraction": math.nan, "topic_kl_bits": math.nan,
                "topic_features": int(keep.sum())}
    p_KT = topic_fires_FT[keep].double() / fires_F[keep].unsqueeze(1).double()
    ratio_K = entropy_bits(p_KT) / h_q
    logratio = torch.log2(torch.where(p_KT > 0, p_KT, torch.ones_like(p_KT)) / q_T.clamp_min(1e-300))
    kl_K = (p_KT * logratio).sum(dim=1)
    return {"topic_entropy_ratio": float(ratio_K.mean()),
            "topic_specific_fraction": float((ratio_K < specific_ratio).double().mean()),
            "topic_kl_bits": float(kl_K.mean()), "topic_features": int(keep.sum())}
