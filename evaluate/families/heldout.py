"""The store's held-out rows, the input of the store families (reconstruction/sparsity, contrastive, topic),
and one pass of an SAE over them that keeps its sums per document (the bootstrap's unit) and its codes (sparse),
so the other families of the pass (co-activation, held-out InfoNCE) read them instead of encoding the rows again.

Shape suffixes: N rows, D documents, M model width, F features.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from csae.shared.errors import UserError
from csae.shared.store.schema import ActivationStore


@dataclass
class HeldoutRows:
    layer: int
    start: int
    stop: int
    x_NM: torch.Tensor
    """Residuals (float32)."""
    doc_N: np.ndarray
    """Document of each row, numbered 0, 1, ... in order of appearance."""
    seq_N: np.ndarray
    """Sequence of each row (store numbering)."""
    topic_D: np.ndarray | None
    """Topic index of each document (-1: none); None when the store has no topics."""
    n_topics: int
    pos_N: np.ndarray | None = None
    """Position of each row in its sequence (store numbering: BOS is 0, never stored)."""

    @property
    def n_docs(self) -> int:
        return int(self.doc_N.max()) + 1 if len(self.doc_N) else 0


def heldout_range(store: ActivationStore, fraction: float, limit: int, where: str) -> tuple[int, int]:
    """[start, stop): the first `limit` rows (0: all) of the tail that training with `fraction` never read."""
    start = store.heldout_start(fraction)
    if start >= store.n_rows:
        raise UserError(f"{where} was trained with heldout_tail_fraction={fraction}, which leaves no held-out rows "
                        f"in a store of {store.n_rows} rows ({store.chunk_rows} per chunk); re-train with a larger "
                        f"heldout_tail_fraction or harvest more tokens")
    return start, store.n_rows if limit == 0 else min(store.n_rows, start + limit)


@functools.lru_cache(maxsize=2)
def heldout_rows(store: ActivationStore, layer: int, start: int, stop: int) -> HeldoutRows:
    x = store.read(layer, start, stop).float()
    store_doc = store.tokens("doc")[start:stop]
    docs, doc_N = np.unique(store_doc, return_inverse=True)
    order = np.argsort(np.unique(doc_N, return_index=True)[1])  # number documents by first appearance
    doc_N = np.argsort(order)[doc_N]
    topic_D = None
    if store.topics and "docs/topic" in store.group:
        topic_D = store.docs("topic").astype(np.int64)[docs[order]]
    return HeldoutRows(layer, start, stop, x, doc_N, store.tokens("seq")[start:stop], topic_D, len(store.topics),
                       store.tokens("pos")[start:stop])


@dataclass
class SaePass:
    """Per-document sums of one SAE pass over held-out rows."""

    n_D: np.ndarray
    err_D: np.ndarray
    """sum_t ||x_t - x_hat_t||^2."""
    xx_D: np.ndarray
    """sum_t ||x_t||^2."""
    x_DM: np.ndarray
    """sum_t x_t."""
    hh_D: np.ndarray
    """sum_t ||x_hat_t||^2."""
    xh_D: np.ndarray
    """sum_t x_t . x_hat_t."""
    cos_D: np.ndarray
    """sum_t cos(x_t, x_hat_t)."""
    l2r_D: np.ndarray
    """sum over rows with x_t != 0 of ||x_hat_t|| / ||x_t||."""
    nonzero_D: np.ndarray
    l0_D: np.ndarray
    l1_D: np.ndarray
    fires_DF: np.ndarray
    """Tokens of each document on which each feature fires (int32)."""
    codes_NF: scipy.sparse.csr_matrix
    """The features of every row (float32, the non-zero ones)."""


@torch.inference_mode()
def sae_pass(sae: torch.nn.Module, rows: HeldoutRows, batch: int,
             on_batch: Callable[[int, torch.Tensor], None] | None = None) -> SaePass:
    """The per-document sums of one pass; on_batch(first row, features) sees every batch's features in row order."""
    d, f = rows.n_docs, sae.d_sae
    sums = {k: torch.zeros(d, dtype=torch.float64) for k in ("n", "err", "xx", "hh", "xh", "cos", "l2r", "nz", "l0",
                                                             "l1")}
    x_DM = torch.zeros(d, rows.x_NM.shape[1], dtype=torch.float64)
    fires_DF = torch.zeros(d, f, dtype=torch.int32)
    doc_N = torch.from_numpy(rows.doc_N)
    codes = []
    for s in range(0, len(rows.x_NM), batch):
        x, doc = rows.x_NM[s:s + batch], doc_N[s:s + batch]
        x_hat, f_NF = sae(x)
        codes.append(scipy.sparse.csr_matrix(f_NF.float().numpy()))
        if on_batch is not None:
            on_batch(s, f_NF)
        x64, h64 = x.double(), x_hat.double()
        norm_x, norm_h = x64.norm(dim=1), h64.norm(dim=1)
        nonzero = norm_x > 0
        per_row = {"n": torch.ones(len(x), dtype=torch.float64), "err": (x64 - h64).pow(2).sum(dim=1),
                   "xx": norm_x.pow(2), "hh": norm_h.pow(2), "xh": (x64 * h64).sum(dim=1),
                   "cos": torch.nn.functional.cosine_similarity(x64, h64, dim=1, eps=1e-12),
                   "l2r": torch.where(nonzero, norm_h / norm_x.clamp_min(1e-300), 0.0), "nz": nonzero.double(),
                   "l0": (f_NF > 0).sum(dim=1).double(), "l1": f_NF.double().abs().sum(dim=1)}
        for k, v in per_row.items():
            sums[k].index_add_(0, doc, v)
        x_DM.index_add_(0, doc, x64)
        fires_DF.index_add_(0, doc, (f_NF > 0).int())
    n = {k: v.numpy() for k, v in sums.items()}
    return SaePass(n["n"], n["err"], n["xx"], x_DM.numpy(), n["hh"], n["xh"], n["cos"], n["l2r"], n["nz"], n["l0"],
                   n["l1"], fires_DF.numpy(), scipy.sparse.vstack(codes, format="csr") if codes
                   else scipy.sparse.csr_matrix((0, f), dtype=np.float32))


def training_sample(store: ActivationStore, layer: int, stop: int, rows: int,
                    seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(x (float32), sequence of each row) of about `rows` rows of the training part [0, stop): whole chunks
    drawn at random (a reader's unit), chunks that cross `stop` excluded."""
    chunk = store.chunk_rows
    n_chunks = stop // chunk
    if n_chunks == 0:
        return store.read(layer, 0, stop).float(), store.tokens("seq")[:stop]
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n_chunks, size=min(n_chunks, -(-rows // chunk)), replace=False))
    seq = store.tokens("seq")
    x = torch.cat([store.read(layer, int(c) * chunk, (int(c) + 1) * chunk) for c in picked]).float()
    return x, np.concatenate([seq[int(c) * chunk:(int(c) + 1) * chunk] for c in picked])
