"""Loss terms against formulas written out here; decoder norm and gradient projection; the plain-SAE step."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from csae.shared.config.base import ConfigError
from csae.shared.config.train import PAPER, PAPER_OURS, PRESETS, TrainConfig, preset
from csae.shared.sae.autoencoder import SAE
from csae.train import losses
from csae.train.runtime import Runtime
from csae.train.trainer import CSAETrainer

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None)


def test_mse_and_l1_match_hand_computation() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    x_hat = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # row 0: 1^2 + 0 = 1; row 1: 2^2 + 2^2 = 8; mean = 4.5
    assert losses.reconstruction(x, x_hat).item() == pytest.approx(4.5)
    f = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    # row sums 4 and 2, mean 3
    assert losses.l1(f).item() == pytest.approx(3.0)
    assert losses.l0(f).item() == pytest.approx(1.5)


def test_reconstruction_value_and_gradients_are_the_formulas() -> None:
    """The written-out backward: d/dx_hat = 2 (x_hat - x) / B and d/dx its negative, against the formula in
    float64; a bfloat16 x_hat gets its gradient in bfloat16. A gradient off by the 1/B or the factor 2 would be
    off by 50% or more."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(48, 24, generator=gen) * 3).requires_grad_()
    x_hat = torch.randn(48, 24, generator=gen).requires_grad_()
    loss = losses.reconstruction(x, x_hat)
    loss.backward()
    x64, x_hat64 = x.detach().double(), x_hat.detach().double()
    assert loss.item() == pytest.approx(((x_hat64 - x64) ** 2).sum().item() / 48, rel=1e-6)
    expected = 2 * (x_hat64 - x64) / 48
    assert ((x_hat.grad.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6
    assert ((x.grad.double() + expected).abs().max() / expected.abs().max()).item() < 1e-6
    x_hat16 = x_hat.detach().bfloat16().requires_grad_()
    losses.reconstruction(x.detach(), x_hat16).backward()
    assert x_hat16.grad.dtype == torch.bfloat16
    expected16 = 2 * (x_hat16.detach().double() - x64) / 48
    assert ((x_hat16.grad.double() - expected16).abs().max() / expected16.abs().max()).item() < 2**-8


def test_info_nce_gradient_equals_autograd_of_the_formula() -> None:
    """The written-out loss and backward against autograd through the cross entropies in float64, at the
    default temperature and at 0.01, where s spans [-100, 100] (exp(s) alone overflows float32) and the loss
    is ~3e-6, from terms ~100. Measured (float32 against float64): value 9.4e-8 and 1.6e-4 relative (the
    latter exactly torch's float32 cross entropies'), gradients 7.5e-7 and 1.1e-4 in norm. One direction
    alone (the rows' cross entropy only) is off by 20% and 99%."""
    gen = torch.Generator().manual_seed(0)
    for tau, tol in ((0.1, 1e-5), (0.01, 1e-3)):
        z_a = torch.randn(64, 16, generator=gen, dtype=torch.float64) * 3
        z_p = (z_a + torch.randn(64, 16, generator=gen, dtype=torch.float64)).requires_grad_()
        z_a.requires_grad_()
        a, p = F.normalize(z_a, dim=1), F.normalize(z_p, dim=1)
        s = a @ p.T / tau
        target = torch.arange(64)
        ref = 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))
        ref_a, ref_p = torch.autograd.grad(ref, (z_a, z_p))
        za32, zp32 = (z.detach().float().requires_grad_() for z in (z_a, z_p))
        got = losses.info_nce(torch.cat([za32, zp32]), tau)
        got.backward()
        assert got.item() == pytest.approx(ref.item(), rel=tol)
        for mine, exact in ((za32.grad, ref_a), (zp32.grad, ref_p)):
            assert ((mine.double() - exact).norm() / exact.norm()).item() < tol


