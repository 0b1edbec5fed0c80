"""Harvest throughput against the bare truncated forward of the same batches, in the same run.

    python bench/harvest.py [--tokens 20000] [--dtype auto]

Prints tokens/s of both and, last, `ratio <harvest/bare>`: how well storage hides behind compute
(1.0 = writing costs nothing). "Bare" runs the same batches through the same truncated forward and
throws the activations away; harvest also gathers rows, casts, compresses and writes them.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csae.harvest.batches import iter_windows, make_batch
from csae.harvest.run import harvest, resolve_layers
from csae.shared.config.harvest import HarvestConfig
from csae.shared.device import resolve_dtype
from csae.shared.entry import cache_dir
from csae.shared.lm import corpora
from csae.shared.lm.models import load_model
from csae.shared.lm.residual import resid_post
from csae.shared.lm.sequences import DocTable, iter_sequences


def bare(cfg: HarvestConfig, lm: object) -> float:
    """tokens/s of the truncated forward alone over the batches harvest would run."""
    seqs = iter_sequences(corpora.iter_documents(cfg.dataset, cfg.split, cfg.heldout_doc_fraction), lm.tokenizer,
                          cfg.context, DocTable())
    batches, rows = [], 0
    for window in iter_windows(seqs, cfg.batch_size, cfg.sort_window):
        for group in window:
            batch = make_batch(group, lm.tokenizer.pad_token_id)
            batches.append(batch.input_ids_BT)
            rows += len(batch.rows["seq"])
        if rows >= cfg.tokens:
            break
    start = time.perf_counter()
    for ids in batches:
        resid_post(lm.model, ids, cfg.layers)
    return min(rows, cfg.tokens) / (time.perf_counter() - start)


@click.command()
@click.option("--tokens", default=20_000, show_default=True)
@click.option("--dtype", default="auto", show_default=True)
def main(tokens: int, dtype: str) -> None:
    cfg = HarvestConfig(tokens=tokens, dtype=resolve_dtype(dtype, "cpu"), device="cpu")
    lm = load_model(cfg.model, cache_dir=cache_dir(), dtype=cfg.dtype, device="cpu")
    cfg = resolve_layers(cfg, lm)
    print(f"model {cfg.model} layers {list(cfg.layers)} dtype {cfg.dtype} batch {cfg.batch_size}x{cfg.context} "
          f"threads {torch.get_num_threads()}")
    bare(dataclasses.replace(cfg, tokens=2_000), lm)  # warm-up
    bare_a = bare(cfg, lm)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = harvest(cfg, Path(tmp) / "acts.zarr", cache_dir=cache_dir(), progress=False, lm=lm)
        harvest_rate = store.n_rows / (time.perf_counter() - start)
        size = store.size_bytes()
    bare_b = bare(cfg, lm)
    bare_rate = (bare_a + bare_b) / 2
    print(f"bare truncated forward   {bare_rate:8.0f} tokens/s  (runs: {bare_a:.0f}, {bare_b:.0f})")
    print(f"harvest run              {harvest_rate:8.0f} tokens/s")
    print(f"store size               {size / store.n_rows * 1e6 / 2**30:.2f} GiB per million tokens")
    print(f"ratio {harvest_rate / bare_rate:.3f}")


if __name__ == "__main__":
    main()
