"""T-SAE's claims, measured (Bhalla et al., "Temporal Sparse Autoencoders", arXiv 2511.05541): the features of its
high-level block vary slowly along a sequence, and carry more semantic (topic) information.

The block of an SAE:
- with a high-level block (`SAE.high_level` = h > 0, a T-SAE): its features [0, h);
- without one (a CSAE, a plain SAE), compared with the SAE with a block at the same layer, sparsity point and
  training seed (the first such run in the order given): the h of its own features matched on firing rate to
  that block, so a comparison is not between a block of rare features and one of frequent ones (a feature that
  fires on most tokens is trivially smooth; one that never fires has no correlation). Matching is greedy: the
  block's features from the most to the least frequent, each taking the unused feature nearest in log firing
  rate on the held-out rows (ties: the lower index). The first h features of a plain SAE would be an arbitrary
  (random) subset; the matched ones are the fairest stand-in for "features like the block's".
Without an SAE with a block among those evaluated, no block figures are formed.

Smoothness of feature j: the Pearson correlation of f_j(t) and f_j(t+1) over every pair of adjacent held-out rows
(the same sequence, consecutive positions), pooled over sequences. A feature constant along each sequence (and
varying between sequences) scores 1, an i.i.d. one about 0. `smoothness_block`: the mean over the block's
features with a defined correlation (non-zero variance on both sides), resampled by document (each document's
sums over its pairs); `smoothness_all`: the same over the whole dictionary, a point value only (its interval would
cost d_sae / h times the block's).

Shape suffixes: N rows, D documents, F features, K block features.
"""

from __future__ import annotations

import numpy as np
import torch

from csae.evaluate.families.heldout import HeldoutRows
from csae.evaluate.inputs import LayerCheckpoint
from csae.evaluate.stats import Figure, additive

#: Firing rates below this count as this in log space (dead features are matched among themselves).
RATE_FLOOR = 1e-9


def block_partner(ckpt: LayerCheckpoint, group: list[LayerCheckpoint]) -> LayerCheckpoint | None:
    """The SAE whose high-level block `ckpt` is measured on: itself when it has one, else the first SAE of `group`
    (checkpoints in the order given) with a block at the same layer, point and seed; None without one."""
    if ckpt.sae.high_level:
        return ckpt
    return next((c for c in group if c.sae.high_level and (c.layer, c.point, c.seed) == (ckpt.layer, ckpt.point,
                                                                                        ckpt.seed)), None)


def match_rates(target_K: np.ndarray, rates_F: np.ndarray) -> np.ndarray:
    """Indices into rates_F, one per target (in target order), all distinct: the targets from the highest rate to
    the lowest, each taking the unused feature nearest in log rate (ties: the lower index)."""
    if len(target_K) > len(rates_F):
        raise ValueError(f"cannot match {len(target_K)} features among {len(rates_F)}")
    log_t = np.log(np.maximum(target_K, RATE_FLOOR))
    log_r = np.log(np.maximum(rates_F, RATE_FLOOR))
    free = np.ones(len(rates_F), dtype=bool)
    out = np.empty(len(target_K), dtype=np.int64)
    for i in np.argsort(-target_K, kind="stable"):
        gap = np.where(free, np.abs(log_r - log_t[i]), np.inf)
        out[i] = int(np.argmin(gap))
        free[out[i]] = False
    return out


def block_features(ckpt: LayerCheckpoint, group: list[LayerCheckpoint],
                   densities: dict[str, np.ndarray]) -> np.ndarray | None:
    """The features of `ckpt`'s block (module docstring), sorted; None without a partner with a block. `densities`:
    firing rate per feature on the held-out rows of the partner and (when matched) of `ckpt`."""
    partner = block_partner(ckpt, group)
    if partner is None:
        return None
    h = partner.sae.high_level
    if partner is ckpt:
        return np.arange(h)
    return np.sort(match_rates(densities[partner.key][:h], densities[ckpt.key]))


def rate_gap(ckpt: LayerCheckpoint, group: list[LayerCheckpoint], densities: dict[str, np.ndarray],
             block: np.ndarray | None) -> dict[str, float]:
    """How well a matched block's firing rates follow the block it stands in for: `block_rate_gap`, the mean over
    quantiles of |ln(matched rate / block rate)| (both sorted; 0: the same distribution, ln 2 = 0.69: a factor of
    2 apart on average); {} for a T-SAE's own block or none."""
    partner = block_partner(ckpt, group)
    if block is None or partner is None or partner is ckpt:
        return {}
    want = np.sort(np.log(np.maximum(densities[partner.key][:partner.sae.high_level], RATE_FLOOR)))
    got = np.sort(np.log(np.maximum(densities[ckpt.key][block], RATE_FLOOR)))
    return {"block_rate_gap": float(np.abs(got - want).mean())}


