"""The SAE's step on the active features only: the same math as the dense path, a fraction of the work.

After the encoder's dense matmul, most features are zero (the default settings reach an L0 of ~50 of
2,560 features: 2% density). The dense step still runs five more matmuls of the encoder's size: the
decoder's forward f W_dec, W_dec's gradient f^T g, f's gradient g W_dec^T, W_enc's gradient
(x - b_dec)^T g_pre and the input gradient for b_dec. Here each runs on the K active entries (b, i):

    decode   x_hat[b]    = sum_{i active in b} f[b,i] W_dec[i] + b_dec     embedding_bag, one bag per row
    g_f      g_f[b,i]    = g[b] . W_dec[i] at active (b, i)                 sampled_addmm (SDDMM)
    dW_dec   dW_dec[i]   = sum_{b: i active in b} f[b,i] g[b]                embedding_bag, one bag per feature
    dW_enc   dW_enc[:,i] = sum_b g_pre[b,i] (x[b] - b_dec)                 embedding_bag, one bag per feature
    db_enc   db_enc[i]   = sum_b g_pre[b,i];   b_dec's share through the encoder: -W_enc db_enc (a matvec)

so a step costs one dense matmul plus O(K d). The contrastive head's first layer (f W_1^T) runs the same
way. Rounding: the encoder's matmul runs in the compute dtype exactly as under autocast (so f is the
dense path's f, bit for bit); the decode takes its operands in the compute dtype, sums in float32 and
rounds once, as autocast's matmul does, but in another order. The gradients (g_f, dW_dec, dW_enc) are
computed from float32 operands in float32: under bfloat16 autocast the dense path rounds the operands and
the result to bfloat16, which on CPU costs a pass over each (F, D) matrix in and out of bfloat16 that is
slower than the float32 gather itself. So with bfloat16 the two paths differ by about one bfloat16
rounding (tests/test_train_sparse.py states the tolerances; the sparse gradients are the closer to exact),
in float32 by summation order only.

Index work (finding the active entries, ordering them by feature) and the SDDMM run in numba kernels on
CPU tensors (csae.train.kernels: 1.8-3x faster than torch and numpy there); other devices use torch's.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from csae.train import kernels, losses


@dataclass(frozen=True)
class Pattern:
    """Where a (B, F) feature matrix is non-zero, in row-major order (k = 0..K-1), with the column-major
    order of the same entries (for sums per feature)."""

    n_rows: int
    n_cols: int
    cols_K: torch.Tensor
    row_offsets: torch.Tensor  # (B + 1,): entries of row b are k in [row_offsets[b], row_offsets[b + 1])
    by_col_K: torch.Tensor  # permutation of k sorting the entries by column, then row
    rows_by_col_K: torch.Tensor  # rows_K[by_col_K] (every sum per feature gathers rows in this order)
    col_offsets: torch.Tensor  # (F + 1,)

    @property
    def nnz(self) -> int:
        return len(self.cols_K)

    @functools.cached_property
    def rows_K(self) -> torch.Tensor:
        counts = self.row_offsets[1:] - self.row_offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.n_rows, device=counts.device), counts)

    @functools.cached_property
    def flat_K(self) -> torch.Tensor:
        """rows_K * n_cols + cols_K: the entries' positions in the flattened (B, F) matrix."""
        return self.rows_K * self.n_cols + self.cols_K

    @classmethod
    def of_rows(cls, row_offsets: torch.Tensor, cols_K: torch.Tensor, n_cols: int) -> Pattern:
        """From the row-major entries (CPU tensors: the column order by kernels.by_column)."""
        col_offsets, by_col_K, rows_by_col_K = kernels.by_column(row_offsets, cols_K, n_cols)
        return cls(len(row_offsets) - 1, n_cols, cols_K, row_offsets, by_col_K, rows_by_col_K, col_offsets)

    @classmethod
    def of_torch(cls, mask_BF: torch.Tensor) -> Pattern:
        """On any device, in torch."""
        B, F_ = mask_BF.shape
        flat_K = mask_BF.reshape(-1).nonzero().squeeze(1)
        by_col_K = torch.argsort(flat_K % F_, stable=True)
        rows_K, cols_K = flat_K // F_, flat_K % F_
        return cls(B, F_, cols_K, _offsets(torch.bincount(rows_K, minlength=B)), by_col_K, rows_K[by_col_K],
                   _offsets(torch.bincount(cols_K, minlength=F_)))


