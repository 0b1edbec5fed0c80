"""harvest run/info end to end on a tiny random-weight Gemma-2 with 26 blocks (the paper model's depth)."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from faults import command
from tolerances import ROW_TOLERANCE, row_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from csae.harvest.batches import iter_windows, stored_rows
from csae.harvest.cli import main
from csae.harvest.plan import make_plan, sequences_from
from csae.shared.config.harvest import HarvestConfig
from csae.shared.errors import UserError
from csae.shared.lm import corpora
from csae.shared.lm.sequences import DocTable, iter_sequences
from csae.shared.store import records, schema
from csae.shared.store.schema import TOKEN_FIELDS, ActivationStore

SMALL = ["--context", "32", "--batch-size", "4", "--sort-window", "2", "--chunk-rows", "64", "--dtype", "float32",
         "--no-progress"]


def harvest(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["run", *map(str, args)])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def full_store(tmp_path_factory: pytest.TempPathFactory, tiny_gemma2: Path, tiny_corpus: Path, dtype: str) -> Path:
    """The whole train split of the tiny corpus (the token budget exceeds it), layers 5 12 19, harvested
    with the forward in `dtype`."""
    store = tmp_path_factory.mktemp("h") / "acts.zarr"
    code, out = harvest("--model", tiny_gemma2, "--dataset", tiny_corpus, "--layers", 5, 12, 19, "--tokens", 10**6,
                        "--store", store, *SMALL, "--dtype", dtype)
    assert code == 0, out
    return store


def test_rows_equal_a_direct_transformers_forward(full_store: Path, tiny_gemma2: Path, dtype: str) -> None:
    store = ActivationStore.open(full_store)
    assert store.layers == [5, 12, 19] and store.d_model == 64 and store.attrs["config"]["dtype"] == dtype
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma2, dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gemma2)
    seq, pos, ids = store.tokens("seq"), store.tokens("pos"), store.tokens("token_id")
    worst, neighbour = 0.0, math.inf
    for s in np.unique(seq)[:12]:
        rows = np.flatnonzero(seq == s)
        input_ids = torch.tensor([[tok.bos_token_id, *ids[rows]]])
        assert list(pos[rows]) == list(range(1, len(rows) + 1))  # BOS (position 0) is never stored
        with torch.no_grad():
            hidden = model(input_ids, output_hidden_states=True).hidden_states
        for layer in store.layers:
            # hidden_states[L + 1] is the output of block L (hidden_states[0] is the embedding).
            got = torch.cat([store.read(layer, r, r + 1) for r in rows])
            worst = max(worst, row_error(got, hidden[layer + 1][0, 1:]))
            neighbour = min(neighbour, row_error(got, hidden[layer + 2][0, 1:]), row_error(got, hidden[layer][0, 1:]))
    assert worst <= ROW_TOLERANCE[dtype], worst
    assert neighbour > 10 * ROW_TOLERANCE[dtype], neighbour  # the tolerance would catch a wrong block


def test_token_ids_and_documents_line_up_with_the_corpus(full_store: Path, tiny_gemma2: Path,
                                                         tiny_corpus: Path) -> None:
    store = ActivationStore.open(full_store)
    tok = AutoTokenizer.from_pretrained(tiny_gemma2)
    corpus = [json.loads(line) for line in tiny_corpus.read_text().splitlines()]
    seq, doc, ids = store.tokens("seq"), store.tokens("doc"), store.tokens("token_id")
    titles, source = store.docs("title"), store.docs("source_index")
    assert 0 < len(titles) < len(corpus)  # the train split only: some documents are held out
    for d in range(len(titles)):
        original = corpus[source[d]]
        assert titles[d] == original["title"]
        assert store.topics[store.docs("topic")[d]] == original["topic"]
        rows = np.flatnonzero(doc == d)
        rows = rows[np.lexsort((store.tokens("pos")[rows], seq[rows]))]  # sequence order, then position
        assert list(ids[rows]) == tok(original["text"], add_special_tokens=False)["input_ids"]
    assert tok.pad_token_id not in set(ids.tolist())


def test_store_attributes(full_store: Path, tiny_gemma2: Path) -> None:
    a = ActivationStore.open(full_store).attrs
    assert a["complete"] and a["schema_version"] == schema.SCHEMA_VERSION == 2 and a["dtype"] == "bfloat16"
    assert a["config"]["layers"] == [5, 12, 19] and a["config"]["context"] == 32
    assert len(a["model"]["sha256"]) == 64 and a["context"] == 32 and a["n_tokens"] == a["rows_written"]
    store = ActivationStore.open(full_store)
    for layer in store.layers:
        x = store.read(layer, 0, store.n_rows).float()
        assert a["mean_norm"][str(layer)] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-5)
    arr = zarr.open_array(str(full_store / "resid_post" / "12"), mode="r")
    assert arr.chunks == (64, 64) and arr.attrs["logical_dtype"] == "bfloat16"


def test_default_layers_are_the_paper_depths(tmp_path: Path, tiny_gemma2: Path, tiny_corpus: Path) -> None:
    code, out = harvest("--model", tiny_gemma2, "--dataset", tiny_corpus, "--tokens", 100, "--store",
                        tmp_path / "s.zarr", *SMALL)
    assert code == 0, out
    assert ActivationStore.open(tmp_path / "s.zarr").layers == [5, 12, 19]  # the paper's layers of 26 blocks
    assert ActivationStore.open(tmp_path / "s.zarr").n_rows == 100


def test_heldout_split_is_disjoint_from_train(tmp_path: Path, full_store: Path, tiny_gemma2: Path,
                                              tiny_corpus: Path) -> None:
    code, out = harvest("--model", tiny_gemma2, "--dataset", tiny_corpus, "--layers", 5, "--split", "heldout",
                        "--tokens", 10**6, "--store", tmp_path / "h.zarr", *SMALL)
    assert code == 0, out
    held = set(ActivationStore.open(tmp_path / "h.zarr").docs("source_index").tolist())
    train = set(ActivationStore.open(full_store).docs("source_index").tolist())
    assert held and not held & train and len(held | train) == 120


def _run_cli(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command("harvest", ["run", *args]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def rows_on_disk(store: Path) -> int:
    """Rows a running harvest has saved so far (0 before the store exists)."""
    try:
        return ActivationStore.open(store, require_complete=False).rows_done()
    except (UserError, OSError, ValueError, KeyError):
        return 0


def _wait_for_rows(store: Path, proc: subprocess.Popen[str], timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        rows = rows_on_disk(store)
        if rows > 0:
            return rows
        time.sleep(0.01)
    raise AssertionError(f"no rows written before the process ended: {proc.communicate()[0]}")


@pytest.mark.slow  # three harvests in subprocesses
def test_resume_after_ctrl_c_and_kill_equals_an_uninterrupted_run(tmp_path: Path, tiny_gemma2: Path,
                                                                   tiny_corpus: Path, dtype: str) -> None:
    # Tiny chunks and batches so that the run is many small steps long and can be caught part-way.
    args = ["--model", str(tiny_gemma2), "--dataset", str(tiny_corpus), "--layers", "5", "12", "19",
            "--tokens", "2500", "--context", "32", "--batch-size", "2", "--sort-window", "3", "--chunk-rows", "8",
            "--dtype", dtype, "--no-progress"]
    reference, resumed = tmp_path / "ref.zarr", tmp_path / "resumed.zarr"
    assert harvest(*args, "--store", reference)[0] == 0

    proc = _run_cli([*args, "--store", str(resumed)])
    _wait_for_rows(resumed, proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2 and "resume" in out, out
    partial = ActivationStore.open(resumed, require_complete=False)
    assert not partial.attrs["complete"] and 0 < partial.rows_done() < 2500

    proc = _run_cli([*args, "--store", str(resumed)])
    first = _wait_for_rows(resumed, proc)
    while proc.poll() is None:  # kill -9 once this run has added rows of its own
        if rows_on_disk(resumed) > first:
            proc.kill()
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"

    code, out = harvest(*args, "--store", resumed)
    assert code == 0, out
    a, b = ActivationStore.open(reference), ActivationStore.open(resumed)
    assert a.n_rows == b.n_rows == 2500
    for layer in a.layers:
        assert np.array_equal(a.acts(layer)[:], b.acts(layer)[:])
    for name in TOKEN_FIELDS:
        assert np.array_equal(a.tokens(name), b.tokens(name))
    for name in ("title", "topic", "source_index"):
        assert np.array_equal(a.docs(name), b.docs(name))
    assert a.attrs["mean_norm"] == b.attrs["mean_norm"]


def test_layer_out_of_range_names_the_valid_range(tmp_path: Path, tiny_gemma2: Path, tiny_corpus: Path) -> None:
    code, out = harvest("--model", tiny_gemma2, "--dataset", tiny_corpus, "--layers", 5, 26, "--store",
                        tmp_path / "s.zarr", *SMALL)
    assert code == 2 and "0-25" in out and "26" in out
    assert not (tmp_path / "s.zarr").exists()


def test_unknown_model_names_the_embedded_model(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "csae.harvest.cli", "run", "--model", "no-such-org/no-such-model",
                           "--store", str(tmp_path / "s.zarr")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "no-such-org/no-such-model" in proc.stderr and "--model gemma-3-270m" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_empty_corpus_is_refused_before_writing(tmp_path: Path, tiny_gemma2: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"text": "", "title": f"t{i}"}) + "\n" for i in range(30)))
    code, out = harvest("--model", tiny_gemma2, "--dataset", empty, "--layers", 5, "--store", tmp_path / "s.zarr",
                        *SMALL)
    assert code == 2 and "no non-empty documents" in out
    assert not (tmp_path / "s.zarr").exists()


def test_store_with_other_settings_is_left_untouched(tmp_path: Path, tiny_gemma2: Path, tiny_corpus: Path) -> None:
    store = tmp_path / "s.zarr"
    base = ["--model", tiny_gemma2, "--dataset", tiny_corpus, "--layers", 5, "--tokens", 200, "--store", store]
    assert harvest(*base, *SMALL)[0] == 0
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    code, out = harvest(*base, *SMALL[:-3], "--dtype", "bfloat16", "--no-progress")
    assert code == 2 and "dtype" in out and "--overwrite" in out
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    for extra in ([], ["--overwrite"]):  # same settings again: complete, nothing to do
        code, out = harvest(*base, *SMALL, *extra)
        assert code == 0 and "nothing to do" in out
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    code, out = harvest(*base, *SMALL[:-3], "--dtype", "bfloat16", "--no-progress", "--overwrite")
    assert code == 0 and ActivationStore.open(store).attrs["config"]["dtype"] == "bfloat16"


def test_overwrite_refuses_a_directory_that_is_not_a_store(tmp_path: Path, tiny_gemma2: Path,
                                                          tiny_corpus: Path) -> None:
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("results")
    code, out = harvest("--model", tiny_gemma2, "--dataset", tiny_corpus, "--layers", 5, "--store", precious,
                        "--overwrite", *SMALL)
    assert code == 2 and "not a csae store" in out
    assert (precious / "chapter1.tex").read_text() == "results"


def test_info_reports_incomplete_and_corrupt_stores(tmp_path: Path, full_store: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["info", str(full_store)])
    assert ok.exit_code == 0 and "complete" in ok.output and "[5, 12, 19]" in ok.output

    incomplete = tmp_path / "incomplete.zarr"  # 2 of 4 chunks written
    group = schema.create(incomplete, layers=(5,), d_model=8, capacity=256, chunk_rows=64, attrs={})
    records.record_(records.new_record(group, 0, 4, 256, {}), 0, np.ones((2, 1)))
    result = runner.invoke(main, ["info", str(incomplete)])
    assert result.exit_code == 3 and "INCOMPLETE (128 of 256 rows)" in result.output

    corrupt = tmp_path / "corrupt.zarr"
    corrupt.mkdir()
    (corrupt / "zarr.json").write_text("{not json")
    result = runner.invoke(main, ["info", str(corrupt)])
    assert result.exit_code == 2 and "not a readable Zarr store" in result.output

    result = runner.invoke(main, ["info", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_repair_recomputes_a_damaged_chunk_bit_for_bit(tmp_path: Path, full_store: Path) -> None:
    """In process (the fault suite replays this through the commands): a truncated chunk file is found by
    `info --verify` and `repair` writes back exactly the bytes an uninterrupted harvest wrote."""
    store = tmp_path / "acts.zarr"
    shutil.copytree(full_store, store)
    chunk = store / "resid_post" / "12" / "c" / "1" / "0"
    original = chunk.read_bytes()
    chunk.write_bytes(original[: len(original) // 2])
    runner = CliRunner()
    info = runner.invoke(main, ["info", str(store), "--verify"])
    assert info.exit_code == 4 and "damaged   chunk 1 of resid_post/12" in info.output
    repair = runner.invoke(main, ["repair", str(store), "--no-progress"])
    assert repair.exit_code == 0 and "1 damaged chunk(s) repaired" in repair.output, repair.output
    assert chunk.read_bytes() == original


def test_a_store_of_an_older_format_is_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    """A store of format 1 (csae 0.x, whose stores could predate write records and checksums) is not read: one
    line names its format and the command that rebuilds it."""
    old = tmp_path / "old.zarr"
    group = schema.create(old, layers=(5,), d_model=8, capacity=64, chunk_rows=64, attrs={})
    schema.finish_(group, 0)
    assert ActivationStore.open(old).n_rows == 0  # the current format opens
    group.attrs["schema_version"] = 1
    with pytest.raises(UserError, match=r"older csae \(store format 1, this csae reads 2\); rebuild it with "
                                        r"`harvest run --overwrite`"):
        ActivationStore.open(old)
    result = CliRunner().invoke(main, ["info", str(old)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "harvest run --overwrite" in result.output


@pytest.mark.parametrize("tokens", [1000, 10**6])
def test_the_plan_counts_the_batches_harvest_builds(tiny_gemma2: Path, tiny_corpus: Path, tokens: int) -> None:
    """The plan (token counts only) against the batches built from the real sequence stream; and a stream
    started at a later window (documents before it skipped untokenized) against the full stream's tail."""
    cfg = HarvestConfig(model=str(tiny_gemma2), dataset=str(tiny_corpus), tokens=tokens, context=32, batch_size=2,
                        sort_window=3)
    tok = AutoTokenizer.from_pretrained(tiny_gemma2)
    table = DocTable()
    docs = corpora.iter_documents(cfg.dataset, cfg.split, cfg.heldout_doc_fraction)
    windows, rows = [], 0
    for window in iter_windows(iter_sequences(docs, tok, cfg.context, table), cfg.batch_size, cfg.sort_window):
        windows.append(window)
        rows += sum(stored_rows(group) for group in window)
        if rows >= tokens:
            break
    plan = make_plan(cfg, tok)
    built = [stored_rows(group) for window in windows for group in window]
    assert plan.offsets.tolist() == [0, *np.cumsum(built).tolist()] and plan.n_rows == min(rows, tokens)
    assert plan.docs == table
    for w in (1, 4, len(windows) - 1):
        later = list(itertools.islice(iter_windows(sequences_from(cfg, tok, plan, w), cfg.batch_size,
                                                   cfg.sort_window), len(windows) - w))
        assert later == windows[w:]
