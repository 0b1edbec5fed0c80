"""The CSAE loss terms as pure functions (no module state, no randomness of their own).

Shape suffixes: B batch rows, D d_model, F dictionary features, C head width, P pairs, S sampled features.
Every term returns a scalar averaged over rows, so its weight does not depend on the batch size.
"""

from __future__ import annotations

import torch


class _SquaredError(torch.autograd.Function):
    """sum_bd (x_hat_bd - x_bd)^2 / B with its gradient written out, 2 (x_hat - x) / B: one float32 residual, one
    dot product and one scaling, where autograd's pow, sum and mean take six ops (0.42 against 0.70 ms forward
    and backward at B 512, D 640 on 2 cores)."""

    @staticmethod
    def forward(ctx, x_hat_BD: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        d_BD = x_hat_BD.float() - x_BD.float()
        ctx.save_for_backward(d_BD)
        ctx.dtypes = x_hat_BD.dtype, x_BD.dtype
        d = d_BD.view(-1)
        return torch.dot(d, d) / len(d_BD)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        (d_BD,) = ctx.saved_tensors
        grad_BD = d_BD * (2 * g / len(d_BD))
        return (grad_BD.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
                -grad_BD.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None)


def reconstruction(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Reconstruction error: mean over rows b of sum_d (x_bd - x_hat_bd)^2, in float32. Shapes (B, D), (B, D) -> ()."""
    return _SquaredError.apply(x_hat_BD, x_BD)


def l1(f_BF: torch.Tensor) -> torch.Tensor:
    """Sparsity: mean over rows b of sum_i |f_bi|. With unit-norm decoder rows this equals the
    decoder-norm-weighted L1 of Anthropic's formulation. Shape (B, F) -> ()."""
    return f_BF.float().abs().sum(dim=1).mean()


class _InfoNCE(torch.autograd.Function):
    """The symmetric InfoNCE of `info_nce` with its gradient written out. With u the unit rows of z, a and p
    their halves (anchors, positives), s = a p^T / t, R and C the softmaxes of s over rows and over columns:
        L = (1 / 2P) sum_i (lse_j s_ij - s_ii) + (1 / 2P) sum_j (lse_i s_ij - s_jj)
        dL/ds = (R + C - 2 I) / 2P;   dL/da = dL/ds p / t,   dL/dp = (dL/ds)^T a / t
    and through the normalisation dL/dz = (dL/du - u (u . dL/du)) / |z|. Two exponentials of the P x P
    similarities instead of autograd's four (each cross entropy's forward and backward), and one graph node
    for the whole (2P, C) input instead of ~15 plus the halves' slices: 1.13 against 1.31 ms forward and
    backward at P 256, C 128 on 2 cores (against 1.54 for autograd through two cross entropies)."""

    @staticmethod
    def forward(ctx, z_BC: torch.Tensor, temperature: float) -> torch.Tensor:  # type: ignore[override]
        z_BC = z_BC.float()
        P = len(z_BC) // 2
        norm_B1 = z_BC.norm(dim=1, keepdim=True).clamp_min(1e-12)
        u_BC = z_BC / norm_B1  # as F.normalize
        s_PP = torch.mm(u_BC[:P], u_BC[P:].T).div_(temperature)
        diag_P = s_PP.diagonal()
        softmaxes, total = [], s_PP.new_zeros(())
        for dim in (1, 0):  # over each row (anchor i's candidates), then each column (positive j's)
            m_P = s_PP.amax(dim=dim)
            e_PP = torch.exp(s_PP - m_P.unsqueeze(dim))
            sum_P = e_PP.sum(dim=dim)
            softmaxes.append(e_PP.div_(sum_P.unsqueeze(dim)))
            # lse - s_ii per row as (m - s_ii) + log(sum): no cancellation of large terms when the loss is small
            total = total + ((m_P - diag_P) + sum_P.log()).sum()
        ctx.save_for_backward(u_BC, norm_B1, *softmaxes)
        ctx.temperature = temperature
        return total / (2 * P)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        u_BC, norm_B1, rows_PP, cols_PP = ctx.saved_tensors
        P = len(rows_PP)
        ds_PP = rows_PP + cols_PP  # (not in place: a retained graph may run backward again)
        ds_PP.diagonal().sub_(2.0)
        ds_PP.mul_(g / (2 * P * ctx.temperature))  # with ds/da's 1 / t
        du_BC = torch.empty_like(u_BC)
        torch.mm(ds_PP, u_BC[P:], out=du_BC[:P])
        torch.mm(ds_PP.T, u_BC[:P], out=du_BC[P:])
        return (du_BC - u_BC * (u_BC * du_BC).sum(dim=1, keepdim=True)) / norm_B1, None


def info_nce(z_BC: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives, in float32, on pairs stacked in halves: rows [0, P) are the
    anchors, rows [P, 2P) their positives (the loader's layout). Shape (2P, C) -> ().

    s_ij = cos(z_i, z_{P+j}) / temperature; loss = (CE(s, diag) + CE(s^T, diag)) / 2, i.e. for each anchor the
    positive must beat the other P-1 pairs' positives, and for each positive the other anchors.
    """
    if len(z_BC) % 2:
        raise ValueError(f"info_nce takes anchors and positives stacked in halves; got {len(z_BC)} rows")
    return _InfoNCE.apply(z_BC, temperature)


class _Diversity(torch.autograd.Function):
    """sum_{i != j} cos(w_i, w_j)^2 over the rows idx_S of W (F, D) -> (), with its gradient written out: with
    u the unit rows and G = u u^T, dL/du = 4 (G - diag G) u (one S x S x D product instead of autograd's two:
    G has u on both sides), and through the normalisation dL/dw = (dL/du - u (u . dL/du)) / |w|.
    Both products (G and G u) take their operands in `dtype`, float32 accumulation, as autocast's matmul: in
    bfloat16 they cost 0.25 and 0.24 ms against float32's 0.42 and 0.75 (S 256, D 640, 2 cores, casts
    included); the rest is float32.
    The gradient comes back sparse, on the S rows: a dense one would zero all F rows and add them into W's
    gradient every step, more work than the term itself."""

    @staticmethod
    def forward(ctx, W_FD: torch.Tensor, idx_S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        w_SD = W_FD.index_select(0, idx_S).float()
        norm_S1 = w_SD.norm(dim=1, keepdim=True).clamp_min(1e-12)  # as F.normalize
        u_SD = w_SD / norm_S1
        u_dt = u_SD.to(dtype)
        off_SS = (u_dt @ u_dt.T).float()
        off_SS.diagonal().zero_()
        ctx.save_for_backward(idx_S, u_SD, norm_S1, off_SS)
        ctx.shape, ctx.dtype, ctx.product_dtype = W_FD.shape, W_FD.dtype, dtype
        return off_SS.pow(2).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        idx_S, u_SD, norm_S1, off_SS = ctx.saved_tensors
        dt = ctx.product_dtype
        du_SD = (off_SS.to(dt) @ u_SD.to(dt)).float() * (4 * g)
        dw_SD = (du_SD - u_SD * (u_SD * du_SD).sum(dim=1, keepdim=True)) / norm_S1
        grad = torch.sparse_coo_tensor(idx_S.unsqueeze(0), dw_SD.to(ctx.dtype), ctx.shape, check_invariants=False)
        return grad, None, None


def diversity(W_dec_FD: torch.Tensor, idx_S: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean squared cosine similarity over ordered pairs of distinct decoder rows. (F, D), (S,) -> ().

    idx_S picks a subset of distinct rows (the Gram matrix of all F rows costs F^2 D per step); None uses all.
    sum_{i != j} cos(w_i, w_j)^2 / (S (S - 1)); `dtype` is its two matmuls' (autocast's), the rest float32.
    """
    idx_S = torch.arange(len(W_dec_FD), device=W_dec_FD.device) if idx_S is None else idx_S
    n = len(idx_S)
    if n < 2:
        return W_dec_FD.new_zeros((), dtype=torch.float32)
    return _Diversity.apply(W_dec_FD, idx_S, dtype) / (n * (n - 1))


def fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean_b x||^2. (B, D), (B, D) -> ()."""
    return fvu_of_reconstruction(reconstruction(x_BD, x_hat_BD), x_BD)


def fvu_of_reconstruction(recon: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
    """The FVU of a batch from its reconstruction term (`reconstruction`: the mean over rows of the squared
    error), so a training step need not form the residual twice. (), (B, D) -> ()."""
    x_BD = x_BD.float()
    c = (x_BD - x_BD.mean(dim=0)).view(-1)
    return recon.detach() * len(x_BD) / torch.dot(c, c).clamp_min(1e-12)


def l0(f_BF: torch.Tensor) -> torch.Tensor:
    """Mean number of active features per row. (B, F) -> ()."""
    return (f_BF > 0).float().sum(dim=1).mean()