#: An activation on the sparse path: (product p (B, F), float32 bias b (F,)) -> the kept entries' pattern and
#: values, each value p + b added in float32.
Select = Callable[[torch.Tensor, torch.Tensor], tuple[Pattern, torch.Tensor]]


def active(p_BF: torch.Tensor, b_F: torch.Tensor) -> tuple[Pattern, torch.Tensor]:
    """The pattern of ReLU(p + b) for a product p (B, F) and a float32 bias b, and its values (K,): p + b added
    in float32, as autocast's dense path adds them (so the values are its f's, bit for bit). On CPU one
    numba kernel reads p in its own dtype (kernels.active_entries); elsewhere torch."""
    if p_BF.device.type == "cpu":
        row_offsets, cols_K, vals_K = kernels.active_entries(p_BF, b_F)
        return Pattern.of_rows(row_offsets, cols_K, p_BF.shape[1]), vals_K
    s_BF = p_BF.float().add_(b_F)
    pat = Pattern.of_torch(s_BF > 0)
    return pat, s_BF.view(-1).take(pat.flat_K)


def _kept(s_BF: torch.Tensor, flat_N: torch.Tensor) -> tuple[Pattern, torch.Tensor]:
    """The pattern and values of s at the flat positions flat_N where s > 0 (any order in; row-major out)."""
    flat_N = flat_N[s_BF.view(-1).take(flat_N) > 0]
    B, F_ = s_BF.shape
    if s_BF.device.type == "cpu":  # numpy's sort of topk's indices measured 15x faster than torch's on 2 cores
        flat_N = torch.from_numpy(np.sort(flat_N.numpy()))
        rows_K, cols_K = flat_N // F_, flat_N % F_
        pat = Pattern.of_rows(_offsets(torch.bincount(rows_K, minlength=B)), cols_K, F_)
    else:
        flat_N = flat_N.sort().values
        pat = Pattern.of_torch(torch.zeros(B * F_, dtype=torch.bool, device=s_BF.device)
                               .index_fill_(0, flat_N, True).view(B, F_))
    return pat, s_BF.view(-1).take(flat_N)


def top_k_rows(p_BF: torch.Tensor, b_F: torch.Tensor, k: int) -> tuple[Pattern, torch.Tensor]:
    """TopK's pattern: the k largest p + b of each row (p + b in float32, as the dense path adds them, and
    torch.topk's choice among ties, as the dense path's), those that are positive (ReLU after the top k, as
    SAELens' TopK)."""
    s_BF = p_BF.float().add_(b_F)
    idx_BK = torch.topk(s_BF, k, dim=1, sorted=False).indices
    rows_B1 = torch.arange(len(s_BF), device=s_BF.device).unsqueeze(1) * s_BF.shape[1]
    return _kept(s_BF, (rows_B1 + idx_BK).view(-1))


#: batch_top's sample: every SAMPLE_STRIDE-th entry (a prime, so it walks through every column of any width).
SAMPLE_STRIDE = 61


def batch_top(s_N: torch.Tensor, K: int) -> torch.Tensor:
    """Flat positions of the K largest entries of s_N (ties at the cut go to the earliest positions), in no
    particular order: BatchTopK's selection. torch.topk over a whole batch (1.3M entries at 512 x 2,560) costs
    9-15 ms on 2 cores, a fifth of the step; here a strided sample's order statistic gives a cut below the K-th
    largest value with near certainty, the entries at or above it (about 1.2 K) are the candidates, and the exact
    K-th largest among them decides (~2 ms). When fewer than K entries pass the cut, every entry is a candidate:
    the result is the same."""
    n = s_N.numel()
    if K >= n:
        return torch.arange(n, device=s_N.device)
    sample = s_N[::SAMPLE_STRIDE]
    expect = K * len(sample) / n  # sample entries expected above the K-th largest value
    r = min(len(sample), int(1.2 * expect + 4 * expect**0.5) + 8)
    idx_C = (s_N >= torch.topk(sample, r, sorted=False).values.min()).nonzero().squeeze(1)
    if len(idx_C) < K:
        idx_C = torch.arange(n, device=s_N.device)
    vals_C = s_N[idx_C]
    cut = torch.kthvalue(vals_C, len(vals_C) - K + 1).values
    above = idx_C[vals_C > cut]
    return torch.cat([above, idx_C[vals_C == cut][: K - len(above)]])  # idx_C ascending: earliest ties first


