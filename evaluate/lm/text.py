"""Held-out corpus text -> token sequences -> padded batches, as harvest cuts them: each document is cut
into sequences of BOS + up to context-1 tokens (one document per sequence).

Position t of a sequence is a *text position* when its token is not BOS or padding; the SAE is spliced in
at text positions only. A *prediction* is made at every text position but the last, for the token after
it, so a sequence with m text tokens contributes m - 1 predictions and special tokens are never predicted
from or scored. Every sequence remembers its document (numbered in order of first use within the text),
the unit the bootstrap resamples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from csae.shared.lm.corpora import Document
from csae.shared.lm.sequences import DocTable, iter_sequences


@dataclass(frozen=True)
class Piece:
    ids: list[int]
    """Token ids, BOS first (when the tokenizer has one)."""
    doc: int
    """The document it comes from, numbered 0, 1, ... in order of first use."""


@dataclass(frozen=True)
class TextBatch:
    ids_BT: torch.Tensor
    """Right-padded token ids (long)."""
    lengths_B: torch.Tensor
    """Real length of each sequence (BOS included)."""
    first: int
    """First text position: 1 when sequences start with BOS, else 0."""
    doc_B: torch.Tensor
    """Document of each sequence (long)."""

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

    def pred_docs(self) -> torch.Tensor:
        """The document of each prediction, in the order of `pred_BT`'s True entries."""
        return self.doc_B.unsqueeze(1).expand_as(self.ids_BT)[self.pred_BT]


def build_sequences(docs: Iterable[Document], tokenizer: Any, context: int, budget: int,
                    unit: Literal["predictions", "tokens"] = "predictions", per_doc: int = 0) -> list[Piece]:
    """Sequences cut exactly as harvest cuts them (csae.shared.lm.sequences) until `budget` predictions (or text
    tokens) are collected; at most `per_doc` of them from one document (its first ones; 0: no limit). The
    last sequence is cut so the count is exact when the text suffices."""
    out: list[Piece] = []
    total = 0
    taken: dict[int, int] = {}
    for seq in iter_sequences(docs, tokenizer, context, DocTable()):
        prefix, piece = seq.ids[: seq.first_stored], seq.ids[seq.first_stored:]
        extra = 1 if unit == "predictions" else 0  # m text tokens make m - 1 predictions
        room = budget - total
        if per_doc:
            room = min(room, per_doc - taken.get(seq.doc, 0))
        count = min(len(piece) - extra, room)
        if count < 1:
            continue
        out.append(Piece(prefix + piece[: count + extra], seq.doc))
        taken[seq.doc] = taken.get(seq.doc, 0) + count
        total += count
        if total >= budget:
            break
    docs_in_order = {doc: i for i, doc in enumerate(dict.fromkeys(p.doc for p in out))}
    return [Piece(p.ids, docs_in_order[p.doc]) for p in out]


def batches(seqs: list[Piece], batch_size: int, pad_id: int, has_bos: bool) -> list[TextBatch]:
    """Batches of `batch_size` sequences, sorted by length first so that padding stays small."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    out = []
    for start in range(0, len(order), batch_size):
        group = [seqs[i] for i in order[start:start + batch_size]]
        longest = max(len(s.ids) for s in group)
        ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
        for b, s in enumerate(group):
            ids[b, : len(s.ids)] = torch.tensor(s.ids)
        out.append(TextBatch(ids, torch.tensor([len(s.ids) for s in group]), int(has_bos),
                             torch.tensor([s.doc for s in group])))
    return out


def alternate(docs: Iterable[Document]) -> tuple[list[Document], list[Document]]:
    """Split documents in two halves by alternation (selection half, test half)."""
    docs = list(docs)
    return docs[0::2], docs[1::2]


def round_robin(groups: list[list[Document]]) -> Iterator[Document]:
    """Documents of several groups taken in turn, so each group contributes equally to a prefix."""
    for i in range(max((len(g) for g in groups), default=0)):
        for g in groups:
            if i < len(g):
                yield g[i]


@dataclass(frozen=True)
class TextSource:
    """Where the LM metrics' text comes from: the held-out split of a corpus, cut with a context length."""

    dataset: str
    heldout_doc_fraction: float
    context: int

    def documents(self) -> Iterator[Document]:
        from csae.shared.lm.corpora import iter_documents

        return iter_documents(self.dataset, "heldout", self.heldout_doc_fraction)


def text_batches(tokenizer: Any, docs: Iterable[Document], context: int, budget: int, batch_size: int,
                 unit: Literal["predictions", "tokens"] = "predictions", per_doc: int = 0) -> list[TextBatch]:
    """`build_sequences` then `batches`, with the tokenizer's padding and BOS."""
    seqs = build_sequences(docs, tokenizer, context, budget, unit=unit, per_doc=per_doc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return batches(seqs, batch_size, pad, tokenizer.bos_token_id is not None)
