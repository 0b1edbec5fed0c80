"""Topic purity against a permutation null with documents as the unit: a feature confined to a few random
documents is not topic-specific, a planted topic feature is; the excess over the null is ~0 for features that
ignore topics; entropies by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy

from csae.evaluate.families.topic import entropy_bits, topic_figures
from csae.evaluate.stats import Units, bootstrap

N_DOCS, N_TOPICS = 120, 6


def _corpus(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(20, 80, size=N_DOCS).astype(float), np.arange(N_DOCS) % N_TOPICS


def _figures(fires_DF: np.ndarray, n_D: np.ndarray, topic_D: np.ndarray, **kw: object) -> tuple[dict, dict]:
    args = {"min_fires": 5, "permutations": 999, "fdr": 0.05, "seed": 0, **kw}
    return topic_figures(fires_DF, n_D, topic_D, N_TOPICS, **args)  # type: ignore[arg-type]


def test_entropy_bits_by_hand() -> None:
    counts = np.array([[4.0, 4, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    got = entropy_bits(counts)
    assert got[:3] == pytest.approx([1.0, 0.0, 2.0]) and np.isnan(got[3])
    rng = np.random.default_rng(0)
    c = rng.integers(0, 9, size=(5, 7)).astype(float)
    assert entropy_bits(c) == pytest.approx(entropy(c, base=2, axis=1))


def test_few_random_documents_are_not_topic_specific_but_a_planted_topic_feature_is() -> None:
    rng = np.random.default_rng(1)
    n_D, topic_D = _corpus(rng)
    fires = np.zeros((N_DOCS, 40))
    fires[topic_D == 2, 0] = rng.integers(5, 20, size=N_DOCS // N_TOPICS)  # planted: every topic-2 document
    for j in range(1, 40):  # confined to 3 random documents each: plug-in entropy is low for all of them
        docs = rng.choice(N_DOCS, size=3, replace=False)
        fires[docs, j] = rng.integers(5, 30, size=3)
    figs, extras = _figures(fires, n_D, topic_D)
    assert extras["topic_features"] == 40
    # the plug-in ratio calls the random features fairly topic-specific (3 documents cover <= 3 of 6 topics) ...
    h = entropy_bits(fires[:, 1:].T @ np.eye(N_TOPICS)[topic_D])
    assert (h / np.log2(N_TOPICS) < 0.62).all()
    # ... the null does not: only the planted feature is significant, and the mean excess is small
    assert extras["topic_significant_features"] == 1
    assert figs["topic_significant_fraction"].value == pytest.approx(1 / 40)
    assert abs(figs["topic_excess"].value) < 0.05

    planted_only, _ = _figures(fires[:, :1], n_D, topic_D)
    assert planted_only["topic_excess"].value > 0.8  # H = 0 against a null close to log2(6)


def test_excess_interval_covers_zero_for_features_that_ignore_topics_and_excludes_it_for_topic_features() -> None:
    rng = np.random.default_rng(2)
    n_D, topic_D = _corpus(rng)
    fires = rng.binomial(n_D[:, None].astype(int), rng.uniform(0.02, 0.3, size=(1, 60)))  # firing ignores topic
    figs, _ = _figures(fires.astype(float), n_D, topic_D, permutations=200)
    iv = bootstrap({"r": [figs]}, Units((N_DOCS,)), None, n_resamples=300, confidence=0.95, seed=0).runs["r"]
    assert iv["topic_excess"].lo <= 0 <= iv["topic_excess"].hi
    assert figs["topic_significant_fraction"].value <= 0.05

    topical = fires.astype(float)
    topical[:, :30] *= (topic_D[:, None] == (np.arange(30) % N_TOPICS)) * 3 + 0.2  # half the features prefer a topic
    figs, _ = _figures(topical, n_D, topic_D, permutations=200)
    iv = bootstrap({"r": [figs]}, Units((N_DOCS,)), None, n_resamples=300, confidence=0.95, seed=0).runs["r"]
    assert iv["topic_excess"].lo > 0
    assert figs["topic_significant_fraction"].value >= 0.4


def test_rare_features_and_documents_without_topic_are_left_out() -> None:
    rng = np.random.default_rng(3)
    n_D, topic_D = _corpus(rng)
    topic_D = topic_D.copy()
    topic_D[:10] = -1
    fires = np.zeros((N_DOCS, 3))
    fires[:10, 0] = 50  # fires only in documents without a topic
    fires[20, 1] = 2  # fires too rarely
    fires[topic_D == 1, 2] = 3
    figs, extras = _figures(fires, n_D, topic_D)
    assert extras["topic_features"] == 1 and extras["topic_docs"] == N_DOCS - 10
    assert figs["topic_significant_fraction"].value == 1.0


def test_resampled_entropy_ratio_equals_the_ratio_on_duplicated_documents() -> None:
    """The replicate of topic_entropy_ratio on document weights w equals the plug-in ratio (scipy's entropy) of
    a corpus where document d appears w_d times; the null's counts equal a brute-force sum per permuted topic."""
    from csae.evaluate.families.topic import _counts

    rng = np.random.default_rng(4)
    n_D, topic_D = _corpus(rng)
    fires = rng.binomial(n_D[:, None].astype(int), rng.uniform(0.05, 0.3, size=(1, 25))).astype(float)
    figs, _ = _figures(fires, n_D, topic_D)
    w_BD = rng.multinomial(N_DOCS, np.full(N_DOCS, 1 / N_DOCS), size=3).astype(float)
    got = figs["topic_entropy_ratio"].resample(w_BD)
    for row, w in zip(got, w_BD, strict=True):
        c_FT = np.zeros((25, N_TOPICS))
        q_T = np.zeros(N_TOPICS)
        for d in range(N_DOCS):
            for _ in range(int(w[d])):
                c_FT[:, topic_D[d]] += fires[d]
                q_T[topic_D[d]] += n_D[d]
        assert row == pytest.approx(np.mean(entropy(c_FT, base=2, axis=1)) / entropy(q_T, base=2), rel=1e-12)

    topics_BD = np.stack([rng.permutation(topic_D) for _ in range(3)])
    want = np.zeros((3, 25, N_TOPICS))
    for b in range(3):
        for d in range(N_DOCS):
            want[b, :, topics_BD[b, d]] += w_BD[b, d] * fires[d]
    assert np.array_equal(_counts(fires.T.astype(np.float32), w_BD, topics_BD, N_TOPICS), want)
