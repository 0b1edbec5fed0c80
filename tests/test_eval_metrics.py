"""Pure metric functions against independent computations written out here (numpy, loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_eval import random_sae

from csae.evaluate.families.contrastive import distinct_pairs, info_nce_terms
from csae.evaluate.families.disentanglement import coactivation, decoder_geometry, mean_abs_correlation
from csae.evaluate.families.heldout import HeldoutRows, sae_pass
from csae.evaluate.families.reconstruction import (
    ce_score,
    fvu_pooled,
    kl_score,
    l2_ratio,
    mean_cosine,
    mse,
    reconstruction_figures,
    reconstruction_metrics,
    relative_bias,
)
from csae.evaluate.families.unlearning.intervention import clamp_intervention, matched_features, select_features
from csae.evaluate.families.unlearning.protocol import choose


def _data(n: int = 200, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d) * 5


def test_fvu_is_pooled_over_tokens_with_the_global_mean() -> None:
    x = _data()
    x_hat = x + np.random.default_rng(1).normal(size=x.shape)
    want = ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    got = fvu_pooled(torch.tensor(x), torch.tensor(x_hat))
    assert got == pytest.approx(want, rel=1e-12)
    # Not SAEBench's variant (per-token variance around each token's own mean over dimensions).
    buggy = ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=1, keepdims=True)) ** 2).sum()
    assert abs(got - buggy) > 1e-3
    assert fvu_pooled(torch.tensor(x), torch.tensor(x)) == 0.0
    mean_pred = np.broadcast_to(x.mean(axis=0), x.shape)
    assert fvu_pooled(torch.tensor(x), torch.tensor(mean_pred)) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [0.5, 0.8, 1.0, 1.3])
def test_known_shrinkage_gives_bias_and_l2_ratio_k(k: float) -> None:
    x = torch.tensor(_data())
    m = reconstruction_metrics(x, k * x)
    assert m["relative_bias"] == pytest.approx(k, rel=1e-12)
    assert m["l2_ratio"] == pytest.approx(k, rel=1e-12)
    assert m["cosine"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx(float(((1 - k) * x).pow(2).mean()))
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"])


def test_relative_bias_formula_on_general_reconstruction() -> None:
    x = _data(seed=3)
    x_hat = 0.7 * x + np.random.default_rng(4).normal(size=x.shape)
    want = (x_hat ** 2).sum(axis=1).mean() / (x * x_hat).sum(axis=1).mean()
    assert reconstruction_metrics(torch.tensor(x), torch.tensor(x_hat))["relative_bias"] == pytest.approx(want)


def test_ce_and_kl_scores() -> None:
    assert ce_score(2.0, 2.0, 5.0) == 1.0
    assert ce_score(2.0, 5.0, 5.0) == 0.0
    assert ce_score(2.0, 2.75, 5.0) == pytest.approx(0.75)
    assert kl_score(0.0, 3.0) == 1.0 and kl_score(3.0, 3.0) == 0.0 and kl_score(1.0, 4.0) == 0.75


def _rows(x: np.ndarray, doc: np.ndarray) -> HeldoutRows:
    return HeldoutRows(0, 0, len(x), torch.tensor(x, dtype=torch.float32), doc, doc, None, 0)


def test_sae_pass_figures_equal_the_formulas_on_all_tokens_and_on_duplicated_documents() -> None:
    """Figures from per-document sums equal the token-level formulas, on all rows and on a resample that
    repeats some documents and drops others (an independent recomputation from the duplicated rows)."""
    rng = np.random.default_rng(0)
    doc = np.repeat(np.arange(6), rng.integers(3, 12, size=6))
    x = _data(n=len(doc), seed=5)
    sae = random_sae(16, 40, seed=2, bias=-0.2)
    p = sae_pass(sae, _rows(x, doc), batch=7)
    figs = reconstruction_figures(p, (0.05, 0.5))
    w = np.array([[2.0, 0, 1, 3, 0, 1], [1, 1, 1, 1, 1, 1]])
    for weights in w:
        keep = np.concatenate([np.flatnonzero(doc == d).repeat(1) for d in range(6) for _ in range(int(weights[d]))])
        xt = torch.tensor(x[keep], dtype=torch.float32)
        with torch.no_grad():
            x_hat, f = sae(xt)
        fires = (f > 0).double()
        want = {"fvu": fvu_pooled(xt, x_hat), "mse": mse(xt, x_hat), "cosine": mean_cosine(xt, x_hat),
                "relative_bias": relative_bias(xt, x_hat), "l2_ratio": l2_ratio(xt, x_hat),
                "l0": float(fires.sum(1).mean()), "l1": float(f.double().sum(1).mean()),
                "dead_fraction": float((fires.sum(0) == 0).double().mean()),
                "dense_fraction_0.5": float((fires.mean(0) > 0.5).double().mean())}
        want["explained_variance"] = 1 - want["fvu"]
        for name, value in want.items():
            got = figs[name].resample(weights[None])[0]  # type: ignore[misc]
            assert got == pytest.approx(value, rel=1e-5, abs=1e-9), name
            if weights.min() == 1:
                assert figs[name].value == pytest.approx(value, rel=1e-5, abs=1e-9), name
    assert 0 < figs["dead_fraction"].value < 1 and 0 < figs["dense_fraction_0.05"].value  # not vacuous
    assert p.fires_DF.sum() == int((sae(torch.tensor(x, dtype=torch.float32))[1] > 0).sum())


def test_coactivation_equals_numpy_corrcoef() -> None:
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(500, 16)), dtype=torch.float32)
    sae = random_sae(16, 24, seed=3, bias=0.3)
    pick = torch.arange(0, 24, 3)
    with torch.no_grad():
        f = sae.encode(x)[:, pick].double().numpy()
    corr = np.corrcoef(f.T)
    want = np.abs(corr[~np.eye(len(pick), dtype=bool)]).mean()
    codes = sae_pass(sae, _rows(x.numpy(), np.arange(500) // 50), batch=128).codes_NF
    with torch.no_grad():  # the pass keeps every row's codes
        assert np.allclose(codes.toarray(), sae.encode(x).numpy(), rtol=1e-6, atol=1e-7)
    assert coactivation(codes, pick) == pytest.approx(want, rel=1e-6)
    # A constant feature has no correlation and is left out.
    f2 = np.c_[f, np.ones(500)]
    s_, p_ = torch.tensor(f2.sum(0)), torch.tensor(f2.T @ f2)
    assert mean_abs_correlation(s_, p_, 500) == pytest.approx(want, rel=1e-6)


def test_decoder_geometry_by_hand() -> None:
    w = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]])
    unit = w / w.norm(dim=1, keepdim=True)
    cos = [float(unit[i] @ unit[j]) for i in range(4) for j in range(4) if i != j]
    g = decoder_geometry(w, block=3)
    assert g["dec_mean_abs_cos"] == pytest.approx(np.mean(np.abs(cos)))
    assert g["dec_max_cos"] == pytest.approx(0.6)
    assert g["dec_frac_cos_above_0.5"] == pytest.approx(sum(c > 0.5 for c in cos) / 12)


def test_distinct_pairs_take_each_sequence_once_per_batch() -> None:
    seq = np.repeat(np.arange(30), np.r_[1, np.arange(2, 31)])  # sequence 0 has a single row: never used
    a, p = distinct_pairs(seq, 8, 50, np.random.default_rng(0))
    assert a.shape == p.shape == (50, 8)
    for ab, pb in zip(a, p, strict=True):
        assert len(set(seq[ab])) == 8  # negatives all from other sequences
        assert (seq[ab] == seq[pb]).all() and (ab != pb).all()
    assert 0 not in seq[a]
    # fewer sequences than the batch: the batch shrinks to the number of sequences with two rows
    a, _ = distinct_pairs(np.array([0, 0, 1, 1, 2]), 8, 3, np.random.default_rng(0))
    assert a.shape == (3, 2)


def test_info_nce_terms_equal_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    za, zp = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    tau = 0.2
    s = np.array([[float(torch.cosine_similarity(za[i], zp[j], dim=0)) for j in range(5)] for i in range(5)])

    def ce(m: np.ndarray, i: int) -> float:
        return float(-(m[i, i] / tau - np.log(np.exp(m[i] / tau).sum())))

    got = info_nce_terms(za.double(), zp.double(), tau)
    for i in range(5):
        assert float(got["loss"][i]) == pytest.approx((ce(s, i) + ce(s.T, i)) / 2, rel=1e-6)  # s in float32
        assert float(got["pos"][i]) == pytest.approx(s[i, i])
        assert float(got["neg"][i]) == pytest.approx((s[i].sum() - s[i, i]) / 4)


def test_feature_selection_as_saebench() -> None:
    nu_f = torch.tensor([0.5, 0.9, 0.3, 0.8, 0.0, 0.7])
    nu_r = torch.tensor([0.0, 0.02, 0.005, 0.0, 0.0, 0.009])
    # tau 0.01 drops feature 1; rank the rest by nu_forget: 3 (0.8), 5 (0.7), 0 (0.5), 2; feature 4 never fires
    # on forget text, so clamping it would do nothing: it is never selected.
    assert select_features(nu_f, nu_r, 0.01, 3).tolist() == [3, 5, 0]
    assert select_features(nu_f, nu_r, 0.001, 10).tolist() == [3, 0]


def test_matched_control_draws_features_that_fire_on_forget_text_at_similar_rates() -> None:
    rng = np.random.default_rng(0)
    nu = torch.tensor(np.r_[np.zeros(500), 10 ** rng.uniform(-4, -0.5, size=500)])
    selected = torch.tensor([600, 700, 800, 900])
    for draw in range(20):
        picked = matched_features(nu, selected, np.random.default_rng(draw))
        assert len(picked) == 4 and len(set(picked.tolist())) == 4
        assert (nu[picked] > 0).all()  # never a feature that does not fire on forget text
        assert not set(picked.tolist()) & set(selected.tolist())
        ratio = np.log10(sorted(nu[picked].tolist())) - np.log10(sorted(nu[selected].tolist()))
        assert np.abs(ratio).max() < 0.1  # the 10 nearest of 500 rates spread over 3.5 decades
    # with fewer candidates than selected features, as many as there are
    assert len(matched_features(torch.tensor([0.0, 0.5, 0.2, 0.0]), torch.tensor([1, 2]), rng)) == 0


def test_clamp_intervention_matches_the_formula() -> None:
    sae = random_sae(8, 32, seed=1, bias=-0.3)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2)) * 2
    feats, a, c = torch.tensor([3, 7, 11]), torch.tensor([0.5, 1.5, 2.0]), 5.0
    out, changed = clamp_intervention(x, sae, feats, a, c)
    with torch.no_grad():
        f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        err = x - (f @ sae.W_dec + sae.b_dec)
        f2 = f.clone()
        for k, j in enumerate(feats.tolist()):
            f2[:, j] = torch.where(f[:, j] > 0, -c * a[k], f[:, j])
        want = err + f2 @ sae.W_dec + sae.b_dec
    assert changed.tolist() == (f[:, feats] > 0).any(dim=1).tolist()
    assert 0 < int(changed.sum()) < 50
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~changed], x[~changed])  # unchanged rows are returned exactly


def test_choose_takes_the_lowest_forget_accuracy_that_keeps_the_retain_text() -> None:
    pts = [{"A_forget": 0.9, "A_retain": 1.0, "features": [1], "c": 1.0, "retain_threshold": 0.01},
           {"A_forget": 0.4, "A_retain": 0.995, "features": [1, 2], "c": 5.0, "retain_threshold": 0.01},
           {"A_forget": 0.4, "A_retain": 0.999, "features": [1, 2], "c": 2.0, "retain_threshold": 0.01},
           {"A_forget": 0.0, "A_retain": 0.5, "features": [1, 2, 3], "c": 20.0, "retain_threshold": 0.01},
           {"A_forget": 0.0, "A_retain": 1.0, "features": [], "c": 1.0, "retain_threshold": 0.001}]
    assert choose(pts, 0.99) is pts[2]  # ties on A_forget go to the smaller multiplier
    assert choose(pts, 0.999) is pts[2]
    assert choose(pts, 1.0) is pts[0]
    assert choose(pts[3:], 0.99) is None  # the empty feature set does not count
