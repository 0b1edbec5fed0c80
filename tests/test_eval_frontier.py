"""The comparison at matched L0 (evaluate/frontier.py) on planted frontiers whose figure-vs-L0 curves are known,
and intervals that stay in a figure's range (evaluate/stats.py), with their coverage on simulated data."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from csae.evaluate.frontier import interpolate_log, matched, summarize_points
from csae.evaluate.inputs import Layout
from csae.evaluate.stats import FamilyResult, Units, _t_interval, bootstrap, ratio, verdict

LAYER, N_DOCS, SEEDS = 8, 80, (0, 1)
REF_L0 = (16.0, 32.0, 64.0, 128.0)


def curve(l0: float) -> float:
    """The baseline's planted frontier: a figure that grows with log L0 (as explained variance does)."""
    return 0.3 + 0.1 * math.log(l0)


def planted(runs: dict[str, tuple[tuple[float, float], ...]], rng: np.random.Generator, noise: float = 0.05
            ) -> FamilyResult:
    """Per run, its points (L0, true figure); each seed's figure is a ratio over the same documents: a document
    effect every SAE shares (sd `noise`: some text is harder), a small one of each SAE (sd noise / 5), and a
    seed effect (sd noise / 20), as an SAE's figure varies between documents far more than between seeds."""
    figures = {}
    den = rng.integers(20, 60, N_DOCS).astype(float)
    hard = noise * rng.standard_normal(N_DOCS)
    for run, points in runs.items():
        for i, (l0, value) in enumerate(points):
            for s in SEEDS:
                own = noise / 5 * rng.standard_normal(N_DOCS) + noise / 20 * rng.standard_normal()
                figures[f"{run}/p{i}/seed_{s}/layer_{LAYER}"] = {"y": ratio(den * (value + hard + own), den),
                                                                 "l0": ratio(den * l0, den)}
    return FamilyResult(Units((N_DOCS,)), figures, {})


def layout(runs: list[str], n_points: int, fixed: bool = False) -> Layout:
    points = [f"p{i}" for i in range(n_points)]
    return Layout(runs, points, list(SEEDS), [LAYER], {p: [LAYER] for p in points}, fixed)


def compare(fam: FamilyResult, lay: Layout, seed: int = 0, n: int = 400):
    kw = {"n_resamples": n, "confidence": 0.95, "seed": seed}
    summary = summarize_points([fam], lay, **kw)
    return summary, matched([fam], lay, summary, **kw)


def test_interpolation_is_linear_in_log_l0_and_never_extrapolates() -> None:
    l0 = np.array([10.0, 40.0])
    y = np.array([[1.0], [3.0]])
    assert interpolate_log(l0, y, 20.0)[0] == pytest.approx(2.0)  # halfway in log L0
    assert interpolate_log(l0, y, 10.0)[0] == pytest.approx(1.0) and interpolate_log(l0, y, 40.0)[0] == 3.0
    assert np.isnan(interpolate_log(l0, y, 9.9)[0]) and np.isnan(interpolate_log(l0, y, 41.0)[0])


@pytest.mark.parametrize("shape", ["offset", "identical", "crossing"])
def test_planted_differences_are_found_with_intervals_that_cover_them(shape: str) -> None:
    """Relu-style sweeps at other L0 than the reference's: the run's figure is interpolated at the reference's
    L0 inside every replicate. Planted difference at reference L0 x: offset +0.05; identical 0; crossing
    0.08 (log x - log 45), which changes sign between 32 and 64."""
    run_l0 = (20.0, 45.0, 90.0, 150.0)

    def planted_diff(x: float) -> float:
        return {"offset": 0.05, "identical": 0.0, "crossing": 0.08 * (math.log(x) - math.log(45.0))}[shape]

    covered, verdicts, n_draws = [], [], 40
    for draw in range(n_draws):
        rng = np.random.default_rng(draw)
        fam = planted({"csae": tuple((x, curve(x) + planted_diff(x)) for x in run_l0),
                       "baseline": tuple((x, curve(x)) for x in REF_L0)}, rng)
        _, match = compare(fam, layout(["csae", "baseline"], 4), seed=draw, n=300)
        assert match.method == "interpolated in log L0"
        # 16 lies below csae's swept 20: no answer
        assert math.isnan(match.diffs["csae", "baseline", "p0", LAYER]["y"].value)
        for i in (1, 2, 3):
            d = match.diffs["csae", "baseline", f"p{i}", LAYER]["y"]
            covered.append(d.lo <= planted_diff(REF_L0[i]) <= d.hi)
            verdicts.append((i, verdict(d, True)))
    assert np.mean(covered) >= 0.85, np.mean(covered)
    found = {i: [v for j, v in verdicts if j == i] for i in (1, 2, 3)}
    if shape == "offset":
        assert all(found[i].count("better") >= 0.8 * n_draws for i in (1, 2, 3))
    elif shape == "identical":
        assert sum(v != "no detectable difference" for _, v in verdicts) <= 0.1 * len(verdicts)
    else:  # below 45 the run is worse, above it better
        assert found[1].count("worse") >= 0.5 * n_draws and found[3].count("better") >= 0.8 * n_draws


