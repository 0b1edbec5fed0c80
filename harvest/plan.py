"""Where every row goes, decided before the first forward: what makes resume, appending, repair and multi-rank
harvest exact.

The sequence stream is deterministic (corpus order, document cutting, windows sorted by length), so
tokenizing it tells how many rows each batch stores, and so which rows of the store each batch fills,
without running the model. Every rank computes the same plan from the same stream. Work is then handed
out in whole write units (one chunk, or one shard of `shard_chunks` chunks): each rank gets a contiguous
run of the units that are not yet complete, computes the batches overlapping it (a batch that straddles
two ranks' runs is computed by both, each keeping its own rows) and writes only its own units. So no two
processes ever write one file, and the finished store is the same, row for row, however many ranks wrote
it and however often it was interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from csae.harvest.batches import iter_windows, stored_rows
from csae.shared import corpora
from csae.shared.config.harvest import HarvestConfig
from csae.shared.errors import UserError
from csae.shared.sequences import DocTable, Seq, iter_sequences


@dataclass(frozen=True)
class Plan:
    offsets: np.ndarray
    """First store row of each batch in stream order, then the end of the last (length: batches + 1)."""
    n_rows: int
    """Rows of the finished store: the token budget, or fewer if the split runs out."""
    docs: DocTable
    """The documents that contribute sequences, in store-local order (what docs/* holds)."""

    @property
    def n_batches(self) -> int:
        return len(self.offsets) - 1


def sequences(cfg: HarvestConfig, tokenizer: object, table: DocTable) -> Iterator[Seq]:
    """The store's sequence stream (the same in every process that asks)."""
    docs = corpora.iter_documents(cfg.dataset, cfg.split, cfg.heldout_doc_fraction)
    return iter_sequences(docs, tokenizer, cfg.context, table)


def make_plan(cfg: HarvestConfig, tokenizer: object, *, progress: bool = False) -> Plan:
    """Tokenize the stream up to the token budget (no model); corpus errors surface here, before any write."""
    table = DocTable()
    counts: list[int] = []
    total = 0
    with tqdm(total=cfg.tokens, unit="tok", unit_scale=True, desc="plan (tokenizing)", disable=not progress,
              leave=False) as bar:
        for window in iter_windows(sequences(cfg, tokenizer, table), cfg.batch_size, cfg.sort_window):
            rows = [stored_rows(group) for group in window]
            counts += rows
            total += sum(rows)
            bar.update(min(sum(rows), max(cfg.tokens - bar.n, 0)))
            if total >= cfg.tokens:
                break
    if total == 0:
        raise UserError(f"corpus {cfg.dataset!r} has no non-empty documents in its {cfg.split} split; "
                        f"check the file or choose another --dataset/--split")
    return Plan(offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), n_rows=min(total, cfg.tokens),
                docs=table)


def assign(done_C: np.ndarray, unit_chunks: int, world: int) -> list[list[tuple[int, int]]]:
    """Per rank, the (first chunk, chunks) ranges it writes: the write units that are not complete, split into
    `world` contiguous runs of nearly equal size."""
    n_chunks = len(done_C)
    units = [u for u in range(-(-n_chunks // unit_chunks))
             if not done_C[u * unit_chunks:(u + 1) * unit_chunks].all()]
    out = []
    for part in np.array_split(np.asarray(units, dtype=np.int64), world):
        ranges: list[tuple[int, int]] = []
        for u in part.tolist():
            first, n = u * unit_chunks, min(unit_chunks, n_chunks - u * unit_chunks)
            if ranges and sum(ranges[-1]) == first:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
            else:
                ranges.append((first, n))
        out.append(ranges)
    return out