def top_k_batch(p_BF: torch.Tensor, b_F: torch.Tensor, k: int) -> tuple[Pattern, torch.Tensor]:
    """BatchTopK's pattern: the k x B largest positive p + b of the whole batch (`batch_top`)."""
    s_BF = p_BF.float().add_(b_F)
    return _kept(s_BF, batch_top(s_BF.view(-1), k * len(s_BF)))


def pattern_of_entries(rows_K: torch.Tensor, cols_K: torch.Tensor, n_rows: int, n_cols: int, use_kernels: bool
                       ) -> Pattern:
    """The pattern of entries given in row-major order: with `use_kernels` (CPU tensors) its column order from
    the numba kernel, else from torch (any device)."""
    if use_kernels:
        return Pattern.of_rows(_offsets(torch.bincount(rows_K, minlength=n_rows)), cols_K, n_cols)
    mask = torch.zeros(n_rows * n_cols, dtype=torch.bool, device=cols_K.device)
    return Pattern.of_torch(mask.index_fill_(0, rows_K * n_cols + cols_K, True).view(n_rows, n_cols))


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = counts.new_zeros(len(counts) + 1)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def _bags(idx_K: torch.Tensor, table_ND: torch.Tensor, offsets: torch.Tensor, w_K: torch.Tensor) -> torch.Tensor:
    """out[j] = sum_{k in bag j} w_k table[idx_k]: a sparse-times-dense product, bags given by offsets.
    Accumulates in float32 and rounds once to the table's dtype (as a bfloat16 matmul does)."""
    return F.embedding_bag(idx_K, table_ND, offsets, mode="sum", per_sample_weights=w_K.to(table_ND.dtype),
                           include_last_offset=True)


def _sampled_dots(pat: Pattern, g_BN: torch.Tensor, W_FN: torch.Tensor) -> torch.Tensor:
    """(g W^T) at the pattern's entries, (K,): g[b] . W[i] for each active (b, i), float32 operands and
    result. On CPU a numba kernel (kernels.sampled_dots); elsewhere torch's SDDMM, sampled_addmm (float32
    only). (embedding_bag's per-sample-weight backward computes the same dots in bfloat16 but measured 5 ms
    a call at any width, 40x sampled_addmm's at 128.)"""
    if g_BN.device.type == "cpu":
        return kernels.sampled_dots(pat.col_offsets, pat.rows_by_col_K, pat.by_col_K, g_BN, W_FN)
    with warnings.catch_warnings():  # "CSR support is in beta": sampled_addmm is all we use of it
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(pat.row_offsets, pat.cols_K, g_BN.new_zeros(pat.nnz, dtype=torch.float32),
                                      (pat.n_rows, pat.n_cols), check_invariants=False)  # zeros: 0 x NaN is NaN
    return torch.sparse.sampled_addmm(csr, g_BN, W_FN.T, beta=0.0).values()


