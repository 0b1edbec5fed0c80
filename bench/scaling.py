"""Figures for the plan for 10^9 tokens in docs/scaling.md, measured on a scaled-down store at d = 2304.

    python bench/scaling.py [--source acts.zarr] [--rows 196608] [--cold]

Writes the same bfloat16 activations (the rows of a real store, cut to width 2304, with --source; else
heavy-tailed synthetic values) as csae stores them: blosc lz4 + bitshuffle + crc32c, chunks of 1024 rows;
unsharded, with 16 and with 64 chunks per shard file, and with 16 but no compression (checksum only).
For each: bytes per row on disk, files per 10^9 rows, and read speed with zarr-python as the loader reads
(whole random chunks, one or two threads; and whole shards). --cold drops the page cache before each read
(root only), so reads come from the disk. Also: the tokenizer's speed (harvest tokenizes every document
twice) and the read bandwidth a GPU training at batch 4096 needs, extrapolated from FLOPs (marked as
such). Last line: `ratio <random-chunk read with 64 chunks per shard / unsharded>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

D = 2304
CHUNK = 1024
GIGA_ROWS = 10**9


def activations(source: str | None, rows: int) -> np.ndarray:
    """(rows, 2304) uint16 bfloat16 bits: the source's activations (all its layers, in order) cut to width 2304."""
    if source:
        group = zarr.open_group(source, mode="r")
        flat = np.concatenate([np.asarray(group[f"resid_post/{layer}"]).reshape(-1) for layer in group.attrs["layers"]])
        if len(flat) < rows * D:
            raise SystemExit(f"{source} holds {len(flat) // D:,} rows of width {D}; pass a smaller --rows")
        return flat[: rows * D].reshape(rows, D)
    rng = np.random.default_rng(0)
    x = (rng.standard_t(4, size=(rows, D)) * 2).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def write(path: Path, data: np.ndarray, shard_chunks: int, compress: bool = True) -> float:
    """Seconds to write `data` as csae writes activations (or with the checksum only)."""
    codecs = [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=2)] if compress else []
    codecs.append(zarr.codecs.Crc32cCodec())
    arr = zarr.create_array(str(path), shape=data.shape, chunks=(CHUNK, D), dtype="uint16", compressors=codecs,
                            shards=(CHUNK * shard_chunks, D) if shard_chunks > 1 else None, fill_value=0)
    t0 = time.perf_counter()
    for start in range(0, len(data), CHUNK * max(shard_chunks, 16)):
        arr[start:start + CHUNK * max(shard_chunks, 16)] = data[start:start + CHUNK * max(shard_chunks, 16)]
    return time.perf_counter() - t0


def drop_caches(cold: bool) -> None:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_rate(path: Path, unit_rows: int, threads: int, cold: bool) -> float:
    """Decoded MB/s reading every unit (a chunk, or a shard) once, in random order."""
    arr = zarr.open_array(str(path), mode="r")
    units = np.random.default_rng(1).permutation(arr.shape[0] // unit_rows)
    drop_caches(cold)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda u: arr[u * unit_rows:(u + 1) * unit_rows], units))
    return len(units) * unit_rows * D * 2 / (time.perf_counter() - t0) / 1e6


def disk_rate(path: Path, cold: bool) -> float:
    """MB/s of the store's files read as bytes, no decoding (the disk, or the page cache when warm)."""
    files = [p for p in path.rglob("*") if p.is_file()]
    drop_caches(cold)
    t0 = time.perf_counter()
    size = sum(len(p.read_bytes()) for p in files)
    return size / (time.perf_counter() - t0) / 1e6


def tokenizer_rate() -> float | None:
    """Gemma tokens/s on wiki-vital (the fast tokenizer's batch call, on this machine's cores), or None without
    the embedded model."""
    try:
        from transformers import AutoTokenizer

        from csae.shared.entry import cache_dir
        from csae.shared.lm.corpora import iter_documents
        from csae.shared.lm.models import embedded_model_dir

        tok = AutoTokenizer.from_pretrained(embedded_model_dir(cache_dir()))
    except Exception:
        return None
    texts = [d.text for _, d in zip(range(4000), iter_documents("wiki-vital", "train", 0.1), strict=False)]
    t0 = time.perf_counter()
    n = sum(len(ids) for i in range(0, len(texts), 256) for ids in tok(texts[i:i + 256])["input_ids"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=None, help="A csae store whose activations supply real values.")
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--cold", action="store_true", help="Drop the page cache before each read (root).")
    ap.add_argument("--dir", default=None, help="Where to write the test stores (default: a temporary directory).")
    args = ap.parse_args()
    data = activations(args.source, args.rows)
    raw = data.nbytes
    load = os.getloadavg()[0]
    print(f"{args.rows:,} rows x {D} bf16 ({raw / 2**20:.0f} MiB raw) from {args.source or 'synthetic t(4)'}; "
          f"{os.cpu_count()} cores, load {load:.1f}; {'cold' if args.cold else 'warm'} page cache")
    rates = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for shards, compress in ((1, True), (16, True), (64, True), (16, False)):
            path = Path(tmp) / f"s{shards}{compress}.zarr"
            secs = write(path, data, shards, compress)
            files = sum(1 for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
            size = int(subprocess.check_output(["du", "-sb", str(path)]).split()[0])
            per_row = size / args.rows
            chunk1 = read_rate(path, CHUNK, 1, args.cold)
            chunk2 = read_rate(path, CHUNK, 2, args.cold)
            whole = read_rate(path, CHUNK * shards, 1, args.cold) if shards > 1 else chunk1
            rates[shards, compress] = chunk1
            disk = disk_rate(path, args.cold)
            name = f"{shards:3d}{'' if compress else ' uncompressed'}"
            print(f"chunks/shard {name}: {per_row:7.1f} B/row ({per_row / (2 * D):.3f} of raw), "
                  f"{files:5d} files here -> {GIGA_ROWS / (CHUNK * shards):12,.0f} per layer at 1e9 rows, "
                  f"{per_row * GIGA_ROWS / 1e12:.2f} TB per layer at 1e9 rows; write {raw / secs / 1e6:5.0f} MB/s; "
                  f"read random chunks {chunk1:5.0f} MB/s (1 thread) {chunk2:5.0f} MB/s (2 threads), "
                  f"whole {'shards' if shards > 1 else 'chunks'} {whole:5.0f} MB/s; files as bytes {disk:5.0f} MB/s")
            shutil.rmtree(path)
    tok = tokenizer_rate()
    if tok:
        # every document is tokenized twice: once for the plan (shared among ranks), once by the rank computing it
        print(f"tokenizer: {tok:,.0f} tokens/s (this machine's cores) -> tokenizing 1e9 tokens twice takes "
              f"{2 * GIGA_ROWS / tok / 3600:.1f} core-hours at this rate (extrapolated), shared among the ranks")
    for expansion in (1, 8):
        flops = 6 * 2 * 4096 * D * D * expansion  # forward + backward of encoder and decoder, batch 4096
        for name, tflops in (("A100 bf16 at 40% of 312 TFLOP/s", 125e12), ("H100 bf16 at 40% of 989 TFLOP/s", 396e12)):
            steps = tflops / flops
            print(f"extrapolated: expansion {expansion}, {name}: {steps:,.0f} steps/s at batch 4096 -> needs "
                  f"{steps * 4096 * D * 2 / 1e9:.1f} GB/s of decoded activations")
    print(f"ratio {rates[64, True] / rates[1, True]:.3f}")


if __name__ == "__main__":
    main()
