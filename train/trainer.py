"""The CSAE training step and the per-layer loop.

`CSAETrainer` holds the model, head, optimiser and dead-feature statistics and does one step on a batch;
`train_layer` is the loop, which reads top to bottom: schedule, step, resample, log, checkpoint.
All randomness after initialisation comes from generators seeded by (seed, step), so a resumed run
repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from csae.shared.checkpoint import LayerInfo, write_final
from csae.shared.config.base import to_dict
from csae.shared.config.train import TrainConfig
from csae.shared.errors import UserError
from csae.shared.head import ContrastiveHead
from csae.shared.sae import SAE
from csae.train import losses
from csae.train.checkpoint import STATE_FILE, MetricsLog, all_finite, save_state
from csae.train.loader import ChunkLoader, NonFiniteActivations
from csae.train.resample import choose_directions, dead_mask, resample_, squared_errors

METRIC_NAMES = ("loss", "recon_loss", "l1", "info_nce", "diversity", "l0", "fvu", "grad_norm_sae", "grad_norm_head")


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on `keys` (numpy's SeedSequence mixes them, so nearby keys give
    unrelated streams: seed 1's initialisation is not seed 0's head initialisation)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


#: What each random stream is for (the second key of derive_seed).
INIT_SAE, INIT_HEAD, DATA, DIVERSITY, VIEWS, RESAMPLE = range(6)


def step_generator(seed: int, step: int, purpose: int) -> torch.Generator:
    """A generator that depends only on (seed, step, purpose): what makes resume exact."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, step))


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains (resolved by the caller, never read from the environment here)."""
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain float32
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


class CSAETrainer:
    def __init__(self, cfg: TrainConfig, d_in: int, rt: Runtime, seed: int) -> None:
        self.cfg, self.rt, self.seed = cfg, rt, seed
        d_sae = d_in * cfg.expansion
        self.sae = SAE(d_in, d_sae, device=rt.device)
        # the same for every run with this seed (the CSAE and its baseline start from the same weights)
        self.sae.reset_parameters_(torch.Generator().manual_seed(derive_seed(seed, INIT_SAE)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, INIT_HEAD))
            self.head = ContrastiveHead(d_sae, cfg.head_dim, cfg.head_hidden).to(rt.device)
        # the head only gets gradients (and optimiser state) when the contrastive term is on
        self.head_params = list(self.head.parameters()) if cfg.contrastive else []
        self.params = list(self.sae.parameters()) + self.head_params
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.last_fired_F = torch.full((d_sae,), -1, dtype=torch.long, device=rt.device)

    @torch.no_grad()
    def init_b_dec_(self, sample_ND: torch.Tensor, iters: int = 30) -> None:
        """b_dec = geometric median of a sample (Weiszfeld iterations from the mean)."""
        x = sample_ND.float()
        m = x.mean(dim=0)
        for _ in range(iters):
            w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-6)
            m = (w[:, None] * x).sum(dim=0) / w.sum()
        if self.rt.distributed:
            dist.broadcast(m, src=0)
        self.sae.b_dec.copy_(m)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        decay_steps = int(cfg.decay_fraction * cfg.steps)
        if decay_steps and step >= cfg.steps - decay_steps:
            lr *= (cfg.steps - step) / (decay_steps + 1)
        return lr

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.rt.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.rt.autocast_dtype)

    def views(self, x_PD: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two SimCLR-style views of each row: dropout then Gaussian noise (augment positives)."""
        g = step_generator(self.seed, step + self.rt.rank * 1_000_000_007, VIEWS)
        out = []
        for _ in range(2):
            keep = torch.rand(x_PD.shape, generator=g).to(x_PD.device) >= self.cfg.augment_dropout
            noise = torch.randn(x_PD.shape, generator=g).to(x_PD.device) * self.cfg.augment_noise
            out.append(x_PD * keep / (1 - self.cfg.augment_dropout) + noise)
        return out[0], out[1]

    def loss_terms(self, x_BD: torch.Tensor, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                 torch.Tensor]:
        """Forward: each loss term (and the total), the reconstruction x_hat_BD and the features f_BF."""
        cfg = self.cfg
        zero = x_BD.new_zeros(())
        with self._autocast():
            x_hat_BD, f_BF = self.sae(x_BD)
            terms = {"recon_loss": losses.reconstruction(x_BD, x_hat_BD), "l1": losses.l1(f_BF), "info_nce": zero,
                     "diversity": zero}
            if cfg.alpha > 0:
                if cfg.positives == "context":  # rows [0, P) are anchors, [P, 2P) their positives
                    z_BC = self.head(f_BF)
                    half = len(x_BD) // 2
                    terms["info_nce"] = losses.info_nce(z_BC[:half], z_BC[half:], cfg.temperature)
                else:
                    v1, v2 = self.views(x_BD[: len(x_BD) // 2], step)
                    z_BC = self.head(self.sae.encode(torch.cat([v1, v2])))
                    terms["info_nce"] = losses.info_nce(z_BC[: len(v1)], z_BC[len(v1):], cfg.temperature)
            if cfg.beta > 0:
                idx_S = None
                if self.sae.d_sae > cfg.diversity_features:
                    g = step_generator(self.seed, step, DIVERSITY)
                    idx_S = torch.randperm(self.sae.d_sae, generator=g)[: cfg.diversity_features].to(x_BD.device)
                terms["diversity"] = losses.diversity(self.sae.W_dec, idx_S)
        terms["loss"] = (terms["recon_loss"] + cfg.l1 * terms["l1"] + cfg.alpha * terms["info_nce"]
                         + cfg.beta * terms["diversity"])
        return terms, x_hat_BD, f_BF

    def step(self, x_BD: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch; returns the step's metrics as 0-d tensors."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        terms, x_hat_BD, f_BF = self.loss_terms(x_BD, step)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.rt.distributed:
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.rt.world)
        # move decoder rows along the unit sphere only; renormalising after the step fixes the rest
        self.sae.remove_gradient_parallel_to_decoder_directions_()
        # The SAE and the head are clipped each by its own norm: under one global norm, the head's and
        # InfoNCE's gradients would shrink the SAE's step, and the CSAE's SAE would take smaller steps than
        # its baseline's for a reason that is not its loss.
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        terms["grad_norm_sae"] = torch.nn.utils.clip_grad_norm_(list(self.sae.parameters()), max_norm)
        terms["grad_norm_head"] = (torch.nn.utils.clip_grad_norm_(self.head_params, max_norm) if self.head_params
                                   else x_BD.new_zeros(()))
        self.opt.step()
        self.sae.set_decoder_norm_to_unit_norm_()
        with torch.no_grad():
            fired_F = (f_BF > 0).any(dim=0)
            self.last_fired_F.masked_fill_(fired_F, step)
            terms["l0"] = losses.l0(f_BF)
            terms["fvu"] = losses.fvu(x_BD, x_hat_BD)
        return terms

    def maybe_resample(self, step: int, pool: Callable[[], torch.Tensor]) -> int | None:
        """Resample after step `step` if it ends a window; returns how many features (None: not due).
        `pool()` reads the rows to draw new directions from (only called when some feature is dead)."""
        cfg = self.cfg
        if not cfg.resample_every or (step + 1) % cfg.resample_every or step >= cfg.resample_until * cfg.steps:
            return None
        dead_F = dead_mask(self.last_fired_F, step, cfg.resample_every, distributed=self.rt.distributed)
        n_dead = int(dead_F.sum())
        self.resampled_S = dead_F.nonzero().squeeze(1)
        if n_dead == 0:
            return 0
        pool_ND = pool()
        err_N = squared_errors(self.sae, pool_ND, distributed=self.rt.distributed, autocast=self._autocast())
        dirs_SD = choose_directions(pool_ND, err_N, self.sae.b_dec.detach(), n_dead,
                                    step_generator(self.seed, step, RESAMPLE))
        idx_S = resample_(self.sae, self.opt, dirs_SD, dead_F, scale=cfg.resample_scale,
                          distributed=self.rt.distributed)
        self.last_fired_F[idx_S] = step  # a fresh window for the revived features
        return n_dead

    def dead_fraction(self, step: int) -> float:
        window = self.cfg.resample_every or 1000
        return float((self.last_fired_F <= step - window).float().mean())

    def state_dict(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "head": self.head.state_dict(), "opt": self.opt.state_dict(),
                "last_fired": self.last_fired_F}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.last_fired_F.copy_(state["last_fired"])


def train_layer(cfg: TrainConfig, trainer: CSAETrainer, loader: ChunkLoader, directory: Path, info: LayerInfo, *,
                start_step: int = 0, stop_at: int | None = None, progress: bool = True,
                on_resample: Callable[[int, CSAETrainer], None] | None = None) -> dict[str, float]:
    """Train from `start_step` to cfg.steps; returns the last step's metrics.

    `stop_at` simulates a crash (for tests): the loop just stops there, after the last regular checkpoint.
    A finished layer keeps its deliverables (csae.shared.checkpoint) and drops the resumable state.

    Only rank 0 writes. Raises UserError on non-finite activations or a diverged loss, before any
    checkpoint of the bad state is written.
    """
    rt, layer = trainer.rt, info.layer
    writer = rt.rank == 0
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    log = MetricsLog(directory, start_step=start_step, enabled=writer)
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"layer {layer}", disable=not (progress and writer),
               unit="step", dynamic_ncols=True)
    batches = iter(loader)
    last: dict[str, float] = {}
    t0, rows_per_step = time.perf_counter(), cfg.batch_size
    try:
        for step in range(start_step, end):
            # 1. data
            try:
                x_BD = next(batches)
            except NonFiniteActivations as err:
                raise UserError(f"layer {layer}, step {step}: {err}; re-harvest the store") from None
            # 2. the step (schedule, forward, backward, grad all-reduce, projection, clip, AdamW, renorm)
            metrics = trainer.step(x_BD, step)
            values = dict(zip(METRIC_NAMES, torch.stack([metrics[k].float() for k in METRIC_NAMES]).tolist(),
                              strict=True))
            if not math.isfinite(values["loss"]):
                raise UserError(f"layer {layer}, step {step}: the loss is {values['loss']} (training diverged); "
                                f"lower lr or l1. The last checkpoint is kept.")
            # 3. dead-feature resampling, from a pool of training rows
            try:
                resampled = trainer.maybe_resample(step, functools.partial(loader.pool, cfg.resample_pool, step))
            except NonFiniteActivations as err:
                raise UserError(f"layer {layer}, step {step}: {err}; re-harvest the store") from None
            if resampled is not None and on_resample is not None:
                on_resample(step, trainer)
            # 4. log
            now = time.perf_counter()
            done = step + 1 - start_step
            last = {"step": step, **values, "lr": trainer.lr_at(step), "dead_frac": trainer.dead_fraction(step),
                    "resampled": resampled if resampled is not None else 0,
                    "tokens_per_s": done * rows_per_step / max(now - t0, 1e-9), "elapsed_s": now - t0}
            log.write(last)
            bar.update(1)
            if step % 10 == 0 or step + 1 == end:
                bar.set_postfix_str(f"tok/s {last['tokens_per_s']:,.0f} recon {values['recon_loss']:.3g} "
                                    f"l1 {values['l1']:.3g} nce {values['info_nce']:.3g} "
                                    f"div {values['diversity']:.2g} L0 {values['l0']:.0f} fvu {values['fvu']:.3f}")
            # 5. checkpoint (the last step's is the deliverables, written below)
            if writer and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                if not all_finite(trainer.sae, trainer.head):
                    raise UserError(f"layer {layer}, step {step}: non-finite weights; not checkpointing")
                log.flush()
                save_state(directory, {"step": step + 1, "config": to_dict(cfg), "d_in": trainer.sae.d_in,
                                       "scale": info.scale, **trainer.state_dict()})
        if writer and end == cfg.steps:
            if not all_finite(trainer.sae, trainer.head):
                raise UserError(f"layer {layer}: non-finite weights after the last step; nothing written")
            log.flush()
            final = {k: v for k, v in last.items() if k != "step"} if last else {}
            write_final(directory, trainer.sae, trainer.head, replace(info, final_metrics=final))
            (directory / STATE_FILE).unlink(missing_ok=True)
    finally:
        loader.close()
        bar.close()
        log.close()
    return last