def test_info_nce_with_bfloat16_products_is_within_their_rounding() -> None:
    """Training under bfloat16 takes InfoNCE's three P x P x C products in bfloat16 (float32 accumulation), as
    autocast's matmul would. At P 256, C 128, temperature 0.1, against the float64 formula: the value within
    2^-7 relative and the gradient within 2^-5 in norm (measured 7.3e-4 and 0.0104: the similarities' rounding,
    2^-8 of |s| <= 10, enters the softmaxes); float32 products: 1.6e-7 and 1.6e-6, within 1e-6 and 1e-5."""
    gen = torch.Generator().manual_seed(0)
    z_a = torch.randn(256, 128, generator=gen, dtype=torch.float64)
    z = torch.cat([z_a, z_a + 0.8 * torch.randn(256, 128, generator=gen, dtype=torch.float64)]).requires_grad_()
    u = F.normalize(z, dim=1)
    s = u[:256] @ u[256:].T / 0.1
    target = torch.arange(256)
    ref = 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))
    (ref_grad,) = torch.autograd.grad(ref, z)
    for dtype, tol_value, tol_grad in ((torch.bfloat16, 2**-7, 2**-5), (torch.float32, 1e-6, 1e-5)):
        z32 = z.detach().float().requires_grad_()
        got = losses.info_nce(z32, 0.1, dtype)
        got.backward()
        assert abs(got.item() - ref.item()) < tol_value * ref.item()
        err = ((z32.grad.double() - ref_grad).norm() / ref_grad.norm()).item()
        assert err < tol_grad, (dtype, err)


def test_fvu_matches_hand_computation() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1): total variance 1+1+1+1 = 4
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])  # residual 1
    assert losses.fvu(x, x_hat).item() == pytest.approx(0.25)


def test_info_nce_matches_formula() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    tau = 0.5
    cos = [[(a[i] @ p[j] / (a[i].norm() * p[j].norm())).item() for j in range(3)] for i in range(3)]
    row = [-(cos[i][i] / tau - math.log(sum(math.exp(cos[i][j] / tau) for j in range(3)))) for i in range(3)]
    col = [-(cos[j][j] / tau - math.log(sum(math.exp(cos[i][j] / tau) for i in range(3)))) for j in range(3)]
    expected = 0.5 * (sum(row) / 3 + sum(col) / 3)
    assert losses.info_nce(torch.cat([a, p]), tau).item() == pytest.approx(expected, rel=1e-5)
    # identical, well separated pairs give a loss near 0; swapping the positives makes it large
    e = torch.eye(3) * 10
    assert losses.info_nce(torch.cat([e, e]), 0.05).item() < 1e-6
    assert losses.info_nce(torch.cat([e, e.roll(1, 0)]), 0.05).item() > 10


def test_diversity_matches_formula_and_subset() -> None:
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    # cosines: (0,1)=0, (0,2)=1/sqrt2, (1,2)=1/sqrt2; squared: 0, 1/2, 1/2; ordered pairs: 2*(1) / (3*2)
    assert losses.diversity(w).item() == pytest.approx(1.0 / 3.0)
    assert losses.diversity(w, torch.tensor([0, 1])).item() == pytest.approx(0.0)
    assert losses.diversity(w, torch.tensor([0, 2])).item() == pytest.approx(0.5)


def test_decoder_norm_and_gradient_projection() -> None:
    trainer = CSAETrainer(TrainConfig(expansion=2, tokens=64, batch_size=8), 4, CPU, seed=0)
    sae = trainer.sae
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1, 9, dtype=torch.float32)[:, None])
    sae.set_decoder_norm_to_unit_norm_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(8), atol=1e-6)
    g = torch.randn(8, 4)
    sae.W_dec.grad = g.clone()
    sae.remove_gradient_parallel_to_decoder_directions_()
    w = sae.W_dec.detach()
    expected = g - (g * w).sum(1, keepdim=True) * w  # rows of w are unit
    assert torch.allclose(sae.W_dec.grad, expected, atol=1e-6)
    assert torch.allclose((sae.W_dec.grad * w).sum(1), torch.zeros(8), atol=1e-6)


def test_decoder_updates_in_blocks_equal_the_whole_matrix_formula() -> None:
    """Over several cache-sized blocks of rows (2,560 x 640: 7 blocks), the row-wise updates equal the
    formulas applied to the whole matrix at once: the projection on unit rows (its precondition) to float
    rounding, the renormalisation bit for bit."""
    gen = torch.Generator().manual_seed(0)
    sae = SAE(640, 2560)
    assert len(sae._decoder_blocks()) > 2
    u0 = F.normalize(torch.randn(2560, 640, generator=gen), dim=1)
    g0 = torch.randn(2560, 640, generator=gen)
    with torch.no_grad():
        sae.W_dec.copy_(u0)
    sae.W_dec.grad = g0.clone()
    sae.remove_gradient_parallel_to_decoder_directions_()
    u64, g64 = u0.double(), g0.double()
    expected = g64 - ((g64 * u64).sum(1) / (u64 * u64).sum(1))[:, None] * u64
    assert torch.allclose(sae.W_dec.grad.double(), expected, rtol=1e-5, atol=1e-5)
    w0 = torch.randn(2560, 640, generator=gen) * torch.rand(2560, 1, generator=gen)
    with torch.no_grad():
        sae.W_dec.copy_(w0)
    sae.set_decoder_norm_to_unit_norm_()
    assert torch.equal(sae.W_dec.detach(), w0 / w0.norm(dim=1, keepdim=True))


