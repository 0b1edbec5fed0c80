"""`evaluate browse`: the collected contexts against a brute-force pass, a planted feature end to end, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from planted_site import HIGH_LEVEL, LAYER, PROBES, RUNS, read_data
from tiny_eval import D_MODEL, make_store, random_sae, write_checkpoint

from csae.evaluate.browse.collect import choose_rows, collect
from csae.evaluate.cli import main
from csae.shared.config.browse import BrowseConfig
from csae.shared.sae.autoencoder import SAE
from csae.shared.store.schema import make_test_store

#: Largest |collected - brute force| of an activation, as a share of the feature's largest: float32 products
#: differ by summation order only (~1e-7); bfloat16 rounds the inputs and the product (2^-8 each, a few
#: roundings over the sum's terms).
ACT_TOLERANCE = {"float32": 1e-5, "bfloat16": 2**-5}


def brute_force(store: Any, layer: int, sae: SAE, rows: Any) -> np.ndarray:
    """Every chosen row encoded at once, in float64: f (rows, features)."""
    x, sae = torch.cat([store.read(layer, a, b) for a, b in rows.ranges]).double(), sae.requires_grad_(False)
    return torch.relu((x - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()).numpy()


def test_collected_contexts_equal_brute_force(tmp_path: Path, dtype: str) -> None:
    store, _ = make_test_store(tmp_path / "acts.zarr", d_model=32, n_docs=64, seq_len=32, chunk_rows=256)
    sae = random_sae(32, 48, seed=3, bias=-8.0)
    cfg = BrowseConfig(rows=1500, top_contexts=6, sample_contexts=4, window=3, batch_size=300, histogram_bins=12)
    heldout = store.heldout_start(0.25)
    rows = choose_rows(store, heldout, cfg.rows)
    assert rows.ranges[0][0] == heldout and rows.n <= cfg.rows and rows.n > cfg.rows - 2 * 32  # whole sequences
    assert all(rows.seq_N[0] != store.read_tokens("seq", a - 1, a)[0] for a, _ in rows.ranges if a > 0)
    got = collect(store, 0, sae, rows, np.array([0, 1] * 32), 2, cfg, getattr(torch, dtype), torch.device("cpu"))
    f = brute_force(store, 0, sae, rows)
    tol = ACT_TOLERANCE[dtype] * f.max(axis=0)
    fires = (f > 0).sum(axis=0)
    assert (fires < rows.n / 4).all() and (fires > cfg.top_contexts).mean() > 0.5  # sparse
    assert (fires < cfg.top_contexts).any()  # and some fire too rarely to fill their contexts
    if dtype == "float32":
        assert (got.fires_F.numpy() == fires).all()
    topic = np.array([0, 1] * 32)[rows.doc_N]
    want_topics = np.stack([((f > 0) & (topic == t)[:, None]).sum(axis=0) for t in (0, 1)], axis=1)
    assert np.abs(got.topic_fires_FT.numpy() - want_topics).max() <= (0 if dtype == "float32" else 3)
    for j in range(sae.d_sae):
        order = np.argsort(-f[:, j], kind="stable")[: min(cfg.top_contexts, fires[j])]
        top_rows = got.top_row_FK[j].numpy()
        assert (top_rows[len(order):] == -1).all()  # empty slots
        top_rows = top_rows[: len(order)]
        if not len(order):
            continue
        if dtype == "float32":
            assert sorted(top_rows) == sorted(order), j
        assert np.all(f[top_rows, j] >= f[order[-1], j] - tol[j])  # none below the k-th largest
        assert np.allclose(got.top_val_FK[j, : len(order)].numpy(), f[top_rows, j], atol=tol[j], rtol=0)
        padded = np.concatenate([np.zeros(3), f[:, j], np.zeros(3)])
        want_win = np.stack([padded[r:r + 7] for r in top_rows])  # rows r-3..r+3, 0 outside the rows read
        assert np.allclose(got.top_win_FKW[j, : len(order)].numpy(), want_win, atol=tol[j], rtol=0), j
        sample = got.sample_row_FK[j].numpy()
        n_sample = min(cfg.sample_contexts, fires[j])
        assert (sample[n_sample:] == -1).all()
        sample = sample[:n_sample]
        assert len(set(sample)) == n_sample and (f[sample, j] > 0).all()  # distinct firing rows
        assert np.allclose(got.sample_val_FK[j, :n_sample].numpy(), f[sample, j], atol=tol[j], rtol=0)
    if dtype == "float32":
        edges = got.edges
        for j in range(sae.d_sae):
            v = f[f[:, j] > 0, j]
            b = np.clip(np.floor(np.log(v / edges[0]) / np.log(edges[1] / edges[0])), 0, len(edges) - 2).astype(int)
            assert (got.hist_FB[j].numpy() == np.bincount(b, minlength=len(edges) - 1)).all()


def test_sample_is_uniform_over_firing_rows(tmp_path: Path) -> None:
    """Over many seeds each firing row of a feature is sampled about equally often (priority sampling)."""
    store, _ = make_test_store(tmp_path / "acts.zarr", d_model=16, n_docs=8, seq_len=16, chunk_rows=64)
    sae = random_sae(16, 4, seed=1, bias=-20.0)
    rows = choose_rows(store, store.n_rows, 0)
    f = brute_force(store, 0, sae, rows)
    counts = np.zeros(rows.n)
    draws = 300
    for seed in range(draws):
        cfg = BrowseConfig(seed=seed, top_contexts=1, sample_contexts=3, window=0, batch_size=40)
        got = collect(store, 0, sae, rows, None, 0, cfg, torch.float32, torch.device("cpu"))
        np.add.at(counts, got.sample_row_FK[0].numpy(), 1)
    firing = np.flatnonzero(f[:, 0] > 0)
    assert set(np.flatnonzero(counts)) <= set(firing)
    expected = draws * 3 / len(firing)
    chi2 = ((counts[firing] - expected) ** 2 / expected).sum()
    assert chi2 < len(firing) + 5 * np.sqrt(2 * len(firing)), (chi2, len(firing))  # df = n - 1, 5 sd above


def test_planted_feature_end_to_end(planted_site: dict[str, Any]) -> None:
    site = planted_site
    common, data = read_data(site["out"], "csae/layer_1")
    token, seq = common["token"], common["seq"]
    rows = data["top_rows"][: data["k_top"]]
    assert len(rows) == 20 and (rows >= 0).all()
    assert (token[rows] == site["planted_token"]).all()  # every top context's token is the planted one
    w = (data["width"] - 1) // 2
    win = data["top_win"][: 20 * data["width"]].reshape(20, data["width"])
    assert win[0, w] == 255 and (np.diff(win[:, w].astype(int)) <= 0).all()  # strongest first, relative to the max
    for r, q in zip(rows, win, strict=True):  # neighbours fire only where they are the planted token too
        for o in range(-w, w + 1):
            if 0 <= r + o < len(token) and seq[r + o] == seq[r] and token[r + o] != site["planted_token"]:
                assert q[w + o] == 0
    up = data["up_ids"][: data["k_logits"]]
    assert up[0] == site["raised_token"]
    ranked = [t for t in site["model_ranking"] if t in set(token.tolist())]  # logit_vocabulary store: its tokens
    assert list(up) == ranked[: len(up)] or site["dtype"] == "bfloat16"
    assert common["vocab"][str(site["planted_token"])].strip() == site["planted_word"]
    other = data["matches"]["baseline"]
    assert len(other["ids"]) == data["n_features"] and np.all(np.abs(other["cos"]) <= 1 + 1e-6)


def test_each_dictionary_lists_the_features_probing_chose(planted_site: dict[str, Any]) -> None:
    """probing.json of `evaluate run --out` reaches the page of the dictionary it names, topic by topic in the order
    probing ranked them; the runs it does not name list none."""
    _, data = read_data(planted_site["out"], "csae/layer_1")
    assert data["probes"] == PROBES
    for run in ("tsae", "baseline"):
        assert read_data(planted_site["out"], f"{run}/layer_1")[1]["probes"] is None


def test_every_feature_links_its_best_match_in_each_other_run(planted_site: dict[str, Any]) -> None:
    """Three runs (csae, tsae, baseline): each dictionary links every feature to the feature of largest decoder
    cosine in each other run (brute force over the saved decoders, in float64), and the T-SAE's high-level block is
    named in its data and in the list of dictionaries (the page marks features [0, HIGH_LEVEL))."""
    decoders = {}
    for run in RUNS:
        w = SAE.load(planted_site["checkpoints"] / run / "seed_0" / f"layer_{LAYER}").W_dec.detach().double()
        decoders[run] = torch.nn.functional.normalize(w, dim=1).numpy()
    for run in RUNS:
        common, data = read_data(planted_site["out"], f"{run}/layer_{LAYER}")
        assert set(data["matches"]) == set(RUNS) - {run}
        for other, m in data["matches"].items():
            cos = decoders[run] @ decoders[other].T
            assert (m["ids"] == cos.argmax(axis=1)).all(), (run, other)
            assert np.allclose(m["cos"], cos.max(axis=1), atol=1e-5)
        want = HIGH_LEVEL if run == "tsae" else 0
        assert data["high_level"] == want
        assert next(d for d in common["dictionaries"] if d["run"] == run)["high_level"] == want


def run_browse(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["browse", "--no-progress", *map(str, args)])
    return result.exit_code, result.output + (repr(result.exception) if result.exit_code not in (0, 2) else "")


@pytest.mark.parametrize("case", ["d_in", "model", "tokens"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, tiny_gemma3: Path,
                                                  topic_corpus: Path, case: str) -> None:
    store = tmp_path / "acts.zarr"
    make_store(store, tiny_gemma3, topic_corpus)
    ckpt = tmp_path / "csae"
    if case == "d_in":
        write_checkpoint(ckpt, 1, random_sae(D_MODEL // 2, 16))
    elif case == "model":
        write_checkpoint(ckpt, 1, random_sae(D_MODEL, 16), model={"name": "google/gemma-2-2b", "revision": "abc"})
    else:
        write_checkpoint(ckpt, 1, random_sae(D_MODEL, 16))
        group = zarr.open_group(str(store), mode="r+")
        group["tokens/token_id"][:] = -1  # the fill value: rows whose token was never written
    out = tmp_path / "eval" / "browser"
    code, output = run_browse("--store", store, "--checkpoints", ckpt, "--out", out)
    assert code == 2 and output.startswith("error: ") and output.count("\n") == 1, output
    want = {"d_in": "d_in=32", "model": "gemma-2-2b", "tokens": "no token metadata"}[case]
    assert want in output, output
    assert not out.exists() and not any((tmp_path / "eval").iterdir() if (tmp_path / "eval").exists() else [])

