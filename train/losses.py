"""The CSAE loss terms as pure functions (no module state, no randomness of their own).

Shape suffixes: B batch rows, D d_model, F dictionary features, C head width, P pairs, S sampled features.
Every term returns a scalar averaged over rows, so its weight does not depend on the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Reconstruction error: mean over rows b of sum_d (x_bd - x_hat_bd)^2. Shapes (B, D), (B, D) -> ()."""
    return (x_BD.float() - x_hat_BD.float()).pow(2).sum(dim=1).mean()


def l1(f_BF: torch.Tensor) -> torch.Tensor:
    """Sparsity: mean over rows b of sum_i |f_bi|. With unit-norm decoder rows this equals the
    decoder-norm-weighted L1 of Anthropic's formulation. Shape (B, F) -> ()."""
    return f_BF.float().abs().sum(dim=1).mean()


def info_nce(z_a_PC: torch.Tensor, z_p_PC: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives. Shapes (P, C), (P, C) -> ().

    s_ij = cos(z_a_i, z_p_j) / temperature; loss = (CE(s, diag) + CE(s^T, diag)) / 2, i.e. for each anchor the
    positive must beat the other P-1 pairs' positives, and for each positive the other anchors.
    """
    a_PC = F.normalize(z_a_PC.float(), dim=1)
    p_PC = F.normalize(z_p_PC.float(), dim=1)
    s_PP = a_PC @ p_PC.T / temperature
    target_P = torch.arange(s_PP.shape[0], device=s_PP.device)
    return 0.5 * (F.cross_entropy(s_PP, target_P) + F.cross_entropy(s_PP.T, target_P))


class _Diversity(torch.autograd.Function):
    """sum_{i != j} cos(w_i, w_j)^2 over the rows idx_S of W (F, D) -> (), in float32, with its gradient
    written out: with u the unit rows and G = u u^T, dL/du = 4 (G - diag G) u (one S x S x D product instead of
    autograd's two: G has u on both sides), and through the normalisation dL/dw = (dL/du - u (u . dL/du)) / |w|.
    The gradient comes back sparse, on the S rows: a dense one would zero all F rows and add them into W's
    gradient every step, more work than the term itself."""

    @staticmethod
    def forward(ctx, W_FD: torch.Tensor, idx_S: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w_SD = W_FD[idx_S].float()
        norm_S1 = w_SD.norm(dim=1, keepdim=True).clamp_min(1e-12)  # as F.normalize
        u_SD = w_SD / norm_S1
        off_SS = u_SD @ u_SD.T
        off_SS.diagonal().zero_()
        ctx.save_for_backward(idx_S, u_SD, norm_S1, off_SS)
        ctx.shape, ctx.dtype = W_FD.shape, W_FD.dtype
        return off_SS.pow(2).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        idx_S, u_SD, norm_S1, off_SS = ctx.saved_tensors
        du_SD = (off_SS @ u_SD) * (4 * g)
        dw_SD = (du_SD - u_SD * (u_SD * du_SD).sum(dim=1, keepdim=True)) / norm_S1
        return torch.sparse_coo_tensor(idx_S.unsqueeze(0), dw_SD.to(ctx.dtype), ctx.shape, check_invariants=False), None


def diversity(W_dec_FD: torch.Tensor, idx_S: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared cosine similarity over ordered pairs of distinct decoder rows. (F, D), (S,) -> ().

    idx_S picks a subset of distinct rows (the Gram matrix of all F rows costs F^2 D per step); None uses all.
    sum_{i != j} cos(w_i, w_j)^2 / (S (S - 1)), in float32.
    """
    idx_S = torch.arange(len(W_dec_FD), device=W_dec_FD.device) if idx_S is None else idx_S
    n = len(idx_S)
    if n < 2:
        return W_dec_FD.new_zeros((), dtype=torch.float32)
    return _Diversity.apply(W_dec_FD, idx_S) / (n * (n - 1))


def fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean_b x||^2. (B, D), (B, D) -> ()."""
    x_BD = x_BD.float()
    resid = (x_BD - x_hat_BD.float()).pow(2).sum()
    total = (x_BD - x_BD.mean(dim=0, keepdim=True)).pow(2).sum()
    return resid / total.clamp_min(1e-12)


def l0(f_BF: torch.Tensor) -> torch.Tensor:
    """Mean number of active features per row. (B, F) -> ()."""
    return (f_BF > 0).float().sum(dim=1).mean()