#: Largest weight difference after 3 AdamW steps (lr 1e-2) between the trainer and the hand-written step.
#: float32: the same operations in a different order, ~1e-7 relative, far below 1e-6. bfloat16 autocast: both
#: run the same matmuls in bfloat16; where the hand-written expression rounds differently (u = 2^-8), a
#: gradient moves by ~u relative, and Adam's update m / sqrt(v) by as much, i.e. u x lr per step: 3 steps x
#: 2^-8 x 1e-2 ~ 1.2e-4. A missing term (the L1, the projection, the clip) moves weights by ~lr = 1e-2.
#: Measured: 3e-8 in both dtypes, one float32 rounding of a weight ~0.5 (the trainer's fused AdamW divides
#: the gradient by the clip's divisor where clip_grad_norm_ multiplies by its inverse); bit-identical before.
STEP_TOLERANCE = {"float32": 1e-6, "bfloat16": 2e-4}


def test_plain_step_equals_hand_written_sae_step(dtype: str) -> None:
    """alpha = beta = 0: the trainer's step is exactly a plain ReLU SAE step (written out here)."""
    cfg = TrainConfig(expansion=2, tokens=512, batch_size=16, alpha=0.0, beta=0.0, l1=0.3, lr=1e-2,
                      warmup_steps=0, decay_fraction=0.0, grad_clip=0.5, resample_every=0, l1_warmup_steps=2,
                      dtype=dtype)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    trainer = CSAETrainer(cfg, 6, Runtime(device=torch.device("cpu"), autocast_dtype=autocast), seed=0)
    W_enc, b_enc = trainer.sae.W_enc.detach().clone(), torch.full((12,), 0.1)
    W_dec, b_dec = trainer.sae.W_dec.detach().clone(), torch.linspace(-1, 1, 6)
    with torch.no_grad():
        trainer.sae.b_enc.copy_(b_enc)
        trainer.sae.b_dec.copy_(b_dec)
    params = [p.clone().requires_grad_(True) for p in (W_enc, b_enc, W_dec, b_dec)]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(16, 6, generator=gen) * 3
        trainer.step(x, step)
        we, be, wd, bd = params
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            f = torch.relu((x - bd) @ we + be)
            x_hat = f @ wd + bd
        l1_weight = 0.3 * min(1.0, (step + 1) / 2)  # the L1 ramped in over 2 steps
        loss = ((x - x_hat.float()) ** 2).sum(1).mean() + l1_weight * f.float().abs().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            u = wd / wd.norm(dim=1, keepdim=True)
            wd.grad -= (wd.grad * u).sum(1, keepdim=True) * u
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        with torch.no_grad():
            wd /= wd.norm(dim=1, keepdim=True)
    sae = trainer.sae
    for ours, theirs in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), params, strict=True):
        assert torch.allclose(ours, theirs, rtol=0, atol=STEP_TOLERANCE[dtype]), (ours - theirs).abs().max()
    assert trainer.head.first.weight.grad is None  # the head is untouched in a plain SAE


def test_lr_schedule_warmup_and_decay() -> None:
    cfg = TrainConfig(tokens=100 * 8, batch_size=8, lr=1.0, warmup_steps=10, decay_fraction=0.2)
    trainer = CSAETrainer(cfg, 4, CPU, seed=0)
    assert trainer.lr_at(0) == pytest.approx(0.1)
    assert trainer.lr_at(9) == pytest.approx(1.0)
    assert trainer.lr_at(50) == pytest.approx(1.0)
    assert trainer.lr_at(80) == pytest.approx(20 / 21)
    assert trainer.lr_at(99) == pytest.approx(1 / 21)


def test_config_validation_and_presets() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=7)
    with pytest.raises(ConfigError, match="tokens"):
        TrainConfig(tokens=10, batch_size=512)
    paper = preset("paper")
    assert (paper.expansion, paper.l1, paper.alpha, paper.lr, paper.resample_every) == (1, 0.04, 2.0, 1e-4, 100)
    assert any("warmup_steps (1000) exceeds" in w for w in paper.warnings())
    assert TrainConfig().warnings() == []
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")


