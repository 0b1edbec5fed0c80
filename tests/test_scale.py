"""Outgrowing one process, with 2 CPU ranks under torchrun: one store written by two ranks (through the
`harvest` console script), a rank killed and resumed, a store grown by appending, and layers trained in
parallel, each equal to what one process gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import HARVEST, SLOW_WRITES, TRAIN, assert_same_store, run
from safetensors.torch import load_file
from tolerances import ROW_TOLERANCE, row_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from csae.shared.store.schema import ActivationStore

pytestmark = pytest.mark.slow  # subprocesses and ranks: the full suite only

BIN = Path(sys.executable).parent


def torchrun(*args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_torchrun_argv(*args), capture_output=True, text=True, timeout=timeout)


def _torchrun_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *map(str, args)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, src: list[str]) -> Path:
    """The same store written by 2 ranks, through the console script launched by torchrun."""
    path = tmp_path_factory.mktemp("two") / "acts.zarr"
    proc = torchrun("--no-python", BIN / "harvest", "run", *src, *HARVEST, "--store", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def test_two_ranks_write_the_store_one_process_writes(two_ranks: Path, reference: Path) -> None:
    assert_same_store(two_ranks, reference)
    store = ActivationStore.open(two_ranks)
    assert [h["ranks"] for h in store.attrs["history"]] == [2] and store.n_rows == 2000
    records = [dict(r.attrs) for _, r in store.group["progress"].arrays()]
    assert sorted(r["rank"] for r in records) == [0, 1]  # each rank wrote its own chunks...
    first = sorted((r["first_chunk"], r["stop_row"]) for r in records)
    assert first[0][0] == 0 and first[1][0] * 64 == first[0][1]  # ...two disjoint runs that meet


def test_rows_of_both_ranks_equal_a_direct_transformers_forward(two_ranks: Path, tiny_gemma2: Path) -> None:
    store = ActivationStore.open(two_ranks)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gemma2)
    seq, ids = store.tokens("seq"), store.tokens("token_id")
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    half = store.n_rows // 2  # sequences from the first rank's rows and from the second's
    sample = [s for s in starts if s < half][:4] + [s for s in starts if s >= half][:4]
    worst = 0.0
    for start in sample:
        rows = np.flatnonzero(seq == seq[start])
        with torch.no_grad():
            hidden = model(torch.tensor([[tok.bos_token_id, *ids[rows]]]), output_hidden_states=True).hidden_states
        for layer in store.layers:
            got = torch.cat([store.read(layer, r, r + 1) for r in rows])
            worst = max(worst, row_error(got, hidden[layer + 1][0, 1:]))
    assert worst <= ROW_TOLERANCE["float32"], worst


def test_a_killed_rank_resumes_to_a_complete_store(tmp_path: Path, src: list[str], reference: Path) -> None:
    store = tmp_path / "acts.zarr"
    driver = tmp_path / "slow_harvest.py"
    driver.write_text(f"import os, signal, sys\n{textwrap.dedent(SLOW_WRITES)}\nfrom csae.harvest.cli import main\n"
                      f"sys.exit(main())\n")
    launcher = subprocess.Popen(_torchrun_argv(driver, "run", *src, *HARVEST, "--store", store),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None and _rows_done(store) < 6 * 64:
        time.sleep(0.1)
    workers = _children(launcher.pid)
    assert len(workers) == 2 and launcher.poll() is None, launcher.communicate()[0]
    os.kill(workers[1], signal.SIGKILL)  # one rank dies; torchrun stops the other
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    partial = ActivationStore.open(store, require_complete=False)
    assert not partial.attrs["complete"] and 0 < partial.rows_done() < 2000
    proc = torchrun("--no-python", BIN / "harvest", "run", *src, *HARVEST, "--store", store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_store(store, reference)  # every sequence once, in order: none duplicated, none missing
    done = ActivationStore.open(store)
    seq, pos = done.tokens("seq").astype(np.int64), done.tokens("pos").astype(np.int64)
    assert len(np.unique(seq * 10**6 + pos)) == done.n_rows  # no (sequence, position) twice
    counts = np.bincount(seq)
    assert np.array_equal(np.maximum.reduceat(pos, np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])),
                          counts[seq[np.r_[True, seq[1:] != seq[:-1]]]])  # each sequence: positions 1..its length


def _rows_done(store: Path) -> int:
    try:
        return ActivationStore.open(store, require_complete=False).rows_done()
    except Exception:
        return 0


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, in pid order (torchrun's workers: rank 0 first)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def test_appending_with_two_ranks_equals_one_longer_harvest(tmp_path: Path, src: list[str], reference: Path) -> None:
    store = tmp_path / "acts.zarr"
    shorter = [*HARVEST, "--tokens", "1000"]  # the last --tokens counts
    assert run("harvest", ["run", *src, *shorter, "--store", store]).returncode == 0
    proc = torchrun("--no-python", BIN / "harvest", "run", *src, *HARVEST, "--store", store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_store(store, reference)
    info = run("harvest", ["info", store])
    assert "rows 0-1,000 by 1 rank(s)" in info.stdout and "rows 1,000-2,000 by 2 rank(s)" in info.stdout


#: T-SAE's settings (params.yaml runs.tsae) on BatchTopK, as --set values
TSAE_SET = ["architecture=batchtopk", "alpha=0.1", "beta=0", "positives=adjacent", "matryoshka_high=0.2",
            "contrast_on=high_level"]


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "tsae"])
def test_layer_parallel_training_equals_one_process_bit_for_bit(tmp_path: Path, reference: Path, arch: str) -> None:
    assert TRAIN[2] == "--set"
    sets = TSAE_SET if arch == "tsae" else [f"architecture={arch}"]
    args = ["--store", reference, "--layers", "5", "12", *TRAIN[2:], "--set", "seeds=0 1", *sets, "k=8"]
    one = run("train", ["fit", *args, "--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    two = torchrun("-m", "csae.train.cli", "fit", *args, "--out", tmp_path / "two", "--distribute", "layers")
    assert two.returncode == 0, two.stdout + two.stderr
    for seed in (0, 1):
        for layer in (5, 12):
            for name in ("sae_weights.safetensors", "head.safetensors"):
                a = load_file(tmp_path / "one" / f"seed_{seed}" / f"layer_{layer}" / name)
                b = load_file(tmp_path / "two" / f"seed_{seed}" / f"layer_{layer}" / name)
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (seed, layer, name)
    # each rank trained two of the four SAEs: the printed summary lists all four once
    assert sum(line.count("-> ") for line in two.stdout.splitlines()) == 4
