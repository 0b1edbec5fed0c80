"""The Python API outside the CLI (device auto, cache dir, logging), the README's example, and store URLs."""

from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from csae.api import harvest, load_sae, train
from csae.shared.store.schema import ActivationStore

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"context": 32, "batch_size": 4, "chunk_rows": 64, "dtype": "float32"}


def test_the_example_runs_as_a_user_would(tmp_path: Path, tiny_gemma2: Path, tiny_corpus: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    metrics = module.main(tmp_path, model=str(tiny_gemma2), dataset=str(tiny_corpus), layer=5, tokens=4000,
                          chunk_rows=128, train_tokens=512 * 8, ce_tokens=32)
    assert set(metrics) == {f"{run}/seed_{seed}/layer_5" for run in ("csae", "baseline") for seed in (0, 1)} | {
        "csae/layer_5", "baseline/layer_5"}
    assert all(math.isfinite(m["ce_score"]) and 0 < m["l0"] for m in metrics.values())
    assert metrics["csae/layer_5"]["ce_score_lo"] <= metrics["csae/layer_5"]["ce_score"]
    _, _, info = load_sae(tmp_path / "checkpoints" / "baseline" / "seed_1" / "layer_5")
    assert info.config.alpha == 0.0 and info.seed == 1 and info.config.device == "cpu"  # `auto` resolved
    printed = capsys.readouterr().out
    assert "feature" in printed and "csae vs baseline at matched L0: verdicts" in printed


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_store_urls_harvest_and_train(tmp_path: Path, tiny_gemma2: Path, tiny_corpus: Path, scheme: str) -> None:
    url = f"file://{tmp_path}/acts.zarr" if scheme == "file" else f"memory://csae-test-{uuid.uuid4().hex}/acts.zarr"
    store = harvest(url, model=str(tiny_gemma2), dataset=str(tiny_corpus), layers=(5,), tokens=1000, progress=False,
                    **SMALL)
    assert store.n_rows == 1000
    fs, path = fsspec.core.url_to_fs(url)
    assert fs.exists(f"{path}/zarr.json") and fs.exists(f"{path}/resid_post/5/zarr.json")  # written at the URL
    if scheme == "file":
        reopened = ActivationStore.open(tmp_path / "acts.zarr")  # the same store as a plain path
        assert torch.equal(reopened.read(5, 0, 1000), store.read(5, 0, 1000))
    results = train(url, tmp_path / "ck", tokens=1024, batch_size=128, expansion=2, heldout_tail_fraction=0.1,
                    seeds=(3,), progress=False)
    assert math.isfinite(results[3, 5]["loss"])
    assert load_sae(tmp_path / "ck" / "seed_3" / "layer_5")[2].store == url  # recorded unchanged
