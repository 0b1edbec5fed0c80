"""T-SAE's claims (evaluate/families/temporal.py, the block probes in probing.py): smoothness along a sequence on
planted features against a brute-force correlation, matching on firing rate, probing restricted to the block, and
three runs (csae, tsae, baseline) end to end with every pair compared."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_eval_probing import sets_for
from tiny_eval import D_MODEL, make_store, random_sae, write_checkpoint

from csae.evaluate.cli import main
from csae.evaluate.families.heldout import HeldoutRows, heldout_rows
from csae.evaluate.families.probing import block_probing, sparse_probing
from csae.evaluate.families.temporal import (
    LagSums,
    block_features,
    correlations,
    match_rates,
    rate_gap,
    smoothness_figures,
)
from csae.evaluate.inputs import LayerCheckpoint
from csae.shared.config.base import ConfigError
from csae.shared.config.evaluate import EvalConfig
from csae.shared.sae.autoencoder import SAE
from csae.shared.store.schema import ActivationStore


def rows_of(seq_N: np.ndarray, pos_N: np.ndarray, doc_N: np.ndarray) -> HeldoutRows:
    x = torch.zeros(len(seq_N), 2)
    return HeldoutRows(0, 0, len(seq_N), x, doc_N, seq_N, None, 0, pos_N)


def brute_force(f_NF: np.ndarray, seq_N: np.ndarray, pos_N: np.ndarray) -> np.ndarray:
    """Per feature, np.corrcoef of f(t) and f(t+1) over the adjacent pairs enumerated one by one (NaN: no
    variance)."""
    row_of = {(int(q), int(p)): r for r, (q, p) in enumerate(zip(seq_N, pos_N, strict=True))}
    pairs = [(r, row_of[int(q), int(p) + 1]) for r, (q, p) in enumerate(zip(seq_N, pos_N, strict=True))
             if (int(q), int(p) + 1) in row_of]
    a = np.array([f_NF[r] for r, _ in pairs])
    b = np.array([f_NF[s] for _, s in pairs])
    out = []
    for j in range(f_NF.shape[1]):
        if a[:, j].std() == 0 or b[:, j].std() == 0:
            out.append(np.nan)
        else:
            out.append(np.corrcoef(a[:, j], b[:, j])[0, 1])
    return np.array(out)


def planted_sequences(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """60 sequences of 20-40 rows, two per document; a position gap in sequence 3 (a missing row). Features: 0
    constant along each sequence (a different value per sequence), 1 i.i.d. exponential, 2 dead, 3 a slow
    random walk, 4 a sparse i.i.d. one."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 41, 60)
    seq = np.repeat(np.arange(60), lengths)
    pos = np.concatenate([np.arange(1, n + 1) for n in lengths])
    pos[seq == 3] += (np.arange((seq == 3).sum()) >= 10)  # position 11 of sequence 3 missing
    doc = seq // 2
    n = len(seq)
    walk = np.concatenate([np.cumsum(rng.normal(size=m)) for m in lengths])
    f = np.stack([rng.uniform(1, 5, 60)[seq], rng.exponential(size=n), np.zeros(n), np.maximum(walk + 3, 0),
                  rng.exponential(size=n) * (rng.random(n) < 0.1)], axis=1)
    return f, seq, pos, doc


def test_smoothness_equals_the_correlation_of_adjacent_rows() -> None:
    """A feature constant along each sequence scores exactly 1, an i.i.d. one about 0, a dead one is left out; every
    feature's correlation equals np.corrcoef over the adjacent pairs enumerated one by one (batches of 37 rows,
    so pairs span batches; the missing position breaks a pair)."""
    f, seq, pos, doc = planted_sequences()
    lags = LagSums(rows_of(seq, pos, doc), f.shape[1])
    for s in range(0, len(f), 37):
        lags.add(s, torch.from_numpy(f[s:s + 37]).float())
    got = correlations(lags.per_document().sum(axis=0, keepdims=True))[0]
    f = f.astype(np.float32).astype(np.float64)  # as the pass hands them over
    want = brute_force(f, seq, pos)
    assert np.isnan(got[2]) and np.isnan(want[2])
    assert np.allclose(got[[0, 1, 3, 4]], want[[0, 1, 3, 4]], atol=1e-9)
    assert got[0] == pytest.approx(1.0, abs=1e-9)
    assert abs(got[1]) < 0.06 and abs(got[4]) < 0.06 and got[3] > 0.8  # i.i.d. ~0; a random walk is smooth
    assert lags.n_D.sum() == sum(np.sum(seq == q) - 1 for q in range(60)) - 1  # the gap removes one pair

    figs, extras = smoothness_figures(lags, np.array([0, 1, 2]))
    assert figs["smoothness_block"].value == pytest.approx((1.0 + got[1]) / 2)  # dead feature 2 left out
    assert figs["smoothness_all"].value == pytest.approx(np.nanmean(got)) and not figs["smoothness_all"].interval
    assert extras["block_features"] == 3 and extras["smoothness_block_live"] == 2
    # resampled by document: weights that duplicate documents equal the figure on the duplicated rows
    w = np.random.default_rng(1).integers(0, 3, size=(2, 30)).astype(float)
    for row, weights in zip(figs["smoothness_block"].resample(w), w, strict=True):  # type: ignore[misc]
        keep = np.concatenate([np.flatnonzero(doc == d) for d in range(30) for _ in range(int(weights[d]))])
        # duplicated sequences get new sequence ids so that no pair spans two copies
        copies = np.concatenate([np.full((doc == d).sum(), i) for i, d in
                                 enumerate(d for d in range(30) for _ in range(int(weights[d])))])
        c = brute_force(f[keep][:, :3], seq[keep] * 1000 + copies, pos[keep])
        assert row == pytest.approx(np.nanmean(c), abs=1e-9)


