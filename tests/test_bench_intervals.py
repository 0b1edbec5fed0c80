"""bench/train.py's interval for the median ratio over rounds: its coverage on simulated rounds against the
coverage of order statistics written out, and its verdicts."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).parents[1] / "bench" / "train.py")
assert _spec is not None and _spec.loader is not None
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def _order_statistic_coverage(n: int, k: int) -> float:
    """P(x_(k) <= median < x_(n+1-k)) for n draws of a continuous distribution: 1 - 2 P(Binomial(n, 1/2) < k)."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize(("n", "k"), [(5, 1), (9, 2)])
def test_interval_covers_the_median_as_order_statistics_do(n: int, k: int) -> None:
    """4,000 simulated benches of n rounds from a skewed distribution (lognormal, median 1.9, spread like the
    bench's rounds): the 90% interval covers the true median as often as the order statistics (x_(k), x_(n+1-k))
    must, 93.75% for 5 rounds and 96.1% for 9, within 4 standard errors, and so at least 90%; and it is those
    order statistics."""
    rng = np.random.default_rng(0)
    true_median, trials = 1.9, 4000
    covered = 0
    for _ in range(trials):
        rounds = (true_median * rng.lognormal(0.0, 0.15, n)).tolist()
        median, low, high = bench_train.median_interval(rounds)
        ordered = sorted(rounds)
        assert (low, high) == (ordered[k - 1], ordered[n - k])
        assert median == ordered[n // 2]
        covered += low <= true_median <= high
    expected = _order_statistic_coverage(n, k)
    assert expected >= 0.9
    assert abs(covered / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_interval_is_undefined_below_five_rounds() -> None:
    """Three rounds cannot give 90%: [min, max] covers 75%."""
    _, low, high = bench_train.median_interval([1.0, 2.0, 3.0])
    assert math.isnan(low) and math.isnan(high)
    assert bench_train.verdict(low, high, at_least=2.0) == "undecided"


@pytest.mark.parametrize(("low", "high", "target", "want"), [
    (2.1, 2.4, {"at_least": 2.0}, "met"),
    (1.6, 1.9, {"at_least": 2.0}, "missed"),
    (1.9, 2.2, {"at_least": 2.0}, "undecided"),
    (0.10, 0.24, {"at_most": 0.25}, "met"),
    (0.26, 0.40, {"at_most": 0.25}, "missed"),
    (0.20, 0.30, {"at_most": 0.25}, "undecided"),
])
def test_verdict(low: float, high: float, target: dict[str, float], want: str) -> None:
    assert bench_train.verdict(low, high, **target) == want
