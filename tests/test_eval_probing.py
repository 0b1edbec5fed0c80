"""Sparse probing and TPP (evaluate/families/probing.py, tpp.py): planted and random SAEs, the selection on
training documents only, TPP's planted drop, and the figures against the protocol written out here (sklearn's
logistic regression is the only code shared)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from csae.evaluate.families.probing import (
    ProbeSets,
    balanced_sample,
    probe_sets,
    probe_task,
    probing_family,
    sparse_probing,
    split_documents,
    topic_quotas,
)
from csae.evaluate.families.tpp import tpp_figures
from csae.evaluate.inputs import LayerCheckpoint
from csae.evaluate.stats import Units, bootstrap
from csae.shared.config.evaluate import EvalConfig
from csae.shared.sae.autoencoder import SAE
from csae.shared.store.schema import make_test_store


def sets_for(topic_D: np.ndarray, n_topics: int, *, min_test: int = 3, seed: int = 0) -> tuple[ProbeSets, np.ndarray]:
    """The family's 80/20 split and one-vs-rest sets, (sets, test side)."""
    test_D = split_documents(topic_D, n_topics, 0.2, seed)
    return probe_sets(topic_D, test_D, n_topics, min_test, seed + 1), test_D


def topic_data(n_per_topic: int, n_topics: int, m: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(topic of each document, its mean residual): a random topic direction of norm `signal` plus N(0, I)."""
    rng = np.random.default_rng(seed)
    topic_D = np.repeat(np.arange(n_topics), n_per_topic)
    mu_TM = rng.normal(size=(n_topics, m))
    mu_TM *= signal / np.linalg.norm(mu_TM, axis=1, keepdims=True)
    return topic_D, (mu_TM[topic_D] + rng.normal(size=(len(topic_D), m))).astype(np.float32)


def test_planted_topic_feature_scores_one_at_k1() -> None:
    """Feature 0 is non-zero exactly on topic 0's documents (a random positive mean there, 0 elsewhere); the
    other 50 features are noise, the residual is noise: at k = 1 topic 0's probe picks feature 0 and is right
    on every test document. Topic 3 (4 documents) is too small to test and is left out, not averaged."""
    rng = np.random.default_rng(0)
    topic_D = np.r_[np.repeat([0, 1, 2], 60), [3] * 4]
    planted = (topic_D == 0) * rng.uniform(0.5, 2.0, size=len(topic_D))
    codes = np.concatenate([planted[:, None], rng.exponential(size=(len(topic_D), 50))], axis=1).astype(np.float32)
    sets, _ = sets_for(topic_D, 4)
    assert list(sets.usable) == [True, True, True, False]
    only0 = replace(sets, usable=np.array([True, False, False, False]))
    figs, chosen = sparse_probing(codes, only0, (1,), "k")
    assert list(chosen[1][0]) == [0]
    assert figs["k1"].value == 1.0
    others = replace(sets, usable=np.array([False, True, True, False]))
    assert sparse_probing(codes, others, (1,), "k")[0]["k1"].value < 0.8  # noise alone does not classify


def test_random_direction_sae_is_near_the_residual_top1_not_above() -> None:
    """A random-direction ReLU SAE (as many directions as channels) against the best single residual channel:
    with isotropic noise and random topic directions, channels and random directions are alike but for the
    ReLU, which can only lose information."""
    topic_D, resid = topic_data(400, 4, 16, 1.5, seed=1)
    sets, _ = sets_for(topic_D, 4)
    ref = sparse_probing(resid, sets, (1,), "k")[0]["k1"].value
    rng = np.random.default_rng(11)
    accs = []
    for _ in range(8):
        w = rng.normal(size=(16, 16))
        w /= np.linalg.norm(w, axis=0)
        codes = np.maximum(resid @ w, 0).astype(np.float32)
        accs.append(sparse_probing(codes, sets, (1,), "k")[0]["k1"].value)
    assert 0.6 < ref < 0.95  # a task neither trivial nor hopeless, so "near" and "above" mean something
    # 160 test documents per topic: one accuracy's sd is ~0.04, the mean of 8 draws' ~0.02 (seeds 0-3 of this
    # construction: differences -0.004, -0.001, +0.005, -0.068)
    assert np.mean(accs) <= ref + 0.02
    assert np.mean(accs) >= ref - 0.1


def test_permuted_test_labels_give_chance_with_an_interval_covering_it() -> None:
    """Features chosen and probes fitted on training documents only: with the test side's topics permuted the
    planted (perfect on true labels) and 200 noise features give ~0.5, and the document bootstrap covers 0.5."""
    rng = np.random.default_rng(3)
    topic_D = np.repeat(np.arange(4), 100)
    codes = np.concatenate([np.eye(4)[topic_D], rng.exponential(size=(400, 200))], axis=1).astype(np.float32)
    test_D = split_documents(topic_D, 4, 0.2, 0)
    permuted = topic_D.copy()
    permuted[test_D] = rng.permutation(topic_D[test_D])
    sets = probe_sets(permuted, test_D, 4, 3, 1)
    fig = sparse_probing(codes, sets, (1, 5), "k")[0]
    comp = bootstrap({"r": [fig]}, Units((len(sets.test_docs),)), None, n_resamples=2000, confidence=0.95, seed=0)
    for name in ("k1", "k5"):
        iv = comp.runs["r"][name]
        assert abs(iv.value - 0.5) < 0.1, (name, iv)
        assert iv.lo <= 0.5 <= iv.hi, (name, iv)
    truth = probe_sets(topic_D, test_D, 4, 3, 1)
    assert sparse_probing(codes, truth, (1,), "k")[0]["k1"].value == 1.0  # the same features on true labels


def test_tpp_planted_drop_on_the_ablated_topic_only() -> None:
    """Residual = s u_t on topic t's documents + noise, u_t orthonormal; the SAE's feature t is exactly that
    component (decoder u_t), the rest small noise features. Ablating topic t's top latents removes u_t from
    its documents: its probe drops to chance, the other probes keep their accuracy."""
    rng = np.random.default_rng(4)
    n_topics, m, s = 4, 24, 4.0
    topic_D = np.repeat(np.arange(n_topics), 80)
    u_TM = np.linalg.qr(rng.normal(size=(m, n_topics)))[0].T
    noise_codes = rng.exponential(0.05, size=(len(topic_D), 20))
    noise_dec = rng.normal(size=(20, m))
    noise_dec /= np.linalg.norm(noise_dec, axis=1, keepdims=True)
    codes = np.concatenate([s * np.eye(n_topics)[topic_D], noise_codes], axis=1).astype(np.float32)
    w_dec = np.concatenate([u_TM, noise_dec]).astype(np.float32)
    resid = (codes @ w_dec + 0.5 * rng.normal(size=(len(topic_D), m))).astype(np.float32)
    sets, _ = sets_for(topic_D, n_topics)
    probes = [LogisticRegression(C=1.0, max_iter=1000).fit(
        resid[np.concatenate(sets.train[t])], np.r_[np.ones(len(sets.train[t][0])), np.zeros(len(sets.train[t][1]))])
        for t in range(n_topics)]
    figs = tpp_figures(codes, w_dec, resid, sets, probes, (1, 2))
    for n in (1, 2):
        assert figs[f"tpp_intended_n{n}"].value > 0.4  # clean ~1.0, ablated ~0.5
        assert abs(figs[f"tpp_unintended_n{n}"].value) < 0.03
        assert figs[f"tpp_n{n}"].value == pytest.approx(figs[f"tpp_intended_n{n}"].value
                                                        - figs[f"tpp_unintended_n{n}"].value)


def _accuracy(probe: LogisticRegression, x: np.ndarray, pos: np.ndarray, neg: np.ndarray,
              w_D: np.ndarray) -> float:
    """Weighted accuracy on a one-vs-rest test set (w_D: each document's multiplicity)."""
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    docs = np.r_[pos, neg]
    right = probe.predict(x[docs].astype(np.float32)) == y
    return float((w_D[docs] * right).sum() / w_D[docs].sum())


def _fit(x: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> LogisticRegression:
    return LogisticRegression(C=1.0, max_iter=1000).fit(np.r_[x[pos], x[neg]].astype(np.float32),
                                                        np.r_[np.ones(len(pos)), np.zeros(len(neg))])


def _checkpoint(path: Path, seed: int, gen_seed: int) -> LayerCheckpoint:
    """A ReLU SAE of width 12 on d 16 with random weights (biases 0.3 x N(0, 1)), as run "r", layer 0."""
    sae = SAE(16, 12)
    gen = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else 1.0))
    return LayerCheckpoint("r", seed, 0, path, sae.eval(), None, None)  # type: ignore[arg-type]


def test_figures_equal_the_protocol_written_out(tmp_path: Path) -> None:
    """From a store, end to end: each row encoded here (numpy), per-document means, the family's split
    (checked against the protocol), top-k by training mean difference, logistic probes, test accuracy averaged
    over topics, and TPP with the ablation done token by token (x - f_S W_dec[S], then the mean): written out
    with loops and sklearn, compared at the point and on reweighted test documents."""
    store, _ = make_test_store(tmp_path / "s.zarr", layers=(0,), d_model=16, n_docs=90, seq_len=8, chunk_rows=128,
                               topics=("a", "b", "c"))
    ckpt = _checkpoint(tmp_path, 0, gen_seed=1)
    sae = ckpt.sae
    cfg = EvalConfig(probe_ks=(1, 3), tpp_ns=(1, 2), probe_min_test_docs=3, sae_batch_size=100)
    results, _ = probing_family(store, [ckpt], cfg, progress=False)
    figs = results[0].figures[ckpt.key]
    task = probe_task(store, cfg)
    sets, topic_D, test_D, n_topics = task.sets, task.topic_D, task.test_D, 3

    assert len(task.docs) == 90 and list(task.docs) == list(range(90))  # all documents (probe_docs 1000 > 90)
    for t in range(n_topics):  # the split and the one-vs-rest sets, as the protocol says
        assert (test_D & (topic_D == t)).sum() == round(0.2 * (topic_D == t).sum())
        for side, (pos, neg) in ((~test_D, sets.train[t]), (test_D, sets.test[t])):
            assert set(pos) == set(np.flatnonzero(side & (topic_D == t)))
            assert len(neg) == len(pos) and side[neg].all() and (topic_D[neg] != t).all()
            assert np.bincount(topic_D[neg], minlength=n_topics).max() <= math.ceil(len(pos) / (n_topics - 1))
    assert list(sets.test_docs) == list(np.flatnonzero(test_D))

    x_N = store.read(0, 0, store.n_rows).float().numpy().astype(np.float64)
    doc_N = store.tokens("doc")
    w_enc, b_enc, w_dec, b_dec = (p.detach().numpy().astype(np.float64) for p in (sae.W_enc, sae.b_enc, sae.W_dec,
                                                                                  sae.b_dec))
    f_N = np.maximum((x_N - b_dec) @ w_enc + b_enc, 0)
    resid = np.stack([x_N[doc_N == d].mean(axis=0) for d in range(90)])
    codes = np.stack([f_N[doc_N == d].mean(axis=0) for d in range(90)])
    rng = np.random.default_rng(5)
    w_D = np.zeros(90)
    w_D[test_D] = rng.integers(1, 4, size=test_D.sum())
    ones = test_D.astype(float)
    for k in (1, 3):
        point, weighted = [], []
        for t in range(n_topics):
            pos, neg = sets.train[t]
            cols = np.argsort(-np.abs(codes[pos].mean(axis=0) - codes[neg].mean(axis=0)))[:k]
            probe = _fit(codes[:, cols], pos, neg)
            point.append(_accuracy(probe, codes[:, cols], *sets.test[t], ones))
            weighted.append(_accuracy(probe, codes[:, cols], *sets.test[t], w_D))
        assert figs[f"probe_acc_k{k}"].value == pytest.approx(np.mean(point), abs=1e-9)
        assert figs[f"probe_acc_k{k}"].resample(w_D[test_D][None])[0] == pytest.approx(np.mean(weighted), abs=1e-9)
    full = [_fit(resid, *sets.train[t]) for t in range(n_topics)]
    assert figs["probe_resid_acc_full"].value == pytest.approx(
        np.mean([_accuracy(full[t], resid, *sets.test[t], ones) for t in range(n_topics)]), abs=1e-9)
    for n in (1, 2):
        scores = []
        for t in range(n_topics):
            pos, neg = sets.train[t]
            effect = [max(0.0, codes[pos, j].mean() - codes[neg, j].mean()) * float(w_dec[j] @ full[t].coef_[0])
                      for j in range(12)]
            ablate = [j for j in np.argsort(effect)[::-1] if effect[j] != 0][:n]
            x_abl = x_N - f_N[:, ablate] @ w_dec[ablate]
            ablated = np.stack([x_abl[doc_N == d].mean(axis=0) for d in range(90)])
            drops = [_accuracy(full[j], resid, *sets.test[j], w_D) - _accuracy(full[j], ablated, *sets.test[j], w_D)
                     for j in range(n_topics)]
            scores.append(drops[t] - np.mean([drops[j] for j in range(n_topics) if j != t]))
        assert figs[f"tpp_n{n}"].resample(w_D[test_D][None])[0] == pytest.approx(np.mean(scores), abs=1e-9)


@pytest.mark.parametrize("n", [1, 7, 60, 100, 129, 130])
def test_probed_documents_are_drawn_as_evenly_over_topics_as_they_allow(n: int) -> None:
    """Topics of 3, 10, 40 and 77 documents (130): a sample of n takes min(size, L) of each topic, L the largest
    level whose total fits (found by brute force over every level), plus the remainder one each from the largest
    topics; the documents are distinct, sorted, and within a topic drawn at random (two seeds differ)."""
    sizes = np.array([40, 3, 77, 10])
    topic_P = np.repeat(np.arange(4), sizes)
    level = max(lv for lv in range(0, 78) if np.minimum(sizes, lv).sum() <= n)
    want = np.minimum(sizes, level)
    for t in np.argsort(-sizes, kind="stable")[: n - want.sum()]:
        assert want[t] < sizes[t]  # the remainder goes to topics that still have documents
        want[t] += 1
    assert (topic_quotas(sizes, n) == want).all() and want.sum() == n
    picked = balanced_sample(topic_P, n, np.random.default_rng(0))
    assert len(set(picked)) == n and (np.diff(picked) > 0).all()
    assert (np.bincount(topic_P[picked], minlength=4) == want).all()
    if 0 < want[2] < sizes[2]:
        assert set(picked) != set(balanced_sample(topic_P, n, np.random.default_rng(1)))


def test_saes_probed_side_by_side_equal_each_probed_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three SAEs of one layer, their probes fitted in two worker processes, get exactly the figures and chosen
    features each gets probed alone in this process (the test above checks those against the protocol)."""
    store, _ = make_test_store(tmp_path / "s.zarr", layers=(0,), d_model=16, n_docs=90, seq_len=8, chunk_rows=128,
                               topics=("a", "b", "c"))
    ckpts = [_checkpoint(tmp_path, seed, gen_seed=seed) for seed in range(3)]
    cfg = EvalConfig(probe_ks=(1, 3), tpp_ns=(1, 2), probe_min_test_docs=3, sae_batch_size=100)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    together, chosen = probing_family(store, ckpts, cfg, progress=False)
    w = np.random.default_rng(0).random((4, together[0].units.n_docs))
    for ckpt in ckpts:
        alone, chosen_alone = probing_family(store, [ckpt], cfg, progress=False)
        got, want = together[0].figures[ckpt.key], alone[0].figures[ckpt.key]
        assert got.keys() == want.keys() and chosen[ckpt.key] == chosen_alone[ckpt.key]
        for name, fig in want.items():
            assert got[name].value == fig.value, name
            assert (got[name].resample(w) == fig.resample(w)).all(), name
    values = [together[0].figures[c.key]["probe_acc_k3"].value for c in ckpts]
    assert len(set(values)) > 1 or len({str(chosen[c.key]) for c in ckpts}) > 1  # not vacuous: the SAEs differ
