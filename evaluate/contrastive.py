"""Held-out InfoNCE of the trained contrastive head, with `context` positives (another token of the
same sequence), and the gap between positive-pair and negative-pair similarity.

Shape suffixes: B pairs in a batch, C head output width, N rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def context_pairs(seq_N: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(anchor rows, positive rows): every row whose sequence has another row, paired with a uniformly
    chosen other row of the same sequence. Anchors come in random order."""
    order = np.argsort(seq_N, kind="stable")
    seq_sorted = seq_N[order]
    starts = np.flatnonzero(np.r_[True, seq_sorted[1:] != seq_sorted[:-1]])
    lengths = np.diff(np.r_[starts, len(seq_N)])
    group_start = np.repeat(starts, lengths)
    group_len = np.repeat(lengths, lengths)
    own = np.arange(len(seq_N)) - group_start
    keep = group_len >= 2
    offset = rng.integers(1, np.maximum(group_len, 2))  # 1..len-1: never the anchor itself
    other = group_start + (own + offset) % group_len
    anchors, positives = order[keep], order[other[keep]]
    perm = rng.permutation(len(anchors))
    return anchors[perm], positives[perm]


def info_nce(z_anchor_BC: torch.Tensor, z_pos_BC: torch.Tensor, temperature: float) -> dict[str, float]:
    """Symmetric InfoNCE with in-batch negatives, as in training: s_ij = cos(z_anchor_i, z_pos_j) / temperature,
    loss = (CE(s, diag) + CE(s^T, diag)) / 2 with CE(s, diag) = mean_i [-log softmax_j(s_ij)[i]]. Also the
    mean positive similarity cos_ii, the mean negative similarity cos_ij (i != j) and their gap."""
    a = torch.nn.functional.normalize(z_anchor_BC.double(), dim=1)
    p = torch.nn.functional.normalize(z_pos_BC.double(), dim=1)
    s_BB = a @ p.T
    target = torch.arange(len(s_BB))
    ce = torch.nn.functional.cross_entropy
    loss = 0.5 * (ce(s_BB / temperature, target) + ce(s_BB.T / temperature, target))
    b = len(s_BB)
    pos = float(s_BB.diagonal().mean())
    neg = float((s_BB.sum() - s_BB.diagonal().sum()) / (b * (b - 1)))
    return {"infonce": float(loss), "pos_sim": pos, "neg_sim": neg, "sim_gap": pos - neg}


def mean_over_batches(results: list[dict[str, float]]) -> dict[str, float]:
    """Unweighted mean of per-batch results (all batches have the same size)."""
    if not results:
        return {"infonce": math.nan, "pos_sim": math.nan, "neg_sim": math.nan, "sim_gap": math.nan}
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}
