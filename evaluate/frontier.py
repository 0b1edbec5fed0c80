"""The comparison at matched sparsity (SAEBench's question: does a method move the sparsity-fidelity frontier?).

Most figures move with L0 (a denser code reconstructs better, separates same-sequence pairs better...), so runs
are compared at the same L0 only:

- fixed-L0 architectures (topk, batchtopk): the runs at one sweep point have the same k, so the paired comparison
  at each point is at matched L0 by construction; `l0_gaps` checks that their held-out L0 agree within 2%.
- relu (L0 set indirectly by l1): each figure of run A is interpolated linearly in log L0 between A's two
  sweep points that bracket run B's L0, inside every bootstrap replicate (so the interval includes the
  interpolation); a point of B outside A's swept L0 range is not comparable (never extrapolated). The
  L0 positions are the seed-mean point values (L0's own interval is far narrower than the gaps between points).

Runs are compared in pairs (A, B), A minus B: `Layout.comparisons` (EvalConfig.pairs; by default every run
against the reference, the last run given, then every pair of the other runs).

Shape suffixes: B bootstrap replicates, P sweep points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from csae.evaluate.inputs import Layout
from csae.evaluate.stats import Bounds, FamilyResult, Interval, Summary, resample, seed_of, summarize

#: Runs at one point of a fixed-L0 sweep whose held-out L0 differ by more than this are flagged.
L0_AGREEMENT = 0.02


def summarize_points(results: list[FamilyResult], lay: Layout, *, n_resamples: int, confidence: float, seed: int,
                     bounds: Mapping[str, Bounds] | None = None) -> Summary:
    """Every series' figures with intervals, and each pair's A minus B at the same point (paired)."""
    out = Summary({}, {}, {}, {})
    for i, point in enumerate(lay.points):
        series = [lay.series(r, point) for r in lay.runs]
        pairs = [(lay.series(a, point), lay.series(b, point)) for a, b in lay.comparisons]
        part = summarize(results, series, lay.seeds, lay.point_layers[point], pairs, n_resamples=n_resamples,
                         confidence=confidence, seed=seed_of(seed, 31, i), bounds=bounds)
        for mine, theirs in ((out.pooled, part.pooled), (out.diffs, part.diffs), (out.per_seed, part.per_seed),
                             (out.counts, part.counts)):
            mine.update(theirs)  # type: ignore[attr-defined]
    return out


def l0_gaps(summary: Summary, lay: Layout) -> dict[tuple[str, str, str, int], float]:
    """{(A, B, point, layer): L0 of A over B's L0, minus 1} for every pair at every point (fixed-L0 sweeps)."""
    out = {}
    for point in lay.points:
        for layer in lay.point_layers[point]:
            for a, b in lay.comparisons:
                mine = summary.pooled.get((lay.series(a, point), layer), {}).get("l0")
                theirs = summary.pooled.get((lay.series(b, point), layer), {}).get("l0")
                if theirs is not None and mine is not None and theirs.value > 0:
                    out[a, b, point, layer] = mine.value / theirs.value - 1
    return out


def interpolate_log(l0_P: np.ndarray, y_PB: np.ndarray, at: float) -> np.ndarray:
    """y at L0 `at`, linear in log L0 between the two points that bracket it (B,); NaN outside [min, max] L0."""
    order = np.argsort(l0_P)
    x_P, y_PB = np.log(l0_P[order]), y_PB[order]
    x = math.log(at)
    if not x_P[0] <= x <= x_P[-1]:
        return np.full(y_PB.shape[1], np.nan)
    j = int(min(np.searchsorted(x_P, x, side="right"), len(x_P) - 1))
    i = j - 1 if j > 0 else 0
    if x_P[j] == x_P[i]:
        return y_PB[i]
    t = (x - x_P[i]) / (x_P[j] - x_P[i])
    return (1 - t) * y_PB[i] + t * y_PB[j]


def interpolated(results: list[FamilyResult], lay: Layout, summary: Summary, *, n_resamples: int,
                 confidence: float, seed: int, bounds: Mapping[str, Bounds] | None = None
                 ) -> dict[tuple[str, str, str, int], dict[str, Interval]]:
    """{(A, B, B's point, layer): {figure: A interpolated at B's L0 minus B}} for every pair compared, at every
    layer that at least two points hold."""
    out: dict[tuple[str, str, str, int], dict[str, Interval]] = {}
    if not lay.comparisons:
        return out
    for layer in lay.layers:
        points = [p for p in lay.points if layer in lay.point_layers[p]]
        if len(points) < 2:
            continue
        l0 = {s: summary.pooled[s, layer]["l0"].value for s in (lay.series(r, p) for r in lay.runs for p in points)
              if "l0" in summary.pooled.get((s, layer), {})}
        for i, fam in enumerate(results):
            _interpolate_family(fam, lay, layer, points, l0, out, n_resamples=n_resamples, confidence=confidence,
                                seed=seed_of(seed, 37, layer, i), bounds=bounds)
    return out


def _interpolate_family(fam: FamilyResult, lay: Layout, layer: int, points: list[str], l0: dict[str, float],
                        out: dict[tuple[str, str, str, int], dict[str, Interval]], **kw: object) -> None:
    keys = {lay.series(r, p): [f"{lay.series(r, p)}/seed_{s}/layer_{layer}" for s in lay.seeds]
            for r in lay.runs for p in points}
    if not all(k in fam.figures for ks in keys.values() for k in ks) or len(l0) < len(keys):
        return
    figs = {series: [fam.figures[k] for k in ks] for series, ks in keys.items()}
    names = sorted(n for n in set.intersection(*[set(f) for fs in figs.values() for f in fs])
                   if all(math.isfinite(f[n].value) and f[n].interval and f[n].resample is not None
                          for fs in figs.values() for f in fs))
    rows = [(a, b, q, n) for a, b in lay.comparisons for q in points for n in names]
    if not rows:
        return

    def contrast(pooled: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
        out_rows = []
        for a, b, q, n in rows:
            l0_P = np.array([l0[lay.series(a, p)] for p in points])
            y_PB = np.stack([pooled[lay.series(a, p)][n] for p in points])
            out_rows.append(interpolate_log(l0_P, y_PB, l0[lay.series(b, q)]) - pooled[lay.series(b, q)][n])
        return np.stack(out_rows)

    ints = resample(figs, names, fam.units, contrast, **kw)  # type: ignore[arg-type]
    for (a, b, q, n), iv in zip(rows, ints, strict=True):
        out.setdefault((a, b, q, layer), {})[n] = iv


@dataclass(frozen=True)
class Matched:
    """Each pair's A minus B at matched L0, per (A, B, B's point, layer)."""

    method: str
    """"same point" (fixed-L0 architectures), "interpolated in log L0" (relu sweeps) or "same setting, L0 not
    matched" (relu runs with one point: nothing to match along)."""
    diffs: dict[tuple[str, str, str, int], dict[str, Interval]]
    l0: dict[tuple[str, str, str, int], tuple[float, float]]
    """A's L0 (interpolated: B's, by construction) and B's."""

    @property
    def matched(self) -> bool:
        return self.method != UNMATCHED


UNMATCHED = "same setting, L0 not matched"


def matched(results: list[FamilyResult], lay: Layout, summary: Summary, *, n_resamples: int, confidence: float,
            seed: int, bounds: Mapping[str, Bounds] | None = None) -> Matched:
    """The comparison at matched L0 that the layout allows (see the module docstring)."""
    if not lay.comparisons:
        return Matched("none", {}, {})

    def l0_of(series: str, layer: int) -> float:
        iv = summary.pooled.get((series, layer), {}).get("l0")
        return iv.value if iv is not None else math.nan

    if lay.fixed_l0 or len(lay.points) < 2:
        diffs = {(a, b, p, layer): d for a, b in lay.comparisons for p in lay.points for layer in lay.point_layers[p]
                 if (d := summary.diffs.get((lay.series(a, p), lay.series(b, p), layer))) is not None}
        l0 = {(a, b, p, layer): (l0_of(lay.series(a, p), layer), l0_of(lay.series(b, p), layer))
              for a, b, p, layer in diffs}
        return Matched("same point" if lay.fixed_l0 else UNMATCHED, diffs, l0)
    diffs = interpolated(results, lay, summary, n_resamples=n_resamples, confidence=confidence, seed=seed,
                         bounds=bounds)
    l0 = {(a, b, p, layer): (l0_of(lay.series(b, p), layer),) * 2 for a, b, p, layer in diffs}
    return Matched("interpolated in log L0", diffs, l0)