class _SparseAffine(torch.autograd.Function):
    """S @ W + b for S (B, F) given by a pattern and its values (K,), W (F, N) and b (N,) float32: the product in
    `dtype` (float32 accumulation, one rounding, as autocast's matmul), b added in float32 (as to autocast's
    product), the gradients in float32. With b inside, the gradient arrives in float32 and is used as it is,
    where autograd would round it to the product's dtype and the backward widen it again (under bfloat16 two
    passes over (B, N) for nothing but a rounding)."""

    @staticmethod
    def forward(ctx, vals_K: torch.Tensor, W_FN: torch.Tensor, b_N: torch.Tensor, pat: Pattern,  # type: ignore[override]
                dtype: torch.dtype, name: str) -> torch.Tensor:
        with record_function(f"csae.sparse.{name}"):
            ctx.save_for_backward(vals_K, W_FN)
            ctx.pat, ctx.name = pat, name
            prod_BN = _bags(pat.cols_K, W_FN.to(dtype, memory_format=torch.contiguous_format), pat.row_offsets, vals_K)
            return torch.add(prod_BN, b_N)  # float32 for a float32 b, as type promotion gives it

    @staticmethod
    @record_function("csae.sparse.affine.backward")
    def backward(ctx, g_BN: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        vals_K, W_FN = ctx.saved_tensors
        pat: Pattern = ctx.pat
        g_BN = g_BN.float().contiguous()
        d_vals = d_W = d_b = None
        if ctx.needs_input_grad[0]:
            d_vals = _sampled_dots(pat, g_BN, W_FN)
        if ctx.needs_input_grad[1]:  # S^T g, one bag per feature
            d_W = _bags(pat.rows_by_col_K, g_BN, pat.col_offsets, vals_K.index_select(0, pat.by_col_K))
        if ctx.needs_input_grad[2]:
            d_b = g_BN.sum(0)
        return d_vals, d_W, d_b, None, None, None


class _SparseEncode(torch.autograd.Function):
    """ReLU((x - b_dec) W_enc + b_enc) at its non-zero entries (K,), the pattern handed back in `out`.
    The matmul runs in `dtype` rounded as autocast rounds it; bias and ReLU in float32. Backward: W_enc's,
    b_enc's and b_dec's gradients (and x's, if asked) from the K entries only, in float32."""

    @staticmethod
    @record_function("csae.sparse.encoder")
    def forward(ctx, x_BD: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,  # type: ignore[override]
                dtype: torch.dtype, out: dict, select: Select) -> torch.Tensor:
        xc_BD = x_BD.float() - b_dec
        # the product in `dtype`; the float32 bias is added in float32 (as autocast's dense path adds it) by
        # `select` (ReLU's `active`, TopK's...), on the way to the kept entries; each kept f equals its p + b,
        # so the gradient through f is the identity at the kept entries for every activation
        pat, vals_K = select(xc_BD.to(dtype) @ W_enc.to(dtype), b_enc.detach())
        ctx.save_for_backward(xc_BD, W_enc)
        ctx.pat = out["pattern"] = pat
        return vals_K

    @staticmethod
    @record_function("csae.sparse.encoder.backward")
    def backward(ctx, g_K: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xc_BD, W_enc = ctx.saved_tensors
        pat: Pattern = ctx.pat
        g_K = g_K.float()
        # (F, D) transposed to W_enc's (D, F): no copy when W_enc is stored feature-major (see CSAETrainer)
        dW_enc = _bags(pat.rows_by_col_K, xc_BD, pat.col_offsets, g_K.index_select(0, pat.by_col_K)).t()
        db_enc = g_K.new_zeros(pat.n_cols).index_add_(0, pat.cols_K, g_K)
        dx = None
        if ctx.needs_input_grad[0]:  # g_pre W_enc^T: never needed in training (x is data)
            dx = _bags(pat.cols_K, W_enc.t().contiguous(), pat.row_offsets, g_K)
        # b_dec enters as -b_dec in every row: minus the column sums of x's gradient, W_enc db_enc
        db_dec = -(W_enc @ db_enc) if dx is None else -dx.sum(0)
        return dx, dW_enc, db_enc, db_dec, None, None, None


@dataclass(frozen=True)
class SparseFeatures:
    """The SAE's features of a batch as a pattern and its values (vals_K carries the autograd graph)."""

    pat: Pattern
    vals_K: torch.Tensor
    dtype: torch.dtype  # of the products (autocast's)

    def affine(self, W_FN: torch.Tensor, b_N: torch.Tensor, name: str = "affine") -> torch.Tensor:
        """f @ W + b, (B, N): the product in `dtype`, as autocast's matmul gives it, plus b (`name` labels it in
        profiles)."""
        with torch.autocast(self.vals_K.device.type, enabled=False):
            return _SparseAffine.apply(self.vals_K, W_FN, b_N, self.pat, self.dtype, name)

    def l1(self) -> torch.Tensor:
        """Mean over rows of sum_i |f_i| (losses.l1) from the values."""
        return self.vals_K.abs().sum() / self.pat.n_rows

    def l0(self) -> torch.Tensor:
        return self.vals_K.new_tensor(self.pat.nnz / self.pat.n_rows)

    def fired(self) -> torch.Tensor:
        """(F,) bool: features active in some row."""
        return self.pat.col_offsets[1:] > self.pat.col_offsets[:-1]

    def dense(self) -> torch.Tensor:
        """f as a dense (B, F) tensor (differentiable)."""
        out = self.vals_K.new_zeros(self.pat.n_rows * self.pat.n_cols)
        return out.index_put((self.pat.flat_K,), self.vals_K).view(self.pat.n_rows, self.pat.n_cols)

    def prefix(self, h: int) -> SparseFeatures:
        """The features [0, h) of every row (a Matryoshka prefix) as sparse features of width h: the entries
        with a column below h, in the same row-major order (their values through index_select, so gradients
        reach vals_K)."""
        keep_J = (self.pat.cols_K < h).nonzero().squeeze(1)
        cols_J, rows_J = self.pat.cols_K.index_select(0, keep_J), self.pat.rows_K.index_select(0, keep_J)
        pat = pattern_of_entries(rows_J, cols_J, self.pat.n_rows, h, cols_J.device.type == "cpu")
        return SparseFeatures(pat, self.vals_K.index_select(0, keep_J), self.dtype)


def encode(x_BD: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
           dtype: torch.dtype, select: Select | None = None) -> SparseFeatures:
    """f = act((x - b_dec) W_enc + b_enc) as sparse features, act given by `select` (default ReLU: `active`);
    `dtype` is the matmul's (autocast's)."""
    out: dict = {}
    with torch.autocast(x_BD.device.type, enabled=False):
        vals_K = _SparseEncode.apply(x_BD, W_enc, b_enc, b_dec, dtype, out, select or active)
    return SparseFeatures(out["pattern"], vals_K, dtype)


@dataclass(frozen=True)
class DenseFeatures:
    """The dense path's features (B, F), with SparseFeatures' interface."""

    f_BF: torch.Tensor
    autocast_dtype: torch.dtype | None  # None: float32

    def affine(self, W_FN: torch.Tensor, b_N: torch.Tensor, name: str = "affine") -> torch.Tensor:
        """f @ W + b under the run's autocast, as the SAE's decode computes it."""
        with torch.autocast(self.f_BF.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            return self.f_BF @ W_FN + b_N

    def l1(self) -> torch.Tensor:
        return losses.l1(self.f_BF)

    def l0(self) -> torch.Tensor:
        return losses.l0(self.f_BF)

    def fired(self) -> torch.Tensor:
        return (self.f_BF > 0).any(dim=0)

    def dense(self) -> torch.Tensor:
        return self.f_BF

    def prefix(self, h: int) -> DenseFeatures:
        """The features [0, h) of every row (a Matryoshka prefix)."""
        return DenseFeatures(self.f_BF[:, :h], self.autocast_dtype)


Features = SparseFeatures | DenseFeatures

#: The sparse path pays below this density (active share of B x F), measured with bench/sparse.py: the
#: step's crossover on 2 cores at d 640, expansion 4, batch 512, per compute dtype. float32: dense/sparse
#: 1.84 at 20%, 1.40 at 30%, 1.10 at 40%; bfloat16: 1.29 at 10%, 1.07 at 15%, 0.87 at 20% (2026-12-02, with
#: the numba kernels; was 30% and 13% before them, 15% and 8% before that; a fresh SAE passes these densities
#: in its first ~100 steps).
SPARSE_BELOW = {torch.float32: 0.4, torch.bfloat16: 0.15}


def pays(density: float, device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether a step at this density is faster on the sparse path (measured on CPUs; elsewhere dense)."""
    return device.type == "cpu" and density < SPARSE_BELOW[compute_dtype]
