"""Dead-feature resampling: revive features that stopped firing, pointing them at badly reconstructed inputs.

A feature is dead when it did not fire during the last window of steps. Each dead feature gets a decoder
row (unit norm) and encoder column along an input x - b_dec, with x drawn with probability proportional
to its squared reconstruction error; the encoder column's norm is `scale` x the mean norm of the living
encoder columns, its bias 0, and its AdamW moments are zeroed (stale moments would push it straight
back). Under DDP the dead set is computed from all-reduced firing statistics and the new directions are
broadcast from rank 0, so every rank resamples the same features the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from csae.shared.sae import SAE


def dead_mask(last_fired_F: torch.Tensor, step: int, window: int, *, distributed: bool) -> torch.Tensor:
    """Features that fired in none of steps (step - window, step]. last_fired_F: (F,) int64, -1 = never."""
    if distributed:
        last_fired_F = last_fired_F.clone()
        dist.all_reduce(last_fired_F, op=dist.ReduceOp.MAX)
    return last_fired_F <= step - window


@torch.no_grad()
def resample_(sae: SAE, optimizer: torch.optim.Optimizer, x_BD: torch.Tensor, dead_F: torch.Tensor, *,
              scale: float, generator: torch.Generator, distributed: bool) -> torch.Tensor:
    """Resample the features in dead_F in place; returns their indices (S,)."""
    idx_S = dead_F.nonzero().squeeze(1)
    if len(idx_S) == 0:
        return idx_S
    x_BD = x_BD.float()
    x_hat_BD, _ = sae(x_BD)
    err_B = (x_BD - x_hat_BD).pow(2).sum(dim=1)
    # all-zero error (a perfect fit) still needs a distribution to draw from
    probs_B = err_B if err_B.sum() > 0 else torch.ones_like(err_B)
    pick_S = torch.multinomial(probs_B.cpu(), len(idx_S), replacement=True, generator=generator)
    dirs_SD = F.normalize(x_BD[pick_S.to(x_BD.device)] - sae.b_dec, dim=1)
    if distributed:
        dist.broadcast(dirs_SD, src=0)
    alive_F = ~dead_F
    enc_norm = sae.W_enc[:, alive_F].norm(dim=0).mean() if alive_F.any() else sae.W_enc.new_tensor(1.0)
    sae.W_dec[idx_S] = dirs_SD
    sae.W_enc[:, idx_S] = dirs_SD.T * (scale * enc_norm)
    sae.b_enc[idx_S] = 0.0
    for param, select in ((sae.W_enc, (slice(None), idx_S)), (sae.b_enc, (idx_S,)), (sae.W_dec, (idx_S,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                state[key][select] = 0.0
    return idx_S
