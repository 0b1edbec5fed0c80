"""One rank's share of a harvest: compute the batches that overlap its chunk ranges and write their rows.

Rows go to a writer thread in whole write units (a chunk, or a shard), so the forward never waits for
compression and disk except when it runs two flushes ahead. A unit's chunks are marked complete in the
rank's progress record only after the unit is on disk (zarr's local store replaces each file atomically),
so a kill at any point leaves a store that the same command resumes, losing at most the units in flight.
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from csae.harvest.batches import iter_windows, make_batch
from csae.harvest.plan import Plan, sequences_from
from csae.shared.config.harvest import HarvestConfig
from csae.shared.errors import UserError
from csae.shared.files import disk_full_as_error
from csae.shared.lm.models import LoadedModel
from csae.shared.lm.residual import resid_post
from csae.shared.store import records, schema

log = logging.getLogger(__name__)

Rows = tuple[dict[int, torch.Tensor], dict[str, np.ndarray]]
#: Compressed size of a row relative to raw bfloat16 (blosc lz4 + bitshuffle on Gemma activations).
_COMPRESSED = 0.85


@dataclass
class _Span:
    """Rows [start, stop) of the store, chunks [first_chunk, ...), and what is buffered for them."""
    start: int
    stop: int
    first_chunk: int
    record: zarr.Array
    written: int = 0
    buffer: list[Rows] = field(default_factory=list)
    buffered: int = 0


class Writer:
    def __init__(self, group: zarr.Group, location: str, unit_rows: int, chunk_rows: int, spans: list[_Span],
                 fix: str) -> None:
        self.group, self.location, self.unit_rows, self.chunk_rows = group, location, unit_rows, chunk_rows
        self.spans, self.fix = spans, fix
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer")
        self.pending: list[Future[None]] = []
        self.row_bytes = sum(group[n].shape[1] * 2 if group[n].ndim == 2 else 4 for n in schema.row_arrays(group))

    def add(self, i: int, rows: Rows) -> None:
        span = self.spans[i]
        span.buffer.append(rows)
        span.buffered += len(rows[1]["seq"])
        at = span.start + span.written
        end = at + span.buffered
        # write up to the last unit boundary reached (the span's end is a boundary or the store's end)
        cut = end if end == span.stop else end - (end - span.start) % self.unit_rows
        if cut > at:
            self._flush(span, cut - at)

    def _flush(self, span: _Span, n: int) -> None:
        acts = {k: torch.cat([b[0][k] for b in span.buffer]) for k in span.buffer[0][0]}
        toks = {k: np.concatenate([b[1][k] for b in span.buffer]) for k in schema.TOKEN_FIELDS}
        head: Rows = ({k: v[:n] for k, v in acts.items()}, {k: v[:n] for k, v in toks.items()})
        span.buffer = [({k: v[n:] for k, v in acts.items()}, {k: v[n:] for k, v in toks.items()})]
        span.buffered -= n
        start = span.start + span.written
        span.written += n
        self.pending.append(self.pool.submit(self._write, span, start, head))
        while len(self.pending) > 2:  # bounded queue: the forward never runs far ahead of the disk
            self.pending.pop(0).result()

    def _write(self, span: _Span, start: int, rows: Rows) -> None:
        left = sum(s.stop - s.start - s.written for s in self.spans) + len(rows[1]["seq"])
        with disk_full_as_error(self.location, int(left * self.row_bytes * _COMPRESSED), self.fix):
            schema.write_rows_(self.group, start, rows[0], rows[1])
            sums = chunk_norm_sums(rows[0], start, self.chunk_rows)
            records.record_(span.record, start // self.chunk_rows, sums)

    def drain(self) -> None:
        for fut in self.pending:
            fut.result()
        self.pending = []

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def chunk_norm_sums(acts: dict[int, torch.Tensor], start: int, chunk_rows: int) -> np.ndarray:
    """(chunks, layers) sums of row norms of rows [start, start + n), split at chunk boundaries."""
    n = len(next(iter(acts.values())))
    cuts = [*range(0, n, chunk_rows), n]  # `start` is a chunk boundary
    assert start % chunk_rows == 0
    return np.array([[float(x[a:b].float().norm(dim=1).double().sum()) for x in acts.values()]
                     for a, b in itertools.pairwise(cuts)])


def fill(group: zarr.Group, location: str, cfg: HarvestConfig, lm: LoadedModel, plan: Plan,
         ranges: list[tuple[int, int]], *, rank: int, world: int, show: bool, fix: str) -> None:
    """Compute and write the rows of chunk ranges `ranges` (first chunk, chunks): this rank's share."""
    chunk_rows = int(group.attrs["chunk_rows"])
    unit_rows = chunk_rows * int(group.attrs.get("shard_chunks", 1))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    spans = []
    for first, n in ranges:
        start, stop = first * chunk_rows, min((first + n) * chunk_rows, plan.n_rows)
        meta = {"rank": rank, "world": world, "started": started}
        spans.append(_Span(start, stop, first, records.new_record(group, first, n, stop, meta)))
    if not spans:
        return
    writer = Writer(group, location, unit_rows, chunk_rows, spans, fix)
    bar = tqdm(total=sum(s.stop - s.start for s in spans), unit="tok", unit_scale=True, disable=not show,
               desc=f"harvest {schema.display_name(location)}" + (f" (rank 0 of {world})" if world > 1 else ""),
               smoothing=0.05)
    try:
        _compute(writer, cfg, lm, plan, bar)
        writer.drain()
    except KeyboardInterrupt:
        writer.drain()
        done = sum(s.written for s in spans)
        raise UserError(f"interrupted after this process saved {done:,} rows; run the same command again to "
                        f"resume") from None
    finally:
        writer.close()
        bar.close()


def _compute(writer: Writer, cfg: HarvestConfig, lm: LoadedModel, plan: Plan, bar: Any) -> None:
    spans = writer.spans
    end = max(s.stop for s in spans)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    device = next(lm.model.parameters()).device
    first_batch = int(np.searchsorted(plan.offsets, min(s.start for s in spans), side="right")) - 1
    first_window = first_batch // cfg.sort_window  # windows before it are neither tokenized nor computed
    k = first_window * cfg.sort_window
    seqs = sequences_from(cfg, lm.tokenizer, plan, first_window)
    for window in iter_windows(seqs, cfg.batch_size, cfg.sort_window):
        for group in window:
            if k >= plan.n_batches or plan.offsets[k] >= end:
                return
            lo, hi = int(plan.offsets[k]), int(plan.offsets[k + 1])
            k += 1
            parts = [(i, max(lo, s.start), min(hi, s.stop)) for i, s in enumerate(spans) if max(lo, s.start) <
                     min(hi, s.stop)]
            if not parts:
                continue
            batch = make_batch(group, pad_id)
            hidden = resid_post(lm.model, batch.input_ids_BT.to(device), cfg.layers)
            for i, a, b in parts:
                sel = slice(a - lo, b - lo)
                bt = torch.from_numpy(batch.rows["b"][sel]), torch.from_numpy(batch.rows["t"][sel])
                writer.add(i, ({layer: hidden[layer][bt].to("cpu", torch.bfloat16) for layer in cfg.layers},
                               {name: batch.rows[name][sel] for name in schema.TOKEN_FIELDS}))
                bar.update(b - a)