def blocks_of(ckpts: list[LayerCheckpoint], densities: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{checkpoint key: its block's features} for every checkpoint that has a block or a partner with one."""
    out = {}
    for c in ckpts:
        found = block_features(c, [o for o in ckpts if o.layer == c.layer], densities)
        if found is not None:
            out[c.key] = found
    return out


class LagSums:
    """Per-document sums over adjacent row pairs (t, t+1) of one SAE pass: pairs, sum f(t), sum f(t+1), sum f(t)^2,
    sum f(t+1)^2, sum f(t) f(t+1) per feature. `add` takes the pass's batches in row order (sae_pass's on_batch).
    Only non-zero activations contribute, so a batch costs one scan of its codes and work in proportion to its
    non-zeros (L0 per row), not rows x features."""

    def __init__(self, rows: HeldoutRows, n_features: int) -> None:
        seq, pos = rows.seq_N, rows.pos_N
        #: row r + 1 follows row r in its sequence (the next position, where positions are known)
        nxt = seq[1:] == seq[:-1]
        if pos is not None:
            nxt &= pos[1:] == pos[:-1] + 1
        self.has_next_N, self.has_prev_N = np.r_[nxt, False], np.r_[False, nxt]
        self.doc_N = rows.doc_N.astype(np.int64)
        self.n_features = n_features
        self.n_D = np.bincount(self.doc_N[self.has_next_N], minlength=rows.n_docs).astype(np.float64)
        self.sums = np.zeros((5, rows.n_docs * n_features))
        self._last: np.ndarray | None = None

    def add(self, start: int, f_NF: torch.Tensor) -> None:
        f = np.ascontiguousarray(f_NF.detach().float().cpu().numpy())
        if self._last is not None and self.has_next_N[start - 1]:  # the pair across the previous batch and this
            at = slice(self.doc_N[start - 1] * self.n_features, (self.doc_N[start - 1] + 1) * self.n_features)
            u, v = self._last.astype(np.float64), f[0].astype(np.float64)
            for acc, w in zip(self.sums, (u, v, u * u, v * v, u * v), strict=True):
                acc[at] += w
        self._last = f[-1].copy()
        flat = torch.from_numpy(f).view(-1).nonzero().squeeze(1).numpy()  # torch's scan: ~1.5x numpy's
        rows, cols = np.divmod(flat, f.shape[1])
        vals = f.reshape(-1)[flat].astype(np.float64)
        glob = rows + start
        where = self.doc_N[glob] * self.n_features + cols  # (document, feature) of each non-zero
        a = self.has_next_N[glob] & (rows < len(f) - 1)  # f(t) of a pair whose t + 1 is in this batch
        b = self.has_prev_N[glob] & (rows > 0)  # f(t + 1) of a pair whose t is in this batch
        nxt = f[rows[a] + 1, cols[a]].astype(np.float64)  # f(t + 1) at the non-zeros of f(t): the products' terms
        for acc, mask, w in zip(self.sums, (a, b, a, b, a), (vals[a], vals[b], vals[a] ** 2, vals[b] ** 2,
                                                             vals[a] * nxt), strict=True):
            acc += np.bincount(where[mask], weights=w, minlength=len(acc))

    def per_document(self, features: np.ndarray | None = None) -> np.ndarray:
        """(D, 1 + 5 K): pairs, then the five sums of the chosen features (all when None)."""
        sums = self.sums.reshape(5, len(self.n_D), self.n_features)
        if features is not None:
            sums = sums[:, :, np.asarray(features, dtype=np.int64)]
        return np.concatenate([self.n_D[:, None], *sums], axis=1)


def correlations(tot: np.ndarray) -> np.ndarray:
    """Per feature, corr(f(t), f(t+1)) from totals (B, 1 + 5 K) of `LagSums.per_document`: (B, K), NaN where a side
    has no variance."""
    k = (tot.shape[1] - 1) // 5
    n = tot[:, :1]
    a, b, aa, bb, ab = (tot[:, 1 + i * k:1 + (i + 1) * k] for i in range(5))
    cov = n * ab - a * b
    var = np.maximum(n * aa - a * a, 0.0) * np.maximum(n * bb - b * b, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        # a variance below 1e-12 of its sum of squares is rounding: no variance
        ok = (n * aa - a * a > 1e-12 * n * aa) & (n * bb - b * b > 1e-12 * n * bb)
        return np.where(ok, cov / np.sqrt(var), np.nan)


def _mean_correlation(tot: np.ndarray) -> np.ndarray:
    c = correlations(tot)
    live = np.isfinite(c)
    return np.where(live.any(axis=1), np.nansum(c, axis=1) / np.maximum(live.sum(axis=1), 1), np.nan)


def smoothness_figures(lags: LagSums, block: np.ndarray | None) -> tuple[dict[str, Figure], dict[str, float]]:
    """(smoothness_all, and smoothness_block where there is a block; extras: the block's size and how many of its
    features have a correlation)."""
    everything = lags.per_document()
    figs = {"smoothness_all": Figure(float(_mean_correlation(everything.sum(axis=0, keepdims=True))[0]),
                                     interval=False)}
    extras: dict[str, float] = {"smoothness_pairs": float(lags.n_D.sum())}
    if block is not None:
        sums = lags.per_document(block)
        figs["smoothness_block"] = additive(sums, _mean_correlation)
        extras.update(block_features=len(block),
                      smoothness_block_live=int(np.isfinite(correlations(sums.sum(axis=0, keepdims=True))).sum()))
    return figs, extras
