"""Fault injection for evaluate and for bad input: a kill at any moment leaves whole outputs, one writer per
--out, and every bad input is one line before anything slow (the fault machinery: faults.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from faults import (
    EVAL_JSON,
    EVALUATE,
    HARVEST,
    KILL_AFTER_METRICS,
    KILL_IN_SITE,
    NO_MODEL,
    SLOW_EVALUATE,
    TRAIN,
    VERIFY_BAR,
    files_of,
    mount_namespace,
    on_tmpfs,
    one_error,
    run,
    sae_tensors,
    start,
    truncate,
)

from csae.shared.config.base import ConfigError
from csae.shared.config.browse import BrowseConfig
from csae.shared.config.evaluate import EvalConfig
from csae.shared.config.harvest import HarvestConfig
from csae.shared.config.train import TrainConfig
from csae.shared.locks import lock_path
from csae.shared.store.schema import ActivationStore

pytestmark = pytest.mark.slow  # subprocesses and ranks: the full suite only


def _evaluate(store: Path, ck: Path, out: Path, *extra: str, patch: str = "") -> subprocess.CompletedProcess[str]:
    return run("evaluate", ["run", "--store", store, "--checkpoints", ck, "--out", out, *EVALUATE, *extra],
               patch=patch)


def test_evaluate_killed_leaves_the_old_results_or_the_new(tmp_path: Path, reference: Path,
                                                          reference_sae: Path) -> None:
    ck, out, fresh = reference_sae.parent.parent, tmp_path / "eval", tmp_path / "fresh"
    assert _evaluate(reference, ck, out, "--seed", "0").returncode == 0
    (out / "browser").mkdir()
    (out / "browser" / "index.html").write_text("a browser built inside --out")  # not evaluate's: kept throughout
    before = files_of(out)
    killed = _evaluate(reference, ck, out, "--seed", "1", patch=KILL_AFTER_METRICS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert files_of(out) == before  # the old run whole, report.md and PNGs included; no file of the new one
    assert _evaluate(reference, ck, fresh, patch=KILL_AFTER_METRICS).returncode == -signal.SIGKILL
    assert not fresh.exists()  # no complete-looking subset
    again = _evaluate(reference, ck, out, "--seed", "1")
    assert again.returncode == 0, again.stderr
    assert "removing" in again.stderr and "interrupted" in again.stderr
    assert _evaluate(reference, ck, fresh, "--seed", "1").returncode == 0
    for name in EVAL_JSON:  # identical runs, identical bytes; keys sorted
        text = (out / name).read_text()
        assert text == (fresh / name).read_text(), name
        assert text == json.dumps(json.loads(text), indent=1 if name == "unlearning.json" else 2,
                                  sort_keys=True) + "\n", name
    assert (out / "metrics.json").read_text() != before["metrics.json"].decode()  # seed 1's figures, not seed 0's
    assert sorted(files_of(out)) == sorted([*files_of(fresh), "browser/index.html"])
    assert (out / "browser" / "index.html").read_text() == "a browser built inside --out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "fresh"]  # no build or lock left beside


def test_browse_killed_before_the_swap_leaves_the_old_site(tmp_path: Path, reference: Path,
                                                           reference_sae: Path) -> None:
    args = ["browse", "--store", reference, "--checkpoints", reference_sae.parent.parent, "--out", tmp_path / "b",
            "--rows", "256", "--top-contexts", "3", "--dtype", "float32", "--no-progress"]
    assert run("evaluate", args).returncode == 0
    before = files_of(tmp_path / "b")
    killed = run("evaluate", [*args, "--top-contexts", "4"], patch=KILL_IN_SITE)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert files_of(tmp_path / "b") == before
    again = run("evaluate", [*args, "--top-contexts", "4"])
    assert again.returncode == 0, again.stderr
    assert files_of(tmp_path / "b") != before and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_second_evaluate_is_refused_and_a_dead_holder_is_taken_over(tmp_path: Path, reference: Path,
                                                                      reference_sae: Path) -> None:
    ck, out = reference_sae.parent.parent, tmp_path / "eval"
    first = start("evaluate", ["run", "--store", reference, "--checkpoints", ck, "--out", out, *EVALUATE],
                  patch=SLOW_EVALUATE)
    deadline = time.time() + 300
    while not lock_path(out).exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    second = _evaluate(reference, ck, out, "--seed", "1")
    line = one_error(second.stderr)
    assert second.returncode == 2 and "being written by `evaluate run`" in line and f"pid {first.pid}" in line
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = _evaluate(reference, ck, out)
    assert third.returncode == 0 and f"pid {first.pid}" in third.stderr and "no longer running" in third.stderr
    assert (out / "report.md").exists() and not lock_path(out).exists()


def test_an_unwritable_out_is_one_line_for_every_command(tmp_path: Path, src: list[str], reference: Path,
                                                         reference_sae: Path) -> None:
    ro = tmp_path / "ro"
    commands = {"harvest": ["run", *src, *HARVEST, "--store", ro / "acts.zarr"],
                "train": ["fit", "--store", reference, "--out", ro / "ck", *TRAIN],
                "evaluate": ["run", "--store", reference, "--checkpoints", reference_sae.parent.parent, "--out",
                             ro / "eval", *EVALUATE],
                "browse": ["browse", "--store", reference, "--checkpoints", reference_sae.parent.parent, "--out",
                           ro / "b", "--no-progress"]}
    results = {}
    if mount_namespace() is not None:  # a read-only file system, which stops root too
        script = f"mount -o remount,ro {ro}\n" + "".join(
            f'"$PY" -m csae.{"evaluate" if name == "browse" else name}.cli {" ".join(map(str, args))} '
            f'2> {tmp_path}/{name}.err; echo "{name}=$?"\n' for name, args in commands.items())
        proc = on_tmpfs(ro, "1m", script)
        for name in commands:
            code = int(proc.stdout.split(f"{name}=")[1].split()[0])
            results[name] = (code, (tmp_path / f"{name}.err").read_text())
        reason = "Read-only file system"
    else:
        assert os.geteuid() != 0, "needs a mount namespace (unshare -m) or a user that permissions stop"
        ro.mkdir()
        ro.chmod(0o555)
        for name, args in commands.items():
            proc = run("evaluate" if name == "browse" else name, args)
            results[name] = (proc.returncode, proc.stderr)
        reason = "Permission denied"
    for name, (code, err) in results.items():
        line = one_error(err)
        assert code == 2 and "cannot write to" in line and str(ro) in line and reason in line, (name, line)


def test_a_checkpoint_is_whole_or_refused_and_resume_retrains_a_damaged_one(tmp_path: Path, reference: Path,
                                                                           reference_sae: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(reference_sae.parent.parent, ck)
    layer = ck / "seed_0" / "layer_12"
    (layer / "cfg.json").unlink()
    proc = _evaluate(reference, ck, tmp_path / "eval")
    line = one_error(proc.stderr)
    assert proc.returncode == 2 and f"checkpoint {layer} is not whole (cfg.json is missing)" in line
    assert f"`train fit --out {ck} --layers 12 --overwrite`" in line and not (tmp_path / "eval").exists()
    for damage in (lambda: None, lambda: truncate(layer / "sae_weights.safetensors")):  # cfg.json deleted above
        damage()
        again = run("train", ["fit", "--store", reference, "--out", ck, *TRAIN, "--resume"])
        assert again.returncode == 0, again.stderr
        assert f"warning: finished layer {layer} is not whole" in again.stderr
        assert sae_tensors(layer) == sae_tensors(reference_sae)  # re-trained: bit for bit what an intact run wrote
        assert (layer / "cfg.json").read_bytes() == (reference_sae / "cfg.json").read_bytes()
    quiet = run("train", ["fit", "--store", reference, "--out", ck, *TRAIN, "--resume"])
    assert quiet.returncode == 0 and "warning" not in quiet.stderr  # a whole layer is left as it is


def test_more_bad_input_is_one_line_before_anything_slow(tmp_path: Path, src: list[str], reference: Path,
                                                         reference_sae: Path, tiny_gemma2: Path) -> None:
    empty = {suffix: tmp_path / f"empty{suffix}" for suffix in (".jsonl", ".json", ".parquet", ".txt")}
    for path in empty.values():
        path.write_text("" if path.suffix != ".json" else "\n  \n")
    params = {}
    for name, section, body in (("nan", "train", "lr: .nan"), ("inf", "evaluate", "confidence: .inf"),
                                ("twice", "harvest", "layers: [3, 3]")):
        params[name] = tmp_path / f"{name}.yaml"
        params[name].write_text(f"{section}:\n  {body}\n")
    missing = tmp_path / "no-such.jsonl"
    ck = reference_sae.parent.parent
    cases = [
        ("train", ["fit", "--store", reference, "--params", params["nan"], "--out", tmp_path / "ck"],
         ["lr: nan is not a finite number", "fix the value of `lr`"]),
        ("train", ["fit", "--store", reference, *TRAIN, "--set", "alpha=inf", "--out", tmp_path / "ck"],
         ["alpha: inf is not a finite number"]),
        ("evaluate", ["run", "--store", reference, "--checkpoints", ck, "--params", params["inf"], "--out",
                      tmp_path / "ev"], ["confidence: inf is not a finite number"]),
        ("harvest", ["run", *src, "--params", params["twice"], "--store", tmp_path / "s.zarr"],
         ["layers: 3 given more than once in [3, 3]; list each once"]),
        ("harvest", ["run", *src, *HARVEST[3:], "--layers", "5", "5", "--store", tmp_path / "s.zarr"],
         ["layers: 5 given more than once in [5, 5]"]),
        ("train", ["fit", "--store", reference, *TRAIN[2:], "--layers", "12", "12", "--out", tmp_path / "ck"],
         ["--layers: 12 given more than once in [12, 12]"]),
        ("harvest", ["run", "--model", tiny_gemma2, "--dataset", missing, "--store", tmp_path / "s.zarr"],
         [f"corpus file {missing} does not exist"]),
        ("evaluate", ["run", "--store", reference, "--checkpoints", ck, "--out", tmp_path / "ev", "--dataset",
                      missing, "--ce-tokens", "64", "--unlearn-known", "0", "--no-progress"],
         [f"corpus file {missing} does not exist"]),
        *[("harvest", ["run", "--model", tiny_gemma2, "--dataset", path, *HARVEST, "--store", tmp_path / "s.zarr"],
           [f"corpus file {path} is empty"])
          for suffix, path in empty.items()],
    ]
    for stage, args, expect in cases:
        proc = run(stage, args, patch=NO_MODEL)  # a model load would exit 7
        line = one_error(proc.stderr)
        assert proc.returncode == 2 and all(e in line for e in expect), (args, expect, line)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_file()) == []  # no store, run or eval left
    for cls, field in ((TrainConfig, "lr"), (EvalConfig, "confidence"), (HarvestConfig, "heldout_doc_fraction"),
                       (EvalConfig, "dense_thresholds")):  # the Python API refuses them too
        for bad in (math.nan, math.inf):
            with pytest.raises(ConfigError, match=f"{field}: .*not a finite number"):
                cls(**{field: (bad,) if field == "dense_thresholds" else bad})
    assert BrowseConfig() == BrowseConfig()  # (no float fields: nothing to refuse)
    with pytest.raises(ConfigError, match="layers: 3 given more than once"):
        HarvestConfig(layers=(3, 3))


def test_train_checks_before_it_plans_and_verify_counts_to_its_total(reference: Path, tmp_path: Path) -> None:
    proc = run("train", ["fit", "--store", reference, *TRAIN[2:], "--layers", "7", "--out", tmp_path / "ck"])
    line = one_error(proc.stderr)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line] and "layer" in line
    info = run("harvest", ["info", reference, "--verify"], patch=VERIFY_BAR)
    assert info.returncode == 0, info.stderr
    store = ActivationStore.open(reference)
    entries = _entries(store.group, store.n_rows)
    assert f"verify bar {entries} of {entries}" in info.stderr, info.stderr


def _entries(group: Any, n_rows: int) -> int:
    """Every entry `--verify` reads, counted from the store's tree: n_rows of each layer's activations and each
    token field, and every entry of the document arrays."""
    per_row = [a for g in ("resid_post", "tokens") for _, a in group[g].arrays()]
    return n_rows * len(per_row) + sum(a.shape[0] for _, a in group["docs"].arrays())
