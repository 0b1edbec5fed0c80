"""The sparse path (train/sparse.py) against the dense path: forward and every gradient, float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from csae.shared.config.train import TrainConfig
from csae.train import sparse
from csae.train.runtime import Runtime
from csae.train.trainer import CSAETrainer

#: Largest |sparse - dense| relative to the largest |dense| of each compared tensor.
#: - float32: the same sums in another order, ~1e-7 relative; measured <= 8e-7.
#: - bfloat16: both paths round where autocast rounds (inputs of each product to bfloat16, float32
#:   accumulation, the product's result to bfloat16 once), so forward and loss terms agree bit for bit; the
#:   sums differ in order, and b_dec's share through the encoder is one matvec here where the dense path
#:   rounds a (B, d) gradient to bfloat16 first (u = 2^-8, averaging over B rows): 2^-7 of the largest
#:   element. Measured <= 1.5e-3 (b_dec).
#: A gradient term left out (b_dec's share through the encoder, the L1's, the head's) moves a tensor by
#: 10-100% of its largest element (checked below).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2**-7}


def _trainer(dtype: str, mode: str, hidden: int = 0, positives: str = "context") -> CSAETrainer:
    cfg = TrainConfig(expansion=8, batch_size=64, tokens=64 * 100, l1=0.5, alpha=2.0, beta=1.0, head_dim=16,
                      head_hidden=hidden, positives=positives, warmup_steps=0, resample_every=0, sparse=mode,  # type: ignore[arg-type]
                      dtype=dtype, lr=1e-3)  # type: ignore[arg-type]
    trainer = CSAETrainer(cfg, 32, Runtime(torch.device("cpu"), torch.bfloat16 if dtype == "bfloat16" else None),
                          seed=0)
    with torch.no_grad():  # ~10% of the features active, and a b_dec that matters
        trainer.sae.b_enc.fill_(-2.0)
        trainer.sae.b_dec.copy_(torch.linspace(-1, 1, 32))
    return trainer


def _batch() -> torch.Tensor:
    return torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * 3


def _grads(trainer: CSAETrainer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss terms, reconstruction, dense features and every parameter's gradient of one forward/backward."""
    trainer.model.sparse_now = trainer.cfg.sparse == "on"
    terms, x_hat, feats = trainer.model.training_forward_pass(x, 0)
    terms["loss"].backward()
    out = {f"term {k}": v.detach().reshape(1) for k, v in terms.items()}
    out["x_hat"], out["f"] = x_hat.detach().float(), feats.dense().detach().float()
    for name, p in [*trainer.sae.named_parameters(), *(("head." + n, p) for n, p in trainer.head.named_parameters())]:
        out["grad " + name] = p.grad.detach().clone()
    return out


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a}


@pytest.mark.parametrize(("hidden", "positives"), [(0, "context"), (24, "context"), (0, "augment")])
def test_sparse_forward_and_every_gradient_equal_the_dense_path(dtype: str, hidden: int, positives: str) -> None:
    x = _batch()
    dense, sparse_ = _grads(_trainer(dtype, "off", hidden, positives), x), _grads(_trainer(dtype, "on", hidden,
                                                                                           positives), x)
    density = float((dense["f"] > 0).float().mean())
    assert 0.02 < density < 0.3  # sparse enough to matter, dense enough that every row has features
    assert set(dense) == set(sparse_) and len([k for k in dense if k.startswith("grad")]) == (8 if hidden else 6)
    worst = _worst(dense, sparse_)
    assert max(worst.values()) < TOLERANCE[dtype], worst
    assert torch.equal(dense["f"], sparse_["f"])  # the encoder rounds the same way: the same active features


