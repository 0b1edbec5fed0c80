"""Topic family: is a feature more topic-specific than chance? Documents are the unit.

For feature j, c_jt = tokens of topic-t documents on which j fires and H_j the entropy (bits) of c_j / sum c_j.
A feature confined to a few documents has a low H_j whatever the topics, so H_j is compared with a null
matched on the feature's own firing: the documents' topic labels are permuted (each document keeps its
tokens and the feature's firings; only the topic moves), P times.

- topic_excess = mean over features of (E_null H_j - H_j) / H(q), q the topic distribution of the evaluated
  tokens: how much more concentrated than chance features are, as a share of the corpus' topic entropy
  (0: as chance; positive: more topic-specific). Its interval resamples documents, with a fresh permutation
  of the resampled documents' labels in every replicate (so duplicates weigh alike in H_j and its null).
- topic_significant_fraction = share of features whose one-sided permutation p-value (1 + #{H_null <= H_j})
  / (1 + P) passes Benjamini-Hochberg at `topic_fdr`. No document resampling (P permutations per
  replicate would cost P x replicates); its interval comes from the seeds only.
- topic_entropy_ratio = mean H_j / H(q), the plug-in figure without a null (kept for comparison).

Features qualify when they fire on at least `topic_min_fires` tokens; documents without a topic are left out.
Shape suffixes: F features (qualifying: K), D documents, T topics, P permutations, B replicates.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from csae.evaluate.stats import Figure, per_replicate

#: Permutations computed together (bounds memory to K x T x this many floats).
_PERM_BLOCK = 64


def entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) along the last axis of non-negative counts (0 log 0 = 0; NaN for all-zero), as
    log2(S) - sum_t c_t log2(c_t) / S with S = sum_t c_t: one logarithm per count, no normalised copy."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1)
    log_c = np.zeros_like(counts)
    np.log2(counts, out=log_c, where=counts > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log2(total) - np.einsum("...t,...t->...", counts, log_c) / total


def _counts(fires_KD: np.ndarray, w_BD: np.ndarray, topic_BD: np.ndarray, n_topics: int) -> np.ndarray:
    """c (B, K, T): per replicate b, sum_d w_bd fires_kd [topic_bd = t] (each replicate its own topics)."""
    b, d = w_BD.shape
    m = np.zeros((d, b * n_topics), dtype=np.float32)
    m[np.arange(d), np.arange(b)[:, None] * n_topics + topic_BD] = w_BD
    counts = fires_KD @ m  # integer-valued and far below 2^24: exact in float32, and twice as fast
    return counts.reshape(len(fires_KD), b, n_topics).transpose(1, 0, 2).astype(np.float64)


def _grouped_counts(groups: list[tuple[np.ndarray, np.ndarray]], w_BD: np.ndarray) -> np.ndarray:
    """c (B, K, T) for the documents' own topics: per topic t, fires of its documents times their weights
    (groups[t] = (fires_K of topic t's documents, their indices)); T times fewer products than `_counts`,
    the same integer sums."""
    w32 = w_BD.astype(np.float32)
    return np.stack([(fires @ w32[:, docs].T).T for fires, docs in groups], axis=2).astype(np.float64)


def topic_figures(fires_DF: np.ndarray, n_D: np.ndarray, topic_D: np.ndarray, n_topics: int, *, min_fires: int,
                  permutations: int, fdr: float, seed: int) -> tuple[dict[str, Figure], dict[str, float]]:
    """(figures, extras) of one dictionary; empty when no feature qualifies or the documents have one topic."""
    has_topic = topic_D >= 0
    fires_DF, n_D, topic_D = fires_DF[has_topic], n_D[has_topic], topic_D[has_topic]
    onehot_DT = np.eye(max(n_topics, 1))[np.clip(topic_D, 0, None)]
    keep = fires_DF.sum(axis=0) >= max(min_fires, 1)
    h_q = float(entropy_bits(n_D @ onehot_DT))
    extras = {"topic_features": int(keep.sum()), "topic_docs": len(topic_D)}
    if not keep.any() or not h_q > 0:
        return {}, extras
    fires_KD = np.ascontiguousarray(fires_DF[:, keep].T, dtype=np.float32)
    d = len(topic_D)
    rng = np.random.default_rng(seed)

    h_obs_K = entropy_bits(fires_KD.astype(np.float64) @ onehot_DT)
    null_sum, below = np.zeros(len(fires_KD)), np.zeros(len(fires_KD))
    for start in range(0, permutations, _PERM_BLOCK):
        perms = np.stack([rng.permutation(d) for _ in range(min(_PERM_BLOCK, permutations - start))])
        h_null = entropy_bits(_counts(fires_KD, np.ones((len(perms), d)), topic_D[perms], n_topics))  # (P, K)
        null_sum += h_null.sum(axis=0)
        below += (h_null <= h_obs_K + 1e-12).sum(axis=0)
    p_K = (1 + below) / (1 + permutations)
    significant = sps.false_discovery_control(p_K) <= fdr
    excess = float(np.mean(null_sum / permutations - h_obs_K) / h_q)
    groups = [(np.ascontiguousarray(fires_KD[:, topic_D == t]), np.flatnonzero(topic_D == t))
              for t in range(n_topics)]
    observed = per_replicate(lambda w_BD: entropy_bits(_grouped_counts(groups, w_BD)))  # H_j, for both figures

    def resample_excess(w_BD: np.ndarray) -> np.ndarray:
        perms = np.stack([rng.permutation(d) for _ in range(len(w_BD))])
        h_null = entropy_bits(_counts(fires_KD, w_BD, topic_D[perms], n_topics))
        hq = entropy_bits((w_BD * n_D) @ onehot_DT)
        return np.nanmean(h_null - observed(w_BD), axis=1) / hq

    def resample_ratio(w_BD: np.ndarray) -> np.ndarray:
        return np.nanmean(observed(w_BD), axis=1) / entropy_bits((w_BD * n_D) @ onehot_DT)

    figs = {"topic_excess": Figure(excess, resample_excess),
            "topic_significant_fraction": Figure(float(significant.mean())),
            "topic_entropy_ratio": Figure(float(np.mean(h_obs_K) / h_q), resample_ratio)}
    extras["topic_significant_features"] = int(significant.sum())
    extras["topic_min_p"] = float(p_K.min()) if len(p_K) else math.nan
    return figs, extras