def test_identical_runs_give_no_verdict() -> None:
    rng = np.random.default_rng(0)
    fam = planted({"baseline": tuple((x, curve(x)) for x in REF_L0)}, rng)
    twin = {k.replace("baseline/", "twin/"): v for k, v in fam.figures.items()}
    both = FamilyResult(fam.units, {**twin, **fam.figures}, {})
    for fixed in (True, False):
        _, match = compare(both, layout(["twin", "baseline"], 4, fixed))
        for cell in match.diffs.values():
            assert cell["y"].value == cell["y"].lo == cell["y"].hi == 0.0


def test_density_alone_is_not_an_advantage() -> None:
    """A planted CSAE that equals the baseline's frontier but sits at 1.5x the L0 at every sweep setting: at the
    same setting it looks better (a denser code reconstructs more), at matched L0 it is no different."""
    rng = np.random.default_rng(1)
    fam = planted({"csae": tuple((1.5 * x, curve(1.5 * x)) for x in REF_L0),
                   "baseline": tuple((x, curve(x)) for x in REF_L0)}, rng, noise=0.02)
    summary, match = compare(fam, layout(["csae", "baseline"], 4))
    same_setting = [verdict(summary.diffs[f"csae/p{i}", f"baseline/p{i}", LAYER]["y"], True) for i in range(4)]
    assert same_setting.count("better") >= 3  # what the unmatched comparison would have said
    assert math.isnan(match.diffs["csae", "baseline", "p0", LAYER]["y"].value)  # 16 < 24: outside the CSAE's sweep
    for i in (1, 2, 3):
        d = match.diffs["csae", "baseline", f"p{i}", LAYER]["y"]
        assert verdict(d, True) == "no detectable difference", (i, d)


def test_fixed_l0_sweeps_pair_runs_at_the_same_point() -> None:
    rng = np.random.default_rng(2)
    fam = planted({"csae": tuple((x, curve(x) + 0.04) for x in REF_L0),
                   "baseline": tuple((x, curve(x)) for x in REF_L0)}, rng, noise=0.02)
    _, match = compare(fam, layout(["csae", "baseline"], 4, fixed=True))
    assert match.method == "same point"
    for i, x in enumerate(REF_L0):
        d = match.diffs["csae", "baseline", f"p{i}", LAYER]["y"]
        assert d.lo <= 0.04 <= d.hi and verdict(d, True) == "better"
        assert match.l0["csae", "baseline", f"p{i}", LAYER] == pytest.approx((x, x))


def _bounded_seed_figures(rng: np.random.Generator, mean: float, n_seeds: int) -> list[dict]:
    """Per seed, a fraction over documents whose seed-level mean varies: a Beta around `mean`."""
    out = []
    for _ in range(n_seeds):
        p = rng.beta(40 * mean, 40 * (1 - mean))
        den = np.full(N_DOCS, 20.0)
        out.append({"acc": ratio(rng.binomial(20, p, N_DOCS).astype(float), den)})
    return out


@pytest.mark.parametrize("n_seeds", [2, 3])
def test_bounded_intervals_stay_in_range_and_cover(n_seeds: int) -> None:
    """An accuracy near 1 (as A_retain): every interval inside [0, 1], and the seeds' mean accuracy covered in
    >= 85% of simulated draws; the same for a cosine near 1 that varies by seed only (a t interval)."""
    mean, covered, covered_t = 0.97, [], []
    for draw in range(80):
        rng = np.random.default_rng(100 + draw)
        figs = {"r": _bounded_seed_figures(rng, mean, n_seeds)}
        iv = bootstrap(figs, Units((N_DOCS,)), None, n_resamples=300, confidence=0.95, seed=draw,
                       bounds={"acc": (0.0, 1.0)}).runs["r"]["acc"]
        assert 0.0 <= iv.lo <= iv.value <= iv.hi <= 1.0
        covered.append(iv.lo <= mean <= iv.hi)
        cos = np.tanh(np.arctanh(0.9) + 0.3 * rng.standard_normal(n_seeds))  # seed-to-seed spread, median 0.9
        t = _t_interval(cos, 0.95, (-1.0, 1.0))
        assert -1.0 <= t.lo <= t.value <= t.hi <= 1.0
        covered_t.append(t.lo <= 0.9 <= t.hi)
    assert np.mean(covered) >= 0.85 and np.mean(covered_t) >= 0.85, (np.mean(covered), np.mean(covered_t))
    # without the range, the same seed values give an interval past 1 (the problem this fixes)
    plain = _t_interval(np.array([0.99, 0.80]), 0.95)
    assert plain.hi > 1.0 and _t_interval(np.array([0.99, 0.80]), 0.95, (-1.0, 1.0)).hi <= 1.0