def test_matching_by_firing_rate_picks_the_features_with_the_nearest_rates() -> None:
    """The other SAE holds, at known indices, one feature at each block feature's rate (within 1%), and
    distractors at 3x or a third of those rates: the match is exactly the known indices, one to one, in block
    order, even where two block features share a rate."""
    rng = np.random.default_rng(0)
    target = np.array([0.2, 0.01, 0.001, 0.05, 0.05, 0.3])
    other = np.concatenate([target * 3 + 1e-3, target / 3, target * rng.uniform(0.99, 1.01, len(target))])
    order = rng.permutation(len(other))
    shuffled = other[order]
    where = np.argsort(order)[2 * len(target):]  # the positions the near copies landed on
    got = match_rates(target, shuffled)
    assert len(set(got)) == len(target)
    assert set(got[[0, 1, 2, 5]]) == set(where[[0, 1, 2, 5]])
    assert set(got[[3, 4]]) == set(where[[3, 4]])  # the two 0.05 features take the two copies near 0.05
    for i, j in enumerate(got):  # brute force: no unused feature is nearer in log rate than the one taken
        assert np.isclose(shuffled[j], target[i], rtol=0.011)


def _ckpt(run: str, seed: int, sae: SAE, point: str = "k_8") -> LayerCheckpoint:
    return LayerCheckpoint(run, seed, 1, Path(run), sae, None, None, point)  # type: ignore[arg-type]


def test_block_is_the_prefix_of_a_tsae_and_the_matched_features_of_the_others() -> None:
    tsae = [_ckpt("tsae", s, SAE(8, 20, activation="jumprelu", high_level=4)) for s in (0, 1)]
    base = [_ckpt("baseline", s, SAE(8, 20)) for s in (0, 1)]
    lone = _ckpt("baseline", 0, SAE(8, 20), point="k_16")  # no T-SAE at its point
    rates = {c.key: np.linspace(0.001, 0.5, 20)[::-1].copy() for c in [*tsae, *base]}
    rates[tsae[1].key] = np.r_[rates[tsae[1].key][10:14], np.zeros(16)]  # seed 1's block: the rates of 10-13
    group = [*base, *tsae, lone]
    assert list(block_features(tsae[0], group, rates)) == [0, 1, 2, 3]
    assert list(block_features(base[0], group, rates)) == [0, 1, 2, 3]  # same rates, same places
    assert list(block_features(base[1], group, rates)) == [10, 11, 12, 13]  # matched to its own seed's T-SAE
    assert block_features(lone, group, rates) is None
    assert rate_gap(base[1], group, rates, block_features(base[1], group, rates)) == {"block_rate_gap": 0.0}
    assert rate_gap(tsae[0], group, rates, np.arange(4)) == {}  # a T-SAE's own block is not matched
    shifted = {**rates, base[0].key: rates[base[0].key] / 2}  # every rate halved: matched a factor of 2 off
    gap = rate_gap(base[0], group, shifted, block_features(base[0], group, shifted))["block_rate_gap"]
    assert gap == pytest.approx(np.log(2), rel=0.2)


