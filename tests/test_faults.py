"""Fault injection: kill -9 at several points, a full disk, two writers at once, damaged chunks and files.
After each fault the same command gives the result an uninterrupted run gives, and every failure is one line.

Faults are patched into a fresh interpreter running the real command (faults.py), so the code under test
carries no test hooks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
from faults import (
    HARVEST,
    KILL_AT_CREATION,
    KILL_BEFORE_SWAP,
    KILL_IN_CHECKPOINT_WRITE,
    KILL_IN_FINISH,
    KILL_MID_CHUNK,
    SLOW_STEPS,
    SLOW_WRITES,
    TRAIN,
    assert_same_store,
    files_of,
    flip_byte,
    mount_namespace,
    on_tmpfs,
    one_error,
    run,
    sae_tensors,
    start,
    truncate,
)

from csae.shared.locks import lock_path
from csae.shared.store.schema import ActivationStore

pytestmark = pytest.mark.slow  # subprocesses and ranks: the full suite only


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
    assert sae_tensors(layer) == sae_tensors(reference_sae)
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
    assert sae_tensors(out / "seed_0" / "layer_12") == sae_tensors(fresh / "seed_0" / "layer_12")
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
    assert sae_tensors(out / "seed_0" / "layer_12") == sae_tensors(reference_sae)


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
        assert sae_tensors(tmp_path) == sae_tensors(reference_sae)
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