def test_a_missing_gradient_term_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tolerance is meaningful: a sparse path that forgets b_dec's share through the encoder is off by
    far more than it."""
    original = sparse._SparseEncode.backward

    def without_b_dec_share(ctx: object, g_K: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dx, dW_enc, db_enc, db_dec, *rest = original(ctx, g_K)
        return (dx, dW_enc, db_enc, torch.zeros_like(db_dec), *rest)

    monkeypatch.setattr(sparse._SparseEncode, "backward", staticmethod(without_b_dec_share))
    x = _batch()
    worst = _worst(_grads(_trainer("float32", "off"), x), _grads(_trainer("float32", "on"), x))
    assert worst["grad b_dec"] > 10 * TOLERANCE["bfloat16"]
    assert max(v for k, v in worst.items() if k != "grad b_dec") < TOLERANCE["float32"]


def test_float32_steps_on_both_paths_stay_together() -> None:
    """Five full steps (projection, clip, AdamW, renormalisation) on each path end at the same weights.
    float32 only: Adam divides each gradient by its own running scale, so where a gradient is ~0 its
    rounding decides the sign of a full lr-sized step; bfloat16's rounding differences (covered above)
    then legitimately move such weights by ~lr. In float32 they stay below 1e-7 (measured)."""
    x = _batch()
    trainers = {mode: _trainer("float32", mode) for mode in ("off", "on")}
    for step in range(5):
        for trainer in trainers.values():
            trainer.step(x, step)
    assert trainers["on"].model.sparse_now and not trainers["off"].model.sparse_now
    for a, b in zip(trainers["off"].params, trainers["on"].params, strict=True):
        assert float((a - b).detach().abs().max()) < 1e-6  # a wrong gradient moves weights by ~lr = 1e-3


def test_auto_switches_on_the_previous_steps_density() -> None:
    x = _batch()
    trainer = _trainer("float32", "auto")
    with torch.no_grad():
        trainer.sae.b_enc.fill_(-4.0)  # a few % active
    trainer.step(x, 0)
    assert not trainer.model.sparse_now  # the first step is dense: no density measured yet
    trainer.step(x, 1)
    model = trainer.model
    assert model.sparse_now == (model.density < sparse.SPARSE_BELOW[torch.float32]) and model.sparse_now
    with torch.no_grad():
        trainer.sae.b_enc.fill_(5.0)  # every feature fires
    trainer.step(x, 2)
    trainer.step(x, 3)
    assert trainer.model.density > 0.9 and not trainer.model.sparse_now


def _mask() -> torch.Tensor:
    mask = torch.rand(7, 11, generator=torch.Generator().manual_seed(0)) > 0.6
    mask[:, 10] = mask[3] = mask[6] = False  # empty rows (an inner one, the last) and an empty last column
    mask[[1, 4], 0] = True  # rows that start at their first column
    return mask


def _product_and_bias(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A product p in `dtype` and a float32 bias b with p + b > 0 exactly where the mask is set: elsewhere
    p + b is negative, 0.0, -0.0 or NaN. b is a multiple of 1/8 and |p + b| >= 0.5 off zero, so p's
    rounding to bfloat16 (<= 2^-7 |p|) cannot move a sum across zero."""
    gen = torch.Generator().manual_seed(1)
    b = torch.randint(-8, 9, (mask.shape[1],), generator=gen).float() / 8
    r = 0.5 + torch.rand(mask.shape, generator=gen) * 2
    p = torch.where(mask, r, -r) - b
    p[2, ~mask[2]] = -b.expand_as(p)[2, ~mask[2]]  # p + b == 0.0
    p[5, ~mask[5]] = (-0.0 - b).expand_as(p)[5, ~mask[5]]
    p[0, ~mask[0]] = float("nan")
    return p.to(dtype), b


@pytest.mark.parametrize("make", ["float32", "bfloat16", "of_torch"])  # the encoder's on CPU, other devices
def test_pattern_orders(make: str) -> None:
    mask = _mask()
    if make == "of_torch":
        pat = sparse.Pattern.of_torch(mask)
    else:  # from a product in this dtype and the bias: the values are torch's float32 sums at the entries
        p, b = _product_and_bias(mask, getattr(torch, make))
        pat, vals = sparse.active(p, b)
        assert torch.equal(vals, (p.float() + b)[mask])
    rows, cols = mask.nonzero().unbind(1)
    assert torch.equal(pat.rows_K, rows) and torch.equal(pat.cols_K, cols)
    assert torch.equal(pat.flat_K, rows * 11 + cols)
    by_col = mask.t().nonzero()  # (col, row) in column-major order
    assert torch.equal(pat.cols_K[pat.by_col_K], by_col[:, 0]) and torch.equal(pat.rows_by_col_K, by_col[:, 1])
    assert torch.equal(pat.row_offsets.diff(), mask.sum(1)) and torch.equal(pat.col_offsets.diff(), mask.sum(0))
    feats = sparse.SparseFeatures(pat, torch.ones(pat.nnz), torch.float32)
    assert torch.equal(feats.fired(), mask.any(0)) and not feats.fired()[10]


@pytest.mark.parametrize("width", [1, 33, 640])  # odd widths: the kernel's vectorised dot has a remainder
def test_sampled_dots_are_the_products_at_the_entries(width: int) -> None:
    """g[b] . W[i] at each active (b, i), against the dense product in float64 (empty rows included)."""
    mask = _mask()
    gen = torch.Generator().manual_seed(2)
    g, W = torch.randn(7, width, generator=gen), torch.randn(11, width, generator=gen)
    got = sparse._sampled_dots(sparse.Pattern.of_torch(mask), g, W)
    want = (g.double() @ W.double().T)[mask]
    assert got.dtype == torch.float32 and float((got.double() - want).abs().max()) < 1e-5 * width**0.5


def _stable_top(s: torch.Tensor, K: int) -> set[int]:
    """The K largest by a stable sort of -s: ties at the cut go to the earliest positions."""
    return set(torch.from_numpy((-s.double()).numpy().argsort(kind="stable")[:K]).tolist())


@pytest.mark.parametrize("case", ["continuous", "ties", "off_stride", "on_stride", "bfloat16"])
@pytest.mark.parametrize("K", [1, 640, 5000, 19999, 20000, 25000])
def test_batch_top_is_the_k_largest_with_ties_to_the_earliest(case: str, K: int) -> None:
    g = torch.Generator().manual_seed(K)
    s = torch.randn(20000, generator=g)
    if case == "ties":  # few distinct values: many ties at every cut
        s = torch.randint(0, 7, (20000,), generator=g).float()
    elif case in ("off_stride", "on_stride"):  # the sample sees only the small values (a cut far too low), or
        s = -torch.rand(20000, generator=g)  # only the large ones (too high: fewer than K pass, all are candidates)
        on = torch.arange(20000) % sparse.SAMPLE_STRIDE == 0
        s[~on if case == "off_stride" else on] += 2.0
    elif case == "bfloat16":
        s = s.bfloat16()
    got = sparse.batch_top(s, K)
    assert len(got) == min(K, len(s)) and len(set(got.tolist())) == len(got)
    assert set(got.tolist()) == _stable_top(s.float(), K)
