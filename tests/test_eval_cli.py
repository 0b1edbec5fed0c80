"""`evaluate run` end to end on a planted test store + the tiny Gemma 3, and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner
from eval_fixtures import (  # noqa: F401
    D_MODEL,
    identity_sae,
    make_store,
    random_sae,
    tiny_gemma3,
    topic_corpus,
    write_checkpoint,
)

from csae.evaluate.cli import main
from csae.evaluate.reconstruction import fvu_pooled
from csae.shared.head import ContrastiveHead
from csae.shared.schema import ActivationStore

FAST = ["--ce-tokens", "64", "--select-tokens", "128", "--unlearn-tokens", "48", "--ns", "2", "5", "--cs", "1", "10",
        "--lm-batch-size", "4", "--no-progress"]


def evaluate(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["run", *map(str, args)])
    return result.exit_code, result.output + (repr(result.exception) if result.exit_code not in (0, 2) else "")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_gemma3: Path, topic_corpus: Path) -> Path:  # noqa: F811
    path = tmp_path_factory.mktemp("store") / "acts.zarr"
    make_store(path, tiny_gemma3, topic_corpus)
    return path


def test_several_values_after_one_flag(tmp_path: Path) -> None:
    # Parsed as --cs 1 --cs 2 --ns 3 5: without the expansion click stops at "unexpected extra argument (2)".
    result = CliRunner().invoke(main, ["run", "--cs", "1", "2", "--ns", "3", "5", "--store",
                                       str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output


def test_run_compares_two_runs_end_to_end(store: Path, tmp_path: Path, dtype: str) -> None:
    csae, base = tmp_path / "csae", tmp_path / "baseline"
    for layer in (1, 2):
        write_checkpoint(csae, layer, random_sae(D_MODEL, 128, seed=layer), ContrastiveHead(128, 16, hidden=32))
        write_checkpoint(base, layer, identity_sae(D_MODEL))
    out = tmp_path / "eval"
    code, output = evaluate("--store", store, "--checkpoints", csae, base, "--out", out, *FAST, "--dtype", dtype)
    assert code == 0, output
    metrics = json.loads((out / "metrics_all.json").read_text())
    headline = json.loads((out / "metrics.json").read_text())
    assert set(headline["csae/seed_0/layer_1"]) <= set(metrics["csae/seed_0/layer_1"])
    assert "ce_score" in headline["csae/seed_0/layer_1"]
    assert sorted(metrics) == [f"{run}/seed_0/layer_{layer}" for run in ("baseline", "csae") for layer in (1, 2)]
    for m in metrics.values():
        assert all(isinstance(v, (int, float)) for v in m.values())
        for key in ("fvu", "relative_bias", "l0", "dead_fraction", "dec_mean_abs_cos", "coactivation_mean_abs_corr",
                    "topic_entropy_ratio", "heldout_infonce", "ce_score", "kl_score", "unlearn_U",
                    "unlearn_U_minus_random", "unlearn_U_CE"):
            assert key in m
        assert m["ce_predictions"] == 64 and m["unlearn_forget_predictions"] == 48
    perfect = metrics["baseline/seed_0/layer_1"]
    assert perfect["fvu"] == pytest.approx(0.0, abs=1e-10) and perfect["ce_score"] == pytest.approx(1.0, abs=1e-4)

    # Store metrics use exactly the held-out tail of the store (heldout_tail_fraction 0.25 in write_checkpoint).
    opened = ActivationStore.open(store)
    start = opened.heldout_start(0.25)
    assert metrics["csae/seed_0/layer_2"]["eval_rows"] == opened.n_rows - start
    x = opened.read(2, start, opened.n_rows).float()
    sae = random_sae(D_MODEL, 128, seed=2)
    with torch.no_grad():
        want = fvu_pooled(x, sae(x)[0])
    assert metrics["csae/seed_0/layer_2"]["fvu"] == pytest.approx(want, rel=1e-5)

    for name in ("report.md", "unlearning.json", "eval_config.json", "density_layer_1.png", "unlearning_layer_2.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "csae/seed_0/layer_1" in report and "baseline/seed_0/layer_2" in report and "CE score" in report


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
    from csae.shared.schema import make_test_store

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


def test_store_metrics_only_needs_no_model(store: Path, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "run", 2, random_sae(D_MODEL, 64))
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["config"]["model"]  # would be loaded otherwise
    code, output = evaluate("--store", store, "--checkpoints", tmp_path / "run", "--out", tmp_path / "e",
                            "--ce-tokens", "0", "--unlearn-tokens", "0", "--no-progress")
    assert code == 0, output
    m = json.loads((tmp_path / "e" / "metrics_all.json").read_text())["run/seed_0/layer_2"]
    assert "fvu" in m and "ce_score" not in m and "unlearn_U" not in m
