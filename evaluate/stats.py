"""Statistics family: intervals by a cluster bootstrap over documents and training seeds, paired comparisons
and verdicts.

A family hands over each figure as a `Figure`: its point value and a function that recomputes it on
reweighted documents (a bootstrap resample is a vector of document multiplicities). Tokens of one document
are not independent, so documents are the resampling unit; where a family has two kinds of document (the
forget and the retain text of unlearning), each kind is resampled on its own (strata). Seeds are resampled
as well: a replicate draws the seeds with replacement and averages the figure over the drawn seeds. Runs
are paired: every run and seed sees the same resampled documents, and run A's seed s is paired with run
B's seed s (they start from the same weights). scipy.stats.bootstrap draws the resamples (each stratum's
document indices and the seed indices as independent samples) and forms percentile intervals.

Shape suffixes: B bootstrap replicates, D documents, S seeds, K figures.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

#: A figure recomputed on B document weightings: (B, D) multiplicities -> (B,) values.
Resample = Callable[[np.ndarray], np.ndarray]
Verdict = Literal["better", "worse", "no detectable difference"]
NO_DIFFERENCE: Verdict = "no detectable difference"


@dataclass(frozen=True)
class Figure:
    value: float
    """The figure on all documents."""
    resample: Resample | None = None
    """The figure recomputed on reweighted documents; None: it does not depend on documents (e.g. decoder
    geometry), so only the seeds vary it."""
    interval: bool = True
    """False: report the value only (a figure that depends on documents but cannot be recomputed cheaply)."""


@dataclass(frozen=True)
class Interval:
    value: float
    lo: float
    hi: float

    @property
    def width(self) -> float:
        return self.hi - self.lo


def seed_of(*parts: int) -> int:
    """A seed for one purpose, derived from several integers (evaluate's seed, a purpose id, layer, training
    seed...) with numpy's SeedSequence, so streams for different purposes are independent."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def additive(sums_DK: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> Figure:
    """A figure that is a function of sums over documents: fn maps totals (B, K) to values (B,), and each
    document contributes one row of sums_DK (its tokens' sums)."""
    sums_DK = np.asarray(sums_DK, dtype=np.float64)
    value = float(fn(sums_DK.sum(axis=0, keepdims=True))[0])
    return Figure(value, lambda w_BD: fn(w_BD @ sums_DK))


def ratio(num_D: np.ndarray, den_D: np.ndarray) -> Figure:
    """sum_d num_d / sum_d den_d (e.g. a mean over tokens: per-document sums over per-document counts)."""
    return additive(np.stack([num_D, den_D], axis=1), lambda t: t[:, 0] / t[:, 1])


def per_replicate(fn: Resample) -> Resample:
    """fn with its last result kept: several figures of one SAE that share a costly intermediate (e.g. firing
    counts on the resampled documents) ask for it with the same weights array in one replicate batch."""
    last: list[np.ndarray] = []

    def cached(w_BD: np.ndarray) -> np.ndarray:
        if not last or last[0] is not w_BD:
            last[:] = [w_BD, fn(w_BD)]
        return last[1]

    return cached


@dataclass(frozen=True)
class Units:
    """The documents a family's figures are computed on: how many of each kind (resampled separately)."""

    strata: tuple[int, ...]

    @property
    def n_docs(self) -> int:
        return sum(self.strata)


@dataclass
class FamilyResult:
    """What a metric family returns: its figures per checkpoint and the documents they were computed on."""

    units: Units
    figures: dict[str, dict[str, Figure]]
    """{checkpoint key: {name: Figure}}."""
    extras: dict[str, dict[str, float]]
    """{checkpoint key: {name: number}}: counts and settings that are reported but not resampled."""


def _counts(idx_BN: np.ndarray, n: int) -> np.ndarray:
    """Multiplicities (B, n) of each index in each row of idx_BN."""
    idx_BN = np.atleast_2d(idx_BN)
    b = idx_BN.shape[0]
    flat = (np.arange(b)[:, None] * n + idx_BN).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _evaluate(fig: Figure, w_BD: np.ndarray) -> np.ndarray:
    if fig.resample is None:
        return np.full(len(w_BD), fig.value)
    return np.asarray(fig.resample(w_BD), dtype=np.float64)


Bounds = tuple[float, float]
#: Figures with a bounded range are resampled on the logit of their position in it, so intervals stay inside.
_EDGE = 1e-9


