"""Benchmark: how fast the loader delivers rows against how fast the trainer consumes them.

On a synthetic store at d=640 (and --dims), batch 512 with context pairs: loader rows/s in streaming
mode (whole random chunks from Zarr, shuffle buffer of --shuffle-rows) and in-memory mode, against the
real trainer's rows/s with the default config. Last line: `ratio <streaming loader rows/s / trainer rows/s>`
at the first d.

    python bench/loader.py [--dims 640 2304] [--batches 400]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from csae.shared.config.train import TrainConfig
from csae.shared.sae.checkpoint import layer_dir, read_metrics
from csae.shared.store.schema import ActivationStore, make_test_store
from csae.train.loader import ChunkLoader
from csae.train.run import fit, resolve

BATCH = 512


def loader_rows_per_s(store: ActivationStore, batches: int, *, in_memory: bool, shuffle_rows: int) -> float:
    loader = ChunkLoader(store, 0, batch_size=BATCH, train_rows=store.heldout_start(0.1), scale=1.0, seed=0,
                         shuffle_rows=shuffle_rows, in_memory_max_bytes=(1 << 40) if in_memory else 0)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * BATCH / (time.perf_counter() - t0)
    loader.close()
    return rate


def trainer_rows_per_s(path: Path, out: Path, steps: int) -> float:
    cfg = resolve(TrainConfig(tokens=BATCH * steps, warmup_steps=5, checkpoint_every=10**9))
    fit(cfg, path, out, layers=[0], overwrite=True, progress=False)
    log = read_metrics(layer_dir(out, cfg.seeds[0], 0))
    return (len(log) - 6) * BATCH / (log[-1]["elapsed_s"] - log[5]["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[640])
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--shuffle-rows", type=int, default=TrainConfig().shuffle_rows)
    parser.add_argument("--trainer-steps", type=int, default=40)
    args = parser.parse_args()
    headline = None
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.dims:
            path = Path(tmp) / f"d{d}.zarr"
            # 256 sequences of 256 tokens, 1024-row chunks: 64 chunks, as `harvest run` writes them
            make_test_store(path, layers=(0,), d_model=d, n_docs=256, seq_len=256, chunk_rows=1024)
            store = ActivationStore.open(path)
            stream = loader_rows_per_s(store, args.batches, in_memory=False, shuffle_rows=args.shuffle_rows)
            memory = loader_rows_per_s(store, args.batches, in_memory=True, shuffle_rows=args.shuffle_rows)
            train = trainer_rows_per_s(path, Path(tmp) / "ck", args.trainer_steps)
            print(f"d={d:5d} loader streaming {stream:10,.0f} rows/s  in-memory {memory:10,.0f} rows/s  "
                  f"trainer (default config) {train:8,.0f} rows/s  streaming/trainer {stream / train:.1f}x",
                  flush=True)
            headline = headline if headline is not None else stream / train
    print(f"ratio {headline:.1f}")


if __name__ == "__main__":
    main()