def test_paper_preset_states_every_field_and_says_whose_it_is() -> None:
    """No value of the paper preset is inherited from our defaults: each is the paper's or listed as ours."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(PAPER) | set(PAPER_OURS) == fields and not set(PAPER) & set(PAPER_OURS)
    assert set(PRESETS["paper"]) == fields
    assert "beta" in PAPER_OURS and "positives" in PAPER_OURS and "head_hidden" in PAPER_OURS


def test_diversity_gradient_equals_autograd_of_the_formula() -> None:
    """The hand-written backward against autograd through the formula written out (float32: sums in
    another order, ~1e-7 relative)."""
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    other = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    for idx in (torch.tensor([6, 0, 3, 2]), None):
        # with another term's dense gradient on w too (as the decoder's in training)
        ((w * other).sum() + losses.diversity(w, idx)).backward()
        mine, w.grad = w.grad.clone(), None
        assert mine.layout == torch.strided
        u = torch.nn.functional.normalize(w if idx is None else w[idx], dim=1)
        cos = u @ u.T
        n = len(u)
        ((w * other).sum() + (cos.pow(2).sum() - cos.diagonal().pow(2).sum()) / (n * (n - 1))).backward()
        assert torch.allclose(mine, w.grad, rtol=1e-5, atol=1e-7) and (mine - other).abs().max() > 1e-3
        w.grad = None


def _diversity_case(unit_rows: bool) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """W (1024, 640) float32 requiring grad (unit rows or not), 256 sampled rows, and the float64 cosine
    formula's value and gradient in W."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 640, generator=gen)
    w = torch.nn.functional.normalize(w, dim=1) if unit_rows else w
    idx = torch.randperm(1024, generator=gen)[:256]
    exact = w.double().requires_grad_()
    u = torch.nn.functional.normalize(exact[idx], dim=1)
    cos = u @ u.T
    value = (cos.pow(2).sum() - cos.diagonal().pow(2).sum()) / (256 * 255)
    value.backward()
    return w.requires_grad_(), idx, value.item(), exact.grad


def test_diversity_with_bfloat16_products_is_within_their_rounding() -> None:
    """Training under bfloat16 takes the term's two S x S x D products in bfloat16 (float32 accumulation).
    At S 256, D 640, against the float64 formula: the value within 1e-3 relative (measured 4.1e-5: the
    rounding errors of 65,280 cosines mostly cancel in the sum) and the gradient within 2^-7 in norm, about
    one bfloat16 rounding (u = 2^-8; measured 0.0040). In float32: 2.0e-8 and 3.6e-7."""
    w, idx, value, exact_grad = _diversity_case(unit_rows=False)
    got = losses.diversity(w, idx, torch.bfloat16)
    got.backward()
    assert abs(got.item() - value) < 1e-3 * value
    err = (w.grad.to_dense().double() - exact_grad).norm() / exact_grad.norm()
    assert err < 2**-7, err


@pytest.mark.parametrize(("dtype", "value_tol", "grad_tol"), [("float32", 1e-5, 1e-5), ("bfloat16", 1e-3, 2**-7)])
def test_diversity_on_unit_rows_equals_the_formula_after_the_projection(dtype: str, value_tol: float,
                                                                        grad_tol: float) -> None:
    """unit_rows (what training passes: its decoder rows are unit vectors) skips the normalisation. On unit rows,
    against the float64 cosine formula: the value within value_tol relative, and the gradient, once each row's
    radial part is projected out (as the trainer's decoder projection does), within grad_tol in norm. Before
    the projection the two gradients differ by the radial part."""
    w, idx, value, exact_grad = _diversity_case(unit_rows=True)
    got = losses.diversity(w, idx, getattr(torch, dtype), unit_rows=True)
    got.backward()
    assert abs(got.item() - value) < value_tol * value
    mine = w.grad.to_dense().double()
    w64 = w.detach().double()

    def project(g: torch.Tensor) -> torch.Tensor:
        return g - (g * w64).sum(1, keepdim=True) * w64

    assert (mine - exact_grad).norm() > 0.1 * exact_grad.norm()  # the radial part
    err = (project(mine) - project(exact_grad)).norm() / project(exact_grad).norm()
    assert err < grad_tol, err