def to_open(v: np.ndarray, bounds: Bounds | None) -> np.ndarray:
    """A bounded figure mapped onto the real line: logit((v - a) / (b - a)); bounded on one side only (the other
    end infinite), -log(b - v) or log(v - a); identity without bounds."""
    if bounds is None:
        return v
    a, b = bounds
    if math.isinf(a) or math.isinf(b):
        if math.isinf(a) and math.isinf(b):
            return v
        d = b - np.asarray(v, dtype=np.float64) if math.isinf(a) else np.asarray(v, dtype=np.float64) - a
        t = np.log(np.maximum(d, _EDGE))
        return -t if math.isinf(a) else t
    u = np.clip((np.asarray(v, dtype=np.float64) - a) / (b - a), _EDGE, 1 - _EDGE)
    return np.log(u) - np.log1p(-u)


def from_open(t: np.ndarray, bounds: Bounds | None) -> np.ndarray:
    if bounds is None:
        return t
    a, b = bounds
    t = np.asarray(t, dtype=np.float64)
    if math.isinf(a) and math.isinf(b):
        return t
    if math.isinf(a):
        return b - np.exp(-t)
    if math.isinf(b):
        return a + np.exp(t)
    return a + (b - a) / (1 + np.exp(-t))


def seed_widening(n_seeds: int, confidence: float) -> float:
    """The factor on the resampled seeds' deviations from their mean: sqrt(S / (S - 1)), since resampling S
    values with replacement shrinks their variance by (S - 1) / S, times t_{S-1} / z at the confidence level, since
    S seeds estimate their own spread with S - 1 degrees of freedom (with two seeds, t_1 = 12.7 against z = 1.96):
    the seeds' share of an interval is then as wide as a t interval over seeds, as it must be to cover with few
    seeds (tests/test_eval_frontier.py measures the coverage)."""
    if n_seeds < 2:
        return 0.0
    q = 0.5 + confidence / 2
    return math.sqrt(n_seeds / (n_seeds - 1)) * float(stats.t.ppf(q, n_seeds - 1) / stats.norm.ppf(q))


def _seed_mean(v_BS: np.ndarray, values: list[np.ndarray], bounds: Bounds | None = None, widen: float = 0.0
               ) -> np.ndarray:
    """The mean over resampled seeds (weights v_BS, rows summing to 1) of per-seed values (each (B,)), the
    seed deviations widened by `widen` (seed_widening). A bounded figure is widened on the logit scale and mapped
    back, so the result stays inside its range."""
    v_SB = to_open(np.stack(values), bounds)
    mean_B = v_SB.mean(axis=0)
    return from_open(mean_B + widen * (v_BS.T * (v_SB - mean_B)).sum(axis=0), bounds)


@dataclass(frozen=True)
class Comparison:
    runs: dict[str, dict[str, Interval]]
    """{run: {figure: its seed mean and interval}}."""
    diffs: dict[tuple[str, str], dict[str, Interval]]
    """{(A, B): {figure: A minus B, with a paired interval}} for every pair compared."""
    n_docs: tuple[int, ...]
    n_seeds: int


def bootstrap(figures: dict[str, Sequence[dict[str, Figure]]], units: Units,
              pairs: Sequence[tuple[str, str]] | None, *, n_resamples: int, confidence: float, seed: int,
              bounds: Mapping[str, Bounds] | None = None) -> Comparison:
    """Seed-mean values, intervals and paired differences of every figure common to all runs.

    figures: {run: [one {name: Figure} per seed, seeds in the same order in every run]}. pairs: (A, B) for
    each difference A minus B formed (None or empty: no comparison). Figures that depend on documents get the paired
    two-level bootstrap; figures that depend on the seeds only (decoder geometry) a t interval over seeds,
    since a bootstrap of two or three values cannot estimate their spread; with one seed they get none.
    """
    runs = list(figures)
    n_seeds = len(figures[runs[0]])
    if any(len(v) != n_seeds for v in figures.values()):
        raise ValueError("every run needs the same seeds")
    pairs = list(pairs or [])
    common = sorted(set.intersection(*[set(d) for per_run in figures.values() for d in per_run]))
    usable = [n for n in common if all(math.isfinite(d[n].value) and d[n].interval
                                       for per_run in figures.values() for d in per_run)]
    by_docs = [n for n in usable if any(d[n].resample is not None for per_run in figures.values() for d in per_run)]
    by_seeds = [n for n in usable if n not in by_docs and n_seeds > 1]

    def per_seed(r: str, n: str) -> np.ndarray:
        return np.array([d[n].value for d in figures[r]])

    out_runs: dict[str, dict[str, Interval]] = {r: {} for r in runs}
    out_diffs: dict[tuple[str, str], dict[str, Interval]] = {pair: {} for pair in pairs}
    bounds = bounds or {}
    for n in by_seeds:
        b = bounds.get(n)
        for r in runs:
            out_runs[r][n] = _t_interval(per_seed(r, n), confidence, b)
        for a, c in pairs:
            out_diffs[a, c][n] = _t_interval(per_seed(a, n) - per_seed(c, n), confidence,
                                             None if b is None else (b[0] - b[1], b[1] - b[0]))
    if by_docs:
        ints = _resampled(figures, by_docs, units, pairs, n_resamples, confidence, seed, bounds)
        for i, (r, n) in enumerate((r, n) for r in runs for n in by_docs):
            out_runs[r][n] = ints[i]
        for i, (pair, n) in enumerate((pair, n) for pair in pairs for n in by_docs):
            out_diffs[pair][n] = ints[len(runs) * len(by_docs) + i]
    return Comparison(out_runs, out_diffs, units.strata, n_seeds)


