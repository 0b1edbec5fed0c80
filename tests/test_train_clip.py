"""The gradient clip inside the fused AdamW (torch's GradScaler divisor, the head's gradients rescaled to their own
factor) against clipping each part's gradients and then stepping, written out; and the resumable state's format."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from csae.shared.config.train import TrainConfig
from csae.shared.errors import UserError
from csae.train import trainer as trainer_module
from csae.train.runtime import Runtime
from csae.train.state import STATE_FILE, load_state, save_state
from csae.train.trainer import CSAETrainer

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
    before.model.begin_step()
    terms, _, _ = before.model.training_forward_pass(x, step)
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


def test_a_state_of_an_older_format_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A state.pt of the 0.x format (an optimiser per part, "opt_head"; no format key) is refused in one line
    that says how to go on; the current format round-trips."""
    torch.save({"step": 3, "opt": {}, "opt_head": {}}, tmp_path / STATE_FILE)
    with pytest.raises(UserError, match=r"state format 1, this csae resumes 2\); delete it to restart"):
        load_state(tmp_path)
    save_state(tmp_path, {"step": 3})
    assert load_state(tmp_path)["step"] == 3

