"""Fault injection: kill -9 at several points, a full disk, two writers at once, damaged chunks and files.
After each fault the same command gives the result an uninterrupted run gives, and every failure is one line.

Faults are patched into a fresh interpreter running the real command (faults.py), so the code under test
carries no test hooks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
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
    KILL_AT_CREATION,
    KILL_BEFORE_SWAP,
    KILL_IN_CHECKPOINT_WRITE,
    KILL_IN_FINISH,
    KILL_IN_SITE,
    KILL_MID_CHUNK,
    NO_MODEL,
    SLOW_EVALUATE,
    SLOW_STEPS,
    SLOW_WRITES,
    TRAIN,
    VERIFY_BAR,
    assert_same_store,
    files_of,
    flip_byte,
    mount_namespace,
    on_tmpfs,
    one_error,
    run,
    start,
    truncate,
)
from safetensors.torch import load_file

from csae.shared.config.base import ConfigError
from csae.shared.config.browse import BrowseConfig
from csae.shared.config.evaluate import EvalConfig
from csae.shared.config.harvest import HarvestConfig
from csae.shared.config.train import TrainConfig
from csae.shared.locks import lock_path
from csae.shared.store.schema import ActivationStore

pytestmark = pytest.mark.slow  # subprocesses and ranks: the full suite only


@pytest.fixture(scope="module")
def reference_sae(tmp_path_factory: pytest.TempPathFactory, reference: Path) -> Path:
    """The layer directory an uninterrupted `train fit` on the reference store writes."""
    out = tmp_path_factory.mktemp("ref-ck") / "ck"
    proc = run("train", ["fit", "--store", reference, "--out", out, *TRAIN])
    assert proc.returncode == 0, proc.stderr
    return out / "seed_0" / "layer_12"


def _weights(layer_dir: Path) -> dict[str, list[float]]:
    """The SAE's and head's tensors (exact values)."""
    out = {}
    for name in ("sae_weights.safetensors", "head.safetensors"):
        out.update({f"{name}:{k}": v.flatten().tolist() for k, v in load_file(layer_dir / name).items()})
    return out


# ----- kill -9, then the same command -----

@pytest.mark.parametrize("fault", [KILL_AT_CREATION, KILL_MID_CHUNK, KILL_IN_FINISH],
                         ids=["store-creation", "mid-chunk", "finish"])
def test_harvest_killed_then_the_same_command_gives_the_same_store(tmp_path: Path, src: list[str], reference: Path,
                                                                   fault: str) -> None:
    store = tmp_path / "acts.zarr"
    killed = run("harvest", ["run", *src, *HARVEST, "--store", store], patch=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert schema_state(store) != "complete"
    again = run("harvest", ["run", *src, *HARVEST, "--store", store])
    assert again.returncode == 0, again.stderr
    assert_same_store(store, reference)
    assert not list(tmp_path.rglob("*.partial")) and not lock_path(store).exists()


def schema_state(store: Path) -> str:
    try:
        return "complete" if ActivationStore.open(store).attrs["complete"] else "incomplete"
    except Exception as err:
        return type(err).__name__


def test_overwrite_builds_beside_and_swaps_only_when_complete(tmp_path: Path, src: list[str], reference: Path) -> None:
    store = tmp_path / "acts.zarr"
    shutil.copytree(reference, store)
    before = files_of(store)
    other = [*HARVEST[:1], "5", *HARVEST[3:]]  # layers 5 only: other settings
    for fault in (KILL_MID_CHUNK, KILL_BEFORE_SWAP):
        killed = run("harvest", ["run", *src, *other, "--store", store, "--overwrite"], patch=fault)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert files_of(store) == before  # the old store, untouched, complete and readable throughout
    done = run("harvest", ["run", *src, *other, "--store", store, "--overwrite"])
    assert done.returncode == 0, done.stderr
    fresh = tmp_path / "fresh.zarr"
    assert run("harvest", ["run", *src, *other, "--store", fresh]).returncode == 0
    assert_same_store(store, fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.zarr", "fresh.zarr"]  # no replacement left beside


def test_overwrite_with_a_bad_corpus_leaves_the_old_store(tmp_path: Path, tiny_gemma2: Path, reference: Path) -> None:
    # Failure 2: a .jsonl whose later rows have "text": null, given to --overwrite.
    store = tmp_path / "acts.zarr"
    shutil.copytree(reference, store)
    before = files_of(store)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": None if i > 60 else f"words {i} " * 9, "title": f"t{i}"}) + "\n"
                           for i in range(100)))
    proc = run("harvest", ["run", "--model", tiny_gemma2, "--dataset", bad, *HARVEST, "--store", store, "--overwrite"])
    line = one_error(proc.stderr)
    assert proc.returncode == 2 and "row 61" in line and "not a string" in line
    assert files_of(store) == before


def test_train_killed_in_a_checkpoint_write_resumes_to_the_same_sae(tmp_path: Path, reference: Path,
                                                                   reference_sae: Path) -> None:
    out = tmp_path / "ck"
    killed = run("train", ["fit", "--store", reference, "--out", out, *TRAIN], patch=KILL_IN_CHECKPOINT_WRITE)
    assert killed.returncode == -signal.SIGKILL
    layer = out / "seed_0" / "layer_12"
    assert [p.name for p in layer.glob(".state.pt.*")]  # the half-written temporary file the kill left
    again = run("train", ["fit", "--store", reference, "--out", out, *TRAIN, "--resume"])
    assert again.returncode == 0, again.stderr
    assert _weights(layer) == _weights(reference_sae)
    assert sorted(p.name for p in layer.iterdir() if p.name.startswith(".")) == []  # swept at start


def test_train_overwrite_keeps_the_old_sae_until_the_new_one_is_finished(tmp_path: Path, reference: Path,
                                                                        reference_sae: Path) -> None:
    out = tmp_path / "ck"
    shutil.copytree(reference_sae.parent.parent, out)
    before = files_of(out)
    other = [*TRAIN, "--set", "l1=2.0"]
    killed = run("train", ["fit", "--store", reference, "--out", out, *other, "--overwrite"],
                 patch=KILL_IN_CHECKPOINT_WRITE)
    assert killed.returncode == -signal.SIGKILL
    assert {k: v for k, v in files_of(out).items() if not k.startswith(".")} == before
    done = run("train", ["fit", "--store", reference, "--out", out, *other, "--overwrite"])
    assert done.returncode == 0, done.stderr
    fresh = tmp_path / "fresh"
    assert run("train", ["fit", "--store", reference, "--out", fresh, *other]).returncode == 0
    assert _weights(out / "seed_0" / "layer_12") == _weights(fresh / "seed_0" / "layer_12")
    assert sorted(p.name for p in out.iterdir()) == ["seed_0"]


def test_ctrl_c_in_train_says_how_to_resume(tmp_path: Path, reference: Path, reference_sae: Path) -> None:
    out = tmp_path / "ck"
    proc = start("train", ["fit", "--store", reference, "--out", out, *TRAIN], patch=SLOW_STEPS)
    state = out / "seed_0" / "layer_12" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    line = one_error(err)
    assert proc.returncode == 2 and "--resume" in line and "Aborted" not in err
    again = run("train", ["fit", "--store", reference, "--out", out, *TRAIN, "--resume"])
    assert again.returncode == 0, again.stderr
    assert _weights(out / "seed_0" / "layer_12") == _weights(reference_sae)


# ----- a full disk -----

def test_disk_full_in_harvest_names_path_and_space_then_resumes(tmp_path: Path, src: list[str],
                                                               reference: Path) -> None:
    mount = tmp_path / "small"
    store = mount / "acts.zarr"
    args = " ".join(["run", *src, *HARVEST, "--store", str(store)])
    harvest = f'"$PY" -m csae.harvest.cli {args}'
    if mount_namespace() is None:  # no tmpfs here: the write call fails as a full disk makes it fail
        mount.mkdir()
        patch = ("import errno, zarr.storage._local as z\norig, n = z._put, [0]\ndef full(*a, **k):\n    n[0] += 1\n"
                 "    if n[0] > 40:\n        raise OSError(errno.ENOSPC, 'No space left on device')\n"
                 "    return orig(*a, **k)\nz._put = full\n")
        first = run("harvest", ["run", *src, *HARVEST, "--store", store], patch=patch)
        code, err = first.returncode, first.stderr
        second = run("harvest", ["run", *src, *HARVEST, "--store", store])
        assert second.returncode == 0, second.stderr
    else:
        proc = on_tmpfs(mount, "200k", f"""
            {harvest} 2> {tmp_path}/err1; echo "rc1=$?"
            mount -o remount,size=16m {mount}
            {harvest} 2> {tmp_path}/err2; echo "rc2=$?"
            "$PY" -c "import sys; sys.path.insert(0, '{Path(__file__).parent}'); from faults import assert_same_store
