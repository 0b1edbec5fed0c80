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


def _unit_rows(w_SD: torch.Tensor, idx_S: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, |w|) of the rows idx_S of w (all rows: None), in float32: u = w / max(|w|, 1e-12) as F.normalize."""
    w_SD = (w_SD if idx_S is None else w_SD.index_select(0, idx_S)).float()
    norm_S1 = torch.linalg.vector_norm(w_SD, dim=1, keepdim=True).clamp_min(1e-12)
    return w_SD / norm_S1, norm_S1


def _unit_rows_backward(u_SD: torch.Tensor, norm_S1: torch.Tensor, du_SD: torch.Tensor, scale: torch.Tensor
                        ) -> torch.Tensor:
    """The gradient in w through u = w / |w| when the loss's gradient in u is scale * du (du in any float dtype):
    scale (du - u (u . du)) / |w|, in float32, in three passes over (S, D) (the scale joins 1 / |w|, a column).
    (A numba kernel for the row-wise passes measured no faster in the training step.)"""
    du_SD = du_SD.float()
    radial_S1 = torch.linalg.vecdot(u_SD, du_SD).unsqueeze(1)
    return torch.addcmul(du_SD, u_SD, radial_S1, value=-1).mul_(scale / norm_S1)


class _InfoNCE(torch.autograd.Function):
    """The symmetric InfoNCE of `info_nce` with its gradient written out. With u the unit rows of z, a and p
    their halves (anchors, positives), s = a p^T / t, R and C the softmaxes of s over rows and over columns:
        L = -(1 / 2P) (sum_i log R_ii + sum_j log C_jj)
        dL/ds = (R + C - 2 I) / 2P;   dL/da = dL/ds p / t,   dL/dp = (dL/ds)^T a / t
    and through the normalisation dL/dz = (dL/du - u (u . dL/du)) / |z|. The three P x P x C products take
    their operands in `dtype` with float32 accumulation, as autocast's matmul (bfloat16: 35-45 against
    95-100 us each at P 256, C 128 on 2 cores); the rest is float32. log_softmax gives log R and log C
    without overflow or cancellation at any temperature, and exp of them the softmaxes for the backward. One
    graph node for the whole (2P, C) input instead of autograd's ~15 through two cross entropies."""

    @staticmethod
    def forward(ctx, z_BC: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        P = len(z_BC) // 2
        u_BC, norm_B1 = _unit_rows(z_BC.float())
        u_dt = u_BC.to(dtype)
        s_PP = torch.mm(u_dt[:P], u_dt[P:].T).float().mul_(1 / temperature)
        log_rows_PP = torch.log_softmax(s_PP, 1)  # anchor i's candidates
        log_cols_PP = torch.log_softmax(s_PP, 0)  # positive j's
        loss = (log_rows_PP.trace() + log_cols_PP.trace()) / (-2 * P)
        ctx.save_for_backward(u_BC, u_dt, norm_B1, log_rows_PP.exp_(), log_cols_PP.exp_())
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        u_BC, u_dt, norm_B1, rows_PP, cols_PP = ctx.saved_tensors
        P = len(rows_PP)
        ds_PP = rows_PP + cols_PP  # (not in place: a retained graph may run backward again)
        ds_PP.diagonal().sub_(2.0)
        ds_dt = ds_PP.to(u_dt.dtype)
        du_BC = torch.empty_like(u_dt)
        torch.mm(ds_dt, u_dt[P:], out=du_BC[:P])
        torch.mm(ds_dt.T, u_dt[:P], out=du_BC[P:])
        # with ds/da's 1 / t
        return _unit_rows_backward(u_BC, norm_B1, du_BC, g / (2 * P * ctx.temperature)), None, None


def info_nce(z_BC: torch.Tensor, temperature: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives on pairs stacked in halves: rows [0, P) are the anchors,
    rows [P, 2P) their positives (the loader's layout). Shape (2P, C) -> ().

    s_ij = cos(z_i, z_{P+j}) / temperature; loss = (CE(s, diag) + CE(s^T, diag)) / 2, i.e. for each anchor the
    positive must beat the other P-1 pairs' positives, and for each positive the other anchors. `dtype` is
    its products' (autocast's), the rest float32.
    """
    if len(z_BC) % 2:
        raise ValueError(f"info_nce takes anchors and positives stacked in halves; got {len(z_BC)} rows")
    return _InfoNCE.apply(z_BC, temperature, dtype)


def temporal_info_nce(f_PH: torch.Tensor, f_adj_PH: torch.Tensor, temperature: float,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """T-SAE's contrastive term: the symmetric InfoNCE of `info_nce` taken directly on the high-level codes of P
    tokens and of their neighbours in the sequence (the token at t-1 for the token at t), by cosine similarity
    over in-batch negatives (the other pairs' tokens), no projection head. (P, H), (P, H) -> (). A row of zeros
    (no high-level feature active) has cosine 0 with everything."""
    if f_PH.shape != f_adj_PH.shape:
        raise ValueError(f"temporal_info_nce takes codes of tokens and of their neighbours, one row each; got "
                         f"{tuple(f_PH.shape)} and {tuple(f_adj_PH.shape)}")
    return _InfoNCE.apply(torch.cat([f_PH, f_adj_PH]), temperature, dtype)


class _Diversity(torch.autograd.Function):
    """sum_{i != j} cos(w_i, w_j)^2 / (S (S - 1)) over the rows idx_S of W (F, D) -> (), with its gradient written
    out: with u the unit rows and G = u u^T, dL/du = 4 (G - diag G) u (one S x S x D product instead of autograd's two:
    G has u on both sides), and through the normalisation dL/dw = (dL/du - u (u . dL/du)) / |w|.
    Both products (G and G u) take their operands in `dtype`, float32 accumulation, as autocast's matmul: in
    bfloat16 they cost 0.25 and 0.24 ms against float32's 0.42 and 0.75 (S 256, D 640, 2 cores, casts
    included); G stays in `dtype` for the second, and the rest is float32.
    With unit_rows the rows are taken as unit vectors (u = w: no normalisation) and the gradient is dL/du, whose
    radial part u (u . dL/du) the normalisation would have removed (see `diversity`).
    The gradient comes back sparse, on the S rows: a dense one would zero all F rows and add them into W's
    gradient every step, more work than the term itself."""

    @staticmethod
    def forward(ctx, W_FD: torch.Tensor, idx_S: torch.Tensor, dtype: torch.dtype,  # type: ignore[override]
                unit_rows: bool) -> torch.Tensor:
        if unit_rows:
            u_dt = W_FD.detach().index_select(0, idx_S).to(dtype)
            normalised: tuple[torch.Tensor, ...] = ()
        else:
            u_SD, norm_S1 = _unit_rows(W_FD.detach(), idx_S)
            u_dt, normalised = u_SD.to(dtype), (u_SD, norm_S1)
        off_SS = torch.mm(u_dt, u_dt.T)  # in `dtype`, as the backward's product takes it
        off_SS.diagonal().zero_()
        o = off_SS.view(-1).float()
        ctx.save_for_backward(idx_S, u_dt, off_SS, *normalised)
        ctx.shape, ctx.dtype, ctx.pairs = W_FD.shape, W_FD.dtype, len(idx_S) * (len(idx_S) - 1)
        return torch.dot(o, o) / ctx.pairs

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        idx_S, u_dt, off_SS, *normalised = ctx.saved_tensors
        du_SD, scale = torch.mm(off_SS, u_dt), 4 * g / ctx.pairs
        dw_SD = _unit_rows_backward(*normalised, du_SD, scale) if normalised else du_SD.float().mul_(scale)
        grad = torch.sparse_coo_tensor(idx_S.unsqueeze(0), dw_SD.to(ctx.dtype), ctx.shape, check_invariants=False)
        return grad, None, None, None


def diversity(W_dec_FD: torch.Tensor, idx_S: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
              unit_rows: bool = False) -> torch.Tensor:
    """Mean squared cosine similarity over ordered pairs of distinct decoder rows. (F, D), (S,) -> ().

    idx_S picks a subset of distinct rows (the Gram matrix of all F rows costs F^2 D per step); None uses all.
    sum_{i != j} cos(w_i, w_j)^2 / (S (S - 1)); `dtype` is its two matmuls' (autocast's), the rest float32.
    unit_rows: the rows are unit vectors (as training keeps them), so cos is the dot product; the gradient then
    keeps its radial part, which changes no row's direction and which a caller that moves rows along the unit
    sphere projects out (the trainer's project_decoder_gradient_): after that projection both gradients agree.
    It saves the normalisation and its backward (~0.2 ms of the bfloat16 step at S 256, D 640).
    """
    idx_S = torch.arange(len(W_dec_FD), device=W_dec_FD.device) if idx_S is None else idx_S
    if len(idx_S) < 2:
        return W_dec_FD.new_zeros((), dtype=torch.float32)
    return _Diversity.apply(W_dec_FD, idx_S, dtype, unit_rows)


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
