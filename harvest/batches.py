"""Token sequences -> windows -> padded batches, deterministically (resume and multi-rank harvest depend on it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from csae.shared.lm.sequences import Seq


@dataclass(frozen=True)
class Batch:
    input_ids_BT: torch.Tensor
    """Right-padded token ids."""
    rows: dict[str, np.ndarray]
    """Per stored row (BOS and padding dropped): token_id, seq, pos, doc, and b/t (where in the batch)."""


def iter_windows(seqs: Iterable[Seq], batch_size: int, window: int) -> Iterator[list[list[Seq]]]:
    """The sequence stream as windows of `window` batches of `batch_size` sequences each (the last ones
    shorter), sorted by length within the window so that each batch pads little (measured on wiki-vital: 63%
    of computed positions were real tokens unsorted, 97% with windows of 32 batches). Windows are fixed blocks
    of the stream, so any process that reads the same stream builds the same batches (same shapes, same
    numerics), whichever of them it computes."""
    seq_iter = iter(seqs)
    while block := list(islice(seq_iter, batch_size * window)):
        block.sort(key=lambda s: -len(s.ids))  # stable: ties keep stream order
        yield [block[start:start + batch_size] for start in range(0, len(block), batch_size)]


def stored_rows(group: list[Seq]) -> int:
    """Rows a batch of these sequences adds to the store (BOS and padding are not stored)."""
    return sum(len(s.ids) - s.first_stored for s in group)


def make_batch(group: list[Seq], pad_id: int) -> Batch:
    longest = max(len(s.ids) for s in group)
    ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("token_id", "seq", "pos", "doc", "b", "t")}
    for b, s in enumerate(group):
        ids[b, : len(s.ids)] = torch.tensor(s.ids)
        t = np.arange(s.first_stored, len(s.ids))
        cols["token_id"].append(np.asarray(s.ids)[t])
        cols["seq"].append(np.full(len(t), s.index))
        cols["pos"].append(t)
        cols["doc"].append(np.full(len(t), s.doc))
        cols["b"].append(np.full(len(t), b))
        cols["t"].append(t)
    return Batch(input_ids_BT=ids, rows={k: np.concatenate(v) for k, v in cols.items()})
