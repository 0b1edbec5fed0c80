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

from csae.shared.sae.checkpoint import LayerInfo

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

#: params.yaml's runs, the baseline last (evaluate compares each run with it)
RUNS = ("csae", "tsae", "baseline")


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def make_project(work: Path, model: Path, corpus: Path, dtype: str) -> dict:
    """The pipeline's files (code, dvc.yaml, .gitignore) in `work`, with params.yaml's sizes shrunk: the real
    sections and keys, so the real wiring runs. Returns the params written."""
    work.mkdir()
    for name in ("csae", "harvest", "train", "evaluate", "shared"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, work)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["harvest"].update(model=str(model), dataset=str(corpus), layers=[5, 19], tokens=2000, context=32,
                             chunk_rows=64, dtype=dtype)
    params["train"].update(tokens=2048, batch_size=128, expansion=2, resample_every=4, checkpoint_every=8,
                           dtype=dtype)
    params["sweep"].update(points=[4, 8], main=8, layers=[19])  # k 8 at both layers, k 4 at layer 19
    params["train"]["architecture"] = "topk"  # L0 = k exactly (BatchTopK's threshold needs more than 16 steps)
    params["evaluate"].update(ce_tokens=64, select_tokens=128, sweep_predictions=32, unlearn_known=16, recon_tokens=256,
                              head_steps=10, topic_permutations=100, bootstrap_resamples=200, forget_topic="Arts",
                              retain_topics=["History", "Geography"], dtype=dtype)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def test_dvc_repro_runs_the_pipeline_and_reruns_only_what_changed(tmp_path: Path, tiny_gemma2: Path,
                                                                  tiny_corpus: Path, dtype: str) -> None:
    work = tmp_path / "project"
    params = make_project(work, tiny_gemma2, tiny_corpus, dtype)
    dvc(work, "init", "--no-scm", "-q")

    dvc(work, "repro")
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    held = [("k_8", 5), ("k_8", 19), ("k_4", 19)]  # (point, layer): the main point at every layer
    assert params["sweep"]["frontier_only"] == ["tsae"]  # ... but the T-SAE's at the sweep's layer only
    trained = {run: [(p, layer) for p, layer in held if run != "tsae" or layer == 19] for run in RUNS}
    pairs = [("csae", "baseline"), ("tsae", "baseline"), ("csae", "tsae")]  # each vs the reference, then the others
    assert set(metrics) == {f"{run}/{p}/layer_{layer}" for run in RUNS for p, layer in trained[run]} | {
        f"{a}_vs_{b}/{p}/layer_{layer}" for a, b in pairs for p, layer in trained[a] if (p, layer) in trained[b]}
    assert all(f"{n}_lo" in metrics["csae/k_8/layer_5"] for n in ("explained_variance", "ce_score", "heldout_infonce"))
    assert set(metrics["csae_vs_baseline/k_8/layer_5"].values()) <= {"better", "worse", "no detectable difference"}
    baseline = LayerInfo.read(work / "checkpoints" / "baseline" / "k_8" / "seed_0" / "layer_5").config
    assert baseline.alpha == 0.0 and baseline.beta == 0.0 and baseline.k == 8
    csae = LayerInfo.read(work / "checkpoints" / "csae" / "k_4" / "seed_0" / "layer_19").config
    assert csae.alpha > 0 and csae.tokens == 2048 and csae.dtype == dtype and csae.k == 4
    assert not (work / "checkpoints" / "csae" / "k_4" / "seed_0" / "layer_5").exists()
    assert metrics["csae/k_4/layer_19"]["l0"] == pytest.approx(4, rel=0.02)  # held-out L0 = k (topk)
    assert (work / "eval" / "frontier.png").is_file() and (work / "eval" / "plots" / "frontier").is_dir()
    evaluated = json.loads((work / "eval" / "eval_config.json").read_text())
    assert evaluated["config"]["dtype"] == dtype
    assert sorted(p.name for p in (work / "eval" / "plots" / "training").iterdir()) == sorted(
        f"{run}_{p}_seed_{seed}_layer_{layer}.csv" for run in RUNS for seed in (0, 1)
        for p, layer in trained[run])
    # a random-weight model knows almost no next token, so unlearning has nothing to score and is skipped (the
    # tiny Gemma 3 of tests/test_eval_*.py covers it); its declared plot directory is still there for DVC
    assert (work / "eval" / "plots" / "unlearning").is_dir()
    assert (work / "eval" / "comparison.json").is_file() and (work / "eval" / "report.md").is_file()
    browser = work / "eval" / "browser"  # the browse stage: both runs' seed-0 SAEs of each layer
    assert (browser / "index.html").is_file() and sorted(p.name for p in (browser / "data").iterdir()) == sorted(
        ["common.js"] + [f"{run}_{p}_layer_{layer}.js" for run in RUNS for p, layer in trained[run]])
    assert (browser / "frontier.png").is_file() and "csae_vs_baseline" in (browser / "data" / "common.js").read_text()

    assert "up to date" in dvc(work, "repro")  # a second repro is a no-op
    shown = dvc(work, "metrics", "show")
    assert "csae/k_8/layer_5.explained_variance_lo" in shown
    assert "csae_vs_baseline/k_8/layer_5.explained_variance" in shown
    assert any(v in shown for v in ("better", "worse", "no detectable difference"))  # the verdicts

    params["train"]["lr"] = 2e-3  # a train value changes: train and evaluate re-run, harvest does not
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(work, "status")
    assert all(f"train@{run}" in status for run in RUNS) and "harvest" not in status


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-c", "user.name=csae", "-c", "user.email=csae@localhost", *args], cwd=cwd,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_dvc_experiments_keep_metrics_and_checkpoints(tmp_path: Path, tiny_gemma2: Path, tiny_corpus: Path) -> None:
    """`dvc exp run -S train.lr=...` as the README says; `dvc exp show` lists each experiment's headline metrics
    and `dvc exp apply` brings back its SAEs (cached) and metrics (in git)."""
    work = tmp_path / "project"
    params = make_project(work, tiny_gemma2, tiny_corpus, "float32")
    git(work, "init", "-q")
    dvc(work, "init", "-q")
    dvc(work, "repro")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "baseline pipeline")
    base_lr = params["train"]["lr"]
    weights = work / "checkpoints" / "csae" / "k_8" / "seed_0" / "layer_5" / "sae_weights.safetensors"
    base_weights = weights.read_bytes()

    dvc(work, "exp", "run", "-S", "train.lr=0.002", "-S", "evaluate.ce_tokens=48", "--name", "higher-lr")
    shown = json.loads(dvc(work, "exp", "show", "--json"))
    runs = {exp.get("name") or exp["rev"]: exp for entry in shown
            for exp in [entry, *[e for ex in entry.get("experiments") or [] for e in ex.get("revs") or []]]}
    exp_metrics = runs["higher-lr"]["data"]["metrics"]["eval/metrics.json"]["data"]
    assert exp_metrics["csae/k_8/layer_5"]["ce_score"] is not None and "baseline/k_4/layer_19" in exp_metrics
    assert runs["higher-lr"]["data"]["params"]["params.yaml"]["data"]["train"]["lr"] == 0.002

    git(work, "reset", "-q", "--hard")  # back to the committed pipeline, outputs too
    dvc(work, "checkout", "--force")
    assert LayerInfo.read(work / "checkpoints" / "csae" / "k_8" / "seed_0" / "layer_5").config.lr == base_lr
    assert weights.read_bytes() == base_weights

    dvc(work, "exp", "apply", "higher-lr")
    applied = LayerInfo.read(work / "checkpoints" / "csae" / "k_8" / "seed_0" / "layer_5")
    assert applied.config.lr == 0.002  # the experiment's SAE, restored from DVC's cache
    assert weights.read_bytes() != base_weights
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics == exp_metrics and json.loads((work / "eval" / "metrics_all.json").read_text())[
        "csae/k_8/seed_0/layer_5"]["ce_predictions"] == 48
