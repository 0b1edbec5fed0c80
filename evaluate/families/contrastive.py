"""Contrastive family: held-out InfoNCE that compares runs. A trained head is only comparable with a trained
head (the baseline's is its random initialisation), so every checkpoint gets a *fresh* head of the shape its
training used, fitted with the same budget, optimiser and seed on its frozen SAE features of training rows;
its held-out InfoNCE is the headline figure (`heldout_infonce`). The trained head's figure is kept as
`heldout_infonce_trained`.

Held-out batches: B pairs (anchor, positive) = two distinct rows of one sequence, each pair from a different
sequence, so the B - 1 in-batch negatives of an anchor all come from other sequences. Loss per pair i:
(CE_row_i + CE_col_i) / 2 of s_ij = cos(h(f_anchor_i), h(f_pos_j)) / T, the symmetric InfoNCE of training;
chance level log B. Each pair's loss counts towards its sequence's document (the bootstrap's unit).

Shape suffixes: B pairs, C head width, N rows, F features.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch

from csae.evaluate.families.heldout import HeldoutRows
from csae.evaluate.stats import Figure, ratio
from csae.shared.config.evaluate import EvalConfig
from csae.shared.sae.checkpoint import LayerInfo
from csae.shared.sae.head import ContrastiveHead


def distinct_pairs(seq_N: np.ndarray, batch: int, n_batches: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """(anchors, positives), each (n_batches, b) row indices: every batch takes b = min(batch, sequences with
    two rows or more) distinct sequences and two distinct random rows of each."""
    order = np.argsort(seq_N, kind="stable")
    starts = np.flatnonzero(np.r_[True, seq_N[order][1:] != seq_N[order][:-1]])
    lengths = np.diff(np.r_[starts, len(seq_N)])
    starts, lengths = starts[lengths >= 2], lengths[lengths >= 2]
    b = min(batch, len(starts))
    if b < 2:
        return np.empty((0, 0), dtype=np.int64), np.empty((0, 0), dtype=np.int64)
    groups = np.stack([rng.choice(len(starts), size=b, replace=False) for _ in range(n_batches)])
    first = rng.integers(0, lengths[groups])
    second = (first + rng.integers(1, lengths[groups])) % lengths[groups]  # never the anchor itself
    return order[starts[groups] + first], order[starts[groups] + second]


def info_nce_terms(z_a_BC: torch.Tensor, z_p_BC: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Per pair: the symmetric InfoNCE loss (CE of row i + CE of column i) / 2 with in-batch negatives, as
    in training; its positive similarity cos_ii; its mean negative similarity (mean_j!=i cos_ij)."""
    a = torch.nn.functional.normalize(z_a_BC, dim=1)
    p = torch.nn.functional.normalize(z_p_BC, dim=1)
    s_BB = a @ p.T
    target = torch.arange(len(s_BB))
    ce = torch.nn.functional.cross_entropy
    loss = 0.5 * (ce(s_BB / temperature, target, reduction="none") + ce(s_BB.T / temperature, target,
                                                                         reduction="none"))
    pos = s_BB.diagonal()
    neg = (s_BB.sum(dim=1) - pos) / max(len(s_BB) - 1, 1)
    return {"loss": loss, "pos": pos, "neg": neg}


def fit_head(f_NF: torch.Tensor, seq_N: np.ndarray, info: LayerInfo, temperature: float, cfg: EvalConfig,
             seed: int) -> ContrastiveHead:
    """A fresh head of the training config's shape, fitted by Adam on InfoNCE over distinct-sequence batches of
    the given (frozen) features: cfg.head_steps steps of cfg.contrastive_batch pairs, lr cfg.head_lr."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = ContrastiveHead(f_NF.shape[1], info.config.head_dim, info.config.head_hidden)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.head_lr)
    anchors, positives = distinct_pairs(seq_N, cfg.contrastive_batch, cfg.head_steps, np.random.default_rng(seed))
    for a, p in zip(anchors, positives, strict=True):
        loss = info_nce_terms(head(f_NF[a]), head(f_NF[p]), temperature)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval().requires_grad_(False)


@torch.inference_mode()
def _heldout(head: torch.nn.Module, features: Callable[[np.ndarray], torch.Tensor], doc_N: np.ndarray,
             anchors: np.ndarray, positives: np.ndarray, temperature: float, prefix: str) -> dict[str, Figure]:
    d = int(doc_N.max()) + 1
    sums = {k: np.zeros(d) for k in ("loss", "pos", "neg")}
    count = np.zeros(d)
    for a, p in zip(anchors, positives, strict=True):
        terms = info_nce_terms(head(features(a)).double(), head(features(p)).double(), temperature)
        for k, v in terms.items():
            sums[k] += np.bincount(doc_N[a], weights=v.numpy(), minlength=d)
        count += np.bincount(doc_N[a], minlength=d)
    return {f"{prefix}infonce": ratio(sums["loss"], count), f"{prefix}pos_sim": ratio(sums["pos"], count),
            f"{prefix}neg_sim": ratio(sums["neg"], count), f"{prefix}sim_gap": ratio(sums["pos"] - sums["neg"], count)}


def contrastive_figures(sae: torch.nn.Module, trained_head: torch.nn.Module | None, info: LayerInfo,
                        rows: HeldoutRows, codes_NF: scipy.sparse.csr_matrix, train_x: torch.Tensor,
                        train_seq: np.ndarray, cfg: EvalConfig,
                        seed: int) -> tuple[dict[str, Figure], dict[str, float]]:
    """Held-out InfoNCE of a fresh head (fitted on `train_x`, rows of the training part) and of the trained head,
    on the held-out rows' codes (codes_NF, the SAE's features of rows.x_NM).
    The fresh head takes features in training units (raw-unit features times the training input scale, what
    the trained head saw in training); the saved trained head takes raw-unit features (the scale is folded in)."""
    temperature = cfg.temperature or info.config.temperature
    with torch.inference_mode():
        f_train = sae.encode(train_x) * info.scale
    head = fit_head(f_train.clone(), train_seq, info, temperature, cfg, seed)
    del f_train
    anchors, positives = distinct_pairs(rows.seq_N, cfg.contrastive_batch, cfg.contrastive_batches,
                                        np.random.default_rng([seed, 1]))
    if not anchors.size:
        return {}, {"contrastive_pairs": 0}

    def raw(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(codes_NF[idx].toarray())

    figs = _heldout(head, lambda i: raw(i) * info.scale, rows.doc_N, anchors, positives, temperature, "heldout_")
    if trained_head is not None:
        figs.update(_heldout(trained_head, raw, rows.doc_N, anchors, positives, temperature, "heldout_trained_"))
    extras = {"contrastive_pairs": int(anchors.size), "contrastive_batch_used": int(anchors.shape[1]),
              "heldout_infonce_chance": math.log(anchors.shape[1])}
    return figs, extras
