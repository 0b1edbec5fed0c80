"""The statistics family: interval coverage on simulated clustered data, resampled figures against a direct
recomputation on duplicated documents, paired differences and verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from csae.evaluate.stats import Figure, Interval, Units, additive, bootstrap, ratio, verdict


def _clustered(rng: np.random.Generator, n_docs: int, mean: float, seed_effect: float = 0.0) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """Per-document (sum, count) of token values: documents of 5-60 tokens, a document effect shared by its
    tokens (sd 1) and token noise (sd 2), so tokens of one document are correlated."""
    counts = rng.integers(5, 60, size=n_docs).astype(float)
    doc_effect = rng.normal(0, 1, size=n_docs)
    sums = np.array([rng.normal(mean + seed_effect + e, 2, size=int(c)).sum() for e, c in zip(doc_effect, counts,
                                                                                                strict=True)])
    return sums, counts


@pytest.mark.parametrize("n_seeds", [1, 2, 8])
def test_interval_covers_a_known_mean(n_seeds: int) -> None:
    """200 simulated data sets with a known mean (token-weighted, so a ratio of sums): the 95% interval covers
    it 85-100% of the time. With seeds, every seed adds its own offset (sd 0.3, about twice the documents'
    standard error) on the same documents. Measured: 185 (one seed), 200 (two), 191 (eight) of 200 with the seed
    deviations widened by sqrt(S/(S-1)) t_{S-1}/z (stats.seed_widening); widened by sqrt(S/(S-1)) alone, two
    seeds covered 172 times, and unwidened 165 (too few)."""
    rng = np.random.default_rng(0)
    mean, covered = 1.5, 0
    for draw in range(200):
        counts = rng.integers(5, 60, size=40).astype(float)
        doc_effect = rng.normal(0, 1, size=40)
        per_seed = []
        for _ in range(n_seeds):
            offset = rng.normal(0, 0.3) if n_seeds > 1 else 0.0
            sums = np.array([rng.normal(mean + offset + e, 2, size=int(c)).sum()
                             for e, c in zip(doc_effect, counts, strict=True)])
            per_seed.append({"m": ratio(sums, counts)})
        # the population mean weights documents by length; the document effects average to 0 over documents
        comp = bootstrap({"run": per_seed}, Units((40,)), None, n_resamples=400, confidence=0.95, seed=draw)
        iv = comp.runs["run"]["m"]
        covered += iv.lo <= mean <= iv.hi
    assert 170 <= covered <= 200, covered


def test_seed_only_figures_get_a_t_interval_that_covers() -> None:
    """A figure that depends on the seeds only (decoder geometry): with two or three seeds a bootstrap would
    cover far too rarely (two values: about 61%); the t interval covers 85-100% of 200 draws."""
    rng = np.random.default_rng(5)
    for n_seeds in (2, 3):
        covered = 0
        for draw in range(200):
            values = rng.normal(0.1, 0.02, size=n_seeds)
            comp = bootstrap({"run": [{"g": Figure(float(v))} for v in values]}, Units((10,)), None,
                             n_resamples=100, confidence=0.95, seed=draw)
            iv = comp.runs["run"]["g"]
            covered += iv.lo <= 0.1 <= iv.hi
        assert 180 <= covered <= 200, (n_seeds, covered)


def test_resampled_figure_equals_the_figure_on_duplicated_documents() -> None:
    """A figure recomputed with document weights w equals the same formula on a data set where document d
    appears w_d times (an independent computation from the tokens)."""
    rng = np.random.default_rng(1)
    tokens = [rng.normal(size=(int(n), 3)) for n in rng.integers(2, 9, size=7)]
    sums = np.stack([np.r_[t.sum(axis=0), (t ** 2).sum(), len(t)] for t in tokens])

    def variance(t: np.ndarray) -> np.ndarray:  # pooled variance of all coordinates of all tokens
        n = t[:, 4] * 3
        return t[:, 3] / n - (t[:, :3].sum(axis=1) / n) ** 2

    fig = additive(sums, variance)
    all_tokens = np.concatenate(tokens)
    assert fig.value == pytest.approx(all_tokens.var())
    w = np.array([[0, 2, 1, 0, 3, 1, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=float)
    got = fig.resample(w)  # type: ignore[misc]
    for row, want_w in zip(got, w, strict=True):
        duplicated = np.concatenate([t for t, k in zip(tokens, want_w, strict=True) for _ in range(int(k))])
        assert row == pytest.approx(duplicated.var())


def _runs(delta: float, rng: np.random.Generator, n_seeds: int = 2) -> dict[str, list[dict[str, Figure]]]:
    sums, counts = _clustered(rng, 60, 1.0)
    noise = rng.normal(0, 0.5, size=(n_seeds, 60)) * counts
    base = [{"m": ratio(sums + noise[s], counts), "geometry": Figure(0.2 + 0.01 * s)} for s in range(n_seeds)]
    better = [{"m": ratio(sums + noise[s] + delta * counts, counts), "geometry": Figure(0.1 + 0.01 * s)}
              for s in range(n_seeds)]
    return {"csae": better, "baseline": base}


def test_paired_comparison_finds_a_planted_advantage_and_nothing_between_identical_runs() -> None:
    rng = np.random.default_rng(2)
    runs = _runs(0.3, rng)
    comp = bootstrap(runs, Units((60,)), [("csae", "baseline")], n_resamples=1000, confidence=0.95, seed=0)
    d = comp.diffs["csae", "baseline"]["m"]
    assert d.value == pytest.approx(0.3) and d.lo > 0 and verdict(d, higher_is_better=True) == "better"
    assert verdict(d, higher_is_better=False) == "worse"
    assert verdict(comp.diffs["csae", "baseline"]["geometry"], higher_is_better=False) == "better"  # both seeds agree

    same = {"csae": runs["baseline"], "baseline": runs["baseline"]}
    comp = bootstrap(same, Units((60,)), [("csae", "baseline")], n_resamples=1000, confidence=0.95, seed=0)
    assert all(iv == Interval(0.0, 0.0, 0.0) for iv in comp.diffs["csae", "baseline"].values())
    assert all(verdict(iv, True) == "no detectable difference" for iv in comp.diffs["csae", "baseline"].values())

    swapped = bootstrap({"baseline": runs["baseline"], "csae": runs["csae"]}, Units((60,)), [("baseline", "csae")],
                        n_resamples=1000, confidence=0.95, seed=0)
    assert verdict(swapped.diffs["baseline", "csae"]["m"], True) == "worse"
    assert swapped.diffs["baseline", "csae"]["m"].value == pytest.approx(-0.3)


def test_pairing_removes_the_shared_document_noise() -> None:
    """Both runs see the same documents, so document-level noise shared by the runs cancels in the paired
    difference: its interval is much narrower than either run's own interval."""
    rng = np.random.default_rng(3)
    comp = bootstrap(_runs(0.05, rng), Units((60,)), [("csae", "baseline")], n_resamples=1000, confidence=0.95, seed=1)
    assert comp.diffs["csae", "baseline"]["m"].width < 0.5 * comp.runs["baseline"]["m"].width
    assert comp.diffs["csae", "baseline"]["m"].lo > 0


def test_no_interval_without_anything_to_resample() -> None:
    """One seed and a figure that does not depend on documents: no interval, so no verdict can be drawn."""
    rng = np.random.default_rng(4)
    comp = bootstrap(_runs(0.3, rng, n_seeds=1), Units((60,)), [("csae", "baseline")], n_resamples=200,
                     confidence=0.95, seed=0)
    assert "geometry" not in comp.diffs["csae", "baseline"] and "m" in comp.diffs["csae", "baseline"]


def test_strata_are_resampled_separately() -> None:
    """Forget and retain documents (two strata): every replicate keeps each stratum's size, so a figure that
    reads only one stratum never sees the other's documents."""
    seen = []

    def record(w: np.ndarray) -> np.ndarray:
        seen.append(w)
        return w[:, :3].sum(axis=1)

    bootstrap({"a": [{"m": Figure(3.0, record)}]}, Units((3, 5)), None, n_resamples=100, confidence=0.9, seed=0)
    w = np.concatenate(seen)
    assert (w[:, :3].sum(axis=1) == 3).all() and (w[:, 3:].sum(axis=1) == 5).all()
