"""Held-out corpus text -> token sequences -> padded batches, as harvest cuts them: each document is cut
into sequences of BOS + up to context-1 tokens (one document per sequence).

Position t of a sequence is a *text position* when its token is not BOS or padding; the SAE is spliced in
at text positions only. A *prediction* is made at every text position but the last, for the token after
it, so a sequence with m text tokens contributes m - 1 predictions and special tokens are never predicted
from or scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from csae.shared.corpora import Document
from csae.shared.sequences import DocTable, iter_sequences


@dataclass(frozen=True)
class TextBatch:
    ids_BT: torch.Tensor
    """Right-padded token ids (long)."""
    lengths_B: torch.Tensor
    """Real length of each sequence (BOS included)."""
    first: int
    """First text position: 1 when sequences start with BOS, else 0."""

    @property
    def text_BT(self) -> torch.Tensor:
        """True at text positions (not BOS, not padding)."""
        t = torch.arange(self.ids_BT.shape[1])
        return (t >= self.first) & (t < self.lengths_B.unsqueeze(1))

    @property
    def pred_BT(self) -> torch.Tensor:
        """True at positions that make a scored prediction (text positions but the last)."""
        t = torch.arange(self.ids_BT.shape[1])
        return (t >= self.first) & (t < self.lengths_B.unsqueeze(1) - 1)

    @property
    def targets_BT(self) -> torch.Tensor:
        """The token each position predicts (the next id; the last column is padding)."""
        pad = torch.zeros_like(self.ids_BT[:, :1])
        return torch.cat([self.ids_BT[:, 1:], pad], dim=1)

    @property
    def n_predictions(self) -> int:
        return int(self.pred_BT.sum())


def build_sequences(docs: Iterable[Document], tokenizer: Any, context: int, budget: int,
                    unit: Literal["predictions", "tokens"] = "predictions") -> list[list[int]]:
    """Sequences cut exactly as harvest cuts them (harvest.sequences.iter_sequences) until `budget`
    predictions (or text tokens) are collected; the last sequence is cut so the count is exact when the
    text suffices."""
    out: list[list[int]] = []
    total = 0
    for seq in iter_sequences(docs, tokenizer, context, DocTable()):
        prefix, piece = seq.ids[: seq.first_stored], seq.ids[seq.first_stored:]
        count = len(piece) - 1 if unit == "predictions" else len(piece)
        if count < 1:
            continue
        if total + count > budget:
            piece = piece[: budget - total + (1 if unit == "predictions" else 0)]
            count = budget - total
        out.append(prefix + piece)
        total += count
        if total >= budget:
            break
    return out


def batches(seqs: list[list[int]], batch_size: int, pad_id: int, has_bos: bool) -> list[TextBatch]:
    """Batches of `batch_size` sequences, sorted by length first so that padding stays small."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = []
    for start in range(0, len(order), batch_size):
        group = [seqs[i] for i in order[start:start + batch_size]]
        longest = max(len(s) for s in group)
        ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
        for b, s in enumerate(group):
            ids[b, : len(s)] = torch.tensor(s)
        out.append(TextBatch(ids, torch.tensor([len(s) for s in group]), int(has_bos)))
    return out


def alternate(docs: Iterable[Document]) -> tuple[list[Document], list[Document]]:
    """Split documents in two halves by alternation (selection half, evaluation half)."""
    docs = list(docs)
    return docs[0::2], docs[1::2]


def round_robin(groups: list[list[Document]]) -> Iterator[Document]:
    """Documents of several groups taken in turn, so each group contributes equally to a prefix."""
    for i in range(max((len(g) for g in groups), default=0)):
        for g in groups:
            if i < len(g):
                yield g[i]