@pytest.mark.parametrize("fixed", [True, False])
def test_three_runs_give_every_pair_its_planted_difference(fixed: bool) -> None:
    """Runs csae, tsae, baseline with planted offsets +0.06, +0.03, 0 on the baseline's frontier. The default pairs
    are csae - baseline, tsae - baseline and csae - tsae (the two contrastive runs against each other), each found
    with its planted difference (0.06, 0.03, 0.03) inside its interval in >= 85% of draws. Fixed L0: all runs at the
    reference's L0, compared point by point. Relu sweeps: csae and tsae swept at other L0 than the baseline and than
    each other, so csae is interpolated at tsae's L0 (the curve is linear in log L0, so exactly) and tsae's first
    point (18) lies below csae's sweep (20), the baseline's (16) below both: not comparable."""
    offsets = {"csae": 0.06, "tsae": 0.03, "baseline": 0.0}
    sweeps = {"csae": (20.0, 45.0, 90.0, 150.0), "tsae": (18.0, 40.0, 80.0, 140.0), "baseline": REF_L0}
    want = {("csae", "baseline"): 0.06, ("tsae", "baseline"): 0.03, ("csae", "tsae"): 0.03}
    lay = layout(list(offsets), 4, fixed)
    assert lay.comparisons == list(want)
    covered = []
    for draw in range(20):
        rng = np.random.default_rng(50 + draw)
        fam = planted({r: tuple((x, curve(x) + off) for x in (REF_L0 if fixed else sweeps[r]))
                       for r, off in offsets.items()}, rng, noise=0.02)
        _, match = compare(fam, lay, seed=draw, n=300)
        assert set(match.diffs) == {(a, b, f"p{i}", LAYER) for a, b in want for i in range(4)}
        for (a, b), planted_diff in want.items():
            for i in range(4):
                d = match.diffs[a, b, f"p{i}", LAYER]["y"]
                if not fixed and i == 0:  # 16 (baseline) lies below 18 and 20, and 18 (tsae) below csae's 20
                    assert math.isnan(d.value)
                    continue
                assert d.value == pytest.approx(planted_diff, abs=0.02), (a, b, i, d)
                covered.append(d.lo <= planted_diff <= d.hi)
        if fixed:  # differences of seed means are additive: (csae - tsae) = (csae - base) - (tsae - base) exactly
            for i in range(4):
                got = [match.diffs[a, b, f"p{i}", LAYER]["y"].value for a, b in want]
                assert got[2] == pytest.approx(got[0] - got[1], abs=1e-12)
    assert np.mean(covered) >= 0.85, np.mean(covered)


def test_pairs_can_be_chosen() -> None:
    """An explicit list of pairs (EvalConfig.pairs) replaces the default: only those differences, in that order,
    and B - A is minus A - B."""
    rng = np.random.default_rng(7)
    fam = planted({r: tuple((x, curve(x) + off) for x in REF_L0) for r, off in
                   (("csae", 0.06), ("tsae", 0.03), ("baseline", 0.0))}, rng, noise=0.02)
    lay = replace(layout(["csae", "tsae", "baseline"], 4, True), pairs=(("baseline", "tsae"),))
    _, match = compare(fam, lay)
    assert {k[:2] for k in match.diffs} == {("baseline", "tsae")}
    default = compare(fam, layout(["csae", "tsae", "baseline"], 4, True))[1]
    for i in range(4):
        mine = match.diffs["baseline", "tsae", f"p{i}", LAYER]["y"]
        theirs = default.diffs["tsae", "baseline", f"p{i}", LAYER]["y"]
        assert mine.value == pytest.approx(-theirs.value, abs=1e-12)


def test_every_headline_accuracy_and_cosine_has_its_range() -> None:
    """The table evaluate passes to the bootstrap names a range for every headline figure that is an accuracy, a
    share or a correlation/cosine (written out here by name, not read from the table), including those named per
    setting (probe_acc_k<k> for any k), so no such interval leaves its range; unbounded figures get none."""
    from csae.evaluate.report.columns import BOUNDS, HEADLINE

    def expected(name: str) -> tuple[float, float] | None:
        if name.startswith(("probe_acc_k", "probe_block_acc_k", "probe_resid_acc_")) or name in (
                "dead_fraction", "unlearn_U", "dec_mean_abs_cos"):
            return (0.0, 1.0)
        if name in ("dec_max_cos", "smoothness_block"):
            return (-1.0, 1.0)
        return None

    for col in HEADLINE:
        if expected(col.name) is not None:
            assert BOUNDS.get(col.name) == expected(col.name), col.name
    for name in ("probe_acc_k7", "probe_block_acc_k300", "probe_resid_acc_full"):
        assert BOUNDS.get(name) == (0.0, 1.0)
    for name in ("heldout_infonce", "ce_score", "tpp_n20", "topic_excess"):
        assert BOUNDS.get(name) is None
    assert BOUNDS.get("explained_variance") == (-math.inf, 1.0)  # 1 - FVU, FVU >= 0
    # two seeds far apart: inside the range with the table's bounds, past its end without them
    for name, seeds in (("probe_acc_k1", [0.95, 0.30]), ("explained_variance", [0.93, 0.60])):
        values = np.array(seeds)
        plain, kept = _t_interval(values, 0.95), _t_interval(values, 0.95, BOUNDS[name])
        assert plain.hi > 1.0 and kept.lo < kept.value < kept.hi <= 1.0, (name, plain, kept)
        assert kept.value == pytest.approx(values.mean(), abs=0.1)
