"""Dead-feature resampling: revive features that stopped firing, pointing them at badly reconstructed inputs.

A feature is dead when it did not fire during the last window of steps. The recipe (Anthropic's "Towards
Monosemanticity" resampling, as SAELens and dictionary_learning implement it): take a pool of training rows
(`resample_pool`, read from the store's training part, not one batch), compute each row's squared
reconstruction error ||x - x_hat||^2, and draw one row per dead feature WITHOUT replacement with
probability proportional to that error, among the pool's distinct rows. Each dead feature gets a decoder
row (unit norm) and encoder column along x - b_dec; the encoder column's norm is `scale` x the mean norm of
the living encoder columns, its bias 0, and its AdamW moments are zeroed (stale moments would push it
straight back). Drawing without replacement is what keeps revived features apart: with replacement, two
features revived onto the same row get bit-identical weights, and in a plain SAE (no head to break the
tie) they stay identical for the rest of training.

If there are more dead features than distinct candidate rows, the rest are drawn again from the
candidates and every repeated direction gets small Gaussian noise (logged), so no two revived features
are equal.

Under DDP every rank reads the same pool, computes the errors of its slice of it, and all-gathers them;
the dead set comes from all-reduced firing statistics and the directions are broadcast from rank 0, so
every rank resamples the same features the same way.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from csae.shared.sae import SAE

log = logging.getLogger(__name__)

#: Norm of the noise added to a repeated direction (relative to the unit direction): cos ~ 0.995 to its twin.
REPEAT_NOISE = 0.1


def dead_mask(last_fired_F: torch.Tensor, step: int, window: int, *, distributed: bool) -> torch.Tensor:
    """Features that fired in none of steps (step - window, step]. last_fired_F: (F,) int64, -1 = never."""
    if distributed:
        last_fired_F = last_fired_F.clone()
        dist.all_reduce(last_fired_F, op=dist.ReduceOp.MAX)
    return last_fired_F <= step - window


@torch.no_grad()
def squared_errors(sae: SAE, pool_ND: torch.Tensor, *, batch: int = 4096, distributed: bool = False,
                   autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """||x - x_hat||^2 of every pool row (N,), float32. Under DDP each rank computes a slice and all
    ranks get the whole vector."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    per_rank = -(-len(pool_ND) // world)
    mine = pool_ND[rank * per_rank:(rank + 1) * per_rank]
    err = torch.zeros(per_rank, dtype=torch.float32, device=pool_ND.device)
    for s in range(0, len(mine), batch):
        x = mine[s:s + batch]
        with autocast or contextlib.nullcontext():
            x_hat, _ = sae(x)
        err[s:s + len(x)] = (x - x_hat.float()).pow(2).sum(dim=1)
    if not distributed:
        return err[: len(pool_ND)]
    parts = [torch.empty_like(err) for _ in range(world)]
    dist.all_gather(parts, err)
    return torch.cat(parts)[: len(pool_ND)]


def distinct_rows(x_ND: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each distinct row (rows compared through a float64 random
    projection: equal rows always collide; unequal rows collide with probability ~0)."""
    gen = torch.Generator().manual_seed(0)
    key_N = (x_ND.double() @ torch.randn(x_ND.shape[1], dtype=torch.float64, generator=gen).to(x_ND.device)).cpu()
    _, first = np.unique(key_N.numpy(), return_index=True)
    return torch.from_numpy(np.sort(first))


def choose_directions(pool_ND: torch.Tensor, err_N: torch.Tensor, b_dec_D: torch.Tensor, n: int,
                      generator: torch.Generator) -> torch.Tensor:
    """n unit directions x - b_dec, x drawn without replacement from the pool's distinct rows with
    probability proportional to err_N. (n, D)."""
    cand = distinct_rows(pool_ND)
    weights = err_N.cpu()[cand].double()
    cand, weights = cand[weights > 0], weights[weights > 0]
    if len(cand) == 0:  # a perfect fit everywhere still needs rows to draw from
        cand = distinct_rows(pool_ND)
        weights = torch.ones(len(cand), dtype=torch.float64)
    take = min(n, len(cand))
    pick = torch.multinomial(weights, take, replacement=False, generator=generator)
    extra = n - take
    if extra:
        log.warning("resampling %d dead features from only %d distinct candidate rows in a pool of %d: %d "
                    "directions repeat, with noise of norm %.2g added", n, len(cand), len(pool_ND), extra,
                    REPEAT_NOISE)
        pick = torch.cat([pick, torch.multinomial(weights, extra, replacement=True, generator=generator)])
    dirs_SD = F.normalize(pool_ND[cand[pick].to(pool_ND.device)] - b_dec_D, dim=1)
    if extra:
        noise = F.normalize(torch.randn(extra, dirs_SD.shape[1], generator=generator), dim=1) * REPEAT_NOISE
        dirs_SD[take:] = F.normalize(dirs_SD[take:] + noise.to(dirs_SD.device), dim=1)
    return dirs_SD


@torch.no_grad()
def resample_(sae: SAE, optimizer: torch.optim.Optimizer, dirs_SD: torch.Tensor, dead_F: torch.Tensor, *,
              scale: float, distributed: bool) -> torch.Tensor:
    """Point the features in dead_F along dirs_SD (one unit row per dead feature) in place; returns their
    indices (S,)."""
    idx_S = dead_F.nonzero().squeeze(1)
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
