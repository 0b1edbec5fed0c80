"""The decoder's row-wise kernels of the training step on CPU (csae.train.kernels) against the formulas in
float64. (The index kernels and the SDDMM are tested through csae.train.sparse in test_train_sparse.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csae.train import kernels


@pytest.mark.parametrize(("n_rows", "width"), [(2560, 640), (7, 33)])  # many rows per thread; odd widths
def test_projection_and_its_sum_of_squares_are_the_formulas(n_rows: int, width: int) -> None:
    gen = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(n_rows, width, generator=gen), dim=1)
    g = torch.randn(n_rows, width, generator=gen) * 3
    got = g.clone()
    sumsq = kernels.project_rows_(u, got)
    u64, g64 = u.double(), g.double()
    expected = g64 - (g64 * u64).sum(1, keepdim=True) * u64
    # float32 rounding of a few terms of size |g| (~3 sqrt(width)); a left-out projection is off by ~|g|
    assert float((got.double() - expected).abs().max()) < 1e-5 * 3 * width**0.5
    assert sumsq == pytest.approx(float(expected.square().sum()), rel=1e-5)


@pytest.mark.parametrize(("n_rows", "width"), [(2560, 640), (7, 33)])
def test_unit_rows_divide_each_row_by_its_norm(n_rows: int, width: int) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n_rows, width, generator=gen) * torch.rand(n_rows, 1, generator=gen) * 10
    w[3] = 0.0  # a zero row stays zero (the norm is clamped at 1e-8, as SAE.set_decoder_norm_to_unit_norm_)
    got = w.clone()
    kernels.unit_rows_(got)
    expected = w.double() / w.double().norm(dim=1, keepdim=True).clamp_min(1e-8)
    assert float((got.double() - expected).abs().max()) < 1e-6
    assert torch.equal(got[3], torch.zeros(width))


def test_non_finite_rows_stay_non_finite() -> None:
    """A diverged row must stay visible to the trainer's checks (no fast-math shortcut maps NaN to a number)."""
    w = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    g = torch.randn(4, 8)
    g[1, 3] = float("nan")
    assert kernels.project_rows_(w, g) != kernels.project_rows_(w, g)  # NaN sum of squares
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2, 3]]).all()
    w[2, 0] = float("inf")
    expected = w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)  # row 2: inf / inf = NaN, the rest 0
    kernels.unit_rows_(w)
    assert torch.isnan(w[2, 0]) and torch.allclose(w, expected, atol=1e-6, equal_nan=True)
