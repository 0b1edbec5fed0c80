"""The training step and the per-layer loop.

`CSAETrainer` holds a TrainingSAE (csae.train.training_sae: the SAE, its head, its encode and its loss terms),
the optimiser and the dead-feature statistics, and does one step on a batch; `train_layer` is the loop, which
reads top to bottom: schedule, step, resample, log, checkpoint.
All randomness after initialisation comes from generators seeded by (seed, step), so a resumed run
repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from csae.shared.config.base import to_dict
from csae.shared.config.train import TrainConfig
from csae.shared.errors import UserError
from csae.shared.sae.checkpoint import LayerInfo, write_final
from csae.train import kernels, losses
from csae.train.loader import ChunkLoader, NonFiniteActivations
from csae.train.report import StepReport
from csae.train.resample import choose_directions, dead_mask, resample_, squared_errors
from csae.train.runtime import Runtime
from csae.train.seeds import RESAMPLE, step_generator
from csae.train.state import STATE_FILE, all_finite, save_state
from csae.train.training_sae import TrainingSAE

#: Where torch's AdamW has a fused kernel (elsewhere its default, op by op, with the clip done beforehand).
FUSED_DEVICES = ("cpu", "cuda")
METRIC_NAMES = ("loss", "recon_loss", "recon_high", "l1", "aux_k", "info_nce", "diversity", "l0", "fvu",
                "grad_norm_sae", "grad_norm_head")


class CSAETrainer:
    def __init__(self, cfg: TrainConfig, d_in: int, rt: Runtime, seed: int) -> None:
        self.cfg, self.rt, self.seed = cfg, rt, seed
        self.model = TrainingSAE(cfg, d_in, rt, seed)
        self.sae, self.head = self.model.sae, self.model.head
        # the head only gets gradients (and optimiser state) when the contrastive term is on
        self.sae_params = list(self.sae.parameters())
        self.head_params = list(self.head.parameters()) if self.model.trains_head else []
        self.params = self.sae_params + self.head_params
        # fused: one kernel for every parameter; torch's default on CPU loops over the parameters op by op
        # (measured 4-8x slower for 2 x 640 x 2,560 weights, as long as a matmul of the step at 2 threads). The
        # fused kernel copies a non-contiguous tensor in and out of a contiguous buffer (parameter, gradient and
        # both moments: 2.8 ms instead of 0.9 for W_enc), so it updates the feature-major weights through their
        # contiguous transposes: the same storage, and AdamW is elementwise. One optimiser for the SAE and the
        # head (a second one for the head cost 0.17-0.29 ms a step more: its own call and pass); each part still has
        # its own clip factor (see clipped_step).
        self.fused = rt.device.type in FUSED_DEVICES
        self.opt_tensors = [p if p.is_contiguous() else p.detach().t() for p in self.params]
        self.opt = torch.optim.AdamW(self.opt_tensors, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self.fused)
        self.max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        self.last_fired_F = torch.full((self.sae.d_sae,), -1, dtype=torch.long, device=rt.device)
        self.step_rng = torch.Generator()  # re-seeded for each use by step_generator (creating one costs 0.1 ms)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        decay_steps = int(cfg.decay_fraction * cfg.steps)
        if decay_steps and step >= cfg.steps - decay_steps:
            lr *= (cfg.steps - step) / (decay_steps + 1)
        return lr

    def step(self, x_BD: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch; returns the step's metrics as 0-d tensors."""
        self.opt.param_groups[0]["lr"] = self.lr_at(step)
        self.model.begin_step()
        if self.cfg.architecture != "relu" and self.cfg.aux_k > 0:  # Aux-K's dead features
            self.model.dead_F = self.last_fired_F <= step - self.cfg.dead_steps
        with record_function("csae.step.forward"):
            terms, _, feats = self.model.training_forward_pass(x_BD, step)
        for p in self.params:
            p.grad = None
        with record_function("csae.step.backward"):
            terms["loss"].backward()
        if self.rt.distributed:
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.rt.world)
        with record_function("csae.step.clip"):
            # The SAE and the head are clipped each by its own norm: under one global norm, the head's and
            # InfoNCE's gradients would shrink the SAE's step, and the CSAE's SAE would take smaller steps
            # than its baseline's for a reason that is not its loss. The clip itself happens in the optimiser.
            terms["grad_norm_sae"] = self.project_decoder_gradient_()
            terms["grad_norm_head"] = self.grad_norm(self.head_params) if self.head_params else x_BD.new_zeros(())
        with record_function("csae.step.optimizer"):
            for t, p in zip(self.opt_tensors, self.params, strict=True):
                if t is not p:
                    t.grad = None if p.grad is None else p.grad.t()
            self.clipped_step(terms["grad_norm_sae"], terms["grad_norm_head"])
            self.normalise_decoder_()
        with torch.no_grad(), record_function("csae.step.stats"):
            self.last_fired_F.masked_fill_(feats.fired(), step)
            terms["l0"] = feats.l0()
            terms["fvu"] = losses.fvu_of_reconstruction(terms["recon_loss"], self.model.split_batch(x_BD)[0])
        self.model.end_step(terms["l0"])
        return terms

    def project_decoder_gradient_(self) -> torch.Tensor:
        """Moves decoder rows along the unit sphere only (renormalising after the step fixes the rest): removes
        from each row's gradient its component along the row (SAE.remove_gradient_parallel_to_decoder_directions_)
        and returns the SAE's gradient norm after it. On CPU one kernel pass over W_dec does both for it."""
        W_dec = self.sae.W_dec
        if self.rt.device.type != "cpu" or W_dec.grad is None or not W_dec.grad.is_contiguous():
            self.sae.remove_gradient_parallel_to_decoder_directions_()
            return self.grad_norm(self.sae_params)
        sumsq = kernels.project_rows_(W_dec, W_dec.grad)
        rest = self.grad_norm([p for p in self.sae_params if p is not W_dec]).double()
        return (rest * rest + sumsq).sqrt().float()

    def normalise_decoder_(self) -> None:
        """Unit-norm decoder rows (SAE.set_decoder_norm_to_unit_norm_; on CPU one kernel pass)."""
        if self.rt.device.type == "cpu":
            kernels.unit_rows_(self.sae.W_dec)
        else:
            self.sae.set_decoder_norm_to_unit_norm_()

    @staticmethod
    def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
        """The norm of the parameters' gradients before clipping (what clip_grad_norm_ returns)."""
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    def clip_factor(self, norm: torch.Tensor) -> torch.Tensor:
        """What clip_grad_norm_ divides the gradients by: max(1, (norm + 1e-6) / max_norm), as a tensor."""
        return ((norm + 1e-6) / self.max_norm).clamp_min(1.0)

    def clipped_step(self, norm_sae: torch.Tensor, norm_head: torch.Tensor) -> None:
        """AdamW on gradients clipped part by part, the SAE's to norm max_norm and the head's likewise.
        Fused: the kernel divides every gradient by the SAE's factor as it reads it (torch's GradScaler
        protocol: opt.grad_scale, a tensor, so no host sync), which saves the clip's own pass over the SAE's
        gradients; the head's are first multiplied by the SAE's factor over the head's (exactly 1 when neither
        clips), so they end up divided by the head's. The kernel's found_inf, optional on CPU and CUDA, stays
        unset: a step is never skipped, and setting it costs an op per parameter. Elsewhere: clip each part,
        then step."""
        if self.fused:
            factor = self.clip_factor(norm_sae)
            if head_grads := [p.grad for p in self.head_params if p.grad is not None]:
                torch._foreach_mul_(head_grads, factor / self.clip_factor(norm_head))
            self.opt.grad_scale = factor  # type: ignore[attr-defined]
        else:
            torch.nn.utils.clip_grads_with_norm_(self.sae_params, self.max_norm, norm_sae)
            torch.nn.utils.clip_grads_with_norm_(self.head_params, self.max_norm, norm_head)
        self.opt.step()

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
        self.model.begin_step()
        err_N = squared_errors(self.model.reconstruct, pool_ND, distributed=self.rt.distributed)
        g = step_generator(self.seed, step, RESAMPLE, self.step_rng)
        dirs_SD = choose_directions(pool_ND, err_N, self.sae.b_dec.detach(), n_dead, g,
                                    self.sae.W_dec.detach()[~dead_F])
        idx_S = resample_(self.sae, self.moments, dirs_SD, dead_F, scale=cfg.resample_scale,
                          distributed=self.rt.distributed)
        self.last_fired_F[idx_S] = step  # a fresh window for the revived features
        return n_dead

    def moments(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The optimiser's per-element state of a parameter (exp_avg, exp_avg_sq, ...), laid out like it."""
        t = next(t for t, p in zip(self.opt_tensors, self.params, strict=True) if p is param)
        state = self.opt.state.get(t, {})
        return {k: v if t is param else v.t() for k, v in state.items() if v.shape == t.shape}

    def dead_fraction(self, step: int) -> float:
        window = self.cfg.resample_every or 1000
        return float((self.last_fired_F <= step - window).float().mean())

    def state_dict(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "head": self.head.state_dict(), "opt": self.opt.state_dict(),
                "last_fired": self.last_fired_F, "sparse_pays": self.model.sparse_pays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.last_fired_F.copy_(state["last_fired"])
        self.model.sparse_pays = bool(state["sparse_pays"])


def train_layer(cfg: TrainConfig, trainer: CSAETrainer, loader: ChunkLoader, directory: Path, info: LayerInfo, *,
                start_step: int = 0, stop_at: int | None = None, progress: bool = True,
                on_resample: Callable[[int, CSAETrainer], None] | None = None) -> dict[str, float]:
    """Train from `start_step` to cfg.steps; returns the last step's metrics.

    `stop_at` simulates a crash (for tests): the loop just stops there, after the last regular checkpoint.
    A finished layer keeps its deliverables (csae.shared.sae.checkpoint) and drops the resumable state.

    Only rank 0 writes. Raises UserError on non-finite activations or a diverged loss, before any
    checkpoint of the bad state is written.
    """
    layer, writer = info.layer, trainer.rt.rank == 0
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    report = StepReport(cfg, directory, layer, start_step, end, writer=writer, progress=progress)
    batches = iter(loader)
    last: dict[str, float] = {}
    try:
        for step in range(start_step, end):
            # 1. data
            try:
                with record_function("csae.data"):
                    x_BD = next(batches)
            except NonFiniteActivations as err:
                raise UserError(f"layer {layer}, step {step}: {err}; re-harvest the store") from None
            # 2. the step (schedule, forward, backward, grad all-reduce, projection, clip, AdamW, renorm)
            with record_function("csae.step"):
                metrics = trainer.step(x_BD, step)
                values = dict(zip(METRIC_NAMES, torch.stack([metrics[k].float() for k in METRIC_NAMES]).tolist(),
                                  strict=True))
            if not math.isfinite(values["loss"]):
                raise UserError(f"layer {layer}, step {step}: the loss is {values['loss']} (training diverged); "
                                f"lower lr or l1. The last checkpoint is kept.")
            # 3. dead-feature resampling, from a pool of training rows
            try:
                with record_function("csae.resample"):
                    resampled = trainer.maybe_resample(step, functools.partial(loader.pool, cfg.resample_pool,
                                                                                step))
            except NonFiniteActivations as err:
                raise UserError(f"layer {layer}, step {step}: {err}; re-harvest the store") from None
            if resampled is not None and on_resample is not None:
                on_resample(step, trainer)
            # 4. log
            last = report.record(step, values, lr=trainer.lr_at(step), dead_frac=trainer.dead_fraction(step),
                                 resampled=resampled)
            # 5. checkpoint (the last step's is the deliverables, written below)
            if writer and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                if not all_finite(trainer.sae, trainer.head):
                    raise UserError(f"layer {layer}, step {step}: non-finite weights; not checkpointing")
                report.log.flush()
                save_state(directory, {"step": step + 1, "config": to_dict(cfg), "d_in": trainer.sae.d_in,
                                       "scale": info.scale, **trainer.state_dict()})
        if writer and end == cfg.steps:
            if not all_finite(trainer.sae, trainer.head):
                raise UserError(f"layer {layer}: non-finite weights after the last step; nothing written")
            report.log.flush()
            final = {k: v for k, v in last.items() if k != "step"} if last else {}
            write_final(directory, trainer.sae, trainer.head, replace(info, final_metrics=final))
            (directory / STATE_FILE).unlink(missing_ok=True)
    finally:
        loader.close()
        report.close()
    return last
