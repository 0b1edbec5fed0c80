"""Where every row goes, decided before the first forward: what makes resume, appending, repair and multi-rank
harvest exact.

The sequence stream is deterministic (corpus order, document cutting, windows sorted by length), so the
token count of each document tells how many rows each batch stores, and so which rows of the store each
batch fills, without running the model. Under torchrun the ranks share the counting (each tokenizes every
N-th document; they exchange counts) and all get the same plan; a rank then tokenizes only the documents of
the windows it computes, skipping those before its first one unread by the tokenizer. Work is then handed
out in whole write units (one chunk, or one shard of `shard_chunks` chunks): each rank gets a contiguous
run of the units that are not yet complete, computes the batches overlapping it (a batch that straddles
two ranks' runs is computed by both, each keeping its own rows) and writes only its own units. So no two
processes ever write one file, and the finished store is the same, row for row, however many ranks wrote
it and however often it was interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
from tqdm import tqdm

from csae.shared.config.harvest import HarvestConfig
from csae.shared.errors import UserError
from csae.shared.lm import corpora
from csae.shared.lm.sequences import DocTable, Seq, body_length, iter_sequences, piece_lengths, token_counts
from csae.shared.ranks import Ranks

#: Documents tokenized between two exchanges of counts among ranks.
_BLOCK = 4096


@dataclass(frozen=True)
class Plan:
    offsets: np.ndarray
    """First store row of each batch in stream order, then the end of the last (length: batches + 1)."""
    n_rows: int
    """Rows of the finished store: the token budget, or fewer if the split runs out."""
    docs: DocTable
    """The documents that contribute sequences, in store-local order (what docs/* holds)."""
    doc_position: np.ndarray
    """Per store document: its position among the split's documents (what a later start skips)."""
    doc_first_seq: np.ndarray
    """Per store document: the index of its first sequence."""
    seqs_per_window: int

    @property
    def n_batches(self) -> int:
        return len(self.offsets) - 1


def make_plan(cfg: HarvestConfig, tokenizer: Any, *, ranks: Ranks | None = None, progress: bool = False) -> Plan:
    """Count tokens per document up to the token budget (no model); under torchrun the ranks share the
    tokenizing. Corpus errors surface here, before anything is written."""
    ranks = ranks or Ranks()
    body, window = body_length(tokenizer, cfg.context), cfg.batch_size * cfg.sort_window
    kept: list[tuple[int, str, str, int, int]] = []  # per non-empty document: index, topic, title, position, seq
    lengths: list[int] = []  # of sequences not yet in a window
    counts: list[int] = []  # rows per batch
    total = consumed = position = 0
    docs = corpora.iter_documents(cfg.dataset, cfg.split, cfg.heldout_doc_fraction)
    # short-lived, so only on a terminal (disable=None), where it does not leave a line behind
    with tqdm(total=cfg.tokens, unit="tok", unit_scale=True, desc="plan (tokenizing)",
              disable=None if progress else True, leave=False) as bar:
        while total < cfg.tokens and (block := list(islice(docs, _BLOCK))):
            for doc, n in zip(block, _token_counts(block, tokenizer, ranks), strict=True):
                if n:
                    kept.append((doc.index, doc.topic, doc.title, position, consumed + len(lengths)))
                    lengths += piece_lengths(n, body)
                position += 1
            while len(lengths) >= window and total < cfg.tokens:
                rows = _window(lengths[:window], cfg.batch_size)
                counts += rows
                total, consumed, lengths = total + sum(rows), consumed + window, lengths[window:]
                bar.update(min(sum(rows), max(cfg.tokens - bar.n, 0)))
        if total < cfg.tokens and lengths:  # the stream ended inside a window
            rows = _window(lengths, cfg.batch_size)
            counts += rows
            total, consumed = total + sum(rows), consumed + len(lengths)
    if total == 0:
        raise UserError(f"corpus {cfg.dataset!r} has no non-empty documents in its {cfg.split} split; "
                        f"check the file or choose another --dataset/--split")
    kept = [k for k in kept if k[4] < consumed]  # documents whose first sequence made it into a window
    table = DocTable([k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept])
    return Plan(offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), n_rows=min(total, cfg.tokens),
                docs=table, doc_position=np.array([k[3] for k in kept], dtype=np.int64),
                doc_first_seq=np.array([k[4] for k in kept], dtype=np.int64), seqs_per_window=window)


def _token_counts(block: list[Any], tokenizer: Any, ranks: Ranks) -> list[int]:
    """Tokens per document of `block`: each rank tokenizes every world-th document, then all exchange."""
    parts = ranks.gather(token_counts(block[ranks.rank::ranks.world], tokenizer))
    return [parts[j % ranks.world][j // ranks.world] for j in range(len(block))]


def _window(lengths: list[int], batch_size: int) -> list[int]:
    """Rows per batch of one window: its sequences sorted by length (stable), as `iter_windows` sorts them."""
    order = sorted(lengths, key=lambda n: -n)
    return [sum(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def sequences_from(cfg: HarvestConfig, tokenizer: Any, plan: Plan, first_window: int) -> Iterator[Seq]:
    """The stream's sequences from window `first_window` on. Documents before it are read but not tokenized:
    the plan says where the window's first sequence starts."""
    first_seq = first_window * plan.seqs_per_window
    d0 = max(int(np.searchsorted(plan.doc_first_seq, first_seq, side="right")) - 1, 0)
    table = DocTable(plan.docs.source_index[:d0], plan.docs.topic[:d0], plan.docs.title[:d0])
    docs = corpora.iter_documents(cfg.dataset, cfg.split, cfg.heldout_doc_fraction)
    skip = int(plan.doc_position[d0]) if len(plan.doc_position) else 0
    seqs = iter_sequences(islice(docs, skip, None), tokenizer, cfg.context, table,
                          first_index=int(plan.doc_first_seq[d0]) if len(plan.doc_first_seq) else 0)
    return (s for s in seqs if s.index >= first_seq)


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
