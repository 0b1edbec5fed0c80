"""The sparse step's kernels on CPU, compiled by numba: what torch and numpy do in several passes
(and numpy on one thread), done in one or two passes over the data on every core.

- `active_entries`: from the encoder's product p (B, F) and its bias b, the entries where p + b > 0, row by
  row: their columns, their values p + b (float32, added as torch adds them, so bit for bit the dense
  path's) and the row offsets. It reads p in its own dtype (bfloat16 bits widened to float32 in place, a
  shift), so the (B, F) float32 copy, the bias pass, the compare and the scan for the entries that torch
  and numpy needed are one pass to count and one to fill: 0.5 against 1.6 ms at B 512, F 2,560, 2% density
  on 2 cores.
- `by_column`: the same entries in column-major order, a counting sort (0.05 ms; numpy's stable sort and
  bincount took 0.3).
- `sampled_dots`: g[b] . W[i] at each entry (SDDMM): 0.45 against torch's sampled_addmm's 0.8 ms at D 640 with
  W in cache. It takes the entries feature by feature, so W is read once and in order: from a cold cache
  0.58 ms against 0.78 for the same kernel row by row (in the step: -0.5 to -0.9 ms, paired A/B).
- `project_rows_` and `unit_rows_`: the decoder's row-wise updates of every step (the gradient's projection
  with its norm, and the renormalisation), one pass each.

Compiled on first use and cached beside this file (numba's cache): 8 s once per machine, then 0.8 s a
process to load. Each kernel runs on as many threads as torch does, in numba's OpenMP pool (measured in the
step, paired A/B of the bfloat16 plain step: -1.6 ms with it, -0.3 single-threaded, -0.2 with numba's
workqueue threads). Where the system has no libgomp, numba falls back to its workqueue layer (the same
results, slower). numba's OpenMP layer is not fork-safe: a child forked after a kernel ran stops with an
error if it runs one (torchrun and subprocesses start fresh interpreters, so training never meets this).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

#: numba's fast-math flags for the kernels' sums: reassociation and fused multiply-adds only, so the sums
#: vectorise; no approximate sqrt or division, and NaN and inf keep IEEE semantics (a diverged weight must
#: stay non-finite for the trainer to see it).
SUMS = {"reassoc", "contract"}


@njit(inline="always", cache=True)
def _row_scores(p_F: np.ndarray, shift: int, b_F: np.ndarray, s_F: np.ndarray) -> None:
    """s = float32(p) + b for one row: p's bits moved into the high bits of float32 (shift 16 for bfloat16,
    exact), then the bias added in float32."""
    bits_F = s_F.view(np.uint32)
    for i in range(len(p_F)):
        bits_F[i] = np.uint32(p_F[i]) << np.uint32(shift)
    for i in range(len(p_F)):
        s_F[i] += b_F[i]


@njit(parallel=True, cache=True)
def _active_entries(p_BF: np.ndarray, shift: int, b_F: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    B, F = p_BF.shape
    row_offsets = np.zeros(B + 1, np.int64)
    for b in prange(B):  # 1. count each row's entries (vectorised compare)
        s_F = np.empty(F, np.float32)
        _row_scores(p_BF[b], shift, b_F, s_F)
        n = 0
        for i in range(F):
            n += s_F[i] > 0
        row_offsets[b + 1] = n
    for b in range(B):
        row_offsets[b + 1] += row_offsets[b]
    cols_K = np.empty(row_offsets[B], np.int64)
    vals_K = np.empty(row_offsets[B], np.float32)
    for b in prange(B):  # 2. fill them in, each row at its offset (recomputing the row beats storing B x F)
        s_F = np.empty(F, np.float32)
        _row_scores(p_BF[b], shift, b_F, s_F)
        k = row_offsets[b]
        for i in range(F):
            if s_F[i] > 0:
                cols_K[k] = i
                vals_K[k] = s_F[i]
                k += 1
    return row_offsets, cols_K, vals_K


@njit(cache=True)
def _by_column(row_offsets: np.ndarray, cols_K: np.ndarray, n_cols: int) -> tuple[np.ndarray, ...]:
    col_offsets = np.zeros(n_cols + 1, np.int64)
    for k in range(len(cols_K)):
        col_offsets[cols_K[k] + 1] += 1
    for i in range(n_cols):
        col_offsets[i + 1] += col_offsets[i]
    next_K = col_offsets[:-1].copy()
    by_col_K = np.empty(len(cols_K), np.int64)
    rows_by_col_K = np.empty(len(cols_K), np.int64)
    for b in range(len(row_offsets) - 1):  # rows in order: stable within each column
        for k in range(row_offsets[b], row_offsets[b + 1]):
            j = next_K[cols_K[k]]
            by_col_K[j], rows_by_col_K[j] = k, b
            next_K[cols_K[k]] = j + 1
    return col_offsets, by_col_K, rows_by_col_K


@njit(parallel=True, cache=True, fastmath=SUMS)
def _sampled_dots(col_offsets: np.ndarray, rows_by_col_K: np.ndarray, by_col_K: np.ndarray, g_BN: np.ndarray,
                  W_FN: np.ndarray) -> np.ndarray:
    out_K = np.empty(len(by_col_K), np.float32)
    for i in prange(len(col_offsets) - 1):  # feature by feature: W is read once, in order
        w_N = W_FN[i]
        for j in range(col_offsets[i], col_offsets[i + 1]):
            g_N = g_BN[rows_by_col_K[j]]
            acc = np.float32(0.0)
            for n in range(len(w_N)):
                acc += g_N[n] * w_N[n]
            out_K[by_col_K[j]] = acc
    return out_K


@njit(parallel=True, cache=True, fastmath=SUMS)
def _project_rows(W_FD: np.ndarray, G_FD: np.ndarray) -> float:
    sumsq_F = np.empty(len(W_FD), np.float64)
    for i in prange(len(W_FD)):
        w_D, g_D = W_FD[i], G_FD[i]
        c = np.float32(0.0)
        for d in range(len(w_D)):
            c += g_D[d] * w_D[d]
        s = 0.0
        for d in range(len(w_D)):
            g_D[d] -= c * w_D[d]
            s += np.float64(g_D[d]) ** 2
        sumsq_F[i] = s
    return sumsq_F.sum()


@njit(parallel=True, cache=True, fastmath=SUMS)
def _unit_rows(W_FD: np.ndarray) -> None:
    for i in prange(len(W_FD)):
        w_D = W_FD[i]
        s = np.float32(0.0)
        for d in range(len(w_D)):
            s += w_D[d] * w_D[d]
        scale = np.float32(1.0) / max(np.sqrt(s), np.float32(1e-8))
        for d in range(len(w_D)):
            w_D[d] *= scale


def _threads() -> None:
    """numba's threads for the next kernel: as many as torch's (a caller's torch.set_num_threads holds)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def active_entries(p_BF: torch.Tensor, b_F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_offsets (B + 1,), cols_K, vals_K) of the entries where float32(p) + b > 0, row-major; p (B, F)
    float32 or bfloat16 and contiguous, b (F,) float32, both on CPU."""
    if p_BF.dtype == torch.bfloat16:
        bits, shift = p_BF.view(torch.int16).numpy().view(np.uint16), 16
    elif p_BF.dtype == torch.float32:
        bits, shift = p_BF.numpy().view(np.uint32), 0
    else:
        raise TypeError(f"active_entries takes float32 or bfloat16 products, not {p_BF.dtype}")
    _threads()
    return tuple(map(torch.from_numpy, _active_entries(bits, shift, b_F.detach().numpy())))  # type: ignore[return-value]


def by_column(row_offsets: torch.Tensor, cols_K: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, ...]:
    """(col_offsets (F + 1,), by_col_K, rows_by_col_K): the permutation of the entries into column-major
    order (rows ascending within a column) and each entry's row in that order."""
    return tuple(map(torch.from_numpy, _by_column(row_offsets.numpy(), cols_K.numpy(), n_cols)))


def sampled_dots(col_offsets: torch.Tensor, rows_by_col_K: torch.Tensor, by_col_K: torch.Tensor,
                 g_BN: torch.Tensor, W_FN: torch.Tensor) -> torch.Tensor:
    """(K,), in the pattern's row-major order: g[b] . W[i] at each entry (b, i), the entries taken feature by
    feature (the pattern's column order) so that W is read once, in order, while g (B x N, the smaller) stays
    in cache; g and W float32."""
    _threads()
    return torch.from_numpy(_sampled_dots(col_offsets.numpy(), rows_by_col_K.numpy(), by_col_K.numpy(),
                                          g_BN.contiguous().numpy(), W_FN.contiguous().numpy()))


def project_rows_(W_FD: torch.Tensor, G_FD: torch.Tensor) -> float:
    """G[i] -= (G[i] . W[i]) W[i] for unit rows W[i], in place, and the sum of squares of the result (float64):
    the decoder gradient's projection and its share of the gradient norm in one pass over W and G, where
    torch's blocked projection and the norm read G twice (0.5 against 0.94 + 0.4 ms at 2,560 x 640 on 2
    cores, from a cold cache). Both float32, contiguous, on CPU."""
    _threads()
    return float(_project_rows(W_FD.detach().numpy(), G_FD.numpy()))


def unit_rows_(W_FD: torch.Tensor) -> None:
    """W[i] /= max(|W[i]|, 1e-8), in place, in one pass (0.27 against torch's blocked 0.58 ms at 2,560 x
    640 on 2 cores, cold cache); float32, contiguous, on CPU."""
    _threads()
    _unit_rows(W_FD.detach().numpy())