def _t_interval(values_S: np.ndarray, confidence: float, bounds: Bounds | None = None) -> Interval:
    """mean +- t_{S-1} sd / sqrt(S) over seeds (scipy.stats.t); for a bounded figure on the logit scale, mapped
    back (so inside the range), widened to contain the plain mean."""
    mean = float(values_S.mean())
    t_S = to_open(values_S, bounds)
    sd = float(t_S.std(ddof=1))
    if sd == 0:
        return Interval(mean, mean, mean)
    lo, hi = stats.t.interval(confidence, len(values_S) - 1, loc=float(t_S.mean()), scale=sd / math.sqrt(len(t_S)))
    lo, hi = float(from_open(np.float64(lo), bounds)), float(from_open(np.float64(hi), bounds))
    return Interval(mean, min(lo, mean), max(hi, mean))


#: Pooled figures of one bootstrap batch, {series: {figure: (B,) values}}, to the rows reported (R, B).
Contrast = Callable[[dict[str, dict[str, np.ndarray]]], np.ndarray]


def resample(figures: dict[str, Sequence[dict[str, Figure]]], names: list[str], units: Units, contrast: Contrast, *,
             n_resamples: int, confidence: float, seed: int, bounds: Mapping[str, Bounds] | None = None
             ) -> list[Interval]:
    """Percentile intervals of the rows `contrast` forms from every series' seed-mean figures: documents of each
    stratum and seeds resampled by scipy.stats.bootstrap, the same draws for every series (paired). The point
    values are `contrast` of the seed means; a row that is NaN (e.g. an interpolation out of range) stays NaN."""
    runs = list(figures)
    n_seeds = len(figures[runs[0]])
    sizes = (*units.strata, n_seeds)
    varied = [i for i, n in enumerate(sizes) if n >= 2]  # scipy resamples samples of two or more; others stay
    bounds = bounds or {}
    widen = seed_widening(n_seeds, confidence)

    def statistic(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        b = np.atleast_2d(samples[0]).shape[0]
        idx = [np.broadcast_to(np.arange(n), (b, n)) for n in sizes]
        for i, sample in zip(varied, samples, strict=True):
            idx[i] = np.atleast_2d(sample)
        w_BD = np.concatenate([_counts(i, n) for i, n in zip(idx[:-1], units.strata, strict=True)], axis=1)
        v_BS = _counts(idx[-1], n_seeds) / n_seeds
        return contrast({r: {n: _seed_mean(v_BS, [_evaluate(figures[r][s][n], w_BD) for s in range(n_seeds)],
                                           bounds.get(n), widen) for n in names} for r in runs})

    values = {r: {n: np.array([np.mean([d[n].value for d in figures[r]])]) for n in names} for r in runs}
    point = [float(v) for v in contrast(values)[:, 0]]
    if not varied:  # nothing to resample: the interval is the point
        return [Interval(p, p, p) for p in point]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # figures constant across resamples
        warnings.simplefilter("ignore", RuntimeWarning)  # rows that are NaN throughout
        res = stats.bootstrap([np.arange(sizes[i]) for i in varied], statistic, paired=False, vectorized=True,
                              n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                              rng=np.random.default_rng(seed),
                              batch=max(1, 1_000_000 // max(1, units.n_docs * len(point))))
    lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    # widened to contain the point value where a skewed percentile interval would miss it
    return [Interval(p, min(p, float(a)), max(p, float(b))) if math.isfinite(p) else Interval(p, math.nan, math.nan)
            for p, a, b in zip(point, lo, hi, strict=True)]


def _resampled(figures: dict[str, Sequence[dict[str, Figure]]], names: list[str], units: Units,
               pairs: list[tuple[str, str]], n_resamples: int, confidence: float, seed: int,
               bounds: Mapping[str, Bounds] | None = None) -> list[Interval]:
    """Each run's seed mean (runs x names), then each pair's difference A - B (pairs x names), paired."""
    runs = list(figures)

    def contrast(pooled: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
        rows = [pooled[r][n] for r in runs for n in names]
        rows += [pooled[a][n] - pooled[b][n] for a, b in pairs for n in names]
        return np.stack(rows)

    return resample(figures, names, units, contrast, n_resamples=n_resamples, confidence=confidence, seed=seed,
                    bounds=bounds)


def verdict(diff: Interval, higher_is_better: bool) -> Verdict:
    """better / worse when the paired interval of (A - B) excludes 0, else no detectable difference."""
    if diff.lo > 0:
        return "better" if higher_is_better else "worse"
    if diff.hi < 0:
        return "worse" if higher_is_better else "better"
    return NO_DIFFERENCE


@dataclass
class Summary:
    """Everything the outputs report, keyed by (run, layer) unless said otherwise."""

    pooled: dict[tuple[str, int], dict[str, Interval]]
    """Seed means with intervals (lo = hi = NaN for figures reported without one)."""
    diffs: dict[tuple[str, str, int], dict[str, Interval]]
    """{(A, B, layer): A minus B with paired intervals} for every pair compared (A, B: series)."""
    per_seed: dict[str, dict[str, float]]
    """{checkpoint key: point values and extras}."""
    counts: dict[tuple[str, int], dict[str, float]]
    """Seed means of the extras (documents, tokens, chosen settings...)."""


def summarize(results: list[FamilyResult], runs: list[str], seeds: list[int], layers: list[int],
              pairs: Sequence[tuple[str, str]] | None, *, n_resamples: int, confidence: float, seed: int,
              bounds: Mapping[str, Bounds] | None = None) -> Summary:
    """Bootstrap every family's figures layer by layer (all runs and seeds of a layer share the documents);
    pairs: (A, B) of runs for each difference A - B."""
    pairs = list(pairs or [])
    pooled: dict[tuple[str, int], dict[str, Interval]] = {(r, lay): {} for r in runs for lay in layers}
    diffs: dict[tuple[str, str, int], dict[str, Interval]] = {(a, b, lay): {} for a, b in pairs for lay in layers}
    per_seed: dict[str, dict[str, float]] = {}
    counts: dict[tuple[str, int], dict[str, float]] = {(r, lay): {} for r in runs for lay in layers}
    for i, fam in enumerate(results):
        for key, figs in fam.figures.items():
            per_seed.setdefault(key, {}).update({n: f.value for n, f in figs.items()})
        for key, ext in fam.extras.items():
            per_seed.setdefault(key, {}).update(ext)
        for layer in layers:
            # the runs this family measured at this layer (a run kept to some layers, a family at some points)
            keys = {r: [f"{r}/seed_{s}/layer_{layer}" for s in seeds] for r in runs}
            keys = {r: ks for r, ks in keys.items() if all(k in fam.figures for k in ks)}
            if not keys:
                continue
            figs = {r: [fam.figures[k] for k in ks] for r, ks in keys.items()}
            comp = bootstrap(figs, fam.units, [(a, b) for a, b in pairs if a in keys and b in keys],
                             n_resamples=n_resamples, confidence=confidence, seed=seed_of(seed, 8, layer, i),
                             bounds=bounds)
            for r in keys:
                pooled[r, layer].update(comp.runs[r])
                for name in set.intersection(*[set(f) for f in figs[r]]) - set(comp.runs[r]):
                    pooled[r, layer][name] = Interval(float(np.mean([f[name].value for f in figs[r]])), math.nan,
                                                      math.nan)
                for name in set.intersection(*[set(fam.extras.get(k, {})) for k in keys[r]]):
                    counts[r, layer][name] = float(np.mean([fam.extras[k][name] for k in keys[r]]))
            for a, b in comp.diffs:
                diffs[a, b, layer].update(comp.diffs[a, b])
    held = {k for k, v in pooled.items() if v}  # not a run that lacks the layer (sweep.frontier_only)
    return Summary({k: pooled[k] for k in held}, {k: v for k, v in diffs.items() if v}, per_seed,
                   {k: counts[k] for k in held})
