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

Distinct rows can still be near-parallel (a few outlier tokens with 10x the median norm carry most of the
error on some layers). So the draw takes more rows than needed, in its weighted random order, and prefers
those whose direction is within cosine MAX_COS of no living feature and of no row preferred before it;
only when the pool has too few such rows (logged) do closer directions fill up.

If there are more dead features than distinct candidate rows, the rest are drawn again from the
candidates and every repeated direction gets small Gaussian noise (logged), so no two revived features
are equal.

Under DDP every rank reads the same pool, computes the errors of its slice of it, and all-gathers them;
the dead set comes from all-reduced firing statistics and the directions are broadcast from rank 0, so
every rank resamples the same features the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from csae.shared.sae.autoencoder import SAE

log = logging.getLogger(__name__)

#: Norm of the noise added to a repeated direction (relative to the unit direction): cos ~ 0.995 to its twin.
REPEAT_NOISE = 0.1

#: Drawn rows whose direction comes within this cosine of a living feature or of another drawn row go last:
#: the highest-error rows are often near-parallel (on layer 8 of Gemma 3 270M, a few tokens with 10x the
#: median norm carry most of the error), and reviving many features onto them made a cluster of 40 features
#: with pairwise cosines > 0.99.
MAX_COS = 0.9


def dead_mask(last_fired_F: torch.Tensor, step: int, window: int, *, distributed: bool) -> torch.Tensor:
    """Features that fired in none of steps (step - window, step]. last_fired_F: (F,) int64, -1 = never."""
    if distributed:
        last_fired_F = last_fired_F.clone()
        dist.all_reduce(last_fired_F, op=dist.ReduceOp.MAX)
    return last_fired_F <= step - window


@torch.no_grad()
def squared_errors(reconstruct: Callable[[torch.Tensor], torch.Tensor], pool_ND: torch.Tensor, *,
                   batch: int = 4096, distributed: bool = False) -> torch.Tensor:
    """||x - reconstruct(x)||^2 of every pool row (N,), float32. Under DDP each rank computes a slice and
    all ranks get the whole vector."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    per_rank = -(-len(pool_ND) // world)
    mine = pool_ND[rank * per_rank:(rank + 1) * per_rank]
    err = torch.zeros(per_rank, dtype=torch.float32, device=pool_ND.device)
    for s in range(0, len(mine), batch):
        x = mine[s:s + batch]
        err[s:s + len(x)] = (x - reconstruct(x).float()).pow(2).sum(dim=1)
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


def spread_order(dirs_MD: torch.Tensor, living_FD: torch.Tensor, max_cos: float) -> tuple[torch.Tensor, int]:
    """A reordering of candidate unit directions (M,): first, greedily in the given order, those within
    cosine max_cos of no living feature and of no direction taken before them; then the others, in order.
    Also returns how many came first."""
    near_M = ((dirs_MD @ living_FD.T).amax(dim=1) > max_cos).cpu().numpy() if len(living_FD) else None
    close_MM = (dirs_MD @ dirs_MD.T > max_cos).cpu().numpy()
    blocked = near_M.copy() if near_M is not None else np.zeros(len(dirs_MD), dtype=bool)
    first = []
    for i in range(len(dirs_MD)):
        if not blocked[i]:
            first.append(i)
            blocked |= close_MM[i]
    rest = np.setdiff1d(np.arange(len(dirs_MD)), first, assume_unique=True)
    return torch.from_numpy(np.concatenate([np.asarray(first, dtype=np.int64), rest])), len(first)


def choose_directions(pool_ND: torch.Tensor, err_N: torch.Tensor, b_dec_D: torch.Tensor, n: int,
                      generator: torch.Generator, living_FD: torch.Tensor | None = None) -> torch.Tensor:
    """n unit directions x - b_dec, x drawn without replacement from the pool's distinct rows with
    probability proportional to err_N, preferring directions within cosine MAX_COS of no living feature
    (rows of living_FD) and of no other drawn direction. (n, D)."""
    cand = distinct_rows(pool_ND)
    weights = err_N.cpu()[cand].double()
    cand, weights = cand[weights > 0], weights[weights > 0]
    if len(cand) == 0:  # a perfect fit everywhere still needs rows to draw from
        cand = distinct_rows(pool_ND)
        weights = torch.ones(len(cand), dtype=torch.float64)
    # an ordered weighted draw of more candidates than needed, then the spread-out ones first
    drawn = torch.multinomial(weights, min(len(cand), max(4 * n, n + 256)), replacement=False, generator=generator)
    dirs_MD = F.normalize(pool_ND[cand[drawn].to(pool_ND.device)] - b_dec_D, dim=1)
    living = living_FD if living_FD is not None else dirs_MD[:0]
    order, n_spread = spread_order(dirs_MD, F.normalize(living.to(dirs_MD.dtype), dim=1), MAX_COS)
    take = min(n, len(cand))
    if n_spread < take:
        log.warning("resampling %d dead features: only %d of the %d rows drawn point more than cosine %.2g away "
                    "from every living feature and from each other; %d directions come closer", n, n_spread,
                    len(order), MAX_COS, take - n_spread)
    dirs_SD = dirs_MD[order[:take].to(dirs_MD.device)]
    extra = n - take
    if extra:
        log.warning("resampling %d dead features from only %d distinct candidate rows in a pool of %d: %d "
                    "directions repeat, with noise of norm %.2g added", n, len(cand), len(pool_ND), extra,
                    REPEAT_NOISE)
        again = torch.multinomial(weights[drawn], extra, replacement=True, generator=generator)
        noise = F.normalize(torch.randn(extra, dirs_SD.shape[1], generator=generator), dim=1) * REPEAT_NOISE
        dirs_SD = torch.cat([dirs_SD, F.normalize(dirs_MD[again.to(dirs_MD.device)] + noise.to(dirs_MD.device),
                                                  dim=1)])
    return dirs_SD


@torch.no_grad()
def resample_(sae: SAE, moments: Callable[[torch.Tensor], dict[str, torch.Tensor]], dirs_SD: torch.Tensor,
              dead_F: torch.Tensor, *, scale: float, distributed: bool) -> torch.Tensor:
    """Point the features in dead_F along dirs_SD (one unit row per dead feature) in place; returns their
    indices (S,). `moments(param)` gives the optimiser's per-element state of a parameter, whose entries of
    the resampled features are zeroed."""
    idx_S = dead_F.nonzero().squeeze(1)
    if distributed:
        dist.broadcast(dirs_SD, src=0)
    alive_F = ~dead_F
    enc_norm = sae.W_enc[:, alive_F].norm(dim=0).mean() if alive_F.any() else sae.W_enc.new_tensor(1.0)
    sae.W_dec[idx_S] = dirs_SD
    sae.W_enc[:, idx_S] = dirs_SD.T * (scale * enc_norm)
    sae.b_enc[idx_S] = 0.0
    for param, select in ((sae.W_enc, (slice(None), idx_S)), (sae.b_enc, (idx_S,)), (sae.W_dec, (idx_S,))):
        for moment in moments(param).values():
            moment[select] = 0.0
    return idx_S