assert_same_store('{store}', '{reference}'); print('same')"
        """)
        log = proc.stdout + proc.stderr + (tmp_path / "err2").read_text()
        assert "rc2=0" in proc.stdout and "same" in proc.stdout, log
        code, err = int(proc.stdout.split("rc1=")[1].split()[0]), (tmp_path / "err1").read_text()
    line = one_error(err)
    assert code == 2 and "disk full" in line and str(store) in line and "MiB" in line and "resumes" in line


def test_disk_full_in_a_checkpoint_write_names_path_and_space(tmp_path: Path, reference: Path,
                                                             reference_sae: Path) -> None:
    mount = tmp_path / "small"
    out = mount / "ck"
    train = f'"$PY" -m csae.train.cli fit --store {reference} --out {out} {" ".join(TRAIN)}'
    if mount_namespace() is None:
        mount.mkdir()
        patch = ("import torch, csae.shared.files as f\norig = torch.save\nf.free_bytes = lambda p: 0\n"
                 "def full(obj, p, *a, **k):\n    raise RuntimeError('[enforce fail at inline_container.cc:672] "
                 "unexpected pos')\ntorch.save = full\n")
        first = run("train", ["fit", "--store", reference, "--out", out, *TRAIN], patch=patch)
        code, err = first.returncode, first.stderr
    else:
        proc = on_tmpfs(mount, "48k", f"""
            {train} 2> {tmp_path}/err1; echo "rc1=$?"
            mount -o remount,size=16m {mount}
            {train} --resume 2> {tmp_path}/err2; echo "rc2=$?"
            cp {out}/seed_0/layer_12/*.safetensors {tmp_path}/
        """)
        assert "rc2=0" in proc.stdout, proc.stdout + proc.stderr + (tmp_path / "err2").read_text()
        assert _weights(tmp_path) == _weights(reference_sae)
        code, err = int(proc.stdout.split("rc1=")[1].split()[0]), (tmp_path / "err1").read_text()
    line = one_error(err)
    assert code == 2 and "disk full" in line and str(out) in line and "--resume" in line


# ----- two writers -----

def test_a_second_harvest_is_refused_naming_the_first(tmp_path: Path, src: list[str], reference: Path) -> None:
    store = tmp_path / "acts.zarr"
    first = start("harvest", ["run", *src, *HARVEST, "--store", store], patch=SLOW_WRITES)
    deadline = time.time() + 300
    while not (store / "progress").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    for extra in ([], ["--overwrite"]):
        second = run("harvest", ["run", *src, *HARVEST, "--store", store, *extra])
        line = one_error(second.stderr)
        assert second.returncode == 2 and f"pid {first.pid} on host {socket.gethostname()}" in line, line
    assert first.wait(timeout=300) == 0, first.communicate()[1]
    assert_same_store(store, reference)


def test_a_second_train_is_refused_and_a_dead_holder_is_taken_over(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "ck"
    first = start("train", ["fit", "--store", reference, "--out", out, *TRAIN], patch=SLOW_STEPS)
    deadline = time.time() + 300
    while not lock_path(out).exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    second = run("train", ["fit", "--store", reference, "--out", out, *TRAIN, "--set", "l1=3", "--overwrite"])
    line = one_error(second.stderr)
    assert second.returncode == 2 and "being written by `train fit`" in line and f"pid {first.pid}" in line
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock_path(out).exists()  # left behind by the dead process...
    third = run("train", ["fit", "--store", reference, "--out", out, *TRAIN, "--resume"])
    assert third.returncode == 0 and f"pid {first.pid}" in third.stderr and "no longer running" in third.stderr
    assert not lock_path(out).exists()  # ...and taken over, then released


# ----- damaged chunks and files -----

def test_damaged_chunks_are_found_named_and_repaired(tmp_path: Path, reference: Path, reference_sae: Path) -> None:
    # Failure 3: a bit-flipped chunk of activations (read by train), then a truncated one of token fields in
    # the held-out tail (read by evaluate).
    store = tmp_path / "acts.zarr"
    shutil.copytree(reference, store)
    flip_byte(store / "resid_post" / "12" / "c" / "3" / "0")
    train = run("train", ["fit", "--store", store, "--out", tmp_path / "ck", *TRAIN])
    line = one_error(train.stderr)
    assert train.returncode == 2 and "chunk 3 of resid_post/12 (rows 192-255) fails its checksum" in line
    assert f"harvest repair {store}" in line
    truncate(store / "tokens" / "seq" / "c" / "30")
    info = run("harvest", ["info", store, "--verify"])
    assert info.returncode == 4, info.stdout + info.stderr
    listed = [line for line in info.stdout.splitlines() if line.startswith("damaged")]
    assert listed == ["damaged   chunk 3 of resid_post/12 (rows 192-255) fails its checksum",
                      "damaged   chunk 30 of tokens/seq (rows 1,920-1,983) fails its checksum"]
    evaluate = run("evaluate", ["run", "--store", store, "--checkpoints", reference_sae.parent.parent, "--out",
                                tmp_path / "eval", "--ce-tokens", "0", "--unlearn-known", "0", "--no-progress"])
    line = one_error(evaluate.stderr)
    assert evaluate.returncode == 2 and "chunk 30 of tokens/seq (rows 1,920-1,983)" in line
    repair = run("harvest", ["repair", store, "--no-progress"])
    assert repair.returncode == 0 and "2 damaged chunk(s) repaired" in repair.stdout, repair.stderr
    assert run("harvest", ["info", store, "--verify"]).returncode == 0
    assert_same_store(store, reference)


def test_a_damaged_checkpoint_file_is_named(tmp_path: Path, reference: Path, reference_sae: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(reference_sae.parent.parent, ck)
    weights = ck / "seed_0" / "layer_12" / "sae_weights.safetensors"
    truncate(weights)
    proc = run("evaluate", ["run", "--store", reference, "--checkpoints", ck, "--out", tmp_path / "eval",
                            "--ce-tokens", "0", "--unlearn-known", "0", "--no-progress"])
    line = one_error(proc.stderr)
    assert proc.returncode == 2 and str(weights) in line and "damaged" in line and "--overwrite" in line
    state = ck / "seed_0" / "layer_12" / "state.pt"
    state.write_bytes(b"PK\3\4 not a checkpoint")
    (ck / "seed_0" / "layer_12" / "train_config.json").unlink()
    proc = run("train", ["fit", "--store", reference, "--out", ck, *TRAIN, "--resume"])
    line = one_error(proc.stderr)
    assert proc.returncode == 2 and str(state) in line and "damaged" in line


# ----- one line for every bad input -----

def test_bad_input_is_one_line_with_advice_that_works(tmp_path: Path, src: list[str], reference: Path,
                                                      tiny_gemma2: Path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"First paragraph.\n\nSecond caf\xe9 paragraph.\n")
    cases = [
        ("harvest", ["run", "--model", tiny_gemma2, "--dataset", latin, *HARVEST, "--store", tmp_path / "a.zarr"],
         [str(latin), "byte offset 28"]),
        ("harvest", ["run", *src, *HARVEST, "--context", "100000", "--store", tmp_path / "b.zarr"],
         ["--context 100000", "256 positions"]),
        ("train", ["fit", "--store", latin, "--out", tmp_path / "ck", *TRAIN], ["is a file, not an activation store"]),
    ]
    for section, body, expect in (("harvest", "tokens: lots", "tokens: expected an integer, got 'lots'"),
                                  ("harvest", "layers: 3", "layers: expected a list of integers such as [3]"),
                                  ("train", "expansion: 2.5", "expansion: expected an integer, got 2.5"),
                                  ("evaluate", "ce_tokens: many", "ce_tokens: expected an integer")):
        params = tmp_path / f"{section}-{len(cases)}.yaml"
        params.write_text(f"{section}:\n  {body}\n")
        cmd = {"harvest": ["run", *src], "train": ["fit", "--store", reference], "evaluate": ["run", "--store",
                                                                                               reference]}[section]
        cases.append((section, [*cmd, "--params", params, "--out" if section != "harvest" else "--store",
                                tmp_path / "x"], [expect]))
    for stage, args, expect in cases:
        proc = run(stage, args)
        line = one_error(proc.stderr)
        assert proc.returncode == 2 and all(e in line for e in expect), (expect, line)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_unknown_model_or_dataset_fails_without_waiting_for_the_hub(tmp_path: Path, tiny_gemma2: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: the hub is unreachable
    for args, name in ((["--model", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
                       (["--model", str(tiny_gemma2), "--dataset", "no-such-org/data"], "no-such-org/data")):
        proc = run("harvest", ["run", *args, "--store", tmp_path / "s.zarr"], env=env)
        line = one_error(proc.stderr)
        assert proc.returncode == 2 and name in line and "unreachable" in line
        assert "Retrying" not in proc.stderr  # no rounds of hub retries before giving up


def test_outputs_follow_the_umask(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "ck"
    proc = run("train", ["fit", "--store", reference, "--out", out, *TRAIN], preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (out / "seed_0" / "layer_12").iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes


# ----- evaluate's outputs: replaced whole, one writer, whole checkpoints (issue 36) -----

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
        assert _weights(layer) == _weights(reference_sae)  # re-trained: bit for bit what an intact run wrote
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