def test_probing_on_the_block_uses_only_its_features() -> None:
    """Feature 5 is non-zero exactly on topic 0's documents; the block is features 0-3 (noise): the whole
    dictionary's k = 1 probe scores 1.0 on topic 0, the block's does not; with feature 5 inside the block it does,
    and the block's figure equals sparse probing of the block's columns alone."""
    rng = np.random.default_rng(0)
    topic_D = np.repeat([0, 1, 2], 60)
    codes = rng.exponential(size=(len(topic_D), 8)).astype(np.float32)
    codes[:, 5] = (topic_D == 0) * rng.uniform(0.5, 2.0, size=len(topic_D))
    sets, _ = sets_for(topic_D, 3)
    only0 = replace(sets, usable=np.array([True, False, False]))
    assert sparse_probing(codes, only0, (1,), "k")[0]["k1"].value == 1.0
    block = block_probing(codes, np.arange(4), only0, (1, 2))
    assert set(block) == {"probe_block_acc_k1", "probe_block_acc_k2"} and block["probe_block_acc_k1"].value < 0.8
    assert block_probing(codes, np.array([1, 5]), only0, (1,))["probe_block_acc_k1"].value == 1.0
    alone = sparse_probing(np.ascontiguousarray(codes[:, :4]), only0, (2,), "k")[0]["k2"].value
    assert block["probe_block_acc_k2"].value == alone
    assert block_probing(codes, None, only0, (1,)) == {}


def _jumprelu_sae(seed: int, high_level: int = 0) -> SAE:
    """A random SAE saved as jumprelu (as a BatchTopK SAE is saved), with a high-level block when asked."""
    base = random_sae(D_MODEL, 40, seed=seed, bias=-0.5)
    sae = SAE(D_MODEL, 40, activation="jumprelu", high_level=high_level)
    sae.load_state_dict({**base.state_dict(), "threshold": torch.full((40,), 0.05)})
    return sae


def test_three_runs_end_to_end(tmp_path: Path, tiny_gemma3: Path, topic_corpus: Path) -> None:
    """csae, tsae (a block of 8) and baseline: a pair naming an unknown run is refused in one line; every default
    pair compared in metrics.json, comparison.json and report.md; smoothness and block probing for every run; the
    T-SAE's block smoothness equals the brute-force correlation of its first 8 features over adjacent held-out
    rows."""
    store = tmp_path / "acts.zarr"
    make_store(store, tiny_gemma3, topic_corpus)
    runs = {"csae": 0, "tsae": 8, "baseline": 0}
    for i, (run, h) in enumerate(runs.items()):
        for seed in (0, 1):
            write_checkpoint(tmp_path / run, 1, _jumprelu_sae(10 * i + seed, h), seed=seed)
    out = tmp_path / "eval"
    refused = CliRunner().invoke(main, ["run", "--no-progress", "--store", str(store), "--checkpoints",
                                        *(str(tmp_path / r) for r in runs), "--out", str(out), "--pairs", "tsae:csea"])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and "'csea'" in refused.output, refused.output
    assert not out.exists()
    with pytest.raises(ConfigError, match="A:B"):
        EvalConfig(pairs=("tsae",))
    result = CliRunner().invoke(main, ["run", "--no-progress", "--store", str(store), "--checkpoints",
                                       *(str(tmp_path / r) for r in runs), "--out", str(out), "--ce-tokens", "0",
                                       "--unlearn-known", "0", "--head-steps", "5", "--topic-permutations", "50",
                                       "--bootstrap-resamples", "200", "--probe-ks", "1", "--probe-min-test-docs",
                                       "2"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    comparison = json.loads((out / "comparison.json").read_text())
    pairs = ["csae_vs_baseline", "tsae_vs_baseline", "csae_vs_tsae"]
    assert {k for k in metrics if "_vs_" in k} == {f"{p}/layer_1" for p in pairs}
    assert comparison["pairs"] == [["csae", "baseline"], ["tsae", "baseline"], ["csae", "tsae"]]
    for p in pairs:
        cell = comparison[p]["layer_1"]["smoothness_block"]
        a, b = p.split("_vs_")
        assert cell["diff"] == pytest.approx(cell[a] - cell[b]) and "probe_block_acc_k1" in comparison[p]["layer_1"]
    everything = json.loads((out / "metrics_all.json").read_text())
    for run in runs:
        for seed in (0, 1):
            m = everything[f"{run}/seed_{seed}/layer_1"]
            assert m["block_features"] == 8 and "smoothness_all" in m and "probe_block_acc_k1" in m
    report = (out / "report.md").read_text()
    for a, b in (p.split("_vs_") for p in pairs):
        assert f"## {a} vs {b} at matched L0: verdicts" in report
    assert "| smoothness (block) | higher |" in report

    opened = ActivationStore.open(store)
    start = opened.heldout_start(0.25)
    rows = heldout_rows(opened, 1, start, opened.n_rows)
    with torch.no_grad():
        f = _jumprelu_sae(10, 8).encode(rows.x_NM)[:, :8].double().numpy()
    want = np.nanmean(brute_force(f, rows.seq_N, opened.tokens("pos")[start:opened.n_rows]))
    assert everything["tsae/seed_0/layer_1"]["smoothness_block"] == pytest.approx(want, abs=1e-6)
