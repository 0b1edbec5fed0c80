"""`harvest run`: one truncated forward per batch, rows streamed into the store by a writer thread.

Resumability: rows are written in whole chunks, and `rows_written` is advanced only after a chunk's
data is on disk (zarr's local store writes each file atomically). A restarted run regenerates the same
sequence stream, restarts at the batch holding the first unwritten row, and drops the rows it already
has, so the finished store equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from csae import __version__
from csae.harvest.batches import iter_batches
from csae.shared import corpora, schema
from csae.shared.config.base import to_dict
from csae.shared.config.harvest import HarvestConfig
from csae.shared.errors import UserError
from csae.shared.models import LoadedModel, load_model, preset_layers, resolve_dtype
from csae.shared.residual import resid_post
from csae.shared.sequences import DocTable, iter_sequences

log = logging.getLogger(__name__)


def resolve_layers(cfg: HarvestConfig, lm: LoadedModel) -> HarvestConfig:
    """The config with explicit layers (the model's preset when none were given), range-checked."""
    n = lm.n_layers
    layers = cfg.layers or preset_layers(n)
    bad = [x for x in layers if x >= n]
    if bad:
        raise UserError(f"layer(s) {bad} out of range: {cfg.model} has {n} blocks, so valid layers are 0-{n - 1}")
    return dataclasses.replace(cfg, layers=tuple(layers))


def store_attrs(cfg: HarvestConfig, lm: LoadedModel) -> dict[str, Any]:
    return {"model": lm.identity, "corpus": corpora.describe(cfg.dataset), "split": cfg.split,
            "context": cfg.context, "csae_version": __version__, "config": to_dict(cfg)}


def _prepare_store(path: str, cfg: HarvestConfig, lm: LoadedModel, overwrite: bool) -> zarr.Group | None:
    """Open the store to resume, create it, or refuse. None means: already complete, nothing to do."""
    if schema.exists(path):
        try:
            old = schema.ActivationStore.open(path, require_complete=False)
        except UserError:
            raise UserError(f"{path} exists and is not a csae store; choose another --store path "
                            f"(it is not deleted, even with --overwrite)") from None
        if old.attrs.get("config") == to_dict(cfg):  # same settings: resume, or nothing to do
            return None if old.attrs.get("complete") else schema.open_group(path, mode="r+")
        if not overwrite:
            diff = sorted(k for k, v in to_dict(cfg).items() if old.attrs.get("config", {}).get(k) != v)
            raise UserError(f"{path} was made with other settings (differing: {', '.join(diff)}); pass "
                            f"--overwrite to replace it or choose another --store")
        schema.remove(path)
    return schema.create(path, layers=cfg.layers, d_model=lm.d_model, capacity=min(cfg.tokens, 64 * cfg.chunk_rows),
                         chunk_rows=cfg.chunk_rows, attrs=store_attrs(cfg, lm))


def _resume_point(group: zarr.Group, seqs_per_window: int) -> tuple[int, int, int]:
    """(rows written, first window to run, rows of that window already written).

    Windows are fixed blocks of the sequence stream and rows are stored window by window, so the rows
    before window w are exactly those whose sequence index is below w * seqs_per_window.
    """
    written = int(group.attrs["rows_written"])
    if written == 0:
        return 0, 0, 0
    seq = np.asarray(group["tokens/seq"][:written])
    window = int(seq[-1]) // seqs_per_window
    first_row = int(np.count_nonzero(seq < window * seqs_per_window))
    return written, window, written - first_row


def harvest(cfg: HarvestConfig, store: str | Path, *, cache_dir: Path, overwrite: bool = False,
            progress: bool = True, lm: LoadedModel | None = None) -> schema.ActivationStore:
    """Fill `store` with cfg.tokens rows of residual-stream activations per layer (or resume it)."""
    path = str(store)
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, cfg.device))
    lm = lm or load_model(cfg.model, cache_dir=cache_dir, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision)
    cfg = resolve_layers(cfg, lm)
    table = DocTable()
    seqs = iter_sequences(corpora.iter_documents(cfg.dataset, cfg.split, cfg.heldout_doc_fraction), lm.tokenizer,
                          cfg.context, table)
    first = next(seqs, None)  # an empty corpus is reported before anything is written
    if first is None:
        raise UserError(f"corpus {cfg.dataset!r} has no non-empty documents in its {cfg.split} split; "
                        f"check the file or choose another --dataset/--split")
    group = _prepare_store(path, cfg, lm, overwrite)
    if group is None:
        log.info("%s is already complete for these settings; nothing to do", path)
        return schema.ActivationStore.open(path)
    written, first_window, skip_rows = _resume_point(group, cfg.batch_size * cfg.sort_window)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    device = next(lm.model.parameters()).device
    all_seqs = itertools.chain([first], seqs)

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer")
    pending: list[Future[None]] = []
    buffer: list[tuple[dict[int, torch.Tensor], dict[str, np.ndarray]]] = []
    buffered = 0
    bar = tqdm(total=cfg.tokens, initial=written, unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {schema.display_name(path)}", smoothing=0.05)

    def flush(rows: int) -> None:
        """Hand the first `rows` buffered rows to the writer thread, keeping the rest buffered."""
        nonlocal buffer, buffered, written
        acts = {layer: torch.cat([b[0][layer] for b in buffer]) for layer in cfg.layers}
        toks = {k: np.concatenate([b[1][k] for b in buffer]) for k in schema.TOKEN_FIELDS}
        head = ({k: v[:rows] for k, v in acts.items()}, {k: v[:rows] for k, v in toks.items()})
        buffer = [({k: v[rows:] for k, v in acts.items()}, {k: v[rows:] for k, v in toks.items()})]
        buffered -= rows
        start, written = written, written + rows
        pending.append(writer.submit(_write_chunks, group, start, head))
        while len(pending) > 2:  # bounded queue: the forward never runs far ahead of the disk
            pending.pop(0).result()

    try:
        for batch in iter_batches(all_seqs, cfg.batch_size, cfg.sort_window, pad_id, skip_windows=first_window):
            rows = batch.rows
            if skip_rows:  # resuming: drop the rows of this window that are already on disk
                drop = min(skip_rows, len(rows["seq"]))
                rows, skip_rows = {k: v[drop:] for k, v in rows.items()}, skip_rows - drop
                if not len(rows["seq"]):
                    continue
            take = min(len(rows["seq"]), cfg.tokens - written - buffered)
            hidden = resid_post(lm.model, batch.input_ids_BT.to(device), cfg.layers)
            b, t = torch.from_numpy(rows["b"][:take]), torch.from_numpy(rows["t"][:take])
            buffer.append(({layer: hidden[layer][b, t].to("cpu", torch.bfloat16) for layer in cfg.layers},
                           {k: rows[k][:take] for k in schema.TOKEN_FIELDS}))
            buffered += take
            bar.update(take)
            if buffered >= cfg.chunk_rows:
                flush(buffered - buffered % cfg.chunk_rows)
            if written + buffered >= cfg.tokens:
                break
        if buffered:
            flush(buffered)
        for fut in pending:
            fut.result()
    except KeyboardInterrupt:
        for fut in pending:
            fut.result()
        bar.close()
        raise UserError(f"interrupted after {group.attrs['rows_written']} rows were saved; run the same "
                        f"command again to resume") from None
    finally:
        writer.shutdown(wait=True)
        bar.close()
    if written < cfg.tokens:
        log.warning("the corpus ran out after %d of %d tokens; the store holds %d", written, cfg.tokens, written)
    topics = sorted(set(table.topic))
    schema.write_docs_(group, table.source_index, [topics.index(t) for t in table.topic], table.title)
    group.attrs.update({"topics": topics})
    schema.finish_(group, written)
    return schema.ActivationStore.open(path)


def _write_chunks(group: zarr.Group, start: int, rows: tuple[dict[int, torch.Tensor], dict[str, np.ndarray]]) -> None:
    schema.write_rows_(group, start, rows[0], rows[1])
    # Progress moves only after the rows are on disk: a kill at any point leaves a resumable store.
    group.attrs.update({"rows_written": start + len(rows[1]["seq"])})

