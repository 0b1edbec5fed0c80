"""The gradient clip inside the fused AdamW (torch's GradScaler divisor, the head's gradients rescaled to their own
factor) against clipping each part's gradients and then stepping, written out; and resuming from a checkpoint
written when the SAE and the head had an optimiser each."""

from __future__ import annotations

import copy

import pytest
import torch

from csae.shared.config.train import TrainConfig
from csae.train import trainer as trainer_module
from csae.train.trainer import CSAETrainer, Runtime

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch's AdamW defaults, which the trainer keeps
D = 16

#: Largest difference of a weight or moment between the trainer's step and the written-out one, relative to
#: the largest magnitude of that tensor. The trainer's kernel divides the gradient by the clip's divisor in
#: float32 (one rounding, u = 2^-24) where the reference multiplies by max_norm / (norm + 1e-6) in float64,
#: and runs Adam's update in float32 where the reference runs it in float64 and rounds once: a few u
#: of each element, the same in both dtypes (autocast only changes how the gradients are computed, and both
#: sides use the same gradients). Measured: 2.4e-7 in both dtypes. Without the clip (the norms here reach
#: 440x max_norm) the moments differ by > 30x; clipping both parts by one global norm moves the SAE's moments
#: by 6e-2 and the head's weights by 9e-5.
CLIP_TOLERANCE = 2e-6


def _trainer(dtype: str) -> CSAETrainer:
    cfg = TrainConfig(expansion=2, tokens=64 * 10, batch_size=64, grad_clip=0.5, warmup_steps=0, lr=1e-2,
                      head_dim=8, resample_every=0, weight_decay=0.01, dtype=dtype)  # type: ignore[arg-type]
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    return CSAETrainer(cfg, D, Runtime(torch.device("cpu"), autocast), seed=0)


def _reference_step(before: CSAETrainer, x: torch.Tensor, step: int) -> tuple[dict, dict[str, float]]:
    """The step written out, in float64, from a copy of the trainer's state before it: the same gradients
    (forward, backward, decoder projection), each part clipped by its own norm, then AdamW, renormalise.
    Returns {param name: (weight, exp_avg, exp_avg_sq)} and each part's pre-clip norm."""
    for p in before.params:
        p.grad = None
    before.sparse_now = before.use_sparse()
    terms, _, _ = before.loss_terms(x, step)
    terms["loss"].backward()
    before.sae.remove_gradient_parallel_to_decoder_directions_()
    cfg, lr = before.cfg, before.lr_at(step)
    out, norms = {}, {}
    for part, module in (("sae", before.sae), ("head", before.head)):
        named = [(n, p) for n, p in module.named_parameters() if p.grad is not None]
        norm = torch.sqrt(sum(p.grad.double().square().sum() for _, p in named))
        norms[part] = float(norm)
        factor = min(1.0, cfg.grad_clip / (float(norm) + 1e-6))  # torch's clip_grad_norm_
        for name, p in named:
            g = p.grad.double() * factor
            moments = before.moments(p)
            t = 1 + (int(before.opt.state[before.opt_tensors[0]]["step"]) if before.opt.state else 0)
            m = BETA1 * moments.get("exp_avg", torch.zeros_like(p)).double() + (1 - BETA1) * g
            v = BETA2 * moments.get("exp_avg_sq", torch.zeros_like(p)).double() + (1 - BETA2) * g * g
            w = p.detach().double() * (1 - lr * cfg.weight_decay)
            w -= lr / (1 - BETA1**t) * m / ((v / (1 - BETA2**t)).sqrt() + EPS)
            if p is before.sae.W_dec:
                w /= w.norm(dim=1, keepdim=True)
            out[f"{part}.{name}"] = (w, m, v)
    return out, norms


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "fallback"])
def test_clip_in_the_optimiser_equals_clipping_then_stepping(dtype: str, fused: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Five steps; inputs scaled so that some steps clip both parts (norm above 0.5) and one clips neither.
    After each step, every weight and both moments of the SAE and the head equal the written-out step."""
    if not fused:  # the path of devices without the fused kernel: clip the gradients, then torch's AdamW
        monkeypatch.setattr(trainer_module, "FUSED_DEVICES", ())
    trainer = _trainer(dtype)
    assert trainer.fused is fused
    gen = torch.Generator().manual_seed(0)
    clipped = {"sae": [], "head": []}
    for step, scale in enumerate((4.0, 4.0, 0.02, 4.0, 1.0)):
        x = torch.randn(64, D, generator=gen) * scale
        want, norms = _reference_step(copy.deepcopy(trainer), x, step)
        metrics = trainer.step(x, step)
        for part in ("sae", "head"):
            assert float(metrics[f"grad_norm_{part}"]) == pytest.approx(norms[part], rel=1e-5)  # pre-clip
            clipped[part].append(norms[part] > trainer.cfg.grad_clip)
        got = {f"{part}.{n}": p for part, module in (("sae", trainer.sae), ("head", trainer.head))
               for n, p in module.named_parameters()}
        for name, (w, m, v) in want.items():
            p = got[name]
            moments = trainer.moments(p)
            for ours, theirs in ((p.detach(), w), (moments["exp_avg"], m), (moments["exp_avg_sq"], v)):
                err = float((ours.double() - theirs).abs().max() / theirs.abs().max())
                assert err <= CLIP_TOLERANCE, (step, name, err)
    for part in ("sae", "head"):  # both cases occurred for each part
        assert any(clipped[part]) and not all(clipped[part]), (part, clipped[part])


def test_a_checkpoint_with_an_optimiser_per_part_resumes_exactly() -> None:
    """A state written when the SAE and the head had an optimiser each ("opt" and "opt_head") loads into the
    one optimiser with the same moments and step counts, and the next step is bit-identical."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, D, generator=gen) * 4 for _ in range(4)]
    ran = _trainer("float32")
    for step in range(3):
        ran.step(xs[step], step)
    n_sae = len(ran.sae_params)
    parts = []
    for tensors in (ran.opt_tensors[:n_sae], ran.opt_tensors[n_sae:]):
        opt = torch.optim.AdamW(tensors, lr=ran.cfg.lr, weight_decay=ran.cfg.weight_decay, fused=True)
        for t in tensors:
            opt.state[t] = ran.opt.state[t]
        parts.append(opt.state_dict())
    assert len(parts[1]["state"]) == len(ran.head_params) > 0
    old = ran.state_dict() | {"opt": parts[0], "opt_head": parts[1]}
    old = copy.deepcopy(old)  # as torch.load returns it: nothing shared with `ran`
    resumed = _trainer("float32")
    resumed.load_state_dict(old)
    for a, b in zip(ran.params, resumed.params, strict=True):
        assert torch.equal(a, b)
        ma, mb = ran.moments(a), resumed.moments(b)
        assert ma.keys() == mb.keys() == {"exp_avg", "exp_avg_sq"}
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert len(resumed.opt.state) == len(resumed.params)
    assert all(int(s["step"]) == 3 for s in resumed.opt.state.values())
    ran.step(xs[3], 3)
    resumed.step(xs[3], 3)
    for a, b in zip(ran.params, resumed.params, strict=True):
        assert torch.equal(a, b)
