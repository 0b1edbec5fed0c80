"""Pure metric functions against independent computations written out here (numpy, loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from eval_fixtures import random_sae

from csae.evaluate.contrastive import context_pairs, info_nce
from csae.evaluate.features import FeatureStats, decoder_geometry, mean_abs_correlation, topic_purity
from csae.evaluate.reconstruction import ce_score, fvu_pooled, kl_score, reconstruction_metrics
from csae.evaluate.unlearn import (
    clamp_intervention,
    random_features,
    select_features,
    unlearning_ce_score,
    unlearning_score,
)


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


def test_feature_stats_sparsity_by_hand() -> None:
    f = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    stats = FeatureStats(4, 0)
    stats.update(f[:3])
    stats.update(f[3:])
    s = stats.sparsity((0.3, 0.6))
    assert s["l0"] == pytest.approx((2 + 1 + 2 + 0) / 4)
    assert s["l1"] == pytest.approx((3 + 3 + 1.5 + 0) / 4)
    assert s["dead_features"] == 2 and s["dead_fraction"] == 0.5
    assert stats.density_F().tolist() == [0.0, 0.5, 0.0, 0.75]
    assert s["dense_fraction_0.3"] == 0.5 and s["dense_fraction_0.6"] == 0.25


def test_coactivation_equals_numpy_corrcoef() -> None:
    rng = np.random.default_rng(0)
    f = np.maximum(rng.normal(size=(500, 6)) + rng.normal(size=(500, 1)), 0)
    stats = FeatureStats(6, 0, sample_F=torch.arange(6))
    stats.update(torch.tensor(f[:250]))
    stats.update(torch.tensor(f[250:]))
    corr = np.corrcoef(f.T)
    want = np.abs(corr[~np.eye(6, dtype=bool)]).mean()
    assert stats.coactivation() == pytest.approx(want, rel=1e-9)
    # A constant feature has no correlation and is left out.
    f2 = np.c_[f, np.ones(500)]
    s, p = torch.tensor(f2.sum(0)), torch.tensor(f2.T @ f2)
    assert mean_abs_correlation(s, p, 500) == pytest.approx(want, rel=1e-9)


def test_decoder_geometry_by_hand() -> None:
    w = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]])
    unit = w / w.norm(dim=1, keepdim=True)
    cos = [float(unit[i] @ unit[j]) for i in range(4) for j in range(4) if i != j]
    g = decoder_geometry(w, block=3)
    assert g["dec_mean_abs_cos"] == pytest.approx(np.mean(np.abs(cos)))
    assert g["dec_max_cos"] == pytest.approx(0.6)
    assert g["dec_frac_cos_above_0.5"] == pytest.approx(sum(c > 0.5 for c in cos) / 12)


def test_topic_purity_by_hand() -> None:
    # Corpus: topics 50/50. Feature 0 fires only on topic 0 (pure), feature 1 on both equally, feature 2
    # too rarely to count.
    fires = torch.tensor([[20, 0], [15, 15], [1, 1]])
    tokens = torch.tensor([100, 100])
    p = topic_purity(fires, tokens, min_fires=10, specific_ratio=0.5)
    assert p["topic_features"] == 2
    assert p["topic_entropy_ratio"] == pytest.approx((0.0 + 1.0) / 2)
    assert p["topic_specific_fraction"] == 0.5
    assert p["topic_kl_bits"] == pytest.approx((1.0 + 0.0) / 2)  # KL([1,0] || [.5,.5]) = 1 bit
    # Relative to a skewed corpus: a feature firing like the corpus has ratio 1 and KL 0.
    p2 = topic_purity(torch.tensor([[30, 10]]), torch.tensor([300, 100]), 10, 0.5)
    assert p2["topic_entropy_ratio"] == pytest.approx(1.0) and p2["topic_kl_bits"] == pytest.approx(0.0, abs=1e-12)


def test_topic_counts_accumulate() -> None:
    f = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0], [1.0, 1.0]])
    stats = FeatureStats(2, 3)
    stats.update(f, torch.tensor([0, 1, 2, -1]))
    assert stats.topic_fires_FT.tolist() == [[1, 1, 0], [0, 1, 1]]
    assert stats.topic_tokens_T.tolist() == [1, 1, 1]


def test_context_pairs_stay_in_their_sequence() -> None:
    seq = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    a, p = context_pairs(seq, np.random.default_rng(0))
    assert sorted(a.tolist()) == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # row 3 is alone in its sequence
    assert (seq[a] == seq[p]).all() and (a != p).all()


def test_info_nce_equals_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    za, zp = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    tau = 0.2
    s = np.array([[float(torch.cosine_similarity(za[i], zp[j], dim=0)) for j in range(5)] for i in range(5)])

    def ce(m: np.ndarray) -> float:
        return float(np.mean([-(m[i, i] / tau - np.log(np.exp(m[i] / tau).sum())) for i in range(5)]))

    got = info_nce(za, zp, tau)
    assert got["infonce"] == pytest.approx((ce(s) + ce(s.T)) / 2, rel=1e-6)
    assert got["pos_sim"] == pytest.approx(np.trace(s) / 5)
    assert got["neg_sim"] == pytest.approx((s.sum() - np.trace(s)) / 20)
    assert got["sim_gap"] == pytest.approx(got["pos_sim"] - got["neg_sim"])


def test_feature_selection_as_saebench() -> None:
    nu_f = torch.tensor([0.5, 0.9, 0.3, 0.8, 0.0, 0.7])
    nu_r = torch.tensor([0.0, 0.02, 0.005, 0.0, 0.0, 0.009])
    # tau 0.01 drops feature 1; rank the rest by nu_forget: 3 (0.8), 5 (0.7), 0 (0.5), 2, 4.
    assert select_features(nu_f, nu_r, 0.01, 3).tolist() == [3, 5, 0]
    assert select_features(nu_f, nu_r, 0.001, 10).tolist() == [3, 0, 4]
    picked = random_features(nu_r, 0.01, 3, torch.Generator().manual_seed(0))
    assert len(picked) == 3 and set(picked.tolist()) <= {0, 2, 3, 4, 5}


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


def test_unlearning_scores() -> None:
    pts = [{"A_forget": 0.9, "A_retain": 1.0, "dCE_forget": 0.1, "dCE_retain": 0.0},
           {"A_forget": 0.4, "A_retain": 0.995, "dCE_forget": 1.0, "dCE_retain": 0.01},
           {"A_forget": 0.0, "A_retain": 0.5, "dCE_forget": 3.0, "dCE_retain": 2.0}]
    assert unlearning_score(pts, 0.99) == pytest.approx(0.6)
    assert unlearning_score(pts, 0.999) == pytest.approx(0.1)
    assert unlearning_score(pts[2:], 0.99) == 0.0
    # gaps: forget 4.0, retain 2.0 -> retain tolerance 1% of 2.0 = 0.02
    assert unlearning_ce_score(pts, 4.0, 2.0, 0.01) == pytest.approx(0.25)
    assert unlearning_ce_score(pts[2:], 4.0, 2.0, 0.01) == 0.0
    assert not math.isnan(unlearning_ce_score(pts, 4.0, 2.0, 1.0))
