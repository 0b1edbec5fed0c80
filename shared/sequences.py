"""The rule that cuts documents into token sequences, shared by harvest (which stores them) and evaluate
(which cuts held-out text the same way): BOS + up to context-1 tokens, one document per sequence, so no
token attends across a document boundary. Deterministic: harvest's resume depends on it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from csae.shared.corpora import Document

_TOKENIZE_DOCS = 256  # documents per tokenizer call: the fast tokenizer is much quicker on lists


@dataclass
class DocTable:
    """The documents that contributed sequences, in order of first use (their store-local index)."""

    source_index: list[int] = field(default_factory=list)
    topic: list[str] = field(default_factory=list)
    title: list[str] = field(default_factory=list)

    def add(self, doc: Document) -> int:
        self.source_index.append(doc.index)
        self.topic.append(doc.topic)
        self.title.append(doc.title)
        return len(self.source_index) - 1


@dataclass(frozen=True)
class Seq:
    index: int
    doc: int
    """Store-local document index."""
    ids: list[int]
    """Token ids including the leading BOS (when the tokenizer has one)."""
    first_stored: int
    """1 when ids[0] is BOS: its norm is orders of magnitude above the rest, so it is never stored."""


def iter_sequences(docs: Iterable[Document], tokenizer: Any, context: int, table: DocTable) -> Iterator[Seq]:
    """Cut each document into sequences of BOS + up to context-1 tokens; one document per sequence, so
    no token attends across a document boundary."""
    bos = tokenizer.bos_token_id
    body = context - 1 if bos is not None else context
    seq_index = 0
    doc_iter = iter(docs)
    while batch := list(islice(doc_iter, _TOKENIZE_DOCS)):
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(batch, encoded, strict=True):
            if not ids:
                continue
            local = table.add(doc)
            for start in range(0, len(ids), body):
                piece = ids[start:start + body]
                yield Seq(index=seq_index, doc=local, ids=([bos] if bos is not None else []) + piece,
                          first_stored=int(bos is not None))
                seq_index += 1
