"""The DVC pipeline end to end with a tiny parameter set: wiring, no-op re-run, partial re-runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.pipeline


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_dvc_repro_runs_the_pipeline_and_reruns_only_what_changed(tmp_path: Path, tiny_gemma2: Path,
                                                                  tiny_corpus: Path, dtype: str) -> None:
    work = tmp_path / "project"
    work.mkdir()
    for name in ("harvest", "train", "evaluate", "shared"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # The real params.yaml with the sizes shrunk: same sections and keys, so the wiring is what runs.
    params["harvest"].update(model=str(tiny_gemma2), dataset=str(tiny_corpus), layers=[5, 19], tokens=2000,
                             context=32, chunk_rows=64, dtype=dtype)
    params["train"].update(tokens=2048, batch_size=128, expansion=2, resample_every=4, checkpoint_every=8,
                           dtype=dtype)
    params["evaluate"] = {"ce_tokens": 64, "select_tokens": 128, "unlearn_tokens": 32, "recon_tokens": 256,
                          "forget_topic": "Arts", "retain_topics": ["History", "Geography"], "dtype": dtype}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(work, "init", "--no-scm", "-q")

    dvc(work, "repro")
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert set(metrics) == {f"{run}/layer_{layer}" for run in ("csae", "baseline") for layer in (5, 19)}
    baseline = json.loads((work / "checkpoints" / "baseline" / "layer_5" / "train_config.json").read_text())
    assert baseline["alpha"] == 0.0 and baseline["beta"] == 0.0
    csae = json.loads((work / "checkpoints" / "csae" / "layer_5" / "train_config.json").read_text())
    assert csae["alpha"] > 0 and csae["tokens"] == 2048 and csae["dtype"] == dtype
    evaluated = json.loads((work / "eval" / "eval_config.json").read_text())
    assert evaluated["config"]["dtype"] == dtype
    assert sorted(p.name for p in (work / "eval" / "plots" / "training").iterdir()) == [
        "baseline_layer_19.csv", "baseline_layer_5.csv", "csae_layer_19.csv", "csae_layer_5.csv"]
    assert len(list((work / "eval" / "plots" / "unlearning").iterdir())) == 4
    assert "unlearn_U" in metrics["csae/layer_5"]

    assert "up to date" in dvc(work, "repro")  # a second repro is a no-op
    shown = dvc(work, "metrics", "show")
    assert "csae/layer_5" in shown or "layer_5" in shown

    params["train"]["lr"] = 5e-4  # a train value changes: train and evaluate re-run, harvest does not
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    status = dvc(work, "status")
    assert "train@csae" in status and "train@baseline" in status and "harvest" not in status
