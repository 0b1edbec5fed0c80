"""`evaluate run` end to end on a planted test store + the tiny Gemma 3, and its bad-input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from tiny_eval import (
    D_MODEL,
    identity_sae,
    make_store,
    random_sae,
    write_checkpoint,
)

from csae.evaluate.cli import main
from csae.evaluate.families.reconstruction import fvu_pooled
from csae.shared.sae.head import ContrastiveHead
from csae.shared.store.schema import ActivationStore

FAST = ["--ce-tokens", "64", "--select-tokens", "128", "--sweep-predictions", "48", "--unlearn-known", "30",
        "--ns", "2", "5", "--cs", "1", "10", "--lm-batch-size", "4", "--head-steps", "20",
        "--topic-permutations", "100", "--bootstrap-resamples", "200", "--no-progress"]


def evaluate(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["run", *map(str, args)])
    return result.exit_code, result.output + (repr(result.exception) if result.exit_code not in (0, 2) else "")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_gemma3: Path, topic_corpus: Path) -> Path:
    path = tmp_path_factory.mktemp("store") / "acts.zarr"
    make_store(path, tiny_gemma3, topic_corpus)
    return path


def test_several_values_after_one_flag(tmp_path: Path) -> None:
    # Parsed as --cs 1 --cs 2 --ns 3 5: without the expansion click stops at "unexpected extra argument (2)".
    result = CliRunner().invoke(main, ["run", "--cs", "1", "2", "--ns", "3", "5", "--store",
                                       str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output


def _two_runs(tmp_path: Path, good: str = "csae", poor: str = "baseline") -> tuple[Path, Path]:
    """`good`: a perfect SAE (identity features) in seeds 0 and 1; `poor`: random SAEs. Layers 1 and 2."""
    a, b = tmp_path / good, tmp_path / poor
    for layer in (1, 2):
        for seed in (0, 1):
            write_checkpoint(a, layer, identity_sae(D_MODEL), seed=seed)
            write_checkpoint(b, layer, random_sae(D_MODEL, 128, seed=10 * seed + layer),
                             ContrastiveHead(128, 16, hidden=32), seed=seed)
    return a, b


def test_run_compares_two_runs_end_to_end(store: Path, tmp_path: Path, dtype: str) -> None:
    csae, base = _two_runs(tmp_path)
    out = tmp_path / "eval"
    code, output = evaluate("--store", store, "--checkpoints", csae, base, "--out", out, *FAST, "--dtype", dtype)
    assert code == 0, output
    everything = json.loads((out / "metrics_all.json").read_text())
    headline = json.loads((out / "metrics.json").read_text())
    pooled = [f"{run}/layer_{layer}" for run in ("csae", "baseline") for layer in (1, 2)]
    per_seed = [f"{run}/seed_{s}/layer_{layer}" for run in ("csae", "baseline") for s in (0, 1) for layer in (1, 2)]
    assert set(everything) == set(pooled + per_seed)
    verdicts = {f"csae_vs_baseline/layer_{layer}" for layer in (1, 2)}
    assert set(headline) == set(pooled) | verdicts
    for key in pooled:  # every headline figure with its interval, the point inside it
        m = headline[key]
        for name in ("explained_variance", "ce_score", "ce_score_saelens", "kl_score", "l0", "dead_fraction",
                     "dec_mean_abs_cos", "dec_max_cos", "heldout_infonce", "topic_excess", "unlearn_U",
                     "unlearn_U_minus_random", "unlearn_U_CE"):
            assert m[f"{name}_lo"] <= m[name] <= m[f"{name}_hi"], (key, name)
        assert set(m) <= set(everything[key])
    for key in per_seed:
        m = everything[key]
        assert all(isinstance(v, (int, float)) for v in m.values())
        assert m["ce_predictions"] == 64 and m["unlearn_forget_known"] >= 30 and m["unlearn_retain_known"] >= 30
    perfect = everything["csae/seed_0/layer_1"]
    assert perfect["fvu"] == pytest.approx(0.0, abs=1e-10) and perfect["ce_score"] == pytest.approx(1.0, abs=1e-4)
    # a seed mean: the two seeds of the random baseline differ
    both = [everything[f"baseline/seed_{s}/layer_2"]["explained_variance"] for s in (0, 1)]
    assert headline["baseline/layer_2"]["explained_variance"] == pytest.approx(np.mean(both))

    # The planted advantage is found: better where a perfect reconstruction must win, whatever the layer (at
    # layer 2 the two random baselines' downstream scores differ so much that two seeds, with the seeds' t factor,
    # leave CE and KL borderline: there only the direction is asserted).
    comparison = json.loads((out / "comparison.json").read_text())
    for layer in (1, 2):
        v = headline[f"csae_vs_baseline/layer_{layer}"]
        assert v["explained_variance"] == "better"
        assert layer == 2 or v["ce_score"] == v["kl_score"] == v["ce_score_saelens"] == "better"
        for name in ("ce_score", "kl_score", "ce_score_saelens"):
            cell = comparison["csae_vs_baseline"][f"layer_{layer}"][name]
            assert cell["diff"] > 0.5 and cell["diff_hi"] > 0.5 and v[name] != "worse"
    cell = comparison["csae_vs_baseline"]["layer_1"]["explained_variance"]
    assert cell["diff_lo"] > 0 and cell["higher_is_better"] and comparison["reference"] == "baseline"
    assert cell["diff"] == pytest.approx(cell["csae"] - cell["baseline"])

    # Store metrics use exactly the held-out tail of the store (heldout_tail_fraction 0.25 in write_checkpoint).
    opened = ActivationStore.open(store)
    start = opened.heldout_start(0.25)
    assert everything["baseline/seed_0/layer_2"]["eval_rows"] == opened.n_rows - start
    x = opened.read(2, start, opened.n_rows).float()
    sae = random_sae(D_MODEL, 128, seed=2)
    with torch.no_grad():
        want = fvu_pooled(x, sae(x)[0])
    assert everything["baseline/seed_0/layer_2"]["fvu"] == pytest.approx(want, rel=1e-5)

    for name in ("report.md", "unlearning.json", "eval_config.json", "density_layer_1.png", "unlearning_layer_2.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert report.startswith("# Evaluation report")
    sections = report.split("\n## ")
    assert sections[1].startswith("The frontier: each figure against L0")  # the report opens with the frontier,
    assert sections[2].startswith("csae vs baseline at matched L0: verdicts")  # then the verdicts
    assert "L0 is not matched" in sections[2]  # one point per run: said so, not passed off as matched
    assert "| expl. var | higher | **better**" in report and "baseline L2" in report


def _verdicts(out: Path) -> dict[str, str]:
    metrics = json.loads((out / "metrics.json").read_text())
    return {f"{k}:{name}": v for k, cells in metrics.items() if "_vs_" in k for name, v in cells.items()}


def test_identical_runs_differ_in_nothing_and_swapping_runs_flips_verdicts(store: Path, tmp_path: Path) -> None:
    a, b = _two_runs(tmp_path / "same")
    twin = tmp_path / "twin" / "baseline2"
    shutil.copytree(b, twin)
    code, output = evaluate("--store", store, "--checkpoints", b, twin, "--out", tmp_path / "e1", *FAST)
    assert code == 0, output
    same = _verdicts(tmp_path / "e1")
    assert len(same) == 2 * 13 and set(same.values()) == {"no detectable difference"}, same

    code, output = evaluate("--store", store, "--checkpoints", a, b, "--out", tmp_path / "e2", *FAST)
    assert code == 0, output
    code, output = evaluate("--store", store, "--checkpoints", b, a, "--out", tmp_path / "e3", *FAST)
    assert code == 0, output
    forward, backward = _verdicts(tmp_path / "e2"), _verdicts(tmp_path / "e3")
    flip = {"better": "worse", "worse": "better", "no detectable difference": "no detectable difference"}
    for key, v in forward.items():
        run_key = key.replace("csae_vs_baseline", "baseline_vs_csae")
        assert backward[run_key] == flip[v], key
    assert "better" in forward.values() and "worse" in backward.values()


def test_runs_with_different_seeds_are_refused_naming_the_missing_ones(store: Path, tmp_path: Path) -> None:
    a, b = _two_runs(tmp_path)
    shutil.rmtree(b / "seed_1")
    code, output = evaluate("--store", store, "--checkpoints", a, b, "--out", tmp_path / "e", *FAST)
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "run baseline lacks seed 1 (layers 1 2)" in output and not (tmp_path / "e").exists()


def test_checkpoint_for_another_width_is_refused(store: Path, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "wide", 1, random_sae(D_MODEL * 2, 32))
    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "wide", "--out", tmp_path / "e", *FAST)
    assert code == 2 and "d_in=128" in output and "another model" in output


def test_checkpoint_for_another_model_is_refused(store: Path, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "other", 1, random_sae(D_MODEL, 32), model={"name": "google/gemma-2-2b"})
    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "other", "--out", tmp_path / "e", *FAST)
    assert code == 2 and "gemma-2-2b" in output

    # Recorded only through the store it was trained on: that store's model identity is compared.
    other_store = tmp_path / "other.zarr"
    from csae.shared.store.schema import make_test_store

    make_test_store(other_store, layers=(1, 2), d_model=D_MODEL)
    write_checkpoint(tmp_path / "other2", 1, random_sae(D_MODEL, 32), store=str(other_store))
    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "other2", "--out", tmp_path / "e", *FAST)
    assert code == 2 and "planted" in output


def test_store_without_heldout_rows_is_refused(store: Path, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "nohold", 1, random_sae(D_MODEL, 32), heldout_tail_fraction=0.0)
    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "nohold", "--out", tmp_path / "e", *FAST)
    assert code == 2 and "no held-out rows" in output


def test_missing_or_unfinished_checkpoints_are_refused(store: Path, tmp_path: Path) -> None:
    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "nope", *FAST)
    assert code == 2 and "does not exist" in output
    layer = write_checkpoint(tmp_path / "half", 1, random_sae(D_MODEL, 32))
    (layer / "train_config.json").unlink()
    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "half", *FAST)
    assert code == 2 and "did not finish" in output
    write_checkpoint(tmp_path / "l7", 7, random_sae(D_MODEL, 32))
    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "l7", *FAST)
    assert code == 2 and "layer 7" in output


def test_zero_budgets_skip_their_family_and_no_model_is_loaded_without_one(store: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--ce-tokens 0 skips the downstream family, --unlearn-known 0 the unlearning family; with both 0 the
    language model is never loaded (its loader fails the test if called)."""
    from csae.evaluate.lm import passes as lm_module

    write_checkpoint(tmp_path / "run", 2, random_sae(D_MODEL, 64))
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["config"]["model"]  # would be loaded otherwise
    loaded = []
    real = lm_module.load_model
    monkeypatch.setattr(lm_module, "load_model", lambda *a, **k: loaded.append(1) or real(*a, **k))
    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "run", "--out", tmp_path / "e",
                            *FAST, "--ce-tokens", "0", "--unlearn-known", "0")
    assert code == 0, output
    m = json.loads((tmp_path / "e" / "metrics_all.json").read_text())["run/seed_0/layer_2"]
    assert "fvu" in m and "ce_score" not in m and "unlearn_U" not in m and not loaded

    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "run", "--out", tmp_path / "e2",
                            *FAST, "--ce-tokens", "0")
    assert code == 0, output
    m = json.loads((tmp_path / "e2" / "metrics_all.json").read_text())["run/seed_0/layer_2"]
    assert "ce_score" not in m and "unlearn_U" in m and loaded == [1]
